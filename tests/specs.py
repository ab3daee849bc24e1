"""Small valid spec documents that tests mutate. Plain dicts: no I/O, no heavy imports."""

from __future__ import annotations

import copy


def base_doc(**over) -> dict:
    doc = {
        "name": "unit",
        "model": {"name_or_path": "some/model"},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16}},
        "data": {"train": {"path": "train.jsonl", "format": "alpaca"}, "max_seq_length": 128},
        "training": {"max_steps": 10, "learning_rate": 1e-4, "precision": "fp32"},
    }
    for k, v in over.items():
        doc[k] = v
    return copy.deepcopy(doc)
