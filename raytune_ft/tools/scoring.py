"""``rtf score SOURCE --file texts.jsonl``: the scores of a regression or reward run on new texts.

The model is rebuilt from what the run saved beside its adapter or model: ``head.json`` (the head's shape, the
objective and, for regression, the label scale) and ``head.safetensors`` (its weights). Texts are tokenized as
training tokenized scored rows (BOS, no EOS, the last token pooled); regression scores are in the labels' own
units, reward scores are the raw scalar rewards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raytune_ft import rundir as rd
from raytune_ft.errors import UserError
from raytune_ft.tools.loading import Loaded, load_model
from raytune_ft.tools.source import Source, resolve_source


@dataclass
class Scorer:
    loaded: Loaded
    head: dict[str, Any]


def read_head_config(src: Source) -> dict[str, Any]:
    path = os.path.join(src.path, rd.HEAD_CONFIG)
    if not os.path.exists(path):
        raise UserError(f"{src.origin}: no {rd.HEAD_CONFIG} beside the model: rtf score reads regression and "
                        "reward runs (method.objective regression or reward)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{src.origin}: {rd.HEAD_CONFIG} is not valid JSON ({e})")
    if not isinstance(cfg, dict) or cfg.get("kind") not in ("mlp", "linear") or not isinstance(
            cfg.get("hidden_size"), int):
        raise UserError(f"{src.origin}: {rd.HEAD_CONFIG} does not describe a head (kind mlp or linear, hidden_size)")
    for key in ("depth", "width"):
        if cfg["kind"] == "mlp" and not (isinstance(cfg.get(key), int) and 0 < cfg[key] <= 1 << 16):
            raise UserError(f"{src.origin}: {rd.HEAD_CONFIG}: {key} must be a positive integer")
    return cfg


def load_scorer(source: str | Source, *, dtype: str | None = None, device: Any = None) -> Scorer:
    src = resolve_source(source) if not isinstance(source, Source) else source
    head = read_head_config(src)
    return Scorer(load_model(src, dtype=dtype, device=device, quantize=False, head=head), head)


def score_texts(scorer: Scorer, texts: Sequence[Any], batch_size: int = 16) -> list[float]:
    """One score per text (a string, or a scored-format row: text | messages | instruction/input/output)."""
    import torch

    from raytune_ft.data.formats import normalize_row, tokenize_scored
    from raytune_ft.train.objectives import ScoredCollator

    tok, model = scorer.loaded.tokenizer, scorer.loaded.model
    rows = [normalize_row("scored", {"text": t, "label": 0.0} if isinstance(t, str) else {"label": 0.0, **t})
            for t in texts]
    examples = tokenize_scored(rows, tok)
    collate = ScoredCollator(tok.pad_token_id)
    mean = float(scorer.head.get("label_mean", 0.0))
    std = float(scorer.head.get("label_std", 1.0))
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size])
            batch.pop("labels")
            batch = {k: v.to(scorer.loaded.device) for k, v in batch.items()}
            raw = model(**batch).logits.squeeze(-1).double()
            out += (raw * std + mean).tolist()
    return out


def read_texts(path: str) -> list[Any]:
    """A .jsonl of strings or scored-format rows ({text} | {messages} | {instruction, input, output}), or a
    plain text file with one text per line."""
    from raytune_ft.data.formats import RowError, normalize_row

    if not os.path.exists(path):
        raise UserError(f"--file {path}: no such file")
    items: list[Any] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                items.append(line.rstrip("\n"))
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{n}: not valid JSON")
            if not isinstance(item, (str, dict)):
                raise UserError(f"{path}:{n}: expected a string or an object with text, messages or instruction")
            if isinstance(item, dict):
                try:
                    normalize_row("scored", {"label": 0.0, **item})
                except RowError as e:
                    raise UserError(f"{path}:{n}: {e}")
            items.append(item)
    if not items:
        raise UserError(f"{path}: no texts")
    return items


def score(source: str | Source, path: str, *, dtype: str | None = None) -> list[dict[str, Any]]:
    """``[{text, score}]`` for each text of ``path``."""
    scorer = load_scorer(source, dtype=dtype)
    items = read_texts(path)
    scores = score_texts(scorer, items)
    return [{"text": it if isinstance(it, str) else it.get("text") or it.get("instruction") or it.get("messages"),
             "score": s} for it, s in zip(items, scores, strict=True)]


def _raw_scores(scorer: Scorer, examples: Sequence[dict[str, Any]], batch_size: int) -> list[float]:
    import torch

    from raytune_ft.train.objectives import ScoredCollator

    collate = ScoredCollator(scorer.loaded.tokenizer.pad_token_id)
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate([{"input_ids": ex["input_ids"], "labels": 0.0} for ex in examples[start:start + batch_size]])
            batch.pop("labels")
            batch = {k: v.to(scorer.loaded.device) for k, v in batch.items()}
            out += scorer.loaded.model(**batch).logits.squeeze(-1).double().tolist()
    return out


def head_metrics(scorer: Scorer, examples: Sequence[dict[str, Any]], batch_size: int = 8,
                 max_len: int | None = None) -> dict[str, float]:
    """``rtf eval`` of a regression run (``mse``, ``mae``, ``r2`` in the labels' units, on scored examples) or a
    reward run (``accuracy``: chosen scored above rejected, ``margin``: their mean difference, on pairs)."""
    from raytune_ft.data.formats import tokenize_preference

    if scorer.head.get("objective") == "regression":
        mean, std = float(scorer.head.get("label_mean", 0.0)), float(scorer.head.get("label_std", 1.0))
        pred = [p * std + mean for p in _raw_scores(scorer, examples, batch_size)]
        true = [float(ex["labels"]) for ex in examples]
        err = [p - t for p, t in zip(pred, true, strict=True)]
        avg = sum(true) / len(true)
        var = sum((t - avg) ** 2 for t in true)
        return {"mse": sum(e * e for e in err) / len(err), "mae": sum(abs(e) for e in err) / len(err),
                "r2": 1.0 - sum(e * e for e in err) / var if var > 0 else float("nan")}
    pairs = tokenize_preference(examples, scorer.loaded.tokenizer, max_len)
    chosen = _raw_scores(scorer, [{"input_ids": p["chosen_ids"]} for p in pairs], batch_size)
    rejected = _raw_scores(scorer, [{"input_ids": p["rejected_ids"]} for p in pairs], batch_size)
    diff = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {"accuracy": sum(d > 0 for d in diff) / len(diff), "margin": sum(diff) / len(diff)}
