"""split_file and split_indices: deterministic, disjoint and complete; fractions outside (0, 1) refused."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytune_ft.data.split import split_file, split_indices
from raytune_ft.errors import DataError, UserError


def test_split_indices_are_disjoint_complete_sorted_and_seeded():
    train, evals = split_indices(100, 0.1, seed=1)
    assert len(evals) == 10 and len(train) == 90
    assert sorted(train + evals) == list(range(100)) and not set(train) & set(evals)
    assert train == sorted(train) and evals == sorted(evals)
    assert split_indices(100, 0.1, seed=1) == (train, evals)
    assert split_indices(100, 0.1, seed=2)[1] != evals
    assert split_indices(3, 0.01, seed=0)[1].__len__() == 1  # at least one eval row
    assert split_indices(3, 0.99, seed=0)[0].__len__() == 1  # at least one train row


def test_split_file_writes_train_and_eval_next_to_the_input(tmp_path):
    lines = [json.dumps({"text": f"row {i}", "u": "é"}, ensure_ascii=False) for i in range(50)]
    src = tmp_path / "data.jsonl"
    src.write_text(
        "\n".join(lines[:25]) + "\n\n" + "\n".join(lines[25:]), encoding="utf-8"
    )  # blank line, no final \n
    train, evals = split_file(src, 0.2, seed=5)
    assert (train, evals) == (tmp_path / "data.train.jsonl", tmp_path / "data.eval.jsonl")
    got_train = train.read_text(encoding="utf-8").splitlines()
    got_eval = evals.read_text(encoding="utf-8").splitlines()
    assert len(got_eval) == 10 and len(got_train) == 40
    assert sorted(got_train + got_eval) == sorted(lines)  # byte-exact lines, nothing lost or duplicated
    assert got_train == [line for line in lines if line in set(got_train)]  # input order kept
    first = (train.read_bytes(), evals.read_bytes())
    split_file(src, 0.2, seed=5)
    assert (train.read_bytes(), evals.read_bytes()) == first
    split_file(src, 0.2, seed=6)
    assert evals.read_bytes() != first[1]


def test_split_file_of_parquet_into_out_dir(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    train, evals = split_file(tmp_path / "qa.parquet", 0.3, seed=0, out_dir=tmp_path / "out")
    assert train == tmp_path / "out" / "qa.train.jsonl"
    got = [json.loads(line) for p in (train, evals) for line in p.read_text().splitlines()]
    assert sorted(got, key=lambda r: r["instruction"]) == sorted(rows, key=lambda r: r["instruction"])
    assert len(evals.read_text().splitlines()) == 3


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, True])
def test_fraction_outside_open_interval_is_a_user_error(tmp_path, fraction):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(UserError, match="between 0 and 1"):
        split_file(src, fraction, seed=0)


def test_too_few_rows_or_missing_file(tmp_path):
    src = tmp_path / "one.jsonl"
    src.write_text('{"text": "a"}\n')
    with pytest.raises(DataError, match="need at least 2"):
        split_file(src, 0.5, seed=0)
    with pytest.raises(DataError, match="no such file"):
        split_file(tmp_path / "missing.jsonl", 0.5, seed=0)
