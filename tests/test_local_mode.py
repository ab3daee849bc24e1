"""Local mode does not depend on the machine's history: with Ray's address file left behind by a head that
died (``ray_current_cluster`` in Ray's temp dir, here a throwaway one named by ``$RAY_TMPDIR``), ``rtf submit``
still starts its own embedded Ray, trains, and says it did not use the recorded head. (A *running* head is
the same test in test_multinode.py, on its real cluster.) And the word ``local`` picks local mode."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from raytune_ft.launch.targets import choose_target
from raytune_ft.spec import spec_from_dict
from tests.tiny import spec_doc, write_spec

REPO = Path(__file__).resolve().parents[1]


def local_run(spec: Path, recorded: str, cwd: Path, *, absent: tuple[str, ...] = (),
              **extra_env: str) -> tuple[int, str, Path]:
    """``rtf submit SPEC`` (local mode) in a fresh process whose Ray temp dir holds an address file naming
    ``recorded``: (exit code, output, the address file). After the run: no session of a Ray left in that dir
    unless the run started one. ``absent``: top-level packages that process cannot import, as on a machine
    without them (a ``sitecustomize`` puts None in ``sys.modules``, which also makes ``find_spec`` say no)."""
    ray_tmp = tempfile.mkdtemp(prefix="rtfl", dir="/tmp")  # short: Ray's socket paths are limited
    try:
        pythonpath = str(REPO)
        if absent:
            (Path(ray_tmp) / "sitecustomize.py").write_text(
                "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in absent))
            pythonpath = f"{ray_tmp}:{REPO}"
        address_file = Path(ray_tmp) / "ray" / "ray_current_cluster"
        address_file.parent.mkdir()
        address_file.write_text(recorded)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RTF_"))}
        env.update(RAY_TMPDIR=ray_tmp, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=pythonpath, **extra_env)
        p = subprocess.run([sys.executable, "-m", "raytune_ft", "submit", str(spec)], env=env, cwd=cwd,
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        sessions = sorted(x.name for x in (Path(ray_tmp) / "ray").glob("session_*"))
        return p.returncode, p.stdout + p.stderr + f"\n[ray sessions: {sessions}]", address_file
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def tiny_spec(name: str, tiny, tmp_path: Path) -> Path:
    train, _, model_dir = tiny
    return write_spec(tmp_path / f"{name}.yaml", spec_doc(name, model_dir, train, None, tmp_path / "runs",
                                                         training={"max_steps": 2, "save_steps": 2}))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_stale_address_file_does_not_stop_local_mode(tiny, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{s.getsockname()[1]}"
    s.close()  # the head that wrote the file is gone: nothing listens there
    # and on a machine without `datasets` or `trl` (the H200 check's, where an SFT run once failed on an
    # unneeded `from datasets import Dataset`): SFT needs neither
    code, out, address_file = local_run(tiny_spec("stale", tiny, tmp_path), dead, tmp_path, absent=("datasets", "trl"))
    assert code == 0, out[-4000:]
    # one worker: trained in the rtf process itself (Ray Train's local mode), no Ray started, none joined
    assert "mode: local, on this machine (no --address" in out and "ray: 1 worker, trained in this process" in out
    assert "[ray sessions: []]" in out and "ray: started a new embedded Ray" not in out
    assert f"ray: not the Ray head at {dead} recorded in {address_file} (running or stale)" in out
    assert "num_cpus and num_gpus must not be provided" not in out and "Traceback" not in out
    assert (tmp_path / "runs" / "stale" / "final" / "adapter_model.safetensors").is_file()
    # with a worker group (RTF_IN_PROCESS=0; several workers always have one): a Ray of its own
    code, out, address_file = local_run(tiny_spec("stale-group", tiny, tmp_path), dead, tmp_path, RTF_IN_PROCESS="0")
    assert code == 0, out[-4000:]
    assert "ray: started a new embedded Ray" in out and "1 worker(s)" in out and "[ray sessions: []]" not in out
    assert f"ray: not the Ray head at {dead} recorded in {address_file} (running or stale)" in out
    assert (tmp_path / "runs" / "stale-group" / "final" / "adapter_model.safetensors").is_file()


def test_local_is_spelled_local(monkeypatch, tmp_path):
    spec = spec_from_dict(spec_doc("t", tmp_path / "m", tmp_path / "t.jsonl", None, tmp_path / "runs"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_target(spec, None) == ("local", None, "no --address, no RAY_ADDRESS and no cluster.address")
    assert choose_target(spec, "local") == ("local", None, "--address local")
    assert choose_target(spec, "http://127.0.0.1:8265")[:2] == ("cluster", "http://127.0.0.1:8265")
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert choose_target(spec, None) == ("local", None, "RAY_ADDRESS=local")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # a running head, asked for by its dashboard
    assert choose_target(spec, None) == ("cluster", "http://127.0.0.1:8265", "RAY_ADDRESS is set")


def test_the_embedded_ray_runs_its_workers_at_normal_priority_and_polls_them_often():
    """What `rtf submit` sets before it starts its own Ray reaches Ray's processes: workers at nice 0 (Ray's
    default is 15), no usage report, and Ray Train's controller polling its workers every 0.25 s (the default
    2 s kept the process alive for seconds after the last step). A fresh process, a real Ray."""
    code = (
        "import os, ray\n"
        "from raytune_ft.launch.local import start_env\n"
        "os.environ.pop('RAY_worker_niceness', None)\n"
        "added = start_env()\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
        "@ray.remote\n"
        "def probe():\n"
        "    return os.nice(0), os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S'), "
        "os.environ.get('RAY_USAGE_STATS_ENABLED')\n"
        "print('PROBE', *ray.get(probe.remote()), sorted(added))\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_TRAIN_", "RAY_USAGE"))}
    env["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="rtfn", dir="/tmp")
    try:
        p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=180)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("PROBE")]
    assert p.returncode == 0 and line, p.stdout + p.stderr
    assert line[0].split(" ", 4)[1:4] == ["0", "0.25", "0"], line
    assert "RAY_worker_niceness" in line[0]


def test_which_local_runs_train_in_the_rtf_process(monkeypatch, tmp_path):
    from raytune_ft.launch.local import choose_in_process

    def spec(**over):
        return spec_from_dict(spec_doc("t", tmp_path / "m", tmp_path / "t.jsonl", None, tmp_path / "runs", **over))

    monkeypatch.delenv("RTF_IN_PROCESS", raising=False)
    assert choose_in_process(spec(), owned=True) == (True, "RTF_IN_PROCESS=0 starts one")
    assert not choose_in_process(spec(), owned=False)[0]  # a Ray this process already runs: a worker group
    assert not choose_in_process(spec(compute={"num_workers": 2}), owned=True)[0]
    assert not choose_in_process(spec(deepspeed={"stage": 2}, method={"type": "full"}), owned=True)[0]
    sweep = spec(tune={"space": {"training.learning_rate": {"grid": [1e-3, 1e-4]}}, "search": "grid", "metric": "loss"})
    assert not choose_in_process(sweep, owned=True)[0]
    monkeypatch.setenv("RTF_IN_PROCESS", "0")
    assert not choose_in_process(spec(), owned=True)[0]
    monkeypatch.setenv("RTF_IN_PROCESS", "1")
    assert choose_in_process(spec(), owned=False) == (True, "RTF_IN_PROCESS=1")
    assert not choose_in_process(spec(compute={"num_workers": 2}), owned=False)[0]
