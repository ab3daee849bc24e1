"""The quickstart dataset built from the Python standard library."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

from raytune_ft.data.formats import normalize_row
from raytune_ft.data.quickstart import build_quickstart_data


def test_builds_valid_deterministic_alpaca_rows(tmp_path):
    # no timing assertion: machines are shared and noisy (bench/ measures speed)
    train, evals = build_quickstart_data(tmp_path / "a", max_examples=300, eval_fraction=0.1)
    assert (train.name, evals.name) == ("quickstart.train.jsonl", "quickstart.eval.jsonl")
    rows = [json.loads(line) for p in (train, evals) for line in p.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 300 and len(evals.read_text().splitlines()) == 30
    assert len({r["output"] for r in rows}) == 300
    for row in rows:
        normalize_row("alpaca", row)  # a valid alpaca row
        match = re.match(
            r"Write a Python function `(\w+)\((.*)\)` that: (.{20,300})$", row["instruction"], re.S
        )
        assert match, row["instruction"]
        tree = ast.parse(row["output"])
        (func,) = tree.body
        assert isinstance(func, ast.FunctionDef) and func.name == match.group(1)
        assert ast.get_docstring(func) is None  # the docstring became the instruction
        assert 3 <= len(row["output"].splitlines()) <= 30
    # deterministic, and the module entry point gives the same files
    out = subprocess.run(
        [sys.executable, "-m", "raytune_ft.data.quickstart", str(tmp_path / "b"), "--max-examples", "300",
         "--eval-fraction", "0.1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    train2, evals2 = (tmp_path / "b" / "quickstart.train.jsonl"), (tmp_path / "b" / "quickstart.eval.jsonl")
    assert out.stdout.split() == [str(train2), str(evals2)]
    assert train2.read_bytes() == train.read_bytes() and evals2.read_bytes() == evals.read_bytes()
