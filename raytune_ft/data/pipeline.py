"""From ``data:`` spec to tokenized (and optionally packed) train/eval examples, plus statistics.

Steps: read every source, validate each row (``on_bad_row: error`` stops at the first bad row with
``file:line: problem (format f)``; ``skip`` counts them per file), split eval off (``data.eval`` sources, or
a seeded ``eval_split`` of each train source, taken before weighting so no eval row is ever trained on),
tokenize with loss masks, truncate to ``max_seq_length`` (keeping the beginning; an example left with no
trained token is dropped), mix the train sources by weight, shuffle, and pack when asked.

Mixture semantics: ``weight`` is how many times a source's examples are drawn per epoch, relative to its
own size. Source i contributes ``round(weight_i * n_i)`` examples: every example ``floor(weight_i)`` times
plus a seeded sample without replacement for the fractional part. So weight 1 (the default) uses a file
as is, 2 repeats it, 0.5 takes a random half, and listing files without weights concatenates them. To give
sources shares s_i of a mixture of N examples, set ``weight_i = s_i * N / n_i``. Eval sources ignore weights.

Everything is deterministic for ``seed`` (pass ``training.data_seed``, else ``training.seed``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from raytune_ft.data.formats import (
    IGNORE_INDEX,
    OBJECTIVE_FORMATS,
    Example,
    RowError,
    alpaca_prompt,
    normalize_row,
    preference_texts,
    render_chat,
    scored_text,
    tokenize_examples,
    tokenize_scored,
)
from raytune_ft.data.hub import is_hub, read_hub_rows
from raytune_ft.data.packing import pack_examples, packing_efficiency, padding_efficiency, token_count
from raytune_ft.data.sources import RawRow, read_rows
from raytune_ft.data.split import split_indices
from raytune_ft.errors import DataError, UserError

FilesystemFor = Callable[[str], tuple[Any, str]]  # uri -> (pyarrow FileSystem, path on it)


@dataclass
class DataStats:
    """What the pipeline produced. Counts of examples are after weighting; ``truncated`` and ``dropped``
    count source examples (before weighting)."""

    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    trained_tokens: int = 0
    eval_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    mixture: dict[str, int] = field(default_factory=dict)
    max_seq_length: int | None = None
    labels: dict[str, float] | None = None  # scored data: the training labels' count/mean/std/min/max
    packed_rows: int | None = None
    eval_packed_rows: int | None = None
    packing_efficiency: float | None = None
    padding_efficiency: float | None = None

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [
            f"train examples: {self.train_examples}  eval examples: {self.eval_examples}",
            f"train tokens: {self.train_tokens} ({self.trained_tokens} trained)  eval tokens: {self.eval_tokens}",
            f"truncated to max_seq_length {self.max_seq_length}: {self.truncated}"
            + (f"  dropped (no trained token left): {self.dropped}" if self.dropped else ""),
            f"skipped bad rows: {self.skipped_total}"
            + "".join(f"\n  {name}: {n}" for name, n in self.skipped.items()),
        ]
        if self.labels:
            lab = self.labels
            out.append(f"labels: n {lab['n']:.0f}  mean {lab['mean']:.4g}  std {lab['std']:.4g}  "
                       f"min {lab['min']:.4g}  max {lab['max']:.4g}")
        if len(self.mixture) > 1:
            out.append("mixture: " + ", ".join(f"{name}: {n}" for name, n in self.mixture.items()))
        if self.packed_rows is not None:
            out.append(f"packed rows: {self.packed_rows}  packing efficiency: {self.packing_efficiency:.1%}")
        elif self.padding_efficiency is not None:
            out.append(f"padding efficiency: {self.padding_efficiency:.1%}")
        return out


@dataclass
class _Source:
    name: str
    fmt: str
    weight: float
    rows: list[dict[str, Any]]


def build_datasets(
    data_spec: Any,
    tokenizer: Any,
    *,
    seed: int,
    filesystem_for: FilesystemFor | None = None,
    batch_size: int | None = None,
) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]], DataStats]:
    """``(train_examples, eval_examples, stats)`` for a ``data:`` spec (or any object/mapping of its shape).

    Examples are dicts of ``input_ids`` and ``labels`` (plus ``position_ids`` when packed). ``batch_size``
    only feeds the padding-efficiency statistic of unpacked data.
    """
    on_bad_row = _get(data_spec, "on_bad_row", "error")
    max_len = _get(data_spec, "max_seq_length")
    packing = bool(_get(data_spec, "packing", False))
    train_on_prompt = bool(_get(data_spec, "train_on_prompt", False))
    eval_split = _get(data_spec, "eval_split")
    if packing and not max_len:
        raise UserError("data.packing needs data.max_seq_length (the packed row length)")
    if _get(data_spec, "eval") and eval_split is not None:
        raise UserError("give data.eval (a source) or data.eval_split (a fraction of train), not both")

    stats = DataStats(max_seq_length=max_len)
    train = [_load(s, on_bad_row, filesystem_for, stats) for s in _sources(_get(data_spec, "train"))]
    if not train:
        raise UserError("data.train needs at least one source")
    evals = [_load(s, on_bad_row, filesystem_for, stats) for s in _sources(_get(data_spec, "eval"))]
    if eval_split is not None:
        for i, src in enumerate(train):
            if len(src.rows) < 2:
                raise DataError(
                    f"{src.name}: data.eval_split needs at least 2 usable rows, found {len(src.rows)}"
                )
            keep, held = split_indices(len(src.rows), eval_split, [seed, i])
            evals.append(_Source(src.name, src.fmt, 1.0, [src.rows[j] for j in held]))
            src.rows = [src.rows[j] for j in keep]

    if {s.fmt for s in [*train, *evals]} & set(OBJECTIVE_FORMATS):
        return _objective_datasets(train, evals, tokenizer, max_len, seed, stats)

    def tokenized(src: _Source) -> list[Example]:
        examples = tokenize_examples(src.fmt, src.rows, tokenizer, train_on_prompt=train_on_prompt)
        return _truncate(examples, max_len, stats)

    train_parts = [tokenized(s) for s in train]
    for src, part in zip(train, train_parts, strict=True):
        if not part:
            raise DataError(f"{src.name}: no training examples left after truncation to {max_len} tokens")
    train_examples = _mix(train_parts, [s.weight for s in train], seed)
    if not train_examples:
        raise DataError("the weighted mixture of data.train draws no examples; raise the weights")
    stats.mixture = {s.name: round(s.weight * len(p)) for s, p in zip(train, train_parts, strict=True)}
    eval_examples = [ex for src in evals for ex in tokenized(src)]

    stats.train_examples, stats.eval_examples = len(train_examples), len(eval_examples)
    stats.train_tokens, stats.eval_tokens = token_count(train_examples), token_count(eval_examples)
    stats.trained_tokens = sum(sum(1 for x in ex["labels"][1:] if x != IGNORE_INDEX) for ex in train_examples)
    if packing:
        train_examples = pack_examples(train_examples, max_len)
        eval_examples = pack_examples(eval_examples, max_len)
        stats.packed_rows, stats.eval_packed_rows = len(train_examples), len(eval_examples)
        stats.packing_efficiency = packing_efficiency(train_examples, max_len)
    elif batch_size:
        stats.padding_efficiency = padding_efficiency(
            [len(ex["input_ids"]) for ex in train_examples], batch_size
        )
    return train_examples, eval_examples, stats


def training_texts(data_spec: Any, *, filesystem_for: FilesystemFor | None = None) -> Iterator[str]:
    """The plain texts of the train sources (alpaca prompt + output, chat in the built-in template, text),
    e.g. to train a tokenizer before :func:`build_datasets`. Bad rows follow ``on_bad_row``."""
    on_bad_row = _get(data_spec, "on_bad_row", "error")
    for spec in _sources(_get(data_spec, "train")):
        src = _load(spec, on_bad_row, filesystem_for, DataStats())
        for row in src.rows:
            if src.fmt == "alpaca":
                yield alpaca_prompt(row["instruction"], row["input"], row["system"]) + row["output"]
            elif src.fmt == "chat":
                yield render_chat(None, row["messages"], add_generation_prompt=False)
            elif src.fmt == "scored":
                yield scored_text(row, None)
            elif src.fmt == "preference":
                texts = preference_texts(row, None)
                yield texts["prompt"] + texts["chosen"]
                yield texts["prompt"] + texts["rejected"]
            else:
                yield row["text"]


def read_source(
    source: Any, *, on_bad_row: str = "error", filesystem_for: FilesystemFor | None = None
) -> tuple[list[dict[str, Any]], int]:
    """The normalized rows of one source and how many bad rows were skipped."""
    stats = DataStats()
    src = _load(source, on_bad_row, filesystem_for, stats)
    return src.rows, stats.skipped_total


def _objective_datasets(train: list[_Source], evals: list[_Source], tokenizer: Any, max_len: int | None,
                        seed: int, stats: DataStats) -> tuple[list[dict[str, Any]], list[dict[str, Any]], DataStats]:
    """Preference and scored data (``method.objective`` other than sft), read, split and weighted as above
    but kept whole: ``scored`` rows become ``{input_ids, labels: float}`` (truncated to ``max_len``, keeping
    the beginning); ``preference`` rows become TRL's text columns ``{prompt, chosen, rejected}`` (the trainer
    tokenizes, and truncates to ``max_len``)."""
    fmts = {s.fmt for s in [*train, *evals]}
    if len(fmts) > 1:
        raise UserError(f"data sources mix the formats {', '.join(sorted(fmts))}; an objective reads one of "
                        f"{', '.join(OBJECTIVE_FORMATS)} in every source")
    fmt = fmts.pop()

    def convert(src: _Source) -> list[dict[str, Any]]:
        if fmt == "preference":
            rows = [preference_texts(r, tokenizer) for r in src.rows]
            chosen, rejected = ([len(x) for x in tokenizer([r["prompt"] + r[k] for r in rows],
                                                           add_special_tokens=False)["input_ids"]]
                                for k in ("chosen", "rejected"))
            for r, a, b in zip(rows, chosen, rejected, strict=True):
                r["_tokens"] = a + b
                stats.truncated += bool(max_len and max(a, b) + 2 > max_len)  # + BOS and EOS
            return rows
        rows = tokenize_scored(src.rows, tokenizer)
        for r in rows:
            if max_len and len(r["input_ids"]) > max_len:
                stats.truncated += 1
                r["input_ids"] = r["input_ids"][:max_len]
        return rows

    train_parts = [convert(s) for s in train]
    train_examples = _mix(train_parts, [s.weight for s in train], seed)
    if not train_examples:
        raise DataError("the weighted mixture of data.train draws no examples; raise the weights")
    stats.mixture = {s.name: round(s.weight * len(p)) for s, p in zip(train, train_parts, strict=True)}
    eval_examples = [ex for src in evals for ex in convert(src)]

    def tokens(examples: list[dict[str, Any]]) -> int:
        return sum(ex.pop("_tokens") if "_tokens" in ex else len(ex["input_ids"]) for ex in examples)

    stats.train_examples, stats.eval_examples = len(train_examples), len(eval_examples)
    train_examples, eval_examples = [dict(ex) for ex in train_examples], [dict(ex) for ex in eval_examples]
    stats.train_tokens, stats.eval_tokens = tokens(train_examples), tokens(eval_examples)
    stats.trained_tokens = stats.train_tokens
    if fmt == "scored":
        y = np.array([ex["labels"] for ex in train_examples], dtype=np.float64)
        stats.labels = {"n": float(len(y)), "mean": float(y.mean()), "std": float(y.std()),
                        "min": float(y.min()), "max": float(y.max())}
    return train_examples, eval_examples, stats


# --------------------------------------------------------------------------- helpers


def check_data(spec: Any) -> int:
    """Read every data row once before anything starts, so a bad row fails in seconds with its
    file and line, not after Ray and the model are up. Returns the number of rows skipped."""
    from raytune_ft import storage as st

    skipped = 0
    for src in [*spec.data.train_sources, *spec.data.eval_sources]:
        if "://" not in src.path and not os.path.exists(src.path):
            raise UserError(f"data source not found: {src.path}",
                            hint="paths are relative to the directory you run rtf from")
        _, n = read_source(src, on_bad_row=spec.data.on_bad_row, filesystem_for=partial(st.open, storage=spec.storage))
        skipped += n
    return skipped


def _load(source: Any, on_bad_row: str, filesystem_for: FilesystemFor | None, stats: DataStats) -> _Source:
    path = _get(source, "path")
    fmt = _get(source, "format") or "alpaca"
    fields = _get(source, "fields") or {}
    weight = _get(source, "weight")
    weight = 1.0 if weight is None else float(weight)
    if not path:
        raise UserError("a data source needs a path")
    if weight <= 0:
        raise UserError(f"{path}: weight must be > 0, got {weight}")
    if on_bad_row not in ("error", "skip"):
        raise UserError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    rows, skipped = [], 0
    for raw in _rows(source, path, filesystem_for):
        problem = raw.error
        if problem is None:
            try:
                rows.append(normalize_row(fmt, raw.value, fields))
                continue
            except RowError as e:
                problem = str(e)
        if on_bad_row == "error":
            raise DataError(
                f"{raw.where}: {problem} (format {fmt})",
                hint="fix the row, or set data.on_bad_row: skip to skip bad rows",
            )
        skipped += 1
    if skipped:
        stats.skipped[path] = stats.skipped.get(path, 0) + skipped
    if not rows:
        raise DataError(f"{path}: no usable rows" + (f" ({skipped} bad rows skipped)" if skipped else ""))
    return _Source(path, fmt, weight, rows)


def _rows(source: Any, path: str, filesystem_for: FilesystemFor | None) -> Iterator[RawRow]:
    if is_hub(path):
        return read_hub_rows(path, config=_get(source, "config"), split=_get(source, "split"),
                             revision=_get(source, "revision"))
    fs, fs_path = _filesystem(path, filesystem_for)
    return read_rows(fs_path, filesystem=fs, name=path)


def _filesystem(path: str, filesystem_for: FilesystemFor | None) -> tuple[Any, str]:
    if path.startswith("file://"):
        return None, path[len("file://") :]
    if "://" in path:
        if filesystem_for is None:
            raise UserError(
                f"{path}: reading {path.split('://')[0]}:// data needs storage credentials/endpoint"
            )
        return filesystem_for(path)
    return None, path


def _truncate(examples: list[Example], max_len: int | None, stats: DataStats) -> list[Example]:
    if not max_len:
        return examples
    kept = []
    for ex in examples:
        if len(ex["input_ids"]) > max_len:
            stats.truncated += 1
            ex = {"input_ids": ex["input_ids"][:max_len], "labels": ex["labels"][:max_len]}
            if all(x == IGNORE_INDEX for x in ex["labels"][1:]):
                stats.dropped += 1
                continue
        kept.append(ex)
    return kept


def _mix(parts: Sequence[list[Example]], weights: Sequence[float], seed: int) -> list[Example]:
    """Draw ``round(w * n)`` examples per part (see the module docstring), then shuffle them all."""
    drawn: list[Example] = []
    for i, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        n = len(part)
        whole = int(weight)
        extra = round(weight * n) - whole * n
        drawn += part * whole
        if extra:
            picks = np.sort(np.random.default_rng([seed, i, 1]).choice(n, size=extra, replace=False))
            drawn += [part[j] for j in picks]
    order = np.random.default_rng([seed, 0]).permutation(len(drawn))
    return [drawn[j] for j in order]


def _sources(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)
