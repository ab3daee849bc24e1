"""What a run optimises (``method.objective``) and the sections that only some objectives take.

``sft`` is next-token prediction (today's behaviour). ``regression`` puts an MLP head on the backbone and
fits a float label; ``reward`` trains a scalar head on preference pairs (Bradley–Terry); ``dpo`` and
``orpo`` train the language model itself on preference pairs through TRL. Each objective reads its own data
format and reports its own evaluation metrics; the rules that tie these together live here so the section
models stay small.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from raytune_ft.spec.base import Section

Objective = Literal["sft", "reward", "regression", "dpo", "orpo"]
OBJECTIVES: tuple[str, ...] = ("sft", "reward", "regression", "dpo", "orpo")

# Refused with the reason: both sample completions from the policy during training, so they need a
# generation engine in the loop (vLLM or HF generate on every worker, a reward function or model to score the
# samples, and rollout/training interleaving), none of which rtf's one-Trainer-per-worker recipe has.
REFUSED = {
    "ppo": "PPO samples completions from the policy at every step and scores them with a reward model, so it needs "
           "a generation engine (vLLM or HF generate) and a reward model in the training loop, plus a value head; "
           "rtf runs one Trainer per worker without rollouts",
    "grpo": "GRPO samples a group of completions per prompt at every step and scores them with reward functions, "
            "so it needs a generation engine (vLLM or HF generate) in the training loop; rtf runs one Trainer per "
            "worker without rollouts",
}

# The data formats each objective reads.
FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("alpaca", "chat", "text"),
    "regression": ("scored",),
    "reward": ("preference",),
    "dpo": ("preference",),
    "orpo": ("preference",),
}

# What an evaluation reports for each objective (HF's names with their eval_ prefix). TRL names DPO/ORPO's
# reward statistics rewards/accuracies and rewards/margins.
METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("eval_loss",),
    "regression": ("eval_loss", "eval_mse", "eval_mae", "eval_r2"),
    "reward": ("eval_loss", "eval_accuracy", "eval_margin"),
    "dpo": ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"),
    "orpo": ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"),
}
ALL_METRICS: tuple[str, ...] = tuple(dict.fromkeys(m for ms in METRICS.values() for m in ms))
# Higher is better for these; every other metric is a loss or an error (lower is better).
HIGHER_IS_BETTER = ("eval_r2", "eval_accuracy", "eval_margin", "eval_rewards/accuracies", "eval_rewards/margins")

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "sigmoid_norm")


class HeadSpec(Section):
    """The regression head: an MLP on the hidden state of the last non-pad token."""

    depth: int = Field(2, ge=1, le=8, description="Linear layers in the MLP (1: a single linear layer).")
    width: int | None = Field(None, gt=0, description="Hidden width of the MLP; defaults to the model's hidden size.")
    dropout: float = Field(0.1, ge=0, lt=1)
    loss: Literal["mse", "huber"] = "mse"
    huber_delta: float = Field(1.0, gt=0, description="Huber's delta, in standardised label units.")
    normalize_labels: bool = Field(True, description="Train on labels standardised by the training set's mean "
                                   "and std; predictions and metrics are in the original units.")


class DpoSpec(Section):
    """Preference optimisation options (TRL's DPOConfig / ORPOConfig)."""

    beta: float = Field(0.1, gt=0, description="DPO: the KL strength against the reference model; ORPO: the "
                        "weight of the odds-ratio term (ORPO's lambda).")
    loss_type: Literal[DPO_LOSSES] = Field("sigmoid", description="DPO's loss (TRL's loss_type); dpo only.")  # type: ignore[valid-type]


def check_objective_name(v):
    """``ppo``/``grpo`` are named with the reason they are refused, not with a bare 'not one of'."""
    if isinstance(v, str) and v in REFUSED:
        raise ValueError(f"{v} is not supported: {REFUSED[v]}; use one of {', '.join(OBJECTIVES)}")
    return v


def check_method(objective: str, method_type: str, head: HeadSpec | None, dpo: DpoSpec | None,
                 dpo_set: set[str]) -> None:
    """Rules inside ``method``: each objective's own section only with that objective."""
    if head is not None and objective != "regression":
        raise ValueError(f"method.head configures the regression head; method.objective is {objective} "
                         "(set objective: regression or remove method.head)")
    if dpo is not None and objective not in ("dpo", "orpo"):
        raise ValueError(f"method.dpo is for objective dpo or orpo; method.objective is {objective}")
    # the default (sigmoid) is accepted: a run's stored spec, dumped whole, names it, and it means nothing to ORPO
    if objective == "orpo" and dpo is not None and "loss_type" in dpo_set and dpo.loss_type != "sigmoid":
        raise ValueError(f"method.dpo.loss_type {dpo.loss_type} chooses DPO's loss; ORPO has one loss "
                         "(drop loss_type)")


def check_job(objective: str, formats: dict[str, str], packing: bool, init: bool, metric_for_best: str,
              tune_metric: str | None, zero3: bool = False) -> None:
    """Rules across sections: the data formats, packing and metrics must fit ``method.objective``.
    ``formats`` maps each data source's field path (data.train[0].format) to its format."""
    wanted = FORMATS[objective]
    for where, fmt in formats.items():
        if fmt not in wanted:
            needs = " or ".join(wanted)
            raise ValueError(f"method.objective {objective} reads {needs} data, but {where} is {fmt}; "
                             f"set {where}: {wanted[0]} or method.objective: {_objective_for(fmt)}")
    if zero3 and objective in ("regression", "reward"):
        raise ValueError(f"method.objective {objective} saves its head from rank 0's parameters, which deepspeed "
                         "stage 3 partitions across workers (the head file would be empty): use stage 2")
    if packing and objective != "sft":
        raise ValueError(f"data.packing concatenates examples for next-token training; method.objective "
                         f"{objective} scores whole sequences: remove data.packing")
    if init and objective in ("dpo", "orpo", "reward"):
        raise ValueError(f"method.objective {objective} tunes a model that already writes text; model.init "
                         "starts from random weights: train with objective sft first")
    if metric_for_best not in METRICS[objective]:
        raise ValueError(f"training.metric_for_best_model {metric_for_best} is not reported by objective "
                         f"{objective}; use one of {', '.join(METRICS[objective])}")
    if tune_metric is not None and tune_metric not in (*METRICS[objective], "loss", "perplexity"):
        raise ValueError(f"tune.metric {tune_metric} is not reported by objective {objective}; use one of "
                         f"{', '.join((*METRICS[objective], 'loss'))}")
    if tune_metric == "perplexity" and objective != "sft":
        raise ValueError(f"tune.metric perplexity is a language-model metric; objective {objective} reports "
                         f"{', '.join(METRICS[objective])}")


def _objective_for(fmt: str) -> str:
    return "regression" if fmt == "scored" else "dpo" if fmt == "preference" else "sft"
