"""The rules that span sections of a job spec, each located at the field a user changes to fix it.

:class:`JobSpec` runs them all when the spec is validated; :mod:`raytune_ft.spec.collect` runs them on a
spec whose other sections have field errors, through a view in which reading a failed value raises
:class:`Blocked`, so a rule runs exactly when what it reads is valid. Every rule returns a message that says
what to change, or None. Rules take the spec (or any object with the sections as attributes): nothing here
imports the models.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raytune_ft.spec import base

Loc = tuple[Any, ...]


@dataclass(frozen=True)
class Rule:
    loc: Loc  # where its problem is reported
    check: Callable[[Any], str | None]


class Blocked(Exception):  # noqa: N818  (not an error: a signal that a rule read a value that failed)
    """A rule read a value that failed validation (``what``: its dotted path); the rule cannot be checked."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


def _qlora_dtypes(s: Any) -> str | None:
    m = s.method  # each rule reads what decides it first: a failed value it never reads does not block it
    if m.type != "qlora" or m.quantization is None:
        return None
    t, q = s.training, m.quantization
    if t.precision == "fp16" and q.compute_dtype == "bfloat16":
        return ("training.precision fp16 with method.quantization.compute_dtype bfloat16 mixes two "
                "half types; use precision bf16, or compute_dtype float16")
    if t.precision == "bf16" and q.compute_dtype == "float16":
        return ("training.precision bf16 with method.quantization.compute_dtype float16 mixes two "
                "half types; use compute_dtype bfloat16")
    return None


def _zero3_8bit(s: Any) -> str | None:
    m = s.method
    if m.type == "qlora" and m.quantization is not None and m.quantization.bits == 8 \
            and s.deepspeed is not None and s.deepspeed.stage == 3:
        return "deepspeed stage 3 cannot partition 8-bit bitsandbytes weights; use 4-bit QLoRA or ZeRO stage 2"
    return None


def _offload_quantized(s: Any) -> str | None:
    m = s.method
    if m.type == "qlora" and m.quantization is not None and s.deepspeed is not None and s.deepspeed.offload_params:
        return ("deepspeed.offload_params cannot move quantized (QLoRA) weights to CPU; "
                "drop offload_params or use method.type lora")
    return None


def _eval_data(s: Any) -> str | None:
    if s.training.eval_strategy != "no" and not s.data.has_eval:
        return (f"training.eval_strategy {s.training.eval_strategy} needs evaluation data: set data.eval or "
                "data.eval_split")
    return None


def _init_tokenizer(s: Any) -> str | None:
    if s.model.init is not None and s.tokenizer.name_or_path is None and s.tokenizer.train is None:
        return ("model.init builds a model from scratch, which has no tokenizer: set tokenizer.train "
                "(BPE trained on your data) or tokenizer.name_or_path")
    return None


def _trained_tokenizer_full(s: Any) -> str | None:
    if s.tokenizer.train is not None and s.method.type != "full":
        return ("a freshly trained tokenizer changes the vocabulary, so the embeddings must train too: "
                "use method.type full with tokenizer.train")
    return None


def _init_full(s: Any) -> str | None:
    if s.model.init is not None and s.method.type != "full":
        return "model.init starts from random weights; LoRA on random weights is pointless: use method.type full"
    return None


TRACKER_PIPS = {"mlflow": ("mlflow", "mlflow-skinny", "raytune_ft[mlflow]"), "wandb": ("wandb", "raytune_ft[wandb]")}


def _tracker_installed(s: Any) -> str | None:
    absent = [r for r in s.monitoring.report_to if r in TRACKER_PIPS and not base.importable(r)]
    if not absent or s.cluster.image:
        return None
    pips = [re.split(r"[=<>!~ ;]", p.strip())[0] for p in s.cluster.pip or []]
    missing = [r for r in absent if not any({n, n.split("[")[0]} & set(TRACKER_PIPS[r]) for n in pips)]
    if missing:
        return (f"monitoring.report_to names {', '.join(missing)}, which is not installed here (training would "
                f"silently report nothing): pip install 'raytune_ft[{','.join(missing)}]', or list it in "
                "cluster.pip, or run in a cluster.image that has it")
    return None


def _mlflow_uri(s: Any) -> str | None:
    if "mlflow" in s.monitoring.report_to and "MLFLOW_TRACKING_URI" not in (s.env or {}):
        return ("monitoring.report_to mlflow needs the tracking store: set env.MLFLOW_TRACKING_URI "
                "(a literal such as sqlite:///mlflow.db or http://host:5000, or null to forward yours)")
    return None


def _liger_gpu(s: Any) -> str | None:
    if s.training.liger_kernel and not s.compute.use_gpu:
        return "training.liger_kernel runs Triton GPU kernels: it needs compute.gpus_per_worker >= 1"
    return None


