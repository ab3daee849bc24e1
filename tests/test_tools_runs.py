"""list_runs(): status, steps, losses and outputs of each run (and sweep trial) under a storage path."""

from __future__ import annotations

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
    assert (lora["status"], lora["method"], lora["steps"], lora["checkpoint"]) == ("finished", "lora", 10, 5)
    assert (lora["train_loss"], lora["eval_loss"]) == (2.25, 2.5)  # from final/final_results.json
    assert lora["outputs"] == str(workspace.lora_run / "final")
    assert runs["full-run"]["method"] == "full" and runs["full-run"]["checkpoint"] is None

    t1 = runs["sweep1/trial-1"]  # no final/: written just now, so "running"
    assert (t1["status"], t1["checkpoint"], t1["steps"]) == ("running", 4, 8)
    assert t1["train_loss"] == pytest.approx(0.8 * (6.0 - 0.4 * 8))  # the last logged loss
    assert t1["eval_loss"] == pytest.approx(0.8 * (5.5 - 0.3 * 6))
    assert t1["outputs"] == str(workspace.sweep / "trial-1" / "checkpoint-00000004")
    assert runs["sweep1/trial-0"]["status"] == "finished"

    later = {r["name"]: r for r in list_runs(str(workspace.storage), now=time.time() + RUNNING_WINDOW_S + 60)}
    assert later["sweep1/trial-1"]["status"] == "incomplete" and later["lora-run"]["status"] == "finished"

    table = render(list(runs.values())).splitlines()
    assert table[0].split()[:3] == ["NAME", "STATUS", "METHOD"] and len(table) == 5
    row = next(line for line in table if line.startswith("lora-run"))
    assert row.split()[:7] == ["lora-run", "finished", "lora", "10", "5", "2.2500", "2.5000"]


def test_one_run_dir_and_empty_storage(workspace, tmp_path):
    assert [r["name"] for r in list_runs(str(workspace.lora_run))] == ["lora-run"]
    (tmp_path / "empty").mkdir()
    assert list_runs(str(tmp_path / "empty")) == []
    assert render([], "x") == "no runs under x"
    with pytest.raises(UserError, match="no such storage dir"):
        list_runs(str(tmp_path / "missing"))
