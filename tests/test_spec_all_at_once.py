"""Every problem of a spec in one `rtf validate` (issue 18 item 9): field errors, the rules that span
sections, the evaluation-data rule and several `tune:` errors together, each on its own line naming its
field; and a note, only where a check could not run because it reads a value that failed."""

from __future__ import annotations

import re

import pytest
import yaml

from raytune_ft.cli import main
from tests.specs import base_doc


def validate(tmp_path, doc, capsys) -> tuple[int, list[str]]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(SystemExit) as ex:
        main(["validate", str(path)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return ex.value.code, [line.strip() for line in err.splitlines()]


def fields(lines: list[str]) -> dict[str, str]:
    """dotted path -> message, from `file:line path: message` lines."""
    out = {}
    for line in lines:
        m = re.search(r"spec\.yaml:\d+ (\S+): (.*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def test_field_cross_eval_data_and_tune_errors_in_one_pass(tmp_path, capsys):
    doc = base_doc()
    doc["training"].update(learning_rate=-1, eval_strategy="steps", eval_steps=5)  # field error; no eval data
    doc["model"] = {"init": {"hidden_size": 64, "num_heads": 4}}  # needs method.type full: cross-field error
    doc["tokenizer"] = {"train": {"vocab_size": 500}}
    doc["tune"] = {"num_samples": 2, "space": {
        "training.learning_rat": {"loguniform": [1e-5, 1e-3]},  # no such field
        "training.warmup_steps": {"uniform": [3, 3]},  # lo < hi
    }}
    code, lines = validate(tmp_path, doc, capsys)
    assert code == 2
    got = fields(lines)
    assert got["training.learning_rate"] == "must be greater than 0 (got -1)"
    assert got["method.type"].startswith("model.init starts from random weights")
    assert got["tokenizer.train"].startswith("a freshly trained tokenizer changes the vocabulary")
    assert got["training.eval_strategy"] == ("training.eval_strategy steps needs evaluation data: set data.eval "
                                             "or data.eval_split")
    assert got["tune.space.training.learning_rat"].startswith("no field `training.learning_rat` in the spec schema; "
                                                              "did you mean `training.learning_rate`?")
    assert got["tune.space.training.warmup_steps"] == "uniform needs lo < hi (got [3, 3])"
    assert got["tune.metric"].startswith("eval_loss comes from evaluation")
    assert lines[0] == f"error: invalid job spec: {len(got)} problems"
    # the swept values cannot be tried on a spec that is itself invalid: said once, not silently dropped;
    # no rule reads training.learning_rate, so nothing else is announced as skipped
    notes = [x for x in lines if x.startswith("note: ")]
    assert notes == ["note: tune checks skipped for the swept values (each is tried on the spec, which has "
                     "errors): fix the problems above first"]


def test_a_check_that_reads_a_failed_value_is_announced_as_skipped(tmp_path, capsys):
    doc = base_doc()
    doc["method"]["type"] = "lorra"  # the trained-tokenizer rule reads method.type
    doc["tokenizer"] = {"train": {"vocab_size": 500}}
    doc["training"].update(eval_strategy="sometimes", eval_steps=5)  # training's own rule reads eval_strategy
    doc["data"]["eval_split"] = 0.1
    code, lines = validate(tmp_path, doc, capsys)
    assert code == 2
    assert set(fields(lines)) == {"method.type", "training.eval_strategy"}
    assert lines[-1] == ("note: cross-field checks involving method.type, training.eval_strategy skipped: "
                         "fix the field errors above first")


def test_no_note_when_nothing_was_skipped(tmp_path, capsys):
    doc = base_doc()
    doc["training"]["learning_rate"] = -1  # no rule reads it
    doc["compute"] = {"num_workers": 0}
    code, lines = validate(tmp_path, doc, capsys)
    assert code == 2
    assert set(fields(lines)) == {"training.learning_rate", "compute.num_workers"}
    assert not [x for x in lines if x.startswith("note: ")]


def test_tune_rules_and_rungs_are_checked_beside_a_bad_swept_path(tmp_path, capsys):
    doc = base_doc()
    doc["data"]["eval_split"] = 0.1
    doc["training"].update(eval_strategy="steps", eval_steps=2)
    doc["tune"] = {"mode": "max", "scheduler": {"type": "asha", "grace_period": 3}, "space": {
        "training.learning_rate": {"loguniform": [0, 1e-3]},  # loguniform needs lo > 0
        "training.warmup_steps": {"choice": [0, -1]},  # a value that gives an invalid spec
        "training.lr": {"choice": [1]},  # no such field
    }}
    code, lines = validate(tmp_path, doc, capsys)
    assert code == 2
    got = fields(lines)
    assert set(got) == {"tune.space.training.learning_rate", "tune.space.training.warmup_steps",
                        "tune.space.training.lr", "tune.mode", "tune.num_samples", "tune.scheduler.grace_period"}
    assert got["tune.space.training.warmup_steps"].startswith("the value -1 gives an invalid spec")
    assert not [x for x in lines if x.startswith("note: ")]


def test_a_sections_own_rules_are_all_reported_beside_its_field_error(tmp_path, capsys):
    doc = base_doc()
    doc["training"].update(learning_rate=-1, warmup_ratio=0.1, warmup_steps=5, eval_steps=5, max_steps=None)
    code, lines = validate(tmp_path, doc, capsys)
    assert code == 2
    assert [x.split(" ", 1)[1] for x in lines if "spec.yaml:" in x] == [
        "training.learning_rate: must be greater than 0 (got -1)",
        "training: give training.max_steps or training.num_epochs (how long to train)",
        "training: give training.warmup_ratio or training.warmup_steps, not both",
        "training: training.eval_steps needs training.eval_strategy: steps",
    ]
    assert not [x for x in lines if x.startswith("note: ")]