def accumulation(s: Any) -> int:
    """training.gradient_accumulation_steps, or what training.tokens_per_step makes it for compute.num_workers
    (``JobSpec.accumulation_steps``; here for the rules, which see the sections only)."""
    t = s.training
    if t.tokens_per_step is None or not s.data.max_seq_length:
        return t.gradient_accumulation_steps
    return max(1, t.tokens_per_step // (s.data.max_seq_length * t.per_device_train_batch_size * s.compute.num_workers))


def _tokens_per_step(s: Any) -> str | None:
    """training.tokens_per_step: full rows (packing), a whole number of micro-batches, one way to set it."""
    t = s.training
    if t.tokens_per_step is None:
        return None
    if not s.data.packing:
        return ("training.tokens_per_step counts full rows of data.max_seq_length tokens: it needs data.packing: "
                "true (unpacked rows vary in length; set their batch with per_device_train_batch_size and "
                "gradient_accumulation_steps)")
    if t.gradient_accumulation_steps != 1:
        return (f"give training.tokens_per_step or training.gradient_accumulation_steps, not both (tokens_per_step "
                f"sets the accumulation; got gradient_accumulation_steps {t.gradient_accumulation_steps})")
    msl, b, n = s.data.max_seq_length, t.per_device_train_batch_size, s.compute.num_workers
    micro = msl * b * n
    if t.tokens_per_step % micro:
        lo = t.tokens_per_step // micro * micro
        near = " or ".join(f"{v:,}" for v in (lo, lo + micro) if v > 0)
        return (f"training.tokens_per_step {t.tokens_per_step:,} is not a whole number of micro-batches of {micro:,} "
                f"tokens (data.max_seq_length {msl} × per_device_train_batch_size {b} × compute.num_workers {n}): "
                f"use {near}")
    return None


def _elastic(s: Any) -> str | None:
    """Elastic workers keep the global batch: per_device × accumulation × num_workers must split into a whole
    accumulation for every worker count; and what cannot move between worker counts is refused."""
    c = s.compute
    if not c.elastic:
        return None
    rng = f"the range {{min: {c.min_workers}, max: {c.num_workers}}}"
    if s.tune is not None:
        return f"{rng}: a sweep's trials hold a fixed number of workers; give num_workers one count"
    if s.deepspeed is not None:
        return (f"{rng}: DeepSpeed's checkpoint is written for one worker count (ZeRO shards the optimizer state "
                "by rank), so a run cannot resume it with another; use DDP (no deepspeed section) or a fixed count")
    t = s.training
    if t.group_by_length:
        return (f"{rng}: training.group_by_length orders rows by the batch each step takes per worker, which "
                "changes with the worker count; an elastic run keeps its order only with random sampling")
    acc = accumulation(s)
    rows = acc * c.num_workers  # per-device batches in one optimizer step
    bad = [w for w in c.worker_counts if rows % w]
    if bad:
        import math

        need = math.lcm(*c.worker_counts) // math.gcd(math.lcm(*c.worker_counts), c.num_workers)
        fix = (f"training.tokens_per_step {need * s.data.max_seq_length * t.per_device_train_batch_size * c.num_workers:,}"
               if t.tokens_per_step is not None else f"gradient_accumulation_steps {need}")
        return (f"{rng}: the global batch ({t.per_device_train_batch_size} per worker × accumulation {acc} × "
                f"{c.num_workers} workers) does not split evenly over {', '.join(map(str, bad))} worker(s), so "
                f"the batch would change when workers are lost: use {fix} (or a multiple of it), or a range whose "
                f"counts all divide {rows}")
    return None


def _objective_fits(s: Any) -> str | None:
    """The data formats, packing, model.init, ZeRO-3 and metrics must fit method.objective."""
    from raytune_ft.spec import objectives as obj

    t, ds = s.training, s.deepspeed
    formats = {f"data.{k}[{i}].format": src.format for k in ("train", "eval")
               for i, src in enumerate(getattr(s.data, k) or [])}
    try:
        obj.check_job(s.method.objective, formats, s.data.packing, s.model.init is not None,
                      t.metric_for_best_model, s.tune.metric if s.tune else None, bool(ds and ds.stage == 3))
    except ValueError as e:
        return str(e)
    return None


def _log_examples(s: Any) -> str | None:
    if s.monitoring.log_examples and s.method.objective != "sft":
        return (f"monitoring.log_examples follows the rows of the SFT collator; method.objective "
                f"{s.method.objective} batches its rows its own way (TRL's)")
    return None


CROSS_RULES: tuple[Rule, ...] = (
    Rule(("training", "precision"), _qlora_dtypes),
    Rule(("deepspeed", "stage"), _zero3_8bit),
    Rule(("deepspeed", "offload_params"), _offload_quantized),
    Rule(("training", "eval_strategy"), _eval_data),
    Rule(("model", "init"), _init_tokenizer),
    Rule(("tokenizer", "train"), _trained_tokenizer_full),
    Rule(("monitoring", "report_to"), _tracker_installed),
    Rule(("monitoring", "report_to"), _mlflow_uri),
    Rule(("training", "liger_kernel"), _liger_gpu),
    Rule(("method", "type"), _init_full),
    Rule(("method", "objective"), _objective_fits),
    Rule(("training", "tokens_per_step"), _tokens_per_step),
    Rule(("compute", "num_workers"), _elastic),
    Rule(("monitoring", "log_examples"), _log_examples),
)


def cross_problems(sections: Any) -> tuple[list[tuple[Loc, str]], set[str]]:
    """(location, message) for every rule that fails, and the failed values that kept other rules from
    running (when ``sections`` raises :class:`Blocked` for them)."""
    found: list[tuple[Loc, str]] = []
    blocked: set[str] = set()
    for rule in CROSS_RULES:
        try:
            msg = rule.check(sections)
        except Blocked as b:
            blocked.add(b.what)
            continue
        if msg:
            found.append((rule.loc, msg))
    return found, blocked


def located_error(problems: list[tuple[Loc, str, Any]], title: str) -> Exception:
    """One pydantic ValidationError holding every (location, message, value): raised from a model validator,
    pydantic keeps each at its own location under the model's."""
    from pydantic import ValidationError
    from pydantic_core import PydanticCustomError

    return ValidationError.from_exception_data(title, [
        {"type": PydanticCustomError("value_error", "{msg}", {"msg": msg}), "loc": loc, "input": value}
        for loc, msg, value in problems
    ])
