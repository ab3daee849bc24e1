"""The RunPod target: pod settings rendered from a spec, and the bootstrap run for real.

The bootstrap (raytune_ft/launch/bootstrap.sh) is run as two "pods" on this machine: two processes with the
environment a RunPod Instant Cluster would give them (rank, node count, head address) through the
generic RTF_* overrides, each with its own Ray temp dir, one CPU and a custom resource naming its
rank. Rank 0's job is a Ray program that puts one task on each node and checks where they ran.
Every Ray process is ended in a finally, by process group and by its temp dir: never `ray stop`,
which would stop every Ray on the machine.
"""

from __future__ import annotations

import base64
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
import time
from pathlib import Path

import pytest
import yaml

from raytune_ft.errors import UserError
from raytune_ft.launch import runpod
from raytune_ft.launch.runpod import render_runpod
from raytune_ft.spec import load_spec, spec_from_dict
from tests.specs import base_doc

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP = REPO / "raytune_ft" / "launch" / "bootstrap.sh"
VENV_BIN = Path(sys.executable).parent
TOK = "tok-never-printed-4711"

# --------------------------------------------------------------------------- rendering


def test_runpod_preset_renders(monkeypatch, tmp_path):
    fake = "hf_FAKEsecretVALUE_runpod_77"
    monkeypatch.setenv("HF_TOKEN", fake)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake/aws/secret/77")
    spec = load_spec(REPO / "jobspecs" / "runpod.yaml")
    files = render_runpod(spec)
    assert set(files) == {"pod.json", "cluster.yaml", "entrypoint.sh", "README.md"}
    for text in files.values():
        assert fake not in text and "fake/aws/secret/77" not in text

    pod = json.loads(files["pod.json"])
    assert pod["imageName"] == "ghcr.io/raytune-ft/rtf:latest"
    assert pod["gpuTypeIds"] == ["NVIDIA H100 80GB HBM3"] and pod["gpuCount"] == 1
    assert pod["cloudType"] == "SECURE" and pod["volumeInGb"] == 200 and pod["containerDiskInGb"] == 50
    assert pod["volumeMountPath"] == "/workspace"
    env = pod["env"]
    # secrets by reference, in RunPod's documented syntax
    assert env["HF_TOKEN"] == "{{ RUNPOD_SECRET_hf_token }}"
    assert env["AWS_ACCESS_KEY_ID"] == "{{ RUNPOD_SECRET_aws_access_key_id }}"
    assert env["AWS_SECRET_ACCESS_KEY"] == "{{ RUNPOD_SECRET_aws_secret_access_key }}"
    assert env["RAY_AUTH_TOKEN"] == "{{ RUNPOD_SECRET_ray_auth_token }}" and env["RAY_AUTH_MODE"] == "token"
    assert env["RTF_NUM_NODES"] == "2"
    assert env["RTF_REQUIRED_ENV"].split() == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"]
    assert json.loads(env["RTF_RAY_RESOURCES"]) == {"accelerator_type:H100": 1}
    assert all(isinstance(v, str) for v in env.values())
    # the spec travels in the env (names only), and loads back to the same spec
    p = tmp_path / "spec.yaml"
    p.write_bytes(base64.b64decode(env["RTF_SPEC_B64"]))
    assert load_spec(p) == spec.model_copy(update={"extends": None})

    cluster = yaml.safe_load(files["cluster.yaml"])
    assert cluster["podCount"] == 2 and cluster["gpuCountPerPod"] == 1
    assert cluster["gpuType"] == "NVIDIA H100 80GB HBM3"
    assert sorted(cluster["secrets"]) == ["aws_access_key_id", "aws_secret_access_key", "hf_token", "ray_auth_token"]
    assert cluster["pod"] == pod
    assert files["entrypoint.sh"] == BOOTSTRAP.read_text()
    assert render_runpod(spec) == files  # deterministic


def test_the_bootstrap_exists_once_and_ships_with_the_package():
    assert runpod.bootstrap_script() == BOOTSTRAP.read_text()
    copies = [p for d in ("docker", "raytune_ft", "k8s", "bench") for p in (REPO / d).rglob("*.sh")
              if p.read_text(errors="replace").startswith("#!/usr/bin/env bash\n# raytune_ft bootstrap")]
    assert copies == [BOOTSTRAP], copies
    assert "launch/bootstrap.sh" in (REPO / "pyproject.toml").read_text()  # package data
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        assert f"COPY --chmod=0755 raytune_ft/launch/bootstrap.sh {runpod.ENTRYPOINT_PATH}" in (
            REPO / "docker" / dockerfile).read_text()


