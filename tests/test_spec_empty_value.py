"""An empty value (`learning_rate:` with nothing after it) is valid YAML meaning null: it is reported as
that field's error, on its line, not as "not valid YAML … line 1, column 1"."""

from __future__ import annotations

import pytest

from raytune_ft.cli import main
from raytune_ft.errors import SpecError
from raytune_ft.spec import load_spec

HEAD = "name: x\nmodel: {name_or_path: some/model}\ndata: {train: {path: t.jsonl, format: alpaca}}\n"


def test_empty_value_is_the_fields_error_with_its_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(HEAD + "training:\n  max_steps: 10\n  learning_rate:\nmethod: {type: lora, lora: {r: }}\n")
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    shown = str(path)
    assert sorted(ei.value.problems) == sorted([
        f"{shown}:6 training.learning_rate: must be a number (got null: the value is empty)",
        f"{shown}:7 method.lora.r: must be a whole number (got null: the value is empty)",
    ])
    with pytest.raises(SystemExit) as ex:
        main(["validate", str(path)])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "not valid YAML" not in err and "Traceback" not in err
    assert "training.learning_rate: must be a number" in err


def test_empty_value_where_null_is_allowed_means_null(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(HEAD + "training:\n  max_steps:\n  num_epochs: 2\n  learning_rate: 1.0e-4\n  precision: fp32\n")
    spec = load_spec(path)
    assert spec.training.max_steps is None and spec.training.num_epochs == 2
    path.write_text(HEAD + "training:\n  num_epochs: 2\n  learning_rate: 1.0e-4\n  precision: fp32\n"
                    "  seed: 2020-01-01\n")  # other scalars still construct as YAML says (a date here)
    with pytest.raises(SpecError, match=r":8 training.seed: must be a whole number \(got datetime.date\(2020, 1, 1\)\)"):
        load_spec(path)
