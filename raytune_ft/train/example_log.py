"""Which training rows each optimizer step trained on (``monitoring.log_examples``): one record per step in
metrics.jsonl, ``{"step": s, "epoch": e, "examples": [row, ...]}``, every rank's rows gathered, the row being
its index in the prepared training set (after packing: a packed row). What it shows: within an epoch each row
is trained once, across a resume and across a change in the worker count (elastic workers); a resume drops
the records after its checkpoint with the rest of metrics.jsonl.

The gap it fills: HF's Trainer says nothing about which rows a step took. The row index rides in each batch
(``rtf_rows``) from the dataset through the collator, and comes out in ``Trainer.get_batch_samples``, which
takes exactly one optimizer step's batches just before the step (the data loader's prefetch cannot shift a
row to the wrong step)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

KEY = "rtf_rows"


class IndexedRows(Dataset):
    """The training rows, each with its index under ``KEY``."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.rows[i], KEY: i}


class IndexedCollator:
    """The run's collator on the rows without their index, plus the batch's indices as a tensor."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not batch or KEY not in batch[0]:  # the evaluation's rows (the trainer collates them the same way)
            return self.collator(batch)
        out = self.collator([{k: v for k, v in row.items() if k != KEY} for row in batch])
        out[KEY] = torch.tensor([row[KEY] for row in batch], dtype=torch.long)
        return out


class ExampleLog(TrainerCallback):
    """Collects the rows of each step's batches (:meth:`install` on the trainer) and, at the step's end,
    gathers every rank's and appends one record to metrics.jsonl (rank 0)."""

    def __init__(self, rank: int, metrics_path: str) -> None:
        self.rank, self.metrics_path = rank, metrics_path
        self.pending: list[int] = []

    def install(self, trainer: Any) -> None:
        take = trainer.get_batch_samples

        def get_batch_samples(epoch_iterator, num_batches, device):
            batches, items = take(epoch_iterator, num_batches, device)
            for b in batches:
                rows = b.pop(KEY, None)  # the model's forward must not see it
                if rows is not None:
                    self.pending.extend(int(r) for r in rows.tolist())
            return batches, items

        trainer.get_batch_samples = get_batch_samples

    def on_step_end(self, args, state, control, **kwargs):
        from raytune_ft.train.callbacks import gather

        rows, self.pending = self.pending, []
        every = [r for part in gather(rows) for r in part]  # a collective: every rank, every step
        if self.rank == 0:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": round(state.epoch or 0.0, 6),
                                    "examples": sorted(every)}) + "\n")