def _spec(**over):
    doc = base_doc(cluster={"image": "registry.example/rtf:1"}, storage={"path": "s3://bkt/runs"})
    doc.update(over)
    return spec_from_dict(doc)


def test_pod_count_defaults_and_checks():
    s = _spec(compute={"num_workers": 4, "gpus_per_worker": 1}, cluster={"image": "x", "runpod": {"gpu_count": 2}})
    pod = json.loads(render_runpod(s)["pod.json"])
    assert pod["env"]["RTF_NUM_NODES"] == "2" and pod["gpuCount"] == 2
    with pytest.raises(UserError, match="cluster.image"):
        render_runpod(_spec(cluster={}))
    with pytest.raises(UserError, match="4 GPU"):
        render_runpod(_spec(compute={"num_workers": 4, "gpus_per_worker": 1},
                            cluster={"image": "x", "runpod": {"gpu_count": 1, "pod_count": 2}}))
    with pytest.raises(UserError, match="shared storage"):
        render_runpod(_spec(compute={"num_workers": 2, "gpus_per_worker": 1}, storage={"path": "./rtf_runs"}))
    # one pod may keep checkpoints on its volume; literals stay literal
    one = json.loads(render_runpod(_spec(storage={"path": "./rtf_runs"}, env={"WANDB_MODE": "offline"}))["pod.json"])
    assert one["env"]["WANDB_MODE"] == "offline" and one["env"]["RTF_NUM_NODES"] == "1"


# --------------------------------------------------------------------------- the bootstrap, for real


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


JOB = r'''
import json, os, ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

ray.init(address="auto")  # RAY_ADDRESS, set by the bootstrap
alive = [n for n in ray.nodes() if n["Alive"]]
rank_of = {n["NodeID"]: r for n in alive for r in (0, 1) if n["Resources"].get(f"node_rank_{r}")}
assert len(alive) == 2 and len(rank_of) == 2, alive

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

# one task pinned to each node by its custom resource
pinned = ray.get([where.options(resources={f"node_rank_{r}": 0.01}).remote() for r in (0, 1)])
assert [rank_of[n] for n in pinned] == [0, 1], pinned

# and a STRICT_SPREAD placement group: one bundle per node
pg = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
ray.get(pg.ready(), timeout=60)
spread = ray.get([where.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
    placement_group=pg, placement_group_bundle_index=i)).remote() for i in (0, 1)])
assert len(set(spread)) == 2, spread
print("RTF_JOB_RESULT " + json.dumps({"pinned": pinned, "spread": spread, "auth": os.environ.get("RAY_AUTH_MODE")}))
'''


