"""Padding-free packing of tokenized examples, and the collators for packed and unpacked batches.

Packing is *best-fit in input order*: each example goes into the open row with the least free space that
still holds it, else into a new row. Examples are never split (truncate them first), rows keep the input's
(shuffled) order of first use, and the result is deterministic.

A packed row holds ``input_ids``, ``labels`` and ``position_ids`` that restart at 0 at each example. The label
of each example's first token is -100: HF causal-LM losses shift labels inside the row, so without this the
last token of one example would learn to predict the first token of the next. With it, the packed loss
equals the unpacked loss.

The model must see the boundaries. :func:`collate_packed` returns no ``attention_mask``, and transformers'
mask builders (sdpa, eager, flex) then derive per-example causal masks from ``position_ids`` (row by row, so
packed rows stay rows unless flash-attention's varlen kernel can take one flattened row); flash-attention
reads them too, and so does rtf's ``rtf_packed_sdpa`` (:mod:`raytune_ft.train.attention`, attention ``auto``
on CPU), which runs SDPA per example instead of over a masked row. They only do so when no KV cache is passed: call the model with ``use_cache=False``
(``Trainer`` sets ``model.config.use_cache = args.use_cache``, False by default). With a cache, the
examples of a row silently attend to each other.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raytune_ft.data.formats import IGNORE_INDEX

if TYPE_CHECKING:  # torch loads in the workers' collators only: the driver reads data without it
    import torch

Row = Mapping[str, Sequence[int]]


def pack_examples(examples: Sequence[Row], max_seq_length: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most ``max_seq_length`` tokens (best-fit, see the module docstring)."""
    bins: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (free space, row index), sorted; full rows are dropped
    for i, ex in enumerate(examples):
        n = len(ex["input_ids"])
        if n > max_seq_length:
            raise ValueError(
                f"example {i} has {n} tokens, more than max_seq_length {max_seq_length}; truncate first"
            )
        if n == 0:
            continue
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = max_seq_length, len(bins)
            bins.append([])
        bins[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return [_concat([examples[i] for i in members]) for members in bins]


def _concat(examples: Sequence[Row]) -> dict[str, list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for ex in examples:
        ids = list(ex["input_ids"])
        input_ids += ids
        labels += [IGNORE_INDEX] + list(ex["labels"][1:])
        position_ids += range(len(ids))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate_packed(batch: Sequence[Row], pad_token_id: int = 0, flatten: bool = False) -> dict[str, torch.Tensor]:
    """Collate packed rows, with ``position_ids`` and no attention mask.

    Default: keep rows as rows, ``[B, longest row]``, right-padded with ``pad_token_id``; the pad tail gets
    labels -100 and its own ``position_ids`` from 0, so it is a separate block no real token attends to.
    SDPA/eager then mask each row block-diagonally: attention costs ``B·L²``, as for padded batches
    (``rtf_packed_sdpa``: the sum of the examples' squared lengths).
    ``flatten=True`` concatenates the batch into one row ``[1, Σ]``: right for flash-attention, whose varlen
    kernel reads the boundaries from ``position_ids`` and wastes nothing, but with SDPA/eager it would
    compute a masked ``Σ×Σ`` attention (the benchmark measured packing losing all its gain that way).

    Rows that already carry ``position_ids`` (from :func:`pack_examples`) keep them; plain examples get
    ``position_ids`` from 0 and their first label set to -100.
    """
    import torch

    rows = [row if "position_ids" in row else _concat([row]) for row in batch]
    if flatten:
        rows = [_join(rows)]
    longest = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(list(r["input_ids"]), dtype=torch.long)
        labels[i, :n] = torch.as_tensor(list(r["labels"]), dtype=torch.long)
        position_ids[i, :n] = torch.as_tensor(list(r["position_ids"]), dtype=torch.long)
        position_ids[i, n:] = torch.arange(longest - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _join(rows: Sequence[Row]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for r in rows:
        for k in out:
            out[k] += list(r[k])
    return out


@dataclass(frozen=True)
class PaddedCollator:
    """Right-pad a batch of examples to its longest one: pads get label -100 and attention_mask 0."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, batch: Sequence[Row]) -> dict[str, torch.Tensor]:
        import torch

        longest = max(len(row["input_ids"]) for row in batch)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        input_ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.as_tensor(list(row["input_ids"]), dtype=torch.long)
            labels[i, :n] = torch.as_tensor(list(row["labels"]), dtype=torch.long)
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def packing_efficiency(rows: Sequence[Row], max_seq_length: int) -> float:
    """Real tokens / row capacity (``len(rows) * max_seq_length``); 1.0 means no room left anywhere."""
    if not rows:
        return 1.0
    return sum(len(r["input_ids"]) for r in rows) / (len(rows) * max_seq_length)


def padding_efficiency(lengths: Sequence[int], batch_size: int) -> float:
    """Real tokens / padded tokens when consecutive examples are right-padded in batches of ``batch_size``."""
    total = padded = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        total += sum(chunk)
        padded += max(chunk) * len(chunk)
    return total / padded if padded else 1.0


def token_count(rows: Sequence[Row]) -> int:
    """All tokens in ``rows``."""
    return sum(len(r["input_ids"]) for r in rows)


def trained_token_count(rows: Sequence[Row]) -> int:
    """Tokens that are loss targets after the causal shift (labels[1:] != -100, per row)."""
    return sum(sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX) for r in rows)
