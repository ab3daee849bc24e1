"""`rtf` against a real two-node Ray cluster with token authentication, started here (two `ray start`
on this machine, each with its own temp dir and one CPU), through the Ray Jobs API:

* a missing, absent-on-the-wire and wrong token are each one line and exit 2;
* `rtf submit --address URL --follow` trains a tiny LoRA model with 2 workers under `strict_spread`
  (one per node) to success, with the live progress in the output, through a restart of the worker group
  (a worker SIGKILLed) after which `rtf logs` shows each line a worker printed once; a forwarded secret reaches both
  workers (its SHA-256 as each rank saw it) and appears nowhere else: not in the job's entrypoint,
  runtime_env or metadata (SDK and dashboard HTTP), not in `rtf logs`, not in any file of the run
  directory or of either node's Ray temp dir (logs, unpacked packages);
* a longer job: Ctrl-C on `--follow` detaches (the job runs on), `logs --follow` reattaches, `status`,
  `logs`, `jobs` report it (a forwarded value the job prints is masked in `--follow` and `logs`), a
  second submit of the running run is refused,
  `stop` ends it, and its first committed checkpoint is intact and committed;
* a bad data row fails on the cluster (driver preflight) with its file:line, exit 2, before any worker;
* the nodes are started as `.venv/bin/ray start` without the venv on PATH (so the `python` there has no
  Ray): the driver still runs, with the Python the raylet starts its workers with;
* local mode beside this running head (recorded in Ray's address file) starts its own Ray and trains;
* a spot reclaim (the worker node drained with reason preemption and a deadline): a just-in-time checkpoint,
  the restart counted as a preemption, not a failure, and an exact resume on a replacement node;
* elastic workers (`num_workers: {min: 1, max: 2}`): the worker node lost, the run goes on with one worker
  and the same global batch; a node joins, and at the next checkpoint it grows back to two, no step trained
  twice; each row once per epoch (the example-id log).

Cleanup kills only processes whose command line names this module's temp dirs (and their children)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.tiny import spec_doc, write_spec

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RTF = [sys.executable, "-m", "raytune_ft"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# The PATH the nodes are started with: this one without the venv (as after `.venv/bin/ray start` with the
# venv not activated), so the job supervisor's `python` is not the venv's.
HEAD_PATH = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                            if d and Path(d).resolve() not in (VENV_BIN.resolve(), Path(sys.prefix, "bin").resolve()))


def _base_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RTF_"))}
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


class TwoNodeCluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.token = "rtf-test-" + secrets.token_hex(16)
        self.temp_dirs: list[str] = []
        self.url = ""
        self.gcs = ""

    def _temp_dir(self) -> str:
        d = tempfile.mkdtemp(prefix="rtfmn", dir="/tmp")  # short: Ray's socket paths are limited
        self.temp_dirs.append(d)
        return d

    def _ray_start(self, *args: str) -> None:
        # the GCS asks each raylet every second and marks a node dead after 5 unanswered asks (Ray's defaults:
        # every 3 s, after 5): a lost node is known in seconds, not half a minute
        env = _base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, PATH=HEAD_PATH,
                        RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="5000",
                        RAY_health_check_failure_threshold="5")
        p = subprocess.run([str(VENV_BIN / "ray"), "start", "--disable-usage-stats", "--num-cpus", "1",
                            "--object-store-memory", str(200 * 1024 * 1024), "--node-ip-address", "127.0.0.1",
                            "--temp-dir", self._temp_dir(), *args], env=env, cwd=self.tmp, stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=120, start_new_session=True)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        assert self.token not in p.stdout + p.stderr

    def start(self) -> None:
        gcs, dash, client, agent0, agent1 = _free_ports(5)
        self._ray_start("--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent0))
        self.url = f"http://127.0.0.1:{dash}"
        self.gcs = f"127.0.0.1:{gcs}"
        self._ray_start("--address", f"127.0.0.1:{gcs}", "--dashboard-agent-listen-port", str(agent1))
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if len(self.node_ids()) == 2:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"the second node did not join: {self.node_ids()}")

    def get(self, path: str, token: str | None = None) -> str:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token or self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read().decode()

    def node_ids(self) -> set[str]:
        data = json.loads(self.get("/api/v0/nodes?limit=100"))
        return {n["node_id"] for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"}

    def env(self, **extra) -> dict[str, str]:
        return _base_env(RAY_AUTH_TOKEN=self.token, **extra)

    def rtf(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> tuple[int, str]:
        p = subprocess.run([*RTF, *args], env=env or self.env(), cwd=self.tmp, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
        return p.returncode, p.stdout + p.stderr

    def processes(self) -> list:
        import psutil

        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(d in a for d in self.temp_dirs for a in (proc.info.get("cmdline") or [])):
                found[proc.pid] = proc
                try:
                    for c in proc.children(recursive=True):
                        found[c.pid] = c
                except psutil.NoSuchProcess:
                    pass
        return list(found.values())

    def stop(self) -> None:
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=5)
        for p in alive + self.processes():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = TwoNodeCluster(tmp_path_factory.mktemp("mn"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


class Follow:
    """`rtf submit ... --follow` in the background, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.p = subprocess.Popen([*RTF, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, stdin=subprocess.DEVNULL)
        self.lines: list[str] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match:
        """The first match of ``pattern`` in the output from offset ``start`` on (its positions in the whole)."""
        end, rx = time.time() + timeout, re.compile(pattern)
        while time.time() < end:
            m = rx.search(self.text, start)
            if m:
                return m
            if self.p.poll() is not None:
                self.t.join(5)
                m = rx.search(self.text, start)
                if m:
                    return m
                break
            time.sleep(0.3)
        raise AssertionError(f"{pattern!r} not seen in:\n{self.text[-5000:]}")

    def finish(self, timeout: float) -> int:
        try:
            code = self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise AssertionError(f"rtf did not finish within {timeout:.0f}s:\n{self.text[-5000:]}")
        self.t.join(10)
        return code


SECRET = "rtf-secret-" + secrets.token_urlsafe(24)


MN_STEPS, MN_SAVE = 60, 5


@pytest.fixture(scope="module")
def trained(cluster, tiny, tmp_path_factory):
    """One real job: 2 LoRA workers spread over the 2 nodes, with a forwarded secret. Rank 1's process is
    killed (SIGKILL) once the first checkpoint is committed, so Ray Train restarts the worker group once
    (``max_failures: 1``), the new group resumes from the latest committed checkpoint, and the job runs to
    success."""
    train, _, model_dir = tiny
    tmp = tmp_path_factory.mktemp("mnjob")
    doc = spec_doc("mn-lora", model_dir, train, None, tmp / "runs",
                   compute={"num_workers": 2, "cpus_per_worker": 1, "placement": "strict_spread"},
                   training={"max_steps": MN_STEPS, "save_steps": MN_SAVE, "logging_steps": 1},
                   fault_tolerance={"max_failures": 1},
                   env={"RTF_TEST_SECRET": None, "RTF_ENV_DIGESTS": "RTF_TEST_SECRET", "RTF_TEST_LITERAL": "plain"})
    spec = write_spec(tmp / "mn.yaml", doc)
    t0 = time.time()
    f = Follow(["submit", str(spec), "--address", cluster.url, "--follow"], cluster.env(RTF_TEST_SECRET=SECRET), tmp)
    rank1 = f.wait_for(r"workers: rank 0 pid \d+ node \S+, rank 1 pid (\d+)", 200).group(1)
    f.wait_for(f"checkpoint committed: step {MN_SAVE}\\b", 120)
    os.kill(int(rank1), signal.SIGKILL)  # a real worker process dies mid-run, after a committed checkpoint
    killed_at = re.findall(rf"\] (\d+)/{MN_STEPS}  loss", f.text)
    code = f.finish(300)
    job_id = re.search(r"job: (rtf-mn-lora-\S+) submitted", f.text)
    return {"code": code, "out": f.text, "job": job_id and job_id.group(1), "run": tmp / "runs" / "mn-lora",
            "seconds": time.time() - t0, "killed_at": int(killed_at[-1]) if killed_at else 0}


# --------------------------------------------------------------------------- authentication


@pytest.mark.timeout(120)
def test_token_missing_or_refused_is_one_line_exit_2(cluster, tmp_path):
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    cases = [
        (_base_env(HOME=home), "error: no Ray auth token for " + cluster.url),
        (_base_env(HOME=home, RTF_ALLOW_NO_AUTH=1),
         f"error: the Ray cluster at {cluster.url} requires a Ray auth token (401 Unauthorized)"),
        (_base_env(RAY_AUTH_TOKEN="wrong-" + cluster.token[:6]),
         f"error: the Ray cluster at {cluster.url} refused the auth token from $RAY_AUTH_TOKEN (403 Forbidden)"),
    ]
    for env, expected in cases:
        code, out = cluster.rtf("jobs", "--address", cluster.url, env=env)
        assert code == 2, out
        assert out.strip().splitlines() == [out.strip().splitlines()[0]] and out.startswith(expected), out
        assert "Traceback" not in out and cluster.token not in out and "wrong-" not in out
    from raytune_ft.launch.ray_jobs import checks_tokens

    assert checks_tokens(cluster.url) is True  # this cluster turns tokenless requests away
    # a token in a file named by RAY_AUTH_TOKEN_PATH is accepted
    tok = tmp_path / "token"
    tok.write_text(cluster.token + "\n")
    code, out = cluster.rtf("jobs", "--address", cluster.url, env=_base_env(HOME=home, RAY_AUTH_TOKEN_PATH=tok))
    assert code == 0, out


# --------------------------------------------------------------------------- the two-node training job


@pytest.mark.timeout(420)  # includes the fixture: the cluster, the job and its restarted worker group
def test_submit_follow_trains_on_both_nodes(cluster, trained):
    out = trained["out"]
    assert trained["code"] == 0, out[-6000:]
    assert f"mode: Ray cluster, Jobs API at {cluster.url} (--address was given)" in out
    assert trained["job"], out
    assert f"storage: {trained['run']}" in out
    assert "secrets: RTF_TEST_SECRET forwarded sealed" in out
    # the live progress, as in local mode, parsed from the driver's RTF_EVENT lines
    assert "storage preflight:" in out and "workers: rank 0 pid" in out
    assert re.search(rf"\] \d+/{MN_STEPS}  loss \d", out) and f"checkpoint committed: step {MN_SAVE} " in out
    assert "RTF_EVENT" not in out and "final train loss" in out and f"job {trained['job']} SUCCEEDED" in out
    # the restarted group's line says so: "workers restarted (attempt 2 of 2): rank 0 pid ..."
    groups = re.findall(r"workers(?: restarted \(attempt \d+ of \d+\))?: rank 0 pid (\d+) node \S+, rank 1 pid (\d+)",
                        out)
    assert len(groups) == 2 and not set(groups[0]) & set(groups[1]), groups  # the worker group was restarted
    assert "workers restarted (attempt 2 of 2)" in out and "no restarts left" not in out
    # the new group resumed from a committed checkpoint, and the steps after it that the first group had
    # trained logged the same losses again: the resume was exact (the losses of a run that started over would
    # repeat from step 1)
    resumed = int(re.search(r"resuming from \S+checkpoint-\d+ at step (\d+)", out).group(1))
    assert resumed >= MN_SAVE and resumed % MN_SAVE == 0, out[-5000:]
    losses: dict[int, list[str]] = {}
    for step, loss in re.findall(rf"\] (\d+)/{MN_STEPS}  loss (\S+)", out):
        losses.setdefault(int(step), []).append(loss)
    twice = {st: v for st, v in losses.items() if len(v) > 1}
    assert not [st for st in twice if st <= resumed], "a step before the resume was trained again"
    assert all(len(set(v)) == 1 for v in twice.values()), twice
    steps = [json.loads(x)["step"] for x in (trained["run"] / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, MN_STEPS + 1)), steps  # each step once in the run's metrics

    results = json.loads((trained["run"] / "final" / "final_results.json").read_text())
    assert results["steps"] == MN_STEPS
    workers = sorted(results["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    assert {w["node_id"] for w in workers} == cluster.node_ids()  # one worker on each of the two nodes
    digest = hashlib.sha256(SECRET.encode()).hexdigest()
    for w in workers:  # every rank, on both nodes, saw the secret's exact value
        assert w["forwarded_env"] == ["RTF_TEST_SECRET"] and w["env_digests"] == {"RTF_TEST_SECRET": digest}
    # rtf was shipped (py_modules) and unpacked on both nodes, not taken from an install there
    for d in cluster.temp_dirs:
        assert list(Path(d).glob("session_*/runtime_resources/py_modules_files/*/raytune_ft/launch/ray_jobs.py")), d
    print(f"two-node job: {trained['seconds']:.0f}s; rank 1 killed near step {trained['killed_at']}, resumed from "
          f"{resumed}, {len(twice)} steps trained twice with equal losses")


@pytest.mark.timeout(120)
def test_secret_value_appears_nowhere_but_the_workers(cluster, trained):
    assert trained["code"] == 0 and trained["job"], trained["out"][-3000:]
    job = trained["job"]
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.url, headers={"Authorization": f"Bearer {cluster.token}"})
    info = client.get_job_info(job)
    payload = json.dumps({"entrypoint": info.entrypoint, "runtime_env": info.runtime_env, "metadata": info.metadata})
    assert SECRET not in payload
    assert info.metadata["rtf_forwarded_env"] == "RTF_TEST_SECRET"
    assert info.runtime_env["working_dir"].startswith("gcs://")
    assert info.runtime_env["env_vars"]["RTF_TEST_LITERAL"] == "plain"  # literals travel in plain sight
    assert "RTF_TEST_SECRET" not in info.runtime_env["env_vars"]
    # what the dashboard serves: the job list, and the actors (their runtime_env included)
    jobs_http = cluster.get("/api/jobs/")
    assert job in jobs_http and SECRET not in jobs_http
    actors_http = cluster.get("/api/v0/actors?limit=1000&detail=true")
    assert "TrainController" in actors_http and SECRET not in actors_http
    # rtf logs, run where the secret is not set (so nothing could be masked)
    code, logs = cluster.rtf("logs", job, "--address", cluster.url)
    assert code == 0 and f"checkpoint committed: step {MN_STEPS}" in logs and SECRET not in logs
    assert SECRET not in trained["out"]
    # no file of the run, nor of either node's Ray temp dir (logs, unpacked bundle), holds it
    needle = SECRET.encode()
    checked = 0
    for root in [trained["run"], *map(Path, cluster.temp_dirs)]:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and not path.is_socket():
                try:
                    assert needle not in path.read_bytes(), path
                except OSError:
                    continue
                checked += 1
    sealed = list(Path(cluster.temp_dirs[1]).glob("session_*/runtime_resources/working_dir_files/*/rtf_secrets.sealed"))
    assert sealed, "the worker node received the sealed bundle"
    assert checked > 50


@pytest.mark.timeout(120)
def test_logs_show_each_worker_line_once_after_a_restart(cluster, trained):
    """`rtf logs` of the job whose worker group restarted: every line a worker printed (HF's log of each
    step, forwarded by Ray from the worker's node to the job's driver) appears once, not once per print
    patch, node or worker group."""
    assert trained["code"] == 0 and trained["job"], trained["out"][-3000:]
    code, logs = cluster.rtf("logs", trained["job"], "--address", cluster.url)
    assert code == 0, logs
    assert len(re.findall(r"^workers(?: restarted \(attempt \d+ of \d+\))?: rank 0 pid", logs, re.M)) == 2, \
        logs[-4000:]  # both groups' workers (the second one marked as restarted)
    printed = re.findall(r"^\(RayTrainWorker pid=\d+[^)]*\) \{'(?:loss|train_runtime)'.*$", logs, re.M)
    assert len(printed) >= 5, logs[-4000:]  # the second group's steps and the summary at least
    repeated = {line: n for line, n in Counter(printed).items() if n > 1}
    assert not repeated, repeated
    # and rank 0 printed them alone: one process per worker group (HF prints on each node's first process)
    assert len({line.split(")", 1)[0] for line in printed}) <= 2, printed


# --------------------------------------------------------------------------- detach, status, logs, jobs, stop


@pytest.mark.timeout(300)
def test_detach_status_logs_jobs_stop_keeps_the_checkpoint(cluster, trained, tiny, tmp_path):
    import pyarrow.fs as pafs

    from raytune_ft import checkpoints as ck

    train, _, model_dir = tiny
    doc = spec_doc("mn-long", model_dir, train, None, tmp_path / "runs", training={"max_steps": 2000, "save_steps": 3},
                   env={"RTF_TEST_SHOWN": None})
    doc["storage"]["keep_checkpoints"] = 1000  # nothing pruned: the first checkpoint must still be there
    spec = write_spec(tmp_path / "long.yaml", doc)
    # a forwarded value the job itself prints: the model path, in the worker's "model: pretrained PATH" event
    shown = str(model_dir)
    env = cluster.env(RTF_TEST_SHOWN=shown)
    f = Follow(["submit", str(spec), "--address", cluster.url], env, tmp_path)
    job = f.wait_for(r"job: (rtf-mn-long-\S+) submitted", 60).group(1)
    f.wait_for(r"checkpoint committed: step 3 ", 200)
    f.p.send_signal(signal.SIGINT)  # Ctrl-C: detach, the job runs on
    assert f.finish(30) == 130, f.text[-3000:]
    assert f"detached: job {job} keeps running" in f.text and f"rtf logs {job} --follow" in f.text
    assert "model: pretrained ***;" in f.text and shown not in f.text, f.text[-3000:]  # masked in --follow

    reattach = Follow(["logs", job, "--follow", "--address", cluster.url], env, tmp_path)
    reattach.wait_for(r"checkpoint committed: step 3 .*\n.*\] \d+/2000  loss", 60)  # the same live view
    reattach.p.send_signal(signal.SIGINT)
    assert reattach.finish(30) == 130 and f"detached: job {job} keeps running" in reattach.text
    assert "model: pretrained ***;" in reattach.text and shown not in reattach.text

    code, out = cluster.rtf("status", job, "--address", cluster.url)
    assert code == 0 and re.search(r"status:\s+RUNNING", out), out
    assert re.search(r"progress:\s+\d+/2000", out) and f"storage:  {tmp_path / 'runs' / 'mn-long'}" in out
    code, out = cluster.rtf("jobs", "--address", cluster.url)
    assert code == 0, out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines()[1:]}
    assert rows[job][1:3] == ["mn-long", "RUNNING"] and re.match(r"\d+/2000", rows[job][-1])
    assert rows[trained["job"]][1:3] == ["mn-lora", "SUCCEEDED"] and rows[trained["job"]][-1] == f"{MN_STEPS}/{MN_STEPS}"
    code, out = cluster.rtf("logs", "mn-long", "--address", cluster.url, env=env)  # a run name: its newest job
    assert code == 0 and "checkpoint committed: step 3 →" in out and "RTF_EVENT" not in out
    assert "model: pretrained ***;" in out and shown not in out  # masked in logs, as in --follow
    code, out = cluster.rtf("submit", str(spec), "--address", cluster.url, env=env)  # one driver per run dir
    assert code == 2 and f"run mn-long is already RUNNING on this cluster as job {job}" in out, out

    code, out = cluster.rtf("stop", job, "--address", cluster.url)
    assert code == 0 and f"job {job} STOPPED" in out and "Committed checkpoints" in out, out
    code, out = cluster.rtf("status", job, "--address", cluster.url)
    assert re.search(r"status:\s+STOPPED", out), out
    code, out = cluster.rtf("stop", job, "--address", cluster.url)
    assert code == 0 and "already STOPPED" in out

    infos = ck.list_checkpoints(pafs.LocalFileSystem(), str(tmp_path / "runs" / "mn-long"), deep=True)
    by_step = {i.step: i for i in infos}
    assert by_step[3].committed, by_step[3].reason
    assert all(i.committed or i.step > max(s for s, j in by_step.items() if j.committed) for i in infos)
    # the stopped run's last step is well short of the end: it was stopped, not finished
    assert not (tmp_path / "runs" / "mn-long" / "final").exists()
    code, out = cluster.rtf("logs", job, "--address", cluster.url)  # the driver said why it ended
    assert "stopped: training stopped; committed checkpoints are intact" in out, out[-3000:]


@pytest.mark.timeout(120)
def test_a_bad_data_row_fails_on_the_cluster_with_its_line_and_exit_2(cluster, tiny, tmp_path):
    _, _, model_dir = tiny
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 5}\n')
    spec = write_spec(tmp_path / "bad.yaml", spec_doc("mn-bad", model_dir, data, None, tmp_path / "runs"))
    code, out = cluster.rtf("submit", str(spec), "--address", cluster.url, "--follow", timeout=100)
    assert code == 2, out
    assert re.search(r"error: .*bad\.jsonl:2:", out) and "Traceback" not in out, out
    assert re.search(r"job rtf-mn-bad-\S+ FAILED \(driver exit code 2\)", out), out
    assert not (tmp_path / "runs" / "mn-bad").exists()  # stopped before anything was written


