"""Resume on a real local Ray: an interrupted run, resubmitted, ends exactly where an uninterrupted one does; a
SIGTERM commits a checkpoint at the next step; a checkpoint without a manifest is never resumed from. (A
SIGKILLed worker replaced mid-run, resuming from the last committed checkpoint, is in test_multinode.py's
two-node job; a preempted node in its last test.)"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raytune_ft import checkpoints as ck
from raytune_ft.cli import main
from tests.tiny import make_model, spec_doc, write_spec

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE = 16, 4


@pytest.fixture(scope="module")
def model4(tiny, tmp_path_factory):
    """A slightly larger model (4 layers) so a run lasts long enough to be interrupted mid-way."""
    train, evals, _ = tiny
    return make_model(tmp_path_factory.mktemp("m4") / "model", train, hidden=128, layers=4)


def doc(name, tiny, model, storage, workers=1, max_failures=0):
    train, _, _ = tiny
    return spec_doc(name, model, train, None, storage, method={"type": "full"},
                    compute={"num_workers": workers, "cpus_per_worker": 1},
                    training={"max_steps": STEPS, "save_steps": SAVE, "learning_rate": 1e-3,
                              "lr_scheduler_type": "cosine", "warmup_steps": 3, "per_device_train_batch_size": 4},
                    fault_tolerance={"max_failures": max_failures})


class Proc:
    """`rtf submit` in its own process, its output read line by line."""

    def __init__(self, spec_path: Path):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.p = subprocess.Popen([sys.executable, "-m", "raytune_ft", "submit", str(spec_path)], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                  start_new_session=True)
        self.lines: list[str] = []
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)
            self.q.put(line)

    def wait_for(self, predicate, timeout=240.0):
        end = time.time() + timeout
        while time.time() < end:
            if predicate():
                return True
            if self.p.poll() is not None and predicate() is False:
                time.sleep(0.2)
                if predicate():
                    return True
                raise AssertionError("process ended first:\n" + "".join(self.lines))
            time.sleep(0.05)
        raise AssertionError("timed out:\n" + "".join(self.lines))

    def finish(self, timeout=240.0) -> int:
        try:
            return self.p.wait(timeout=timeout)
        finally:
            if self.p.poll() is None:
                os.killpg(self.p.pid, signal.SIGKILL)

    @property
    def text(self) -> str:
        return "".join(self.lines)


def committed(run: Path, step: int) -> bool:
    return (run / ck.checkpoint_dir_name(step) / ck.MANIFEST).is_file()


def final_state(run: Path):
    res = json.loads((run / "final" / "final_results.json").read_text())
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return res, load_file(str(run / "final" / "model.safetensors")), recs


def run_inprocess(spec_path, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["submit", str(spec_path)])
    out = capsys.readouterr()
    assert ei.value.code == 0, out.out + out.err
    return out.out + out.err


def assert_same_training(a, b, full_log=True):
    (ra, wa, ma), (rb, wb, mb) = a, b
    assert ra["steps"] == rb["steps"] == STEPS
    assert rb["train_loss"] == pytest.approx(ra["train_loss"], abs=1e-4)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=0, msg=k)
    lr = {r["step"]: r["learning_rate"] for r in ma if "loss" in r}  # the schedule position carried on
    assert [r["learning_rate"] for r in mb if "loss" in r] == pytest.approx(
        [lr[r["step"]] for r in mb if "loss" in r], rel=1e-6)
    if full_log:
        assert [r["step"] for r in mb if "loss" in r] == list(range(1, STEPS + 1))  # each step logged once


def test_interrupted_run_resumes_to_the_same_result(ray_local, tiny, model4, tmp_path, capsys):
    storage = tmp_path / "runs"
    base = run_inprocess(write_spec(tmp_path / "a.yaml", doc("whole", tiny, model4, storage)), capsys)
    assert "resuming" not in base

    spec_b = write_spec(tmp_path / "b.yaml", doc("interrupted", tiny, model4, storage))
    run = storage / "interrupted"
    proc = Proc(spec_b)
    proc.wait_for(lambda: committed(run, SAVE))
    os.killpg(proc.p.pid, signal.SIGINT)  # Ctrl-C
    assert proc.finish() == 130, proc.text
    assert "interrupted: training stopped" in proc.text
    # a fresh `rtf submit` of one worker trains in its own process (Ray Train's local mode): Ctrl-C stopped the
    # training thread at a step boundary, and what it committed is what the resume below continues from
    assert "1 worker, trained in this process" in proc.text, proc.text
    assert f"checkpoint committed: step {SAVE} " in proc.text  # said before it stopped
    # the console (a pipe here) holds rtf's lines, not library chatter
    for noise in ("Token authentication is enabled", "\x1b[", "gemm_4bit", "kernels"):
        assert noise not in proc.text, noise
    assert not (run / "final").exists()
    done = [s for s in range(SAVE, STEPS, SAVE) if committed(run, s)]
    assert done and done[-1] < STEPS
    from raytune_ft.tools.runs import list_runs

    row = next(r for r in list_runs(str(storage)) if r["name"] == "interrupted")  # not "running": it says why
    assert (row["status"], row["checkpoint"], row["reason"]) == ("stopped", done[-1], "interrupted"), row
    # a crash mid-upload: files but no manifest, newer than every committed checkpoint
    fake = run / ck.checkpoint_dir_name(done[-1] + 1)
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"partial")

    with pytest.raises(SystemExit):
        main(["checkpoints", "list", str(run)])
    listing = capsys.readouterr().out
    assert re.search(rf"{done[-1] + 1}\s.*incomplete", listing), listing

    out = run_inprocess(spec_b, capsys)
    assert f"resuming from {run / ck.checkpoint_dir_name(done[-1])} at step {done[-1]}" in out
    assert_same_training(final_state(storage / "whole"), final_state(run))
    assert not (run / "rtf_stopped.json").exists()  # resumed: the stop record went when it started again
    assert next(r for r in list_runs(str(storage)) if r["name"] == "interrupted")["status"] == "completed"
    import pyarrow.fs as pafs

    # retention: the last keep_checkpoints (2) committed remain; the incomplete one was older, so deleted
    assert [(i.step, i.committed) for i in ck.list_checkpoints(pafs.LocalFileSystem(), str(run))] == [
        (STEPS - SAVE, True), (STEPS, True)]

    # --resume-from: a new run started from another run's committed checkpoint carries on from it
    first = storage / "whole" / ck.checkpoint_dir_name(STEPS - SAVE)
    spec_c = write_spec(tmp_path / "c.yaml", doc("from-ckpt", tiny, model4, storage))
    with pytest.raises(SystemExit) as ei:
        main(["submit", str(spec_c), "--resume-from", str(first)])
    out = capsys.readouterr()
    assert ei.value.code == 0, out.err
    assert f"resuming from {first} at step {STEPS - SAVE}" in out.err
    assert_same_training(final_state(storage / "whole"), final_state(storage / "from-ckpt"), full_log=False)


def test_sigterm_commits_a_checkpoint_at_the_next_step_then_stops(ray_local, tiny, model4, tmp_path, capsys):
    """SIGTERM (a pod's eviction, a RunPod stop, `kill`) to a fresh `rtf submit` of one worker, which trains in
    its own process: the step under way finishes, a checkpoint of it is committed (between the periodic
    ones), the process exits 143 saying so, and resubmitting resumes from exactly that step. With
    storage.upload async (rtf's own upload thread in this process): the exit waits for that upload's commit."""
    storage = tmp_path / "runs"
    d = doc("termed", tiny, model4, storage)
    d["storage"]["upload"] = "async"
    spec_path = write_spec(tmp_path / "t.yaml", d)
    run = storage / "termed"
    proc = Proc(spec_path)
    proc.wait_for(lambda: committed(run, SAVE))
    os.kill(proc.p.pid, signal.SIGTERM)  # the process itself, as Kubernetes signals a container's PID 1
    assert proc.finish() == 143, proc.text
    m = re.search(r"stopped on SIGTERM: checkpoint committed at step (\d+)\. Run the same command again", proc.text)
    assert m, proc.text
    step = int(m.group(1))
    assert SAVE <= step < STEPS and committed(run, step), proc.text
    assert f"SIGTERM: committing a checkpoint at step {step}, then stopping" in proc.text
    assert f"checkpoint committed: step {step} " in proc.text and "Traceback" not in proc.text
    assert not (run / "final").exists()
    latest = ck.latest_committed(__import__("pyarrow.fs").fs.LocalFileSystem(), str(run))
    assert latest is not None and latest.step == step  # what a resubmission resumes from
    from raytune_ft.tools.runs import list_runs

    row = next(r for r in list_runs(str(storage)) if r["name"] == "termed")
    assert (row["status"], row["reason"]) == ("stopped", "terminated (SIGTERM)"), row
    out = run_inprocess(spec_path, capsys)
    assert f"resuming from {run / ck.checkpoint_dir_name(step)} at step {step}" in out
    assert json.loads((run / "final" / "final_results.json").read_text())["steps"] == STEPS
