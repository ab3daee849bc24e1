"""``rtf eval``: token-weighted loss and perplexity of a run on evaluation data.

The data is the run's eval data (``data.eval`` sources, or the seeded ``data.eval_split`` part of the train
sources, exactly the rows training held out) or a given file. It goes through the training data pipeline
(:func:`raytune_ft.data.pipeline.build_datasets`: same format, template, truncation and loss mask), one
example per row (unpacked: packing restarts positions and masks each example's first label, so it does not
change the scored tokens). The loss is the mean cross-entropy over every scored token of the whole set
(not a mean of per-batch means), and the perplexity its exponential. So it does not depend on the batch
size, and differs slightly from the ``eval_loss`` HF Trainer logs during training, which averages each
batch's token mean weighted by the batch's number of examples (same model and tokens, other weighting).

Results go beside a run's committed outputs, never inside them (``final/`` and each checkpoint are committed
with their files listed; an evaluation must not change them): ``RUN/eval/final/eval_results.json`` for the
run's ``final/``, ``RUN/eval/checkpoint-NNNNNNNN/eval_results.json`` for a checkpoint. A model dir outside a
run gets ``eval_results.json`` in it. On S3 for an s3:// source; ``--out`` chooses another path.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from raytune_ft import rundir as rd
from raytune_ft import storage as st
from raytune_ft.errors import UserError
from raytune_ft.tools.loading import load_base_for_full, load_model
from raytune_ft.tools.source import Source, resolve_source

RESULTS_FILE = "eval_results.json"
IGNORE_INDEX = -100


def evaluate(
    source: str | Source,
    data_path: str | None = None,
    batch_size: int = 8,
    include_base: bool = False,
    *,
    out: str | None = None,
    data_format: str | None = None,
    dtype: str | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Loss and perplexity of ``source`` on its run's eval data or on ``data_path`` (an SFT run); a regression,
    reward, DPO or ORPO run gets its objective's metrics instead, as training's evaluation reports them.

    Returns ``{"source", "model", "data", "format", "examples", "tokens", "loss", "perplexity", ...}``
    and, with ``include_base``, ``"base": {"loss", "perplexity"}`` (or ``{"error": why}``). Writes the
    dict as JSON (see the module docstring) unless ``write`` is False; ``"written"`` says where.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1 (got {batch_size})")
    started = time.time()
    src = source if isinstance(source, Source) else resolve_source(source)
    objective = src.spec.method.objective if src.spec is not None else "sft"
    if objective in ("dpo", "orpo"):
        return _evaluate_preference(src, data_path, batch_size, started, out=out, data_format=data_format,
                                    dtype=dtype, write=write)
    if objective in ("regression", "reward"):
        return _evaluate_head(src, data_path, batch_size, started, out=out, data_format=data_format, dtype=dtype,
                              write=write)
    loaded = load_model(src, dtype=dtype)
    examples, described, fmt = eval_examples(src, loaded.tokenizer, data_path, data_format)
    total, count = token_loss(loaded.model, examples, batch_size, loaded.tokenizer, loaded.device)
    result: dict[str, Any] = {
        "source": src.origin,
        "model": src.describe(),
        "step": src.step,
        "data": described,
        "format": fmt,
        "examples": len(examples),
        "tokens": count,
        "loss": total / count,
        "perplexity": _ppl(total / count),
    }
    notes = list(src.notes) + list(loaded.notes)
    if include_base:
        if src.is_adapter:
            with loaded.model.disable_adapter():
                b_total, b_count = token_loss(loaded.model, examples, batch_size, loaded.tokenizer, loaded.device)
            result["base"] = {"model": src.base_model, "loss": b_total / b_count, "perplexity": _ppl(b_total / b_count)}
        else:
            base, why = load_base_for_full(src, dtype=loaded.dtype, device=loaded.device)
            if base is None:
                result["base"] = {"model": src.base_model, "error": why}
                notes.append(why)
            else:
                b_total, b_count = token_loss(base, examples, batch_size, loaded.tokenizer, loaded.device)
                result["base"] = {"model": src.base_model, "loss": b_total / b_count, "perplexity": _ppl(b_total / b_count)}
    result["notes"] = notes
    result["runtime_s"] = round(time.time() - started, 3)
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if write:
        result["written"] = _write(src, result, out)
    return result


def _evaluate_head(src: Source, data_path: str | None, batch_size: int, started: float, *, out: str | None,
                   data_format: str | None, dtype: str | None, write: bool) -> dict[str, Any]:
    """A regression or reward run: the objective's metrics (as training's eval reports them) on its eval data."""
    from raytune_ft.tools.scoring import head_metrics, load_scorer

    scorer = load_scorer(src, dtype=dtype)
    examples, described, fmt = eval_examples(src, scorer.loaded.tokenizer, data_path, data_format)
    result: dict[str, Any] = {"source": src.origin, "model": src.describe(), "step": src.step, "data": described,
                              "format": fmt, "objective": scorer.head.get("objective"), "examples": len(examples),
                              **head_metrics(scorer, examples, batch_size,
                                             src.spec.data.max_seq_length if src.spec is not None else None)}
    result["notes"] = list(src.notes) + list(scorer.loaded.notes)
    result["runtime_s"] = round(time.time() - started, 3)
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if write:
        result["written"] = _write(src, result, out)
    return result


def _evaluate_preference(src: Source, data_path: str | None, batch_size: int, started: float, *, out: str | None,
                         data_format: str | None, dtype: str | None, write: bool) -> dict[str, Any]:
    """A DPO or ORPO run: the evaluation of the TRL trainer it trained with, on its eval data, so the figures are
    training's ``eval_rewards/*``. DPO's reference is the one training used: the base with the adapter disabled
    (LoRA), or the starting model (full fine-tuning; it must be on this machine)."""
    import tempfile

    from raytune_ft.train import objectives as ob
    from raytune_ft.train.recipe import training_arguments

    spec = src.spec
    objective = spec.method.objective
    loaded = load_model(src, dtype=dtype)
    examples, described, fmt = eval_examples(src, loaded.tokenizer, data_path, data_format)
    _, eval_ds, _ = ob.prepare_datasets(spec, loaded.tokenizer, [], examples)
    ref = None
    if objective == "dpo" and not src.is_adapter:
        ref, why = load_base_for_full(src, dtype=loaded.dtype, device=loaded.device)
        if ref is None:
            raise UserError(f"a DPO run's rewards are measured against its reference, the model it started from: "
                            f"{why}", hint="download the base model first, or evaluate the run on this machine's cache")
        ref.eval().requires_grad_(False)
    cls, extra = ob.argument_class(spec)
    with tempfile.TemporaryDirectory(prefix="rtf-eval-") as tmp:
        args = training_arguments(spec, tmp, None, use_cpu=loaded.device.type == "cpu", cls=cls, **extra)
        args.per_device_eval_batch_size = batch_size
        args.report_to = []
        common = dict(model=loaded.model, args=args, train_dataset=eval_ds, eval_dataset=eval_ds,  # (TRL needs one)
                      processing_class=loaded.tokenizer)
        if objective == "dpo":
            from trl import DPOTrainer

            trainer = DPOTrainer(ref_model=ref, **common)
            peft_model = trainer.accelerator.unwrap_model(trainer.model)
            if "ref" in getattr(peft_model, "peft_config", {}):
                # given a PeftModel, TRL copies its adapter as the reference ("ref"): right for training on from a
                # pretrained adapter, but training's reference was the base with the adapter disabled, which is
                # what TRL uses when there is no "ref" adapter
                peft_model.delete_adapter("ref")
        else:
            from trl.experimental.orpo import ORPOTrainer

            trainer = ORPOTrainer(**common)
        metrics = trainer.evaluate()
    keep = {k.removeprefix("eval_"): float(v) for k, v in metrics.items()
            if k.startswith(("eval_rewards/", "eval_logps/", "eval_nll_loss", "eval_log_odds"))}
    keep[f"{objective}_loss"] = float(metrics["eval_loss"])
    result: dict[str, Any] = {"source": src.origin, "model": src.describe(), "step": src.step, "data": described,
                              "format": fmt, "objective": objective, "examples": len(examples), **keep}
    result["notes"] = list(src.notes) + list(loaded.notes)
    result["runtime_s"] = round(time.time() - started, 3)
    result["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if write:
        result["written"] = _write(src, result, out)
    return result


# --------------------------------------------------------------------------------------------------
# data


def eval_examples(
    src: Source, tokenizer: Any, data_path: str | None, data_format: str | None = None
) -> tuple[list[dict[str, list[int]]], list[str], str]:
    """``(examples, description of the data, format)``: tokenized eval examples with their loss masks.

    This is the one place that turns data into tokens; it calls the training pipeline.
    """
    from raytune_ft.data.pipeline import build_datasets

    spec = src.spec
    data = spec.data if spec is not None else None
    # the recipe's own rule: data_seed when set (0 included), else training.seed
    seed = (spec.training.data_seed if spec.training.data_seed is not None else spec.training.seed) if spec else 0
    common = {
        "max_seq_length": data.max_seq_length if data else None,
        "train_on_prompt": data.train_on_prompt if data else False,
        "on_bad_row": data.on_bad_row if data else "error",
        "packing": False,
    }
    if data_path is not None:
        fmt = data_format or (data.eval_sources[0].format if data and data.eval else None) or (
            src.data_format or _sniff_format(data_path, _fs_for(src))
        )
        one = {"path": data_path, "format": fmt}
        doc = {**common, "train": [one], "eval": [one]}
        described = [data_path]
    else:
        if data is None:
            raise UserError(
                f"{src.origin}: no {rd.SPEC} found, so the run's eval data is unknown",
                hint="pass the data with --data FILE",
            )
        if not data.has_eval:
            raise UserError(
                f"the run {spec.name} has no eval data (neither data.eval nor data.eval_split)",
                hint="pass the data with --data FILE",
            )
        if data_format:
            raise UserError("--format applies to --data FILE; the run's eval data keeps its own format")
        doc = {**common, **data.model_dump(include={"train", "eval", "eval_split"}, exclude_none=True)}
        fmt = (data.eval_sources[0].format if data.eval else src.data_format) or "alpaca"
        described = (
            [s.path for s in data.eval_sources]
            if data.eval
            else [f"{s.path} (eval_split {data.eval_split})" for s in data.train_sources]
        )
    _, examples, _ = build_datasets(doc, tokenizer, seed=seed, filesystem_for=_fs_for(src))
    if not examples:
        raise UserError(f"no eval examples in {', '.join(described)}")
    return examples, described, fmt


def _fs_for(src: Source):
    return partial(st.open, storage=src.spec.storage if src.spec is not None else None)


def _sniff_format(path: str, filesystem_for) -> str:
    """alpaca/chat/text from the first row's fields (for a file evaluated without a spec)."""
    from raytune_ft.data.sources import read_rows

    fs, p = filesystem_for(path) if "://" in path else (None, path)
    for row in read_rows(p, filesystem=fs, name=path):
        if row.value is None:
            continue
        if "messages" in row.value:
            return "chat"
        if "instruction" in row.value:
            return "alpaca"
        if "text" in row.value:
            return "text"
        break
    raise UserError(f"{path}: cannot tell the data format from its first row", hint="pass --format alpaca|chat|text")