# --------------------------------------------------------------------------- the machine's history


@pytest.mark.timeout(300)  # the first test to ask for `trained` waits for it
def test_the_driver_runs_with_the_clusters_python_though_path_has_none(cluster, trained):
    """The nodes' PATH has no `python` with Ray (the condition that broke `python -m ...` entrypoints);
    the two-node job succeeded all the same, its driver started with the raylet's Python."""
    p = subprocess.run(["python", "-c", "import ray"], env=_base_env(PATH=HEAD_PATH), capture_output=True)
    assert p.returncode != 0, "the nodes' PATH has a python with Ray: this test would show nothing"
    assert trained["code"] == 0, trained["out"][-3000:]
    from ray.job_submission import JobSubmissionClient

    from raytune_ft.launch.ray_jobs import PICK_PYTHON

    info = JobSubmissionClient(cluster.url, headers={"Authorization": f"Bearer {cluster.token}"}).get_job_info(
        trained["job"])
    assert info.entrypoint.startswith(PICK_PYTHON) and str(info.status) == "SUCCEEDED"


@pytest.mark.timeout(300)
def test_local_mode_beside_a_running_head_starts_its_own_ray(cluster, tiny, tmp_path):
    from tests.test_local_mode import local_run, tiny_spec

    code, out, address_file = local_run(tiny_spec("beside", tiny, tmp_path), cluster.gcs, tmp_path,
                                        RTF_IN_PROCESS="0")  # a worker group: the Ray it starts is its own
    assert code == 0, out[-4000:]
    assert "ray: started a new embedded Ray" in out
    assert f"ray: not the Ray head at {cluster.gcs} recorded in {address_file} (running or stale)" in out
    results = json.loads((tmp_path / "runs" / "beside" / "final" / "final_results.json").read_text())
    assert results["steps"] == 2
    assert {w["node_id"] for w in results["workers"]}.isdisjoint(cluster.node_ids())  # not on the head's nodes


