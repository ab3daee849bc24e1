"""Sweeps end to end on a real local Ray (the session's ``ray_local``), through ``rtf submit``: trials are
whole TorchTrainer runs of a tiny LoRA spec; ASHA stops poor trials from the evaluations streamed to Tune;
results.csv and best.yaml come out; a sweep stopped with Ctrl-C continues where it stopped."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time

import pyarrow.fs as pafs
import pytest

from raytune_ft import checkpoints as ck
from raytune_ft.cli import main
from raytune_ft.spec import load_spec
from raytune_ft.sweep import tune as sweep_tune
from tests.tiny import spec_doc, write_spec

pytestmark = pytest.mark.ray

GOOD_LR, DEAD_LR = 5e-3, 1e-7


def submit(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["submit", *argv])
    out = capsys.readouterr()
    return ei.value.code, out.out + out.err


def rows(sweep_dir):
    with open(sweep_dir / "results.csv") as f:
        return {r["trial"]: r for r in csv.DictReader(f)}


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tune_progress(sweep_dir, trial):
    with open(sweep_dir / "tune" / trial / "progress.csv") as f:
        return list(csv.DictReader(f))


def tune_pids(sweep_dir, trial) -> set[int]:
    """The processes Tune got the trial's results from (its trial actors): Tune stamps every result with it."""
    lines = (sweep_dir / "tune" / trial / "result.json").read_text().splitlines()
    return {json.loads(x)["pid"] for x in lines if x.strip()}


def trained_in(run_dir) -> int:
    """The pid of the process that trained the run (its one worker), from its final results."""
    workers = json.loads((run_dir / "final" / "final_results.json").read_text())["workers"]
    assert len(workers) == 1
    return workers[0]["pid"]