# --------------------------------------------------------------------------------------------------
# loss


def token_loss(model, examples: Sequence[dict[str, list[int]]], batch_size: int, tokenizer, device) -> tuple[float, int]:
    """``(sum of cross-entropy over scored tokens, number of scored tokens)``.

    Token t is scored when ``labels[t] != -100`` for t >= 1, against the logits at t - 1 (the causal shift
    HF losses use). Batches are right-padded (pad positions masked out and unscored).
    """
    import torch
    import torch.nn.functional as F

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    total = 0.0
    count = 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            width = max(len(ex["input_ids"]) for ex in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ex in enumerate(batch):
                n = len(ex["input_ids"])
                ids[row, :n] = torch.tensor(ex["input_ids"])
                labels[row, :n] = torch.tensor(ex["labels"])
                mask[row, :n] = 1
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((shift_labels != IGNORE_INDEX).sum())
    if count == 0:
        raise UserError("the eval data has no scored tokens (every label is masked)")
    return total, count


def _ppl(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


# --------------------------------------------------------------------------------------------------
# output


EVAL_DIR = "eval"


def results_path(src: Source) -> str:
    """Where ``rtf eval`` writes by default (see the module docstring)."""
    from raytune_ft.checkpoints import parse_step
    from raytune_ft.rundir import FINAL as FINAL_DIR

    where = src.result_dir
    join = st.join if src.remote else os.path.join
    name = (where.rstrip("/").rsplit("/", 1)[-1] if src.remote else os.path.basename(os.path.normpath(where)))
    if src.run_dir and (name == FINAL_DIR or parse_step(name) is not None):
        return join(src.run_dir, EVAL_DIR, name, RESULTS_FILE)
    return join(where, RESULTS_FILE)


def _write(src: Source, result: dict[str, Any], out: str | None) -> str:
    target = out or results_path(src)
    payload = {k: v for k, v in result.items() if k != "written"}
    payload = _finite(payload)
    if st.is_s3(target):
        storage = st.config_for(target, storage=src.spec.storage if src.spec is not None else None)
        with st.storage_errors(storage, "write"):
            fs, path = st.open(storage)
            st.write_json(fs, path, payload)
    else:
        import pyarrow.fs as pafs

        target = st.local_path(target)
        try:
            st.write_json(pafs.LocalFileSystem(), target, payload)
        except OSError as e:
            raise UserError(f"cannot write {target}: {e}", hint="pass another path with --out")
    return target


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def render(result: dict[str, Any]) -> str:
    """A small table: model (and base) loss and perplexity, tokens, where the results went."""
    if "loss" not in result:  # a regression, reward, DPO or ORPO run: its own metrics
        lines = [f"{result['model']}", f"data: {', '.join(result['data'])} ({result['format']}, "
                 f"{result['examples']} examples)"]
        lines += [f"{k}: {result[k]:.6g}" for k in ("mse", "mae", "r2", "accuracy", "margin") if k in result]
        lines += [f"{k}: {v:.6g}" for k, v in result.items()  # dpo, orpo: TRL's evaluation, as in training's log
                  if k.startswith(("rewards/", "logps/", "nll_loss", "log_odds")) or k in ("dpo_loss", "orpo_loss")]
        lines += [f"note: {x}" for x in result.get("notes") or []]
        return "\n".join(lines + ([f"wrote {result['written']}"] if result.get("written") else []))
    rows = [("model", "loss", "perplexity", "tokens")]
    rows.append(("fine-tuned", f"{result['loss']:.4f}", f"{result['perplexity']:.3f}", str(result["tokens"])))
    base = result.get("base")
    if base:
        if "error" in base:
            rows.append(("base", "-", "-", base["error"]))
        else:
            rows.append(("base", f"{base['loss']:.4f}", f"{base['perplexity']:.3f}", str(result["tokens"])))
    widths = [max(len(r[i]) for r in rows[:3] if i < len(r)) for i in range(3)]
    lines = [f"{result['model']}", f"data: {', '.join(result['data'])} ({result['format']}, {result['examples']} examples)"]
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  ------")
    lines += [f"note: {x}" for x in result.get("notes") or []]
    if result.get("written"):
        lines.append(f"wrote {result['written']}" + (" (beside the run's committed outputs, which are unchanged)"
                                                     if f"{os.sep}{EVAL_DIR}{os.sep}" in result["written"]
                                                     or f"/{EVAL_DIR}/" in result["written"] else ""))
    return "\n".join(lines)
