"""Reading rows from every supported file type, with line numbers and undecodable rows."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raytune_ft.data.sources import detect_kind, read_rows
from raytune_ft.errors import DataError

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Add 1 and 2", "input": "1, 2", "output": "3"},
    {
        "instruction": "Translate 'chat' to English",
        "input": "",
        "output": 'cat, with "quotes"\nand a newline é',
    },
]


def write_all_formats(tmp_path, rows):
    """The same rows as jsonl, json, parquet, csv and a datasets save_to_disk directory."""
    import datasets

    paths = {}
    paths["jsonl"] = tmp_path / "d.jsonl"
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    paths["json"] = tmp_path / "d.json"
    paths["json"].write_text(json.dumps(rows, indent=2), encoding="utf-8")
    paths["parquet"] = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), paths["parquet"])
    paths["csv"] = tmp_path / "d.csv"
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    paths["hf_disk"] = tmp_path / "d_hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(paths["hf_disk"]))
    return paths


def test_every_format_reads_the_same_rows(tmp_path):
    paths = write_all_formats(tmp_path, ROWS)
    for kind, path in paths.items():
        assert detect_kind(str(path)) == kind
        got = list(read_rows(str(path)))
        assert [r.value for r in got] == ROWS, kind
        assert all(r.error is None for r in got)


def test_line_numbers_are_where_rows_start(tmp_path):
    paths = write_all_formats(tmp_path, ROWS)
    # jsonl: one row per line; blank lines are skipped but still counted
    p = tmp_path / "gaps.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert [r.line for r in read_rows(str(p))] == [1, 3]
    # json array pretty-printed with indent=2: each object spans 5 lines after the opening bracket
    assert [r.line for r in read_rows(str(paths["json"]))] == [2, 7, 12]
    # csv: header is line 1; the third row's quoted newline makes it span two physical lines
    assert [r.line for r in read_rows(str(paths["csv"]))] == [2, 3, 4]
    # parquet / save_to_disk: 1-based row numbers
    assert [r.line for r in read_rows(str(paths["parquet"]))] == [1, 2, 3]
    assert [r.line for r in read_rows(str(paths["hf_disk"]))] == [1, 2, 3]


def test_csv_row_after_multiline_cell_gets_its_physical_line(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text('text\n"a\nb\nc"\nnext\n', encoding="utf-8")
    rows = list(read_rows(str(p)))
    assert [(r.line, r.value) for r in rows] == [(2, {"text": "a\nb\nc"}), (5, {"text": "next"})]


def test_undecodable_and_non_json_lines_are_bad_rows_with_lines(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(
        b'{"text": "ok"}\n'
        b"this is not json\n"
        b'{"text": "caf\xe9"}\n'  # latin-1, not UTF-8
        b"[1, 2]\n"
        b'{"text": "fine"}\n'
    )
    rows = list(read_rows(str(p), name="data/bad.jsonl"))
    assert [(r.line, r.error is None) for r in rows] == [
        (1, True),
        (2, False),
        (3, False),
        (4, False),
        (5, True),
    ]
    assert "not valid JSON" in rows[1].error
    assert "invalid UTF-8" in rows[2].error
    assert "expected a JSON object, got array" in rows[3].error
    assert rows[2].where == "data/bad.jsonl:3"


def test_undecodable_bytes_in_csv_and_json_are_bad_rows(tmp_path):
    c = tmp_path / "bad.csv"
    c.write_bytes(b"text\nok\ncaf\xe9\nfine\n")
    rows = list(read_rows(str(c)))
    assert [(r.line, r.error is not None) for r in rows] == [(2, False), (3, True), (4, False)]
    assert "invalid UTF-8 bytes in field 'text'" in rows[1].error
    j = tmp_path / "bad.json"
    j.write_bytes(b'[\n{"text": "ok"},\n{"text": "caf\xe9"}\n]\n')
    rows = list(read_rows(str(j)))
    assert [(r.line, r.error is not None) for r in rows] == [(2, False), (3, True)]


def test_a_utf8_byte_order_mark_is_ignored(tmp_path):
    for name, body in (
        ("bom.jsonl", b'{"text": "a"}\n'),
        ("bom.json", b'[{"text": "a"}]'),
        ("bom.csv", b"text\na\n"),
    ):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body)
        assert [r.value for r in read_rows(str(tmp_path / name))] == [{"text": "a"}], name


def test_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [(r.line, r.value) for r in read_rows(str(p))] == [(1, {"text": "a"}), (2, {"text": "b"})]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.json", '[\n{"text": "a"},\n{"text": \n', "broken.json:3: not valid JSON"),
        ("x.txt", "hello", "unknown data file type"),
        ("ragged.csv", "a,b\n1,2,3\n", None),
    ],
)
def test_unreadable_files(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    if message is None:  # a CSV row with too many cells is a bad row, not a broken file
        (row,) = read_rows(str(p))
        assert row.line == 2 and "3 cells but the header has 2 columns" in row.error
        return
    with pytest.raises(DataError, match=message):
        list(read_rows(str(p)))


def test_missing_path_and_plain_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_rows(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="not a datasets save_to_disk directory"):
        list(read_rows(str(tmp_path)))


def test_dataset_dict_directory_asks_for_a_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict directory with splits \['train'\]"):
        list(read_rows(str(tmp_path / "dd")))
    assert [r.value for r in read_rows(str(tmp_path / "dd" / "train"))] == ROWS


def test_reads_through_a_passed_filesystem(tmp_path):
    """A caller-supplied pyarrow filesystem (S3 in production) with a bucket/key style path."""
    (tmp_path / "bucket").mkdir()
    paths = write_all_formats(tmp_path / "bucket", ROWS)
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    for kind, path in paths.items():
        key = f"bucket/{path.name}"
        rows = list(read_rows(key, filesystem=fs, name=f"s3://{key}"))
        assert [r.value for r in rows] == ROWS, kind
        assert rows[0].source == f"s3://{key}"
