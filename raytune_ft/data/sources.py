"""Read raw rows from a data file: JSONL, JSON, parquet, CSV or a `datasets` save_to_disk directory.

Every read goes through a pyarrow ``FileSystem`` (local by default, S3 when the caller passes one), so local
files and ``s3://`` objects take the same code path. Rows come out as :class:`RawRow` with the 1-based line
they start on (JSONL, JSON, CSV) or their 1-based row number (parquet, save_to_disk). A row that cannot be
decoded (invalid UTF-8, not JSON, not an object) is yielded with ``error`` set so the caller can either stop
or skip it; a file that cannot be read at all raises :class:`DataError`.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytune_ft.errors import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
_BUFFER = 1 << 20


@dataclass(frozen=True)
class RawRow:
    """One row of a file: ``value`` is the decoded object, or None with ``error`` saying why not."""

    source: str
    line: int
    value: dict[str, Any] | None
    error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def detect_kind(path: str, filesystem: pafs.FileSystem | None = None) -> str:
    """``"jsonl" | "json" | "parquet" | "csv" | "hf_disk"`` for a path; DataError when unknown or missing."""
    fs = filesystem or pafs.LocalFileSystem()
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.Directory:
        return "hf_disk"
    name = path.lower()
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    raise DataError(
        f"{path}: unknown data file type; expected one of {', '.join(SUFFIXES)} "
        "or a datasets save_to_disk directory"
    )


def read_rows(
    path: str, *, filesystem: pafs.FileSystem | None = None, name: str | None = None
) -> Iterator[RawRow]:
    """Yield the rows of ``path`` (on ``filesystem``, local when None); ``name`` is how messages call it."""
    fs = filesystem or pafs.LocalFileSystem()
    shown = name or path
    kind = detect_kind(path, fs)
    if kind == "jsonl":
        yield from _read_jsonl(fs, path, shown)
    elif kind == "json":
        yield from _read_json(fs, path, shown)
    elif kind == "csv":
        yield from _read_csv(fs, path, shown)
    elif kind == "parquet":
        yield from _read_parquet(fs, path, shown)
    else:
        yield from _read_hf_disk(fs, path, shown)


def _open_bytes(fs: pafs.FileSystem, path: str, shown: str) -> io.BufferedReader:
    try:
        return io.BufferedReader(fs.open_input_stream(path), _BUFFER)
    except OSError as e:
        raise DataError(f"{shown}: cannot open: {e}")


def _object_row(shown: str, line: int, value: Any) -> RawRow:
    if not isinstance(value, dict):
        return RawRow(shown, line, None, f"expected a JSON object, got {_json_type(value)}")
    bad = _find_undecodable(value)
    if bad is not None:
        return RawRow(shown, line, None, f"invalid UTF-8 bytes in {bad}")
    return RawRow(shown, line, value)


def _read_jsonl(fs: pafs.FileSystem, path: str, shown: str) -> Iterator[RawRow]:
    with _open_bytes(fs, path, shown) as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RawRow(shown, line_no, None, f"invalid UTF-8 bytes at column {e.start + 1}")
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield RawRow(shown, line_no, None, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            yield _object_row(shown, line_no, value)


def _read_json(fs: pafs.FileSystem, path: str, shown: str) -> Iterator[RawRow]:
    """A JSON array of objects (the rows keep their real line numbers), or JSON lines saved as ``.json``."""
    with _open_bytes(fs, path, shown) as f:
        data = f.read()
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] != "[":
        yield from _read_jsonl(fs, path, shown)  # many ".json" files are JSON lines
        return
    decoder = json.JSONDecoder()
    pos = start + 1
    line, counted = 1, 0  # `line` is the 1-based line of `counted` (a position in text)

    def line_at(p: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    while True:
        pos = _skip_ws(text, pos)
        if text.startswith("]", pos):
            break
        row_line = line_at(pos)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{shown}:{row_line}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                "the file cannot be read"
            )
        yield _object_row(shown, row_line, value)
        pos = _skip_ws(text, pos)
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos):
            raise DataError(
                f"{shown}:{line_at(pos)}: not valid JSON (expected ',' or ']'); the file cannot be read"
            )
    if text[pos + 1 :].strip():
        raise DataError(f"{shown}:{line_at(pos + 1)}: not valid JSON (extra data after the array)")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(fs: pafs.FileSystem, path: str, shown: str) -> Iterator[RawRow]:
    """CSV with a header row; a row's line is the physical line it starts on (the header is line 1)."""
    raw = _open_bytes(fs, path, shown)
    with io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(f"{shown}:1: cannot parse the CSV header ({e})")
        if _has_surrogates("".join(header)):
            raise DataError(f"{shown}:1: invalid UTF-8 bytes in the CSV header")
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{shown}:{start}: cannot parse CSV ({e}); the file cannot be read")
            line, start = start, reader.line_num + 1
            if not cells:
                continue
            if len(cells) > len(header):
                yield RawRow(
                    shown, line, None, f"{len(cells)} cells but the header has {len(header)} columns"
                )
                continue
            # A short row lacks its last columns: they are missing, not empty.
            yield _object_row(shown, line, dict(zip(header, cells, strict=False)))