class Pods:
    """Bootstrap processes started by a test, each in its own session, and everything they spawn."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.temp_dirs: list[str] = []
        self.logs: list[Path] = []

    def env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RTF_"))}
        env.pop("NODE_RANK", None)
        env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", RTF_PYTHON=sys.executable,
                   PYTHONPATH=str(REPO), RTF_POLL_INTERVAL="1", RTF_STOP_TIMEOUT="15")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def temp_dir(self) -> str:
        # short: Ray's unix sockets live under it (108-byte path limit)
        d = tempfile.mkdtemp(prefix="rtfp", dir="/tmp")
        self.temp_dirs.append(d)
        return d

    def start(self, name: str, env: dict[str, str], *cmd: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs.append(log)
        with open(log, "wb") as fh:
            p = subprocess.Popen(["bash", str(BOOTSTRAP), *cmd], env=env, stdin=subprocess.DEVNULL,
                                 stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.tmp)
        self.procs.append(p)
        return p

    def output(self) -> str:
        return "\n".join(f"===== {p.name}\n{p.read_text(errors='replace')}" for p in self.logs if p.exists())

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.time() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        for pid in self.leftovers():  # Ray daemons outside our process groups, found by our temp dirs
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def leftovers(self) -> list[int]:
        import psutil

        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info.get("cmdline") or [])
            if any(d in cmd for d in self.temp_dirs):
                found.append(proc.info["pid"])
        return found


@pytest.fixture
def pods(tmp_path):
    p = Pods(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


def _wait(p: subprocess.Popen, timeout: float, pods: Pods) -> int:
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bootstrap did not finish within {timeout:.0f}s\n{pods.output()[-6000:]}")


def two_pods(pods: Pods, tmp_path: Path, job: str, token: str, rank1: dict | None = None,
             **common_extra) -> tuple[subprocess.Popen, subprocess.Popen]:
    """(rank 1, rank 0): two bootstrap pods on 127.0.0.1 forming a cluster, rank 0 running ``job`` (Python
    source). Each node has a resource naming its rank. The worker starts first: it must wait for the head."""
    gcs, dash, client, agent0, agent1 = _free_ports(5)
    (tmp_path / "job.py").write_text(job)
    common = dict(RAY_AUTH_TOKEN=token, RTF_HEAD_ADDRESS="127.0.0.1", RTF_NODE_IP="127.0.0.1",
                  RTF_RAY_PORT=gcs, RTF_NUM_NODES=2, RTF_NUM_CPUS=1, RTF_JOIN_TIMEOUT=60, **common_extra)
    worker = pods.start("rank1", pods.env(
        **common, RTF_NODE_RANK=1, RTF_RAY_TEMP_DIR=pods.temp_dir(), **(rank1 or {}),
        RTF_RAY_RESOURCES=json.dumps({"node_rank_1": 1}),
        RTF_RAY_START_ARGS=f"--dashboard-agent-listen-port {agent1}"))
    time.sleep(2)
    head = pods.start("rank0", pods.env(
        **common, RTF_NODE_RANK=0, RTF_RAY_TEMP_DIR=pods.temp_dir(), RTF_DASHBOARD_PORT=dash,
        RTF_RAY_RESOURCES=json.dumps({"node_rank_0": 1}),
        RTF_RAY_START_ARGS=f"--ray-client-server-port {client} --dashboard-agent-listen-port {agent0}"),
        sys.executable, str(tmp_path / "job.py"))
    return worker, head


@pytest.mark.ray
@pytest.mark.timeout(150)
def test_bootstrap_forms_a_two_node_cluster_and_runs_the_job(pods, tmp_path):
    token = secrets.token_hex(24)
    t0 = time.time()
    worker, head = two_pods(pods, tmp_path, JOB, token)

    head_rc = _wait(head, 110, pods)
    worker_rc = _wait(worker, 40, pods)
    out = pods.output()
    assert head_rc == 0 and worker_rc == 0, out[-6000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("RTF_JOB_RESULT ")]
    assert len(lines) == 1, out[-6000:]
    result = json.loads(lines[0].split(" ", 1)[1])
    assert len(set(result["pinned"])) == 2 and set(result["spread"]) == set(result["pinned"])
    assert result["auth"] == "token"
    assert "cluster formed: 2 node(s)" in out
    assert "the head reports the job finished (exit 0); leaving" in out
    assert token not in out  # never echoed, by the script or by `ray start`
    assert time.time() - t0 < 120
    time.sleep(0.5)
    assert pods.leftovers() == [], "Ray processes outlived the bootstrap"


DRAIN_JOB = r'''
import json, time, ray
ray.init()
rank1 = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node_rank_1" in n["Resources"])


@ray.remote(num_cpus=0, resources={"node_rank_1": 1})
class Worker:  # work on rank 1: Ray lets a drained node with nothing on it go at once
    def ping(self):
        return ray.get_runtime_context().get_node_id()


w = Worker.remote()
assert ray.get(w.ping.remote()) == rank1
print("RTF_JOB_READY", flush=True)
t0 = time.time()
while time.time() - t0 < 60:
    drained = ray._private.state.state.get_draining_nodes()  # what Ray Train's preemption watcher polls
    if rank1 in drained:
        alive = any(n["NodeID"] == rank1 and n["Alive"] for n in ray.nodes())
        print("RTF_DRAINED " + json.dumps({"deadline_in_s": (drained[rank1] - time.time() * 1000) / 1000,
                                           "alive": alive}), flush=True)
        break
    time.sleep(0.3)
'''


def test_the_drain_fails_in_seconds_with_its_reason():
    """The preStop hook's and the bootstrap's drain, without a reachable GCS or with a bad deadline: a one-line
    reason and exit 1 or 2 at once (a pod's grace period is short), never a traceback."""
    run = [sys.executable, "-m", "raytune_ft.launch.drain"]
    p = subprocess.run([*run, "--deadline", "5", "--address", f"127.0.0.1:{_free_ports(1)[0]}", "--no-wait"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 1 and "[rtf-drain] could not drain this node: the Ray GCS at 127.0.0.1:" in p.stderr
    assert "not reachable" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([*run, "--deadline", "0"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2 and "--deadline must be at least 1 second" in p.stderr


@pytest.mark.ray
@pytest.mark.timeout(150)
def test_a_worker_pods_sigterm_drains_its_node_as_preempted_before_ray_stops(pods, tmp_path):
    """A RunPod stop (or any SIGTERM) of a worker pod's bootstrap: before stopping Ray it drains its node with
    reason preemption and RTF_TERM_GRACE as the deadline, which is what Ray Train's preemption watcher reads (a
    training run then commits a just-in-time checkpoint: tests/test_multinode.py's last test), then exits 143
    once the deadline has passed."""
    token = secrets.token_hex(24)
    worker, head = two_pods(pods, tmp_path, DRAIN_JOB, token, RTF_LEAVE_TIMEOUT=30, rank1={"RTF_TERM_GRACE": 8})
    deadline = time.time() + 100
    while "RTF_JOB_READY" not in pods.output():
        assert time.time() < deadline and head.poll() is None, pods.output()[-6000:]
        time.sleep(0.5)
    worker.send_signal(signal.SIGTERM)  # the container's stop: its PID 1, the bootstrap
    worker_rc = _wait(worker, 60, pods)
    head_rc = _wait(head, 60, pods)
    out = pods.output()
    assert worker_rc == 143 and head_rc == 0, out[-6000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("RTF_DRAINED ")]
    assert len(lines) == 1, out[-6000:]
    seen = json.loads(lines[0].split(" ", 1)[1])
    assert seen["alive"] and 0 < seen["deadline_in_s"] <= 8, seen  # drained, with Ray still up on it
    assert "draining this node (reason preemption, deadline 8s) before Ray stops" in out
    assert re.search(r"\[rtf-drain\] drained node [0-9a-f]{12} \(reason preemption, deadline in 8s\)", out), out[-4000:]
    assert token not in out
    time.sleep(0.5)
    assert pods.leftovers() == [], "Ray processes outlived the bootstrap"


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_bootstrap_exit_code_missing_node_and_wrong_token(pods):
    token = secrets.token_hex(24)
    gcs, dash, client, agent = _free_ports(4)
    base = dict(RAY_AUTH_TOKEN=token, RTF_NODE_IP="127.0.0.1", RTF_RAY_PORT=gcs, RTF_NUM_CPUS=1,
                RTF_NODE_RANK=0, RTF_DASHBOARD_PORT=dash,
                RTF_RAY_START_ARGS=f"--ray-client-server-port {client} --dashboard-agent-listen-port {agent}")
    gcs2, dash2, client2, agent2, agent3 = _free_ports(5)
    # (all at once, to save time) two nodes expected but only the head comes: exit 3 with a clear
    # message and no job run; a node with the wrong token is turned away (exit 2); and one node
    # whose job exits 7: the bootstrap exits 7
    lonely = pods.start("lonely", pods.env(**base, RTF_NUM_NODES=2, RTF_JOIN_TIMEOUT=12, RTF_RAY_TEMP_DIR=pods.temp_dir()),
                        "bash", "-c", "echo JOB-RAN")
    intruder = pods.start("intruder", pods.env(
        RAY_AUTH_TOKEN="not-the-" + token[:8], RTF_HEAD_ADDRESS="127.0.0.1", RTF_NODE_IP="127.0.0.1",
        RTF_RAY_PORT=gcs, RTF_NUM_NODES=2, RTF_NODE_RANK=1, RTF_NUM_CPUS=1, RTF_JOIN_TIMEOUT=30,
        RTF_RAY_TEMP_DIR=pods.temp_dir(), RTF_RAY_START_ARGS=f"--dashboard-agent-listen-port {agent3}"))
    env = pods.env(**{**base, "RTF_RAY_PORT": gcs2, "RTF_DASHBOARD_PORT": dash2,
                      "RTF_RAY_START_ARGS": f"--ray-client-server-port {client2} --dashboard-agent-listen-port {agent2}"},
                   RTF_NUM_NODES=1, RTF_RAY_TEMP_DIR=pods.temp_dir())
    exit7 = pods.start("exit7", env, "bash", "-c", 'echo "addr=$RAY_ADDRESS"; exit 7')
    # and a pod stopped with SIGTERM while its job runs: the job gets the signal and its grace period
    # (here it takes 2 s to "checkpoint" and exits 0) before Ray is stopped; the bootstrap exits 143
    gcs3, dash3, client3, agent4 = _free_ports(4)
    marker = pods.tmp / "stopped-cleanly"
    job = (f"trap 'sleep 2; ray status >/dev/null 2>&1; echo ray-status=$? > {marker}; exit 0' TERM; "
           "echo JOB-READY; while :; do sleep 0.2; done")
    stopped = pods.start("sigterm", pods.env(**{**base, "RTF_RAY_PORT": gcs3, "RTF_DASHBOARD_PORT": dash3,
                                                "RTF_RAY_START_ARGS": f"--ray-client-server-port {client3} "
                                                                      f"--dashboard-agent-listen-port {agent4}"},
                                             RTF_NUM_NODES=1, RTF_TERM_GRACE=20, RTF_RAY_TEMP_DIR=pods.temp_dir()),
                         "bash", "-c", job)
    log = pods.tmp / "sigterm.log"
    deadline = time.time() + 120
    while "JOB-READY" not in log.read_text(errors="replace") and time.time() < deadline:
        time.sleep(0.5)
    assert "JOB-READY" in log.read_text(errors="replace"), pods.output()[-3000:]
    os.kill(stopped.pid, signal.SIGTERM)  # the bootstrap alone, as a container runtime signals PID 1
    assert _wait(stopped, 40, pods) == 143, pods.output()[-4000:]
    assert marker.read_text().strip() == "ray-status=0", pods.output()[-3000:]  # stopped on its own, Ray still up
    assert "waiting up to 20s for the job to stop" in pods.output()
    assert _wait(intruder, 45, pods) == 2, pods.output()[-4000:]
    assert _wait(lonely, 60, pods) == 3, pods.output()[-4000:]
    assert _wait(exit7, 60, pods) == 7, pods.output()[-4000:]
    out = pods.output()
    assert re.search(r"only [01] of 2 node\(s\) joined within 12s", out) and "JOB-RAN" not in out, out[-3000:]
    assert f"addr=127.0.0.1:{gcs2}" in out
    assert "rejected this node's Ray auth token" in out
    assert token not in out and "not-the-" not in out


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "no Ray auth token"),
        ({"RAY_AUTH_TOKEN": "{{ RUNPOD_SECRET_ray_auth_token }}"}, "RAY_AUTH_TOKEN holds a secret reference that was not resolved"),
        ({"RAY_AUTH_TOKEN": TOK, "RTF_REQUIRED_ENV": "HF_TOKEN"}, "HF_TOKEN is not set"),
        ({"RAY_AUTH_TOKEN": TOK, "RTF_REQUIRED_ENV": "HF_TOKEN", "HF_TOKEN": "{{ RUNPOD_SECRET_hf_token }}"}, "HF_TOKEN holds a secret reference"),
        ({"RAY_AUTH_TOKEN": TOK, "RTF_NODE_RANK": "1", "RTF_NUM_NODES": "2"}, "no head address"),
        ({"RAY_AUTH_TOKEN": TOK, "RTF_NODE_RANK": "2", "RTF_NUM_NODES": "2"}, "out of range"),
        ({"RAY_AUTH_TOKEN": TOK, "RTF_NUM_NODES": "two"}, "must be a non-negative integer"),
        ({"RAY_AUTH_TOKEN": TOK, "RTF_SPEC": "/nonexistent/spec.yaml"}, "job spec not found"),
    ],
    ids=["no-token", "unresolved-token", "missing-secret", "unresolved-secret", "no-head", "bad-rank", "bad-count", "no-spec"],
)
def test_bootstrap_refuses_bad_configuration_before_starting_ray(pods, env, message):
    p = pods.start("bad", pods.env(**env, RTF_RAY_TEMP_DIR=pods.temp_dir()))
    assert _wait(p, 20, pods) == 2
    out = pods.output()
    assert message in out, out
    assert "starting the Ray head" not in out
    if "RAY_AUTH_TOKEN" in env:
        assert env["RAY_AUTH_TOKEN"] not in out or env["RAY_AUTH_TOKEN"].startswith("{{")
