"""The objectives beyond next-token prediction, inside a worker: the model class, the head, the datasets as each
trainer reads them, the trainer, and what is saved beside the model.

- ``sft``: HF ``Trainer`` on tokens with a loss mask (today's path; nothing here changes it).
- ``regression``: ``AutoModelForSequenceClassification`` (num_labels 1: the backbone's last non-pad token is
  pooled by transformers) whose ``score`` layer is replaced by an MLP head (:class:`MLPHead`); MSE or Huber
  loss, ``eval_mse``/``eval_mae``/``eval_r2``. Hand-written: TRL has no regression trainer, and transformers'
  sequence-classification head is a single linear layer with MSE only.
- ``reward``: TRL's ``RewardTrainer`` (Bradley–Terry on the scalar ``score`` head): ``eval_accuracy``, ``eval_margin``.
- ``dpo``: TRL's ``DPOTrainer``. Under LoRA the reference model is the base with the adapter disabled (TRL's own
  mechanism when it applies the adapter from ``peft_config``: no second copy); under full fine-tuning a frozen
  copy (which :mod:`raytune_ft.plan` counts).
- ``orpo``: TRL's ``ORPOTrainer`` (no reference model).

All of them subclass HF ``Trainer``, so the recipe's callbacks, checkpoints, DeepSpeed and resume are one path.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raytune_ft import rundir as rd
from raytune_ft.errors import UserError
from raytune_ft.spec.models import JobSpec

HEAD_OBJECTIVES = ("regression", "reward")
PREFERENCE_OBJECTIVES = ("reward", "dpo", "orpo")


def objective(spec: JobSpec) -> str:
    return spec.method.objective


def has_head(spec: JobSpec) -> bool:
    return spec.method.objective in HEAD_OBJECTIVES


# --------------------------------------------------------------------------- the regression head


class MLPHead(nn.Module):
    """``depth`` linear layers (GELU and dropout between them) from the hidden size to one value. Applied to
    every position by the sequence-classification model, which then keeps the last non-pad token's value."""

    def __init__(self, hidden: int, depth: int = 2, width: int | None = None, dropout: float = 0.0):
        super().__init__()
        width = width or hidden
        layers: list[nn.Module] = []
        d_in = hidden
        for _ in range(depth - 1):
            layers += [nn.Dropout(dropout), nn.Linear(d_in, width), nn.GELU()]
            d_in = width
        layers += [nn.Dropout(dropout), nn.Linear(d_in, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = self.layers[-1].weight.dtype
        return self.layers(hidden_states.to(dtype)).to(hidden_states.dtype)


@dataclass(frozen=True)
class LabelScale:
    """Labels are trained as ``(y - mean) / std``; predictions are ``mean + std * head``."""

    mean: float = 0.0
    std: float = 1.0

    @classmethod
    def of(cls, labels: list[float], normalize: bool) -> LabelScale:
        if not normalize or not labels:
            return cls()
        t = torch.tensor(labels, dtype=torch.float64)
        std = float(t.std(unbiased=False))
        return cls(float(t.mean()), std if std > 1e-12 else 1.0)


def head_config(spec: JobSpec, hidden: int, scale: LabelScale) -> dict[str, Any]:
    """What rebuilds the head at load time (``head.json``); plain JSON, read back by ``rtf score``/``rtf eval``."""
    h = spec.method.head
    cfg: dict[str, Any] = {"objective": spec.method.objective, "module": "score", "hidden_size": hidden}
    if spec.method.objective == "regression":
        assert h is not None
        cfg.update(kind="mlp", depth=h.depth, width=h.width or hidden, dropout=h.dropout, loss=h.loss,
                   label_mean=scale.mean, label_std=scale.std, normalize_labels=h.normalize_labels)
    else:
        cfg.update(kind="linear")
    return cfg


def build_head(cfg: dict[str, Any]) -> nn.Module:
    if cfg.get("kind") == "mlp":
        return MLPHead(int(cfg["hidden_size"]), int(cfg["depth"]), int(cfg["width"]), float(cfg["dropout"]))
    return nn.Linear(int(cfg["hidden_size"]), 1, bias=False)


def hidden_size(model: Any) -> int:
    return int(model.config.get_text_config().hidden_size)


def attach_head(model: Any, spec: JobSpec) -> Any:
    """regression: the model's ``score`` layer becomes the MLP head of ``method.head`` (seeded like the model)."""
    if spec.method.objective != "regression":
        return model
    if not isinstance(getattr(model, "score", None), nn.Module):
        raise UserError(f"method.objective regression needs a model whose sequence-classification class has a "
                        f"`score` layer (Llama, Mistral, Qwen2 and most decoders); {type(model).__name__} has none")
    h = spec.method.head or _default_head(spec)
    dtype = model.score.weight.dtype if model.score.weight.dtype == torch.float32 else torch.float32
    model.score = MLPHead(hidden_size(model), h.depth, h.width, h.dropout).to(dtype=dtype,
                                                                           device=model.score.weight.device)
    return model


def _default_head(spec: JobSpec) -> Any:
    from raytune_ft.spec.models import HeadSpec

    return HeadSpec()


def head_module(model: Any) -> nn.Module:
    """The trained head (under PEFT: the copy in ``modules_to_save``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    score = base.score
    return score.modules_to_save["default"] if hasattr(score, "modules_to_save") else score


def save_head(model: Any, spec: JobSpec, out_dir: str, scale: LabelScale) -> None:
    """``head.safetensors`` + ``head.json`` beside the adapter or model."""
    from safetensors.torch import save_file

    head = head_module(model)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in head.state_dict().items()}
    save_file(state, os.path.join(out_dir, rd.HEAD_WEIGHTS))
    with open(os.path.join(out_dir, rd.HEAD_CONFIG), "w") as f:
        json.dump(head_config(spec, hidden_size(model), scale), f, indent=2)


# --------------------------------------------------------------------------- data as each trainer reads it


@dataclass
class ScoredCollator:
    """Right-pads ``input_ids`` (attention_mask 0 on pads); ``labels`` are the float targets."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in batch)
        ids = torch.full((len(batch), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, row in enumerate(batch):
            n = len(row["input_ids"])
            ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            mask[i, :n] = 1
        labels = torch.tensor([float(row["labels"]) for row in batch], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prepare_datasets(spec: JobSpec, tokenizer: Any, train: list[dict], evals: list[dict]) -> tuple[Any, Any, LabelScale]:
    """The pipeline's examples as the objective's trainer reads them, and the label scale (regression)."""
    obj = spec.method.objective
    scale = LabelScale()
    if obj == "regression":
        h = spec.method.head
        scale = LabelScale.of([ex["labels"] for ex in train], h.normalize_labels if h else True)
        norm = [(lambda ex: {**ex, "labels": (ex["labels"] - scale.mean) / scale.std})]
        return [norm[0](ex) for ex in train], [norm[0](ex) for ex in evals], scale
    if obj not in ("reward", "dpo", "orpo"):  # sft: plain lists; `datasets` is imported for TRL's trainers only
        return train, evals, scale
    from datasets import Dataset

    from raytune_ft.data.formats import tokenize_preference

    if obj == "reward":  # TRL's pre-tokenized columns (its own tokenizing would skip our BOS/EOS/truncation)
        max_len = spec.data.max_seq_length
        train_ds = Dataset.from_list(tokenize_preference(train, tokenizer, max_len))
        eval_ds = Dataset.from_list(tokenize_preference(evals, tokenizer, max_len)) if evals else None
        return train_ds, eval_ds, scale
    return Dataset.from_list(train), (Dataset.from_list(evals) if evals else None), scale


# --------------------------------------------------------------------------- regression loss and metrics


def regression_loss(spec: JobSpec):
    """HF ``Trainer``'s ``compute_loss_func``: MSE or Huber on the pooled value, summed and divided by the items
    in the (accumulated) batch when HF counts them, as its own losses are."""
    h = spec.method.head
    huber, delta = (h.loss == "huber", h.huber_delta) if h else (False, 1.0)

    def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        pred = outputs["logits"].squeeze(-1).float()
        target = labels.to(pred.device).float().view_as(pred)
        each = (nn.functional.huber_loss(pred, target, reduction="none", delta=delta) if huber
                else (pred - target) ** 2)
        if num_items_in_batch is not None:
            return each.sum() / torch.as_tensor(num_items_in_batch, device=each.device)
        return each.mean()

    return loss


def regression_metrics(scale: LabelScale):
    """``compute_metrics``: ``mse``, ``mae``, ``r2`` in the labels' own units (HF prefixes ``eval_``)."""

    def metrics(eval_pred: Any) -> dict[str, float]:
        import numpy as np

        pred = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1) * scale.std + scale.mean
        true = np.asarray(eval_pred.label_ids, dtype=np.float64).reshape(-1) * scale.std + scale.mean
        err = pred - true
        var = float(((true - true.mean()) ** 2).sum())
        return {"mse": float((err ** 2).mean()), "mae": float(np.abs(err).mean()),
                "r2": 1.0 - float((err ** 2).sum()) / var if var > 0 else float("nan")}

    return metrics


# --------------------------------------------------------------------------- the trainer


def argument_class(spec: JobSpec) -> tuple[Any, dict[str, Any]]:
    """The ``TrainingArguments`` class of the objective's trainer and its own options."""
    from transformers import TrainingArguments

    obj = spec.method.objective
    max_len = spec.data.max_seq_length
    if obj == "regression":
        return TrainingArguments, {"label_names": ["labels"]}
    if obj == "reward":
        from trl import RewardConfig

        return RewardConfig, {"max_length": None, "dataset_num_proc": None}
    if obj == "dpo":
        from trl import DPOConfig

        d = spec.method.dpo
        return DPOConfig, {"beta": d.beta if d else 0.1, "loss_type": [d.loss_type if d else "sigmoid"],
                           "max_length": max_len, "dataset_num_proc": None}
    if obj == "orpo":
        from trl.experimental.orpo import ORPOConfig

        d = spec.method.dpo
        return ORPOConfig, {"beta": d.beta if d else 0.1, "max_length": max_len or 1024, "dataset_num_proc": None}
    return TrainingArguments, {}


def wraps_adapter_itself(spec: JobSpec) -> bool:
    """DPO under LoRA: TRL applies the adapter (``peft_config``), so its reference is the base with the adapter
    disabled; given an already wrapped model it would add a second, "ref" adapter instead."""
    return spec.method.objective == "dpo" and spec.method.type != "full"


def make_trainer(spec: JobSpec, *, model: Any, args: Any, train_ds: Any, eval_ds: Any, tokenizer: Any,
                 callbacks: list[Any], scale: LabelScale, collator: Any = None) -> Any:
    """The objective's trainer (an HF ``Trainer`` subclass for every one)."""
    from transformers import Trainer

    obj = spec.method.objective
    common = dict(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds or None,
                  processing_class=tokenizer, callbacks=callbacks)
    if obj == "sft":
        return Trainer(data_collator=collator, **common)
    if obj == "regression":
        return Trainer(data_collator=ScoredCollator(tokenizer.pad_token_id), compute_loss_func=regression_loss(spec),
                       compute_metrics=regression_metrics(scale), **common)
    if obj == "reward":
        from trl import RewardTrainer

        return RewardTrainer(**common)
    if obj == "dpo":
        from trl import DPOTrainer

        from raytune_ft.train.modeling import lora_config

        if spec.method.type == "full":
            ref = copy.deepcopy(model).eval()  # the frozen reference: the model as training starts
            ref.requires_grad_(False)
            return DPOTrainer(ref_model=ref, **common)
        return DPOTrainer(peft_config=lora_config(spec), **common)
    if obj == "orpo":
        from trl.experimental.orpo import ORPOTrainer

        return ORPOTrainer(**common)
    raise UserError(f"unknown method.objective {obj}")


def probe_ids(example: dict[str, Any], tokenizer: Any) -> list[int]:
    """A fixed input for the fingerprint of the trained model: the example's tokens (a pair: its prompt)."""
    if "input_ids" in example:
        return list(example["input_ids"])
    if "chosen_ids" in example:
        return list(example["chosen_ids"])
    return tokenizer(example["prompt"] + example["chosen"])["input_ids"]


def eval_summary(spec: JobSpec, metrics: dict[str, float]) -> dict[str, float]:
    """The objective's metrics of the final evaluation, for final_results.json."""
    from raytune_ft.spec.objectives import METRICS

    return {k: float(metrics[k]) for k in METRICS[spec.method.objective] if k in metrics and k != "eval_loss"}
