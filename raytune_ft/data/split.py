"""Deterministic train/eval splits: of row indices (used by ``data.eval_split``) and of files (``rtf data split``).

The eval part is ``round(n * fraction)`` rows, at least 1 and at most n - 1, chosen by a seeded permutation
(numpy PCG64, stable across platforms and versions); both parts keep the input's order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from raytune_ft.data.sources import SUFFIXES, read_rows
from raytune_ft.errors import DataError, UserError


def eval_size(n: int, fraction: float) -> int:
    """How many of ``n`` rows go to eval for ``fraction``."""
    check_fraction(fraction)
    return min(max(round(n * fraction), 1), n - 1)


def check_fraction(fraction: float) -> None:
    """UserError unless ``0 < fraction < 1``."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
        raise UserError(f"eval fraction must be between 0 and 1 (exclusive), got {fraction!r}")


def split_indices(n: int, fraction: float, seed: int | Sequence[int]) -> tuple[list[int], list[int]]:
    """``(train, eval)`` index lists over ``range(n)``: disjoint, complete, sorted, deterministic for ``seed``
    (an int >= 0 or a sequence of them)."""
    check_fraction(fraction)
    if n < 2:
        raise DataError(f"cannot split {n} row(s) into train and eval; need at least 2")
    chosen = np.random.default_rng(seed).permutation(n)[: eval_size(n, fraction)]
    is_eval = np.zeros(n, dtype=bool)
    is_eval[chosen] = True
    return np.flatnonzero(~is_eval).tolist(), np.flatnonzero(is_eval).tolist()


def split_file(
    input_path: str | Path, eval_fraction: float, seed: int, out_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """Write ``<stem>.train.jsonl`` and ``<stem>.eval.jsonl`` (next to the input, or in ``out_dir``).

    JSONL lines are copied byte for byte (blank lines dropped); other formats are read as rows and written
    as JSON lines, and an unreadable row there is a DataError.
    """
    check_fraction(eval_fraction)
    src = Path(input_path)
    lines = _jsonl_lines(src) if src.suffix.lower() == ".jsonl" else _rows_as_lines(src)
    train_idx, eval_idx = split_indices(len(lines), eval_fraction, seed)
    stem = src.name
    for suffix in SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    target = Path(out_dir) if out_dir is not None else src.parent
    target.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = target / f"{stem}.train.jsonl", target / f"{stem}.eval.jsonl"
    if src.resolve() in (train_path.resolve(), eval_path.resolve()):
        raise UserError(f"{src}: splitting would overwrite the input; pass another out_dir")
    for path, idx in ((train_path, train_idx), (eval_path, eval_idx)):
        with open(path, "wb") as f:
            f.writelines(lines[i] for i in idx)
    return train_path, eval_path


def _jsonl_lines(src: Path) -> list[bytes]:
    if not src.is_file():
        raise DataError(f"{src}: no such file")
    with open(src, "rb") as f:
        lines = [line for line in f if line.strip()]
    if lines and not lines[-1].endswith(b"\n"):
        lines[-1] += b"\n"
    return lines


def _rows_as_lines(src: Path) -> list[bytes]:
    lines = []
    for row in read_rows(str(src)):
        if row.error:
            raise DataError(f"{row.where}: {row.error}")
        lines.append((json.dumps(row.value, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
    return lines
