"""Synthetic data with a learnable signal for the non-SFT objectives (built in the test, nothing downloaded).

scored: a few words ending in a colour; the label is the colour's value (plus a little noise), so the last
token decides it. preference: the chosen completion is always a "yes" sentence, the rejected a "no" one."""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": 0.0, "green": 1.0, "blue": 2.0, "black": 3.0}
WORDS = ["def", "return", "import", "class", "value", "string", "list", "file", "data", "number"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def scored_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        colour = rng.choice(list(COLOURS))
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + " " + colour
        rows.append({"text": text, "label": COLOURS[colour] + rng.uniform(-0.05, 0.05)})
    return rows


def preference_rows(n: int, seed: int = 0, chat: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "Is the " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) + " fine?"
        chosen, rejected = "yes it is", "no it is not"
        if chat:
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": chosen}],
                         "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            rows.append({"prompt": prompt + "\n", "chosen": chosen, "rejected": rejected})
    return rows
