"""monitoring.log_examples on a real one-worker run (in this process): one record per optimizer step in
metrics.jsonl with the rows it trained; a run extended from its checkpoint continues the epoch where it left
off (each row once per epoch, no step logged twice), and the model's forward never sees the row ids."""

from __future__ import annotations

import json

import pytest

from raytune_ft.cli import main
from tests.tiny import spec_doc, write_spec


def submit(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["submit", *argv])
    out = capsys.readouterr()
    return ei.value.code, out.out + out.err


def test_each_step_logs_its_rows_and_a_resume_continues_the_epoch(ray_local, in_process, tiny, tmp_path, capsys):
    train, evals, model_dir = tiny  # 64 rows, 4 a step: 16 steps an epoch; evaluated (rows without ids) too
    spec = write_spec(tmp_path / "s.yaml", spec_doc("rows", model_dir, train, evals, tmp_path / "runs",
                                                   training={"max_steps": 10, "save_steps": 5, "eval_steps": 5},
                                                   monitoring={"log_examples": True}))
    code, out = submit([str(spec)], capsys)
    assert code == 0, out
    code, out = submit([str(spec), "--set", "training.max_steps=20"], capsys)  # resumes at step 10
    assert code == 0 and "at step 10" in out, out
    records = [json.loads(x) for x in (tmp_path / "runs" / "rows" / "metrics.jsonl").read_text().splitlines()]
    took = [r for r in records if "examples" in r]
    assert [r["step"] for r in took] == list(range(1, 21))
    assert all(len(r["examples"]) == 4 for r in took)
    assert sorted(x for r in took[:16] for x in r["examples"]) == list(range(64))  # epoch 1, across the resume
    assert took[15]["epoch"] == 1.0 and len({x for r in took[16:] for x in r["examples"]}) == 16
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))  # the loss records as before
    assert [r["step"] for r in records if "eval_loss" in r] == [5, 10, 15, 20]