def _read_parquet(fs: pafs.FileSystem, path: str, shown: str) -> Iterator[RawRow]:
    try:
        pf = pq.ParquetFile(fs.open_input_file(path))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{shown}: not a readable parquet file ({e})")
    yield from _table_rows(pf.iter_batches(batch_size=1024), shown)


def _read_hf_disk(fs: pafs.FileSystem, path: str, shown: str) -> Iterator[RawRow]:
    """A ``Dataset.save_to_disk`` directory, read from its Arrow stream files (no `datasets` import needed)."""
    base = path.rstrip("/")
    if fs.get_file_info(f"{base}/dataset_dict.json").type == pafs.FileType.File:
        splits = _read_json_file(fs, f"{base}/dataset_dict.json", shown).get("splits", [])
        raise DataError(
            f"{shown}: is a DatasetDict directory with splits {splits}; point data at one split",
            hint=f"use {shown.rstrip('/')}/{splits[0] if splits else 'train'}",
        )
    if fs.get_file_info(f"{base}/state.json").type != pafs.FileType.File:
        raise DataError(f"{shown}: a directory, but not a datasets save_to_disk directory (no state.json)")
    state = _read_json_file(fs, f"{base}/state.json", shown)
    files = [entry["filename"] for entry in state.get("_data_files", [])]
    if not files:
        raise DataError(f"{shown}/state.json lists no data files")

    def batches() -> Iterator[pa.RecordBatch]:
        for filename in files:
            try:
                with fs.open_input_stream(f"{base}/{filename}") as stream:
                    yield from pa.ipc.open_stream(stream)
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{shown}/{filename}: cannot read Arrow data ({e})")

    yield from _table_rows(batches(), shown)


def _read_json_file(fs: pafs.FileSystem, path: str, shown: str) -> dict[str, Any]:
    with _open_bytes(fs, path, shown) as f:
        try:
            return json.loads(f.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})")


def _table_rows(batches: Any, shown: str) -> Iterator[RawRow]:
    index = 0
    for batch in batches:
        for value in batch.to_pylist():
            index += 1
            yield _object_row(shown, index, value)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _find_undecodable(value: Any, path: str = "") -> str | None:
    """The first place in a decoded row that holds bytes which were not valid UTF-8, else None."""
    if isinstance(value, str):
        return (f"field {path}" if path else "the row") if _has_surrogates(value) else None
    if isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return f"field {path}" if path else "the row"
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _find_undecodable(v, f"{path}.{k}" if path else f"'{k}'")
            if found:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _find_undecodable(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