def all_cpus_free(ray, timeout=60.0) -> bool:
    """No trial left anything behind: every CPU of the session's Ray is free again (a stopped trial's
    workers' placement group would hold one)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU"):
            return True
        time.sleep(1)
    return False


def test_asha_sweep_stops_poor_trials_early_and_writes_results_and_best_spec(ray_local, tiny, tmp_path, capsys,
                                                                             monkeypatch):
    """4 trials (lr × r grid), 2 at a time, 1 worker each. lr 1e-7 learns nothing in 2 steps, so its eval_loss
    at the first rung (step 2) is worse than every lr 5e-3 trial's; the grid runs the 5e-3 trials first, so
    when a 1e-7 trial reaches step 2 ASHA has good values recorded there and stops it: deterministic.

    The sweep is stopped with Ctrl-C (a real SIGINT, as in the test below) as soon as the first trial completes,
    before any 1e-7 trial has reported, and resubmitted: the 1e-7 trials then run in the resumed sweep, whose
    ASHA must still hold the rungs of the first run (Tune does not restore a scheduler's state; rtf refills it
    from the results Tune recorded) to stop them at step 2 rather than let them run to the end."""
    train, evals, model_dir = tiny
    doc = spec_doc("sw", model_dir, train, evals, tmp_path / "runs",
                   training={"max_steps": 6, "eval_steps": 2, "save_steps": 2})
    doc["tune"] = {"space": {"training.learning_rate": {"grid": [GOOD_LR, DEAD_LR]}, "method.lora.r": {"grid": [4, 8]}},
                   "search": "grid", "max_concurrent_trials": 2, "metric": "eval_loss",
                   "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2}}
    spec_path = write_spec(tmp_path / "sweep.yaml", doc)
    said: list[str] = []
    say = sweep_tune.SweepEvents.say
    monkeypatch.setattr(sweep_tune.SweepEvents, "say", lambda self, m: (said.append(m), say(self, m)))
    interrupted = []

    def interrupt_at_first_completion():
        deadline = time.time() + 400
        while time.time() < deadline:
            if any(" completed at step 6" in m for m in said):
                interrupted.append(list(said))
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.1)

    late = []
    previous = signal.signal(signal.SIGINT, lambda *a: late.append(a))
    watcher = threading.Thread(target=interrupt_at_first_completion, daemon=True)
    watcher.start()
    t0 = time.time()
    try:
        code, out = submit([str(spec_path)], capsys)
    finally:
        watcher.join(timeout=5)
        signal.signal(signal.SIGINT, previous)
    assert interrupted and not late and code == 130, out
    sweep = tmp_path / "runs" / "sw"
    # no 1e-7 trial reached a rung before the stop: each is stopped (or not) by the resumed sweep's scheduler
    for row in rows(sweep).values():
        if float(row["training.learning_rate"]) == DEAD_LR:
            assert (row["status"], row["steps"]) == ("unfinished", ""), row
    assert all_cpus_free(ray_local), ray_local.available_resources()

    code, out = submit([str(spec_path)], capsys)
    assert code == 0, out
    assert "continuing from" in out
    assert "Configuration for experiment" not in out and "tensorboard --logdir" not in out  # Tune's own output
    took = time.time() - t0
    res = rows(sweep)

    # a row per trial, named by the swept paths; the dead-lr trials were stopped by the scheduler at step 2
    assert len(res) == 4 and sorted(res) == ["trial-000", "trial-001", "trial-002", "trial-003"]
    grid = {(float(r["training.learning_rate"]), int(r["method.lora.r"])): r for r in res.values()}
    assert set(grid) == {(GOOD_LR, 4), (GOOD_LR, 8), (DEAD_LR, 4), (DEAD_LR, 8)}
    for r in (4, 8):
        dead = grid[(DEAD_LR, r)]
        assert (dead["status"], dead["stopped_early"], dead["steps"]) == ("stopped early", "true", "2"), dead
        assert not (sweep / dead["trial"] / "final").exists()
    completed = [r for r in res.values() if r["status"] == "completed"]
    assert completed and all(r["steps"] == "6" and r["stopped_early"] == "false" for r in completed)
    assert "stopped early by the scheduler at step 2" in out
    assert all_cpus_free(ray_local), ray_local.available_resources()  # stopped trials gave their CPUs back

    # each trial is a normal run dir: its own spec (its values, name trial-NNN), metrics, committed checkpoints
    for name, r in res.items():
        run = sweep / name
        trial_spec = load_spec(run / "rtf_spec.yaml")
        assert trial_spec.name == name and trial_spec.tune is None
        assert trial_spec.training.learning_rate == float(r["training.learning_rate"])
        assert trial_spec.method.lora.r == int(r["method.lora.r"])
        infos = ck.list_checkpoints(pafs.LocalFileSystem(), str(run))
        # (a trial stopped at its step-2 evaluation, before that step's save, has none: it trains in its trial's
        # process, and ASHA's stop ends it at the report)
        assert all(i.committed for i in infos) and (infos or r["status"] == "stopped early"), (name, infos)
        # the metric in results.csv is the best eval_loss the trial itself recorded
        evs = [m["eval_loss"] for m in metrics(run) if "eval_loss" in m]
        if r["status"] == "completed":
            final = json.loads((run / "final" / "final_results.json").read_text())
            assert final["steps"] == 6 and final["eval_loss"] == pytest.approx(evs[-1])
            evs = evs + [final["eval_loss"]]
        assert float(r["eval_loss"]) == pytest.approx(min(evs), abs=1e-6)

    # every evaluation reached Tune as it happened (steps 2, 4 from the workers, 6 with the final report)
    full = tune_progress(sweep, completed[0]["trial"])
    assert [int(x["step"]) for x in full] == [2, 4, 6] and full[-1]["final"] == "True"
    assert [int(x["step"]) for x in tune_progress(sweep, grid[(DEAD_LR, 8)]["trial"])] == [2]

    # best.yaml: a complete valid spec, no tune:, with the values of the trial whose metric is the best of all
    best_row = min(res.values(), key=lambda r: float(r["eval_loss"]))
    assert float(best_row["training.learning_rate"]) == GOOD_LR
    best = load_spec(sweep / "best.yaml")
    assert best.tune is None and best.name == "sw-best"
    assert best.training.learning_rate == float(best_row["training.learning_rate"])
    assert best.method.lora.r == int(best_row["method.lora.r"])
    assert best.storage.path == str(tmp_path / "runs") and best.training.max_steps == 6
    assert f"best: {best_row['trial']} (eval_loss {float(best_row['eval_loss']):.4f})" in out
    assert f"outputs: {sweep / best_row['trial'] / 'final'}" in out

    # each one-worker trial trained in its Tune trial's own process (no worker group), and said so
    assert "per trial, trained in the trial's own process" in out
    for r in completed:  # (a trial interrupted by the Ctrl-C above reported from two processes, one per submit)
        assert trained_in(sweep / r["trial"]) in tune_pids(sweep, r["trial"]), r["trial"]

    # the table again, later, from results.csv
    with pytest.raises(SystemExit) as ei:
        main(["sweep", "results", "sw", "--storage", str(tmp_path / "runs")])
    again = capsys.readouterr().out
    assert ei.value.code == 0
    table = out[out.rindex("sweep sw: 4 trial(s)"):].splitlines()[:6]
    assert again.splitlines()[:6] == table
    print(f"\n4-trial ASHA sweep, interrupted and resumed, took {took:.0f}s\n" + "\n".join(table))


def test_interrupted_sweep_continues_without_rerunning_finished_trials(ray_local, tiny, tmp_path, capsys,
                                                                      monkeypatch):
    """Two trials at once, a short one (4 steps) and a long one (LONG steps). Ctrl-C (a real SIGINT to this process,
    caught by Ray Tune as it would be in `rtf submit`) once the short trial finished and the long one committed
    a checkpoint. Resubmitting restores the Tune experiment: the finished trial is not run again (its files
    are untouched, Tune got no new result from it) and the long one resumes from its committed checkpoint.

    With RTF_IN_PROCESS=0: each trial's worker is a worker group of its own, as on a cluster (the test above
    covers trials trained in their trial actors)."""
    monkeypatch.setenv("RTF_IN_PROCESS", "0")
    train, evals, model_dir = tiny
    # long enough that it is still training when Tune stops it: at 24 steps it once finished first (a full run)
    LONG = 64
    doc = spec_doc("resumable", model_dir, train, evals, tmp_path / "runs",
                   training={"max_steps": LONG, "eval_steps": 4, "save_steps": 8})
    doc["tune"] = {"space": {"training.max_steps": {"grid": [4, LONG]}}, "search": "grid", "max_concurrent_trials": 2}
    spec_path = write_spec(tmp_path / "sweep.yaml", doc)
    sweep = tmp_path / "runs" / "resumable"
    short, long = sweep / "trial-000", sweep / "trial-001"
    snapshot: dict[str, tuple[int, bytes]] = {}
    said: list[str] = []  # the sweep's progress lines, as the driver emits them
    say = sweep_tune.SweepEvents.say
    monkeypatch.setattr(sweep_tune.SweepEvents, "say", lambda self, m: (said.append(m), say(self, m)))

    def interrupt_when_ready():
        deadline = time.time() + 400
        while time.time() < deadline:
            if "trial-000 completed at step 4" in said and \
                    ck.latest_committed(pafs.LocalFileSystem(), str(long)) is not None:
                if (long / "final").exists():
                    return  # too late: it finished (the test then fails on the exit code)
                for p in [short / "rtf_spec.yaml", short / "metrics.jsonl", short / "final" / "final_results.json"]:
                    snapshot[str(p)] = (p.stat().st_mtime_ns, p.read_bytes())
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.2)

    late = []
    previous = signal.signal(signal.SIGINT, lambda *a: late.append(a))  # a signal after Tune's run is recorded
    watcher = threading.Thread(target=interrupt_when_ready, daemon=True)
    watcher.start()
    t0 = time.time()
    try:
        code, out = submit([str(spec_path)], capsys)
    finally:
        watcher.join(timeout=5)
        signal.signal(signal.SIGINT, previous)
    assert snapshot and not late, out
    assert code == 130, out
    assert "interrupted" in out
    first = rows(sweep)
    assert first["trial-000"]["status"] == "completed" and first["trial-001"]["status"] == "unfinished", first
    assert not (long / "final").exists()
    assert all_cpus_free(ray_local), ray_local.available_resources()  # the interrupted trial's too
    tune_seen = tune_progress(sweep, "trial-000")  # what Tune recorded of the finished trial
    assert [int(x["step"]) for x in tune_seen] == [4]

    code, out = submit([str(spec_path)], capsys)
    took = time.time() - t0
    assert code == 0, out
    assert "continuing from" in out
    assert "trial-000 started" not in out and "trial-001 started" in out
    res = rows(sweep)
    assert {n: (r["status"], r["steps"]) for n, r in res.items()} == {"trial-000": ("completed", "4"),
                                                                       "trial-001": ("completed", str(LONG))}
    for path, (mtime, data) in snapshot.items():  # the finished trial was not rerun
        assert os.stat(path).st_mtime_ns == mtime and open(path, "rb").read() == data, path
    assert tune_progress(sweep, "trial-000") == tune_seen  # and Tune got no new result from it
    final = json.loads((long / "final" / "final_results.json").read_text())
    assert final["steps"] == LONG and final["resumed_from_step"] in range(8, LONG, 8)
    assert [r["step"] for r in metrics(long) if "loss" in r] == list(range(1, LONG + 1))  # one line per step, no repeats
    assert "trained in the trial's own process" not in out
    for trial in (short, long):  # by a worker of Ray Train's, not by the trial actor Tune got the results from
        assert trained_in(trial) not in tune_pids(sweep, trial.name), trial.name
    assert load_spec(sweep / "best.yaml").training.max_steps == int(min(res.values(), key=lambda r: float(r["eval_loss"]))["steps"])
    print(f"\ninterrupted + resumed sweep took {took:.0f}s (resumed from step {final['resumed_from_step']})")