# --------------------------------------------------------------------------- preemption (runs last: it replaces a node)

DEADLINE_S = 15  # the drain's deadline


@pytest.mark.timeout(600)
def test_a_preempted_node_gets_a_checkpoint_before_it_goes_and_the_run_resumes(cluster, tiny, tmp_path):
    """A spot reclaim as Ray sees it: the worker node is drained with reason preemption and a DEADLINE_S
    deadline (what the autoscaler does on a cloud's notice; `ray drain-node` by hand) after the first periodic
    checkpoint. The workers commit a checkpoint at the next step they ask (about every second here), before the
    deadline, and train on. Ray Train ends the group at the deadline and restarts it from the latest committed
    checkpoint once nodes are free, with `max_failures: 0` (a preemption is not a failure); the node is then
    killed, as the cloud takes it, and a replacement started. (Killed before the deadline, the node's end raced
    Ray Train's classification: the surviving rank's collective error could arrive first, and the attempt then
    counted as a failure.) The steps trained twice (after that checkpoint until the deadline, then again after
    the restart) log the same losses both times: the resume is exact (no second, uninterrupted run is needed
    to show it; test_resume.py compares against one for the other interruptions)."""
    train, _, model_dir = tiny
    save_steps, max_steps = 25, 400  # still training at the deadline (about 11 steps/s here); several per checkpoint
    t0 = time.time()

    def spec(name: str) -> Path:
        return write_spec(tmp_path / f"{name}.yaml", spec_doc(
            name, model_dir, train, None, tmp_path / "runs",
            compute={"num_workers": 2, "cpus_per_worker": 1, "placement": "strict_spread"},
            training={"max_steps": max_steps, "save_steps": save_steps, "logging_steps": 1},
            fault_tolerance={"max_failures": 0}))

    worker_node = next(n["node_id"] for n in json.loads(cluster.get("/api/v0/nodes?limit=100"))["data"]["result"]["result"]
                       if n["state"] == "ALIVE" and not n["is_head_node"])
    worker_dir = cluster.temp_dirs[1]
    f = Follow(["submit", str(spec("spot")), "--address", cluster.url, "--follow"], cluster.env(), tmp_path)
    f.wait_for(f"checkpoint committed: step {save_steps}\\b", 240)
    p = subprocess.run([str(VENV_BIN / "ray"), "drain-node", "--address", cluster.gcs, "--node-id", worker_node,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                        "--deadline-remaining-seconds", str(DEADLINE_S)], env=cluster.env(RAY_AUTH_MODE="token"),
                       capture_output=True, text=True, timeout=60)
    t_drain = time.time()
    print(f"preemption: drained after {t_drain - t0:.0f}s")
    assert p.returncode == 0, p.stdout + p.stderr
    # Ray Train's watcher polls drains every 5 s; the ranks on the drained node are those it names
    m = f.wait_for(r"preemption notice for node (\w+) \(rank ([01])\), deadline in (\d+)s: committing a checkpoint "
                   r"at step (\d+), then training on \(the last checkpoint took [\d.]+s\)", 60)
    assert worker_node.startswith(m.group(1)) and 0 < int(m.group(3)) <= DEADLINE_S
    jit = int(m.group(4))
    f.wait_for(f"checkpoint committed: step {jit}\\b", DEADLINE_S)
    assert time.time() < t_drain + DEADLINE_S, "the just-in-time checkpoint came after the deadline"
    print(f"preemption: checkpoint at step {jit} committed {time.time() - t_drain:.0f}s after the drain")
    assert jit < max_steps, f.text[-3000:]
    # Ray Train ends the group at the deadline, as a preemption; then the node goes, and a replacement joins
    f.wait_for(r"node preempted \(attempt 1 of 2 ended", DEADLINE_S + 60)
    assert f"/{max_steps}  loss" in f.text and f"] {max_steps}/{max_steps}" not in f.text  # it was still training
    import psutil

    def cmdline(p) -> list[str]:  # a process may end between the listing and this read
        try:
            return p.cmdline() or []
        except psutil.Error:
            return []

    for proc in [p for p in cluster.processes() if any(worker_dir in a for a in cmdline(p))]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    cluster._ray_start("--address", cluster.gcs, "--dashboard-agent-listen-port", str(_free_ports(1)[0]))
    code = f.finish(400)
    out = f.text
    (tmp_path / "submit.out").write_text(out)  # kept for a failure's post-mortem
    assert code == 0, out[-6000:]
    assert "SUCCEEDED" in out  # (the last step's progress line can come after the summary, or not at all)
    # the group Ray Train ended at the deadline is a preemption, not a failure (max_failures is 0)
    assert re.search(r"node preempted \(attempt 1 of 2 ended: .*\); Ray Train restarts the workers from the last "
                     r"committed checkpoint once nodes are free \(preemption 1 of unlimited", out), out[-5000:]
    assert "workers restarted (attempt 2 of 2)" in out and "no restarts left" not in out
    run = tmp_path / "runs" / "spot"
    import pyarrow.fs

    from raytune_ft import checkpoints as ck

    committed = [i.step for i in ck.list_checkpoints(pyarrow.fs.LocalFileSystem(), str(run)) if i.committed]
    assert committed, out[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == sorted(set(steps)) and steps[-1] == max_steps, steps  # each step logged once
    results = json.loads((run / "final" / "final_results.json").read_text())
    assert results["steps"] == max_steps

    # the steps trained twice log the same losses: the restart resumed exactly from the latest committed checkpoint
    # (the just-in-time one, or a periodic one after it; when the deadline fell right after a commit, no step
    # was trained twice, and the steps logged once each show the resume)
    losses: dict[int, list[str]] = {}
    for step, loss in re.findall(rf"\] (\d+)/{max_steps}  loss (\S+)", out):
        losses.setdefault(int(step), []).append(loss)
    twice = {s: v for s, v in losses.items() if len(v) > 1}
    resumed = int(re.search(r"resumed from step +(\d+)", out).group(1))  # the JIT one, or a periodic one after it
    assert resumed >= jit, out[-3000:]
    assert (not twice or min(twice) == resumed + 1) and all(len(set(v)) == 1 for v in twice.values()), twice
    assert not [s for s, v in losses.items() if s <= resumed and len(v) > 1], "a step before the resume was redone"
    print(f"preemption: just-in-time checkpoint at step {jit}, resumed from {resumed}, {len(twice)} steps redone "
          f"with equal losses; {time.time() - t0:.0f}s in all")


# --------------------------------------------------------------------------- elastic workers (runs last: it loses a node)


@pytest.mark.timeout(600)
def test_elastic_workers_shrink_to_one_node_and_grow_back_with_the_same_global_batch_and_order(cluster, tiny,
                                                                                                   tmp_path):
    """`compute.num_workers: {min: 1, max: 2}` under strict_spread: 2 workers, one per node. The worker node is
    lost (its processes killed) after a checkpoint: Ray Train restarts the run from the latest checkpoint on the
    one node left, with 1 worker and twice the accumulation, so the global batch stays 4 rows. Then a node
    joins: at the first checkpoint after Ray sees it, the workers stop once it is committed and the run starts
    again from it with 2 workers; no step is trained twice. The example-id log (monitoring.log_examples) shows
    each step once, 4 rows a step, each row once per epoch, and each step's rows the ones a fixed-size run
    takes: the seeded sampler's permutation of the epoch, 4 rows a step, whatever the worker count. Checkpoints
    upload asynchronously (`storage.upload: async`), from both workers, and the grow waits for its commit."""
    import torch

    train, _, model_dir = tiny
    # 16 steps an epoch (4 rows a step), 12 epochs: the 1-worker phase outlasts Ray's notice of the new node
    n_rows, per, steps, save = 64, 2, 192, 8
    if len(cluster.node_ids()) < 2:  # the preemption test left a replacement; on its own, start one
        cluster._ray_start("--address", cluster.gcs, "--dashboard-agent-listen-port", str(_free_ports(1)[0]))
    doc = spec_doc(
        "elastic", model_dir, train, None, tmp_path / "runs",
        compute={"num_workers": {"min": 1, "max": 2}, "cpus_per_worker": 1, "placement": "strict_spread"},
        training={"max_steps": steps, "per_device_train_batch_size": per, "save_steps": save, "logging_steps": 1},
        monitoring={"log_examples": True}, fault_tolerance={"max_failures": 1},
        # Ray Train's elastic policy first retries at the old size while Ray still counts the lost node (it
        # is told of the loss by the workers before the GCS marks the node dead), until its worker-group start
        # timeout (60 s by default), then starts what fits
        env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5"})
    doc["storage"]["upload"] = "async"  # each worker's upload in flight beside training; committed before a grow
    spec = write_spec(tmp_path / "elastic.yaml", doc)
    f = Follow(["submit", str(spec), "--address", cluster.url, "--follow"], cluster.env(), tmp_path)
    # 2 workers from the start, or from the first checkpoint: Ray Train sizes a new group from Ray's
    # AutoscalingCoordinator, whose own view of the nodes lags up to 20 s (and which may still hold a reservation
    # of the run before), so a run submitted right after a node joined can start with 1 and grow at once
    two = f.wait_for(r"workers: rank 0 pid \d+ node \S+, rank 1 pid \d+", 240)
    f.wait_for(r"checkpoint committed: step \d+", 120, start=two.end())  # a checkpoint of the 2-worker group
    import psutil

    for proc in psutil.process_iter():  # every process of the worker nodes (not drained: lost)
        try:
            if any(d in a for d in cluster.temp_dirs[1:] for a in proc.cmdline()):
                proc.kill()
        except psutil.Error:
            pass
    t_kill = time.time()
    shrunk = f.wait_for(r"workers restarted \(attempt 2 of 2\): rank 0 pid \d+ node \S+ \(1 of 2 workers, "
                        r"elastic\)\n", 300, start=two.end())
    print(f"elastic: restarted {time.time() - t_kill:.0f}s after the node was lost")
    cluster._ray_start("--address", cluster.gcs, "--dashboard-agent-listen-port", str(_free_ports(1)[0]))
    t_node = time.time()
    m = f.wait_for(r"elastic: Ray has room for 2 workers \(1 now\): the workers stop at the checkpoint of step "
                   r"(\d+), and the run starts again from it with more", 200, start=shrunk.end())
    print(f"elastic: growing at step {m.group(1)}, {time.time() - t_node:.0f}s after a node joined")
    code = f.finish(400)
    out = f.text
    (tmp_path / "submit.out").write_text(out)  # kept for a failure's post-mortem
    print(f"elastic: finished {time.time() - t_node:.0f}s after a node joined")
    assert code == 0, out[-6000:]
    grown, at = int(m.group(1)), m.start()
    after = out[at:]
    shrunk_text = out[shrunk.start():at]  # the 1-worker group's
    assert "global batch 4 = 2 per worker × 1 accumulation × 2 workers (elastic, 1-2 workers" in out[two.start():
                                                                                                    shrunk.start()]
    assert "global batch 4 = 2 per worker × 2 accumulation × 1 workers (elastic, 1-2 workers" in shrunk_text
    # grown at a checkpoint the 1-worker group committed before the stop, and started again from it, with 2
    assert grown % save == 0 and grown < steps and f"checkpoint committed: step {grown} →" in shrunk_text
    assert f"elastic: starting the workers again from step {grown} (as many as Ray has room for, up to 2)" in after
    assert re.search(r"\nworkers: rank 0 pid \d+ node \S+, rank 1 pid \d+", after), after[:4000]
    assert "global batch 4 = 2 per worker × 1 accumulation × 2 workers (elastic, 1-2 workers" in after, after[:4000]
    # since the loss: resumed from a committed checkpoint (a multiple of save_steps), then at the grow
    resumes = [int(x) for x in re.findall(r"resuming from \S+ at step (\d+)", out[shrunk.start():])]
    assert len(resumes) == 2 and save <= resumes[0] < grown and resumes[0] % save == 0 and resumes[1] == grown, resumes
    # no step trained twice at the grow: the steps after it start right after the checkpoint it stopped at
    assert min(int(s) for s in re.findall(rf"\] (\d+)/{steps}  loss", after)) == grown + 1, after[:4000]
    run = tmp_path / "runs" / "elastic"
    results = json.loads((run / "final" / "final_results.json").read_text())
    assert results["steps"] == steps and results["resumed_from_step"] == grown
    assert len(results["workers"]) == 2, results["workers"]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    took = {r["step"]: r["examples"] for r in records if "examples" in r}
    assert sorted(took) == list(range(1, steps + 1)) and len(took) == sum("examples" in r for r in records)
    for epoch in range(steps * per * 2 // n_rows):
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(7 + epoch)).tolist()
        for i in range(n_rows // (per * 2)):
            step = epoch * n_rows // (per * 2) + i + 1
            assert took[step] == sorted(order[4 * i:4 * i + 4]), (step, took[step])
        assert sorted(r for s, rows in took.items() if (s - 1) // 16 == epoch for r in rows) == list(range(n_rows))
