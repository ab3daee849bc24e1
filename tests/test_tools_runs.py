"""list_runs(): status, steps, losses and outputs of each run (and sweep trial) under a storage path."""

from __future__ import annotations

import json
import time

import pytest

from raytune_ft.errors import UserError
from raytune_ft.tools.runs import RUNNING_WINDOW_S, list_runs, render
from tests import test_tools_support as support

workspace = support.workspace  # fixtures shared by the tool tests
_tools_cache = support._tools_cache


def test_runs_table(workspace):
    runs = {r["name"]: r for r in list_runs(str(workspace.storage))}
    assert sorted(runs) == ["full-run", "lora-run", "sweep1/trial-0", "sweep1/trial-1"]

    lora = runs["lora-run"]
    assert (lora["status"], lora["method"], lora["steps"], lora["checkpoint"]) == ("completed", "lora", 10, 5)
    assert (lora["train_loss"], lora["eval_loss"]) == (2.25, 2.5)  # from final/final_results.json
    assert lora["outputs"] == str(workspace.lora_run / "final")
    assert runs["full-run"]["method"] == "full" and runs["full-run"]["checkpoint"] is None

    t1 = runs["sweep1/trial-1"]  # no final/: written just now, so "running"
    assert (t1["status"], t1["checkpoint"], t1["steps"]) == ("running", 4, 8)
    assert t1["train_loss"] == pytest.approx(0.8 * (6.0 - 0.4 * 8))  # the last logged loss
    assert t1["eval_loss"] == pytest.approx(0.8 * (5.5 - 0.3 * 6))
    assert t1["outputs"] == str(workspace.sweep / "trial-1" / "checkpoint-00000004")
    assert runs["sweep1/trial-0"]["status"] == "completed"

    later = {r["name"]: r for r in list_runs(str(workspace.storage), now=time.time() + RUNNING_WINDOW_S + 60)}
    assert later["sweep1/trial-1"]["status"] == "incomplete" and later["lora-run"]["status"] == "completed"

    table = render(list(runs.values())).splitlines()
    assert table[0].split()[:3] == ["NAME", "STATUS", "METHOD"] and len(table) == 5
    row = next(line for line in table if line.startswith("lora-run"))
    assert row.split()[:7] == ["lora-run", "completed", "lora", "10", "5", "2.2500", "2.5000"]


def test_one_run_dir_and_empty_storage(workspace, tmp_path):
    assert [r["name"] for r in list_runs(str(workspace.lora_run))] == ["lora-run"]
    (tmp_path / "empty").mkdir()
    assert list_runs(str(tmp_path / "empty")) == []
    assert render([], "x") == "no runs under x"
    with pytest.raises(UserError, match="no such storage dir"):
        list_runs(str(tmp_path / "missing"))


def _run_dir(storage, name, *, step=None, final=False):
    """A run dir as training leaves it: metrics.jsonl written just now, a committed checkpoint, final/."""
    import pyarrow.fs as pafs

    from raytune_ft import checkpoints as ck

    d = storage / name
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text(json.dumps({"step": step or 1, "loss": 1.5}) + "\n")
    if step:
        c = d / ck.checkpoint_dir_name(step)
        c.mkdir()
        (c / "adapter_model.safetensors").write_bytes(b"\0" * 16)
        ck.write_manifest(pafs.LocalFileSystem(), str(c), step=step, epoch=None, files=ck.file_digests(str(c)),
                          spec_hash=None)
    if final:
        (d / "final").mkdir()
        (d / "final" / "final_results.json").write_text(json.dumps({"steps": step}))
    return d


def test_states_come_from_what_the_run_dir_records_not_file_times(tmp_path):
    """The issue's report: a Ctrl-C'd run and ASHA-stopped trials, all written to in the last minutes, were
    listed as 'running'. Every file below is fresh; only the records tell the states apart."""
    import pyarrow.fs as pafs

    from raytune_ft.launch.driver import mark_stopped
    from raytune_ft.rundir import STOPPED as STOP_MARKER
    from raytune_ft.rundir import RunDir
    from raytune_ft.spec import spec_from_dict
    from raytune_ft.sweep.results import SweepResults, TrialRow, results_csv
    from tests.specs import base_doc

    storage = tmp_path / "runs"

    def spec(name):
        return spec_from_dict(base_doc(name=name, storage={"path": str(storage)}))

    _run_dir(storage, "ctrl-c", step=4)
    mark_stopped(spec("ctrl-c"), "interrupted")  # what `rtf submit` writes on Ctrl-C
    _run_dir(storage, "broke", step=2)
    mark_stopped(spec("broke"), "failed: WorkerGroupError: boom")
    _run_dir(storage, "resumed", step=4)
    mark_stopped(spec("resumed"), "interrupted")
    RunDir(pafs.LocalFileSystem(), str(storage / "resumed"), str(storage / "resumed")).clear_stopped()  # resubmitted
    mark_stopped(spec("never-started"), "interrupted")
    assert not (storage / "never-started").exists()  # no stub run dir

    sweep = storage / "sw"
    for i, (step, final) in enumerate([(6, True), (2, False), (2, False), (4, False)]):
        _run_dir(sweep, f"trial-00{i}", step=step, final=final)
    rows = [TrialRow(f"trial-00{i}", {"training.learning_rate": lr}, best, steps, status, str(sweep / f"trial-00{i}"))
            for i, (lr, best, steps, status) in enumerate([(1e-3, 1.2, 6, "completed"), (1e-7, 4.0, 2, "stopped early"),
                                                            (1e-2, None, 2, "error"), (1e-4, 2.0, 4, "unfinished")])]
    (sweep / "results.csv").write_text(results_csv(SweepResults("sw", "eval_loss", "min", ["training.learning_rate"], rows)))
    mark_stopped(spec("sw"), "interrupted")  # the sweep was Ctrl-C'd with trial-003 unfinished

    runs = {r["name"]: r for r in list_runs(str(storage))}
    assert (runs["ctrl-c"]["status"], runs["ctrl-c"]["checkpoint"], runs["ctrl-c"]["reason"]) == ("stopped", 4, "interrupted")
    assert json.loads((storage / "ctrl-c" / STOP_MARKER).read_text())["step"] == 4
    assert (runs["broke"]["status"], runs["broke"]["reason"]) == ("failed", "failed: WorkerGroupError: boom")
    assert runs["resumed"]["status"] == "running" and runs["resumed"]["reason"] is None
    assert [runs[f"sw/trial-00{i}"]["status"] for i in range(4)] == ["completed", "stopped early", "failed", "stopped"]
    # the records hold however old the files are
    later = {r["name"]: r["status"] for r in list_runs(str(storage), now=time.time() + 10 * RUNNING_WINDOW_S)}
    assert later["ctrl-c"] == "stopped" and later["sw/trial-001"] == "stopped early" and later["resumed"] == "incomplete"
    assert next(x for x in render(list(runs.values())).splitlines() if x.startswith("ctrl-c")).split()[1] == "stopped"
