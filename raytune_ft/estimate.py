"""Before a run: how many tokens, how long, how much, and the smallest change that makes it fit.

Pure arithmetic on the spec, the model's shape (``plan.resolve_arch``) and the local data; no torch, no
ray. Every figure says where it came from (counted, sampled or approximated tokens; a measured, a
configured or an assumed MFU; a configured or a list price), so a user can check it by hand:

    time  = tokens × FLOPs per token / (GPUs × peak FLOP/s × MFU)
    cost  = time in hours × GPUs × price per GPU-hour

FLOPs per token (the same model ``make gpu-check`` and ``bench/gpu.py`` measure MFU against):
    full:  6·N + A          LoRA/QLoRA: 4·N + 6·N_trainable + A     (+ 2·N with gradient checkpointing)
    N = the weights that multiply each token's activations (decoder linears + LM head); A = attention,
    12 · layers · hidden · s for sequence length s. LoRA's frozen base costs a forward (2N) and the
    activation gradients (2N), not weight gradients; checkpointing recomputes one forward.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raytune_ft.plan import Arch, make_plan, memory_estimate, resolve_arch
from raytune_ft.spec.models import JobSpec

# Dense (no sparsity) bf16/fp16 tensor FLOP/s per GPU, from the vendors' data sheets.
PEAK_TFLOPS: dict[str, float] = {
    "H100": 989, "H100-80G": 989, "H100-NVL": 835, "H200": 989, "B200": 2250,
    "A100": 312, "A100-40G": 312, "A100-80G": 312,
    "A40": 150, "L40S": 362, "L40": 181, "A10G": 70, "A10": 125, "L4": 121,
    "RTX4090": 165, "RTX3090": 71, "RTX-A6000": 155, "V100-16G": 125, "V100-32G": 125, "T4": 65,
}

# Assumed model FLOP utilisation by method, when neither compute.assumed_mfu nor a figure measured by this
# project (bench/mfu.json, written from `make gpu-check` / `make bench-gpu`) applies. Deliberately
# conservative round numbers in the range the peers publish for HF-Trainer-style training of 1-8B models
# in bf16 (full fine-tuning 35-45%, LoRA lower because the adapters' small matmuls and the frozen base's
# bookkeeping cost time without FLOPs, QLoRA lower again for dequantising every 4-bit weight each pass).
ASSUMED_MFU: dict[str, float] = {"full": 0.40, "lora": 0.35, "qlora": 0.22}
MEASURED_MFU_FILE = Path(__file__).resolve().parents[1] / "bench" / "mfu.json"

# On-demand list prices in USD per GPU-hour, for a rough figure only (cloud prices change monthly and
# differ by region and commitment): override with compute.price_per_hour.
LIST_PRICE_PER_GPU_HOUR: dict[str, float] = {
    "H100": 2.99, "H100-80G": 2.99, "H100-NVL": 3.29, "H200": 3.79, "B200": 5.99,
    "A100": 1.89, "A100-80G": 1.89, "A100-40G": 1.29, "A40": 0.44, "L40S": 0.86, "L40": 0.99,
    "A10G": 1.01, "A10": 0.75, "L4": 0.48, "RTX4090": 0.69, "RTX3090": 0.43, "RTX-A6000": 0.49,
    "V100-16G": 0.89, "V100-32G": 1.10, "T4": 0.35,
}

SAMPLE_ROWS = 2000
HEADROOM = 0.9  # a larger micro-batch is proposed only while the estimate leaves 10% of the card free
CHARS_PER_TOKEN = 4.0  # the usual rule of thumb for English BPE tokenizers, used only without a tokenizer


@dataclass
class Tokens:
    per_epoch: int | None
    examples: int | None
    mean_len: float | None
    how: str  # counted | sampled | approximate | unknown: why
    lengths: tuple[int, ...] = ()  # the counted (or sampled) examples' lengths, as training truncates them


@dataclass
class Estimate:
    tokens: Tokens
    train_tokens: int | None
    steps: int | None
    flops_per_token: float | None
    gpus: int
    peak_tflops: float | None
    mfu: float | None
    mfu_source: str
    hours: float | None
    price_per_gpu_hour: float | None
    price_source: str
    cost: float | None
    sweep: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    compute_tokens: int | None = None  # train_tokens with the padding a padded batch computes too

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens"].pop("lengths", None)  # the sample behind mean_len and the padding: not a plan figure
        return d


# --------------------------------------------------------------------------- tokens


def _tokenizer_file(spec: JobSpec) -> Path | None:
    for ref in (spec.tokenizer.name_or_path, spec.model.name_or_path):
        if ref and (Path(ref) / "tokenizer.json").is_file():
            return Path(ref) / "tokenizer.json"
    return None


def _row_text(fmt: str, row: dict[str, Any], fields: dict[str, str] | None) -> str:
    from raytune_ft.data.formats import normalize_row

    ex = normalize_row(fmt, row, fields)
    if "messages" in ex:
        return "\n".join(m["content"] for m in ex["messages"])
    return "\n".join(v for v in ex.values() if isinstance(v, str))


def count_tokens(spec: JobSpec, *, sample_rows: int = SAMPLE_ROWS) -> Tokens:
    """Tokens in one epoch of the training data: every row counted with the model's own tokenizer.json
    when the data has at most ``sample_rows`` rows, else the first ``sample_rows`` counted and scaled by
    the row count; without a local tokenizer, characters / 4. Remote data is not read (stated)."""
    from raytune_ft.data.formats import RowError
    from raytune_ft.data.sources import read_rows
    from raytune_ft.errors import DataError

    tok_file = _tokenizer_file(spec)
    encode = None
    if tok_file is not None:
        try:
            from tokenizers import Tokenizer

            tk = Tokenizer.from_file(str(tok_file))

            def encode(texts: list[str]) -> list[int]:
                return [len(e.ids) for e in tk.encode_batch(texts)]
        except Exception:  # a tokenizer file the library cannot read: fall back to characters
            encode = None
    total_tokens, total_rows, sampled_any = 0.0, 0, False
    all_lens: list[int] = []
    max_len = spec.data.max_seq_length
    for src in spec.data.train_sources:
        if "://" in src.path:
            return Tokens(None, None, None, f"unknown: {src.path} is remote (not read by plan); use --tokens N")
        if not os.path.exists(src.path):
            return Tokens(None, None, None, f"unknown: {src.path} does not exist here; use --tokens N")
        texts, rows = [], 0
        try:
            for raw in read_rows(src.path):
                rows += 1
                if raw.value is None or len(texts) >= sample_rows:
                    continue
                try:
                    texts.append(_row_text(src.format, raw.value, src.fields))
                except RowError:
                    continue
        except DataError as e:
            return Tokens(None, None, None, f"unknown: {e}")
        if not texts:
            continue
        lens = encode(texts) if encode else [math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts]
        if max_len:
            lens = [min(n + 2, max_len) for n in lens]  # + BOS/EOS, truncated as training truncates
        all_lens += lens
        scale = rows / len(texts)
        sampled_any |= scale > 1
        total_tokens += sum(lens) * scale * src.weight
        total_rows += int(rows * src.weight)
    if not total_rows:
        return Tokens(None, None, None, "unknown: no usable training rows")
    if spec.data.eval_split:
        total_tokens *= 1 - spec.data.eval_split
        total_rows = int(total_rows * (1 - spec.data.eval_split))
    if encode is None:
        how = f"approximate: {CHARS_PER_TOKEN:g} characters per token (no local tokenizer.json)"
    elif sampled_any:
        how = f"sampled: {sample_rows:,} rows per source counted with {tok_file}, scaled by the row count"
    else:
        how = f"counted: every row, with {tok_file}"
    return Tokens(int(total_tokens), total_rows, total_tokens / total_rows, how, tuple(all_lens))


def padded_length(lengths: tuple[int, ...], batch: int, draws: int = 256) -> float | None:
    """The mean row length of a padded micro-batch: each batch pads to its longest example, and HF's
    sampler draws examples at random (no length grouping), so this is the expected maximum of ``batch``
    lengths drawn from the data (simulated with a fixed seed)."""
    if not lengths:
        return None
    if batch <= 1:
        return sum(lengths) / len(lengths)
    import random

    rng = random.Random(0)
    return sum(max(rng.choices(lengths, k=batch)) for _ in range(draws)) / draws


# --------------------------------------------------------------------------- FLOPs, MFU, price


def flops_per_token(arch: Arch, spec: JobSpec, trainable: int, seq: float) -> float:
    n = arch.linear_params + arch.vocab * arch.hidden  # decoder linears + LM head (tied or not)
    attn = 12 * arch.layers * arch.hidden * seq
    if spec.method.type == "full":
        f = 6 * n + attn
    else:
        f = 4 * n + 6 * trainable + attn
    if spec.training.gradient_checkpointing:
        f += 2 * n + attn / 3  # one more forward
    return f


def measured_mfu(accelerator: str | None, method: str) -> tuple[float | None, str]:
    """A figure this project measured (bench/mfu.json: {"H100": {"lora": 0.31, "source": "..."}})."""
    if not accelerator or not MEASURED_MFU_FILE.is_file():
        return None, ""
    try:
        table = json.loads(MEASURED_MFU_FILE.read_text())
    except ValueError:
        return None, ""
    row = table.get(accelerator) or table.get(accelerator.split("-")[0]) or {}
    if isinstance(row.get(method), (int, float)):
        return float(row[method]), f"measured by this project ({row.get('source', 'bench/mfu.json')})"
    return None, ""


def _mfu(spec: JobSpec) -> tuple[float, str]:
    c = spec.compute
    if c.assumed_mfu is not None:
        return c.assumed_mfu, "compute.assumed_mfu"
    m, src = measured_mfu(c.accelerator_type, spec.method.type)
    if m is not None:
        return m, src
    return ASSUMED_MFU[spec.method.type], f"assumed for {spec.method.type} (raytune_ft.estimate.ASSUMED_MFU)"


def _price(spec: JobSpec) -> tuple[float | None, str]:
    c = spec.compute
    if c.price_per_hour is not None:
        return c.price_per_hour, "compute.price_per_hour"
    if c.accelerator_type in LIST_PRICE_PER_GPU_HOUR:
        return LIST_PRICE_PER_GPU_HOUR[c.accelerator_type], "list price (raytune_ft.estimate; set compute.price_per_hour)"
    return None, "no price: set compute.price_per_hour"


# --------------------------------------------------------------------------- the estimate


def estimate(spec: JobSpec, *, tokens: Tokens | None = None, tokens_per_epoch: int | None = None) -> Estimate:
    """``tokens_per_epoch`` (``rtf plan --tokens N``) stands in for counting the data."""
    plan = make_plan(spec)
    c, t = spec.compute, spec.training
    tokens = tokens or (Tokens(tokens_per_epoch, None, None, "given with --tokens")
                        if tokens_per_epoch else count_tokens(spec))
    gpus = max(1, int(math.ceil(c.num_workers * c.gpus_per_worker))) if c.use_gpu else 0
    mfu, mfu_src = _mfu(spec)
    price, price_src = _price(spec)
    peak = c.peak_tflops or PEAK_TFLOPS.get(c.accelerator_type or "")
    est = Estimate(tokens, None, None, None, gpus, peak, mfu, mfu_src, None, price, price_src, None)
    seq_cap = spec.data.max_seq_length or 2048
    # tokens per optimizer step: packed rows are full rows; unpacked batches hold examples of mean length
    mean_len = tokens.mean_len or seq_cap
    per_seq = seq_cap if spec.data.packing else min(mean_len, seq_cap)
    step_tokens = plan.global_batch_size * per_seq
    # what the model computes per row: a packed row is full; a padded row is as long as its batch's longest
    padded = None if spec.data.packing else padded_length(tokens.lengths, t.per_device_train_batch_size)
    compute_per_token = max(1.0, padded / per_seq) if padded else 1.0
    if padded and compute_per_token > 1.0:
        est.notes.append(f"padded batches: rows of ≈{padded:.0f} tokens for examples of {per_seq:.0f} on average; "
                         f"the time counts the padding ({100 * (1 - 1 / compute_per_token):.0f}% of what is computed; "
                         "data.packing removes it)")
    if t.max_steps:
        est.steps = t.max_steps
        est.train_tokens = int(t.max_steps * step_tokens)
        if tokens.per_epoch and t.num_epochs:
            est.train_tokens = min(est.train_tokens, int(tokens.per_epoch * t.num_epochs))
    elif tokens.per_epoch and t.num_epochs:
        est.train_tokens = int(tokens.per_epoch * t.num_epochs)
        est.steps = max(1, math.ceil(est.train_tokens / step_tokens))
    arch = resolve_arch(spec)
    if arch is None:
        est.notes.append("model shape unknown (see the memory note): no FLOPs, no time")
        return est
    trainable = memory_estimate(spec, arch).trainable_params
    seq_attn = min(mean_len, seq_cap)  # attention runs per example, packed or not
    est.flops_per_token = flops_per_token(arch, spec, trainable, seq_attn)
    if est.peak_tflops is None:
        est.notes.append("CPU run: no peak FLOP/s table for CPUs; set compute.peak_tflops for a time estimate"
                         if not c.use_gpu else
                         f"compute.accelerator_type {c.accelerator_type or 'unset'}: peak FLOP/s unknown; set "
                         "compute.accelerator_type (e.g. H100) or compute.peak_tflops for a time estimate")
        return est
    if est.train_tokens is None:
        est.notes.append("training length " + tokens.how)
        return est
    devices = gpus or max(1, c.num_workers)  # on CPU: one device (peak_tflops) per worker
    est.compute_tokens = int(est.train_tokens * compute_per_token)
    seconds = est.compute_tokens * est.flops_per_token / (devices * est.peak_tflops * 1e12 * mfu)
    est.hours = seconds / 3600
    if price is not None:
        est.cost = est.hours * gpus * price
    if spec.tune is not None:
        est.sweep = sweep_estimate(spec, est)
    return est


COSTLY_KEYS = ("r", "max_seq_length", "per_device_train_batch_size", "num_epochs", "max_steps",
               "gradient_accumulation_steps")


def sweep_estimate(spec: JobSpec, per_trial: Estimate) -> dict[str, Any]:
    """Trials × per-trial time ÷ concurrency, sized at the costliest point of the space (largest LoRA rank,
    longest sequence, largest batch): an upper bound, since ASHA stops poor trials early."""
    tune = spec.tune
    assert tune is not None
    costly: dict[str, Any] = {}
    for path, dist in tune.space.items():
        values = dist.options if dist.options is not None else list(dist.lo_hi or ())
        nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if nums and path.split(".")[-1] in COSTLY_KEYS:
            costly[path] = max(nums)
    worst_spec = _apply(spec, costly, drop_tune=True)
    worst = estimate(worst_spec, tokens=per_trial.tokens)
    grid = [d for d in tune.space.values() if d.kind == "grid"]
    trials = (tune.num_samples or 1) * math.prod(len(d.grid) for d in grid) if grid else (tune.num_samples or 1)
    conc = tune.max_concurrent_trials or trials
    waves = math.ceil(trials / conc)
    hours = (worst.hours or 0) * waves if worst.hours is not None else None
    gpu_hours = (worst.hours or 0) * worst.gpus * trials if worst.hours is not None else None
    return {"trials": trials, "concurrent": conc, "costliest_point": costly, "trial_hours": worst.hours,
            "wall_hours": hours, "gpu_hours": gpu_hours,
            "cost": gpu_hours * worst.price_per_gpu_hour if gpu_hours is not None and worst.price_per_gpu_hour else None,
            "memory_gib_at_costliest": round(memory_estimate(worst_spec).total / 1024**3, 2)}


def render(est: Estimate) -> list[str]:
    t = est.tokens
    lines = []
    if t.per_epoch is not None:
        lines.append(f"data:         {t.per_epoch:,} tokens per epoch"
                     + (f" in {t.examples:,} examples (mean {t.mean_len:.0f})" if t.examples else "") + f"; {t.how}")
    else:
        lines.append(f"data:         tokens {t.how}")
    if est.train_tokens is not None:
        lines.append(f"training:     {est.train_tokens:,} tokens in {est.steps:,} optimizer steps"
                     if est.steps else f"training:     {est.train_tokens:,} tokens")
    if est.flops_per_token:
        lines.append(f"compute:      {est.flops_per_token / 1e9:.2f} GFLOP per token"
                     + (f", {est.gpus} GPU(s) × {est.peak_tflops:g} TFLOP/s peak × MFU {est.mfu:.0%} ({est.mfu_source})"
                        if est.peak_tflops and est.gpus else
                        f", CPU × {est.peak_tflops:g} TFLOP/s peak (compute.peak_tflops) × MFU {est.mfu:.0%} "
                        f"({est.mfu_source})" if est.peak_tflops else ""))
    if est.hours is not None:
        h = est.hours
        when = f"{h * 3600:.0f} s" if h < 1 / 60 else f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"
        cost = (f"; cost ≈ ${est.cost:,.2f} at ${est.price_per_gpu_hour:.2f}/GPU-hour ({est.price_source})"
                if est.cost is not None else f"; {est.price_source}")
        lines.append(f"time:         ≈ {when} of training ({h * est.gpus:.1f} GPU-hours){cost}" if est.gpus else
                     f"time:         ≈ {when} of training on CPU")
    if est.sweep and est.sweep.get("wall_hours") is not None:
        s = est.sweep
        pts = ", ".join(f"{k}={v}" for k, v in s["costliest_point"].items()) or "the spec as written"
        lines.append(f"sweep:        {s['trials']} trials, {s['concurrent']} at a time: ≈ {s['wall_hours']:.1f} h, "
                     f"{s['gpu_hours']:.0f} GPU-hours"
                     + (f", ≈ ${s['cost']:,.0f}" if s.get("cost") else "")
                     + f" (each trial sized at {pts}: {s['trial_hours']:.2f} h, "
                       f"{s['memory_gib_at_costliest']:.1f} GiB/GPU; ASHA stops poor trials early, so less)")
    lines += [f"              note: {n}" for n in est.notes]
    return lines


# --------------------------------------------------------------------------- fitting to memory


def fit(spec: JobSpec) -> tuple[list[str], str]:
    """The smallest change that makes ``spec`` fit its accelerator, as ``--set`` overrides, or, when it
    already fits, the largest micro-batch that still does (global batch kept through accumulation).
    Order of proposals: micro-batch down (accumulation up), gradient checkpointing, ZeRO stage / offload
    (with several workers), QLoRA. Each proposal is re-planned before it is offered."""
    from raytune_ft.plan import ACCELERATOR_MEMORY_GIB, GIB

    cap = ACCELERATOR_MEMORY_GIB.get(spec.compute.accelerator_type or "")
    if cap is None:
        return [], "no fit check: compute.accelerator_type is unset or has no known memory size"
    if not memory_estimate(spec).known:
        return [], "no fit check: the model's shape is unknown"

    def total(sets: dict[str, Any]) -> float:
        return memory_estimate(_apply(spec, sets)).total / GIB

    t = spec.training
    gbs_per_worker = t.per_device_train_batch_size * spec.accumulation_steps

    def batch(b: int) -> dict[str, Any]:  # a micro-batch of b, the global batch kept
        if t.tokens_per_step:  # the accumulation follows from tokens_per_step
            return {"training.per_device_train_batch_size": b}
        return {"training.per_device_train_batch_size": b, "training.gradient_accumulation_steps": gbs_per_worker // b}

    now = total({})
    if now <= cap:  # headroom: the largest micro-batch that fits and divides the per-worker batch
        best = t.per_device_train_batch_size
        for b in range(t.per_device_train_batch_size + 1, gbs_per_worker + 1):
            if gbs_per_worker % b == 0 and total({"training.per_device_train_batch_size": b}) <= cap * HEADROOM:
                best = b
        if best == t.per_device_train_batch_size:
            return [], f"fits: {now:.1f} of {cap:g} GiB; no larger micro-batch fits with the same global batch"
        sets = batch(best)
        return _as_sets(sets), (f"fits: {now:.1f} of {cap:g} GiB; the largest micro-batch that fits with "
                                f"{100 - HEADROOM * 100:.0f}% to spare is {best} ({total(sets):.1f} GiB), same global batch")
    steps: list[dict[str, Any]] = [  # in order of effect on a step's speed: least costly first
        batch(b) for b in _divisors_desc(gbs_per_worker, below=t.per_device_train_batch_size)]
    if not t.gradient_checkpointing:
        steps.append({"training.gradient_checkpointing": True})
    stage = spec.deepspeed.stage if spec.deepspeed else 0
    if spec.compute.num_workers > 1:
        steps += [{"deepspeed.stage": s} for s in (2, 3) if stage < s]
    if spec.method.type == "full":
        steps.append({"deepspeed.stage": max(2, stage), "deepspeed.offload_optimizer": True})
    if spec.method.type == "lora":
        steps.append({"method.type": "qlora", "method.quantization.bits": 4})
    sets: dict[str, Any] = {}
    for step in steps:  # cumulative: each proposal keeps what the earlier ones set
        sets = {**sets, **step}
        size = total(sets)
        if size <= cap:
            return _as_sets(sets), f"does not fit: {now:.1f} of {cap:g} GiB; with these it is {size:.1f} GiB"
    return _as_sets(sets), (f"does not fit: {now:.1f} of {cap:g} GiB, and even with every change below it is "
                            f"{total(sets):.1f} GiB: use more GPUs (ZeRO-3 across them) or a shorter max_seq_length")


def _divisors_desc(n: int, below: int) -> list[int]:
    return [d for d in range(below - 1, 0, -1) if n % d == 0]


def _apply(spec: JobSpec, sets: dict[str, Any], *, drop_tune: bool = False) -> JobSpec:
    from raytune_ft.spec import dump_spec, spec_from_dict

    doc = dump_spec(spec)
    if drop_tune:
        doc.pop("tune", None)
    for path, value in sets.items():
        *parents, last = path.split(".")
        cur = doc
        for p in parents:
            if not isinstance(cur.get(p), dict):
                cur[p] = {}
            cur = cur[p]
        cur[last] = value
    if doc.get("method", {}).get("type") == "qlora":
        doc["method"].setdefault("quantization", {"bits": 4})
    return spec_from_dict(doc)


def _as_sets(sets: dict[str, Any]) -> list[str]:
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sets.items()]
