"""The GPU readiness check (issue 14): one prepared script for the few minutes a GPU machine is lent.

Two parts, one per run, each starting with the install of its wheelhouse folder (bench/gpu_wheelhouse.py):

  make gpu-check PART=1   (carry .whl1: ray, deepspeed, pydantic, liger-kernel)
    fixture      Llama-3.2-1B-shaped model from its config (random bf16 weights, 1,235,814,400 parameters),
                 a BPE tokenizer and the quickstart data from the standard library (bench/gpu.py's fixture)
    lora_rtf     LoRA bf16 through the real ``rtf submit`` on the embedded Ray (``gpus_per_worker: 1``),
                 60 steps of packed rows: loss falls, tokens/s, MFU, peak memory vs ``rtf plan``'s estimate
    hf_baseline  a plain HF Trainer + SDPA padded LoRA script on the same data: tokens/s, the rtf/HF ratio
    attention    SDPA padded vs SDPA packed rows vs flex_attention packed rows (block-diagonal causal
                 BlockMask from the rows' position_ids) on the same examples: losses, tokens/s of each
    zero_plain, zero2, zero3
                 full fine-tuning with gradient checkpointing: no DeepSpeed, then rtf's generated ZeRO-2 and
                 ZeRO-3 configs, each in its own process with an NCCL process group of one GPU: losses of the
                 first steps within tolerance of the plain run
    liger        Liger kernels off / on (HF's ``use_liger_kernel``) on rtf's LoRA setup: tokens/s, peak
                 memory, same losses within tolerance
  make gpu-check PART=2   (carry .whl2: bitsandbytes, pydantic; no Ray, no DeepSpeed)
    fixture, qlora
                 QLoRA nf4 double-quant, ``paged_adamw_8bit``, gradient checkpointing, built by rtf's own
                 modeling code and trained by HF Trainer in this process: loss falls, memory vs plan
  make gpu-check-dry      the same sub-checks with the GPU steps replaced by their plans (shapes, FLOP model,
                 memory plan, wheelhouse sizes): runs on CPU, in CI, so the script cannot rot.

Output: progress lines with timestamps, one table on stdout, and ``OUT/gpu_check_partN.json`` rewritten after
every sub-check (a run cut off by its time limit still leaves the finished sub-checks). Every sub-check runs in
its own try/except; the exit code is 1 when any assertion failed or any sub-check broke, 0 otherwise. A
sub-check that no longer fits the time budget (``--budget-s``) is skipped and says so (not a failure).

MFU = achieved model FLOP/s ÷ the card's dense bf16 peak (bench/gpu.py: H100 SXM 989 TFLOP/s); model FLOPs per
token: LoRA 4·N + 6·N_trainable + A, full 6·N + A, with N the weights that multiply an activation (decoder
linears + LM head) and A = 12·layers·hidden·s, s the token-weighted mean example length Σs²/Σs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))
import common as C  # noqa: E402
import gpu as G  # noqa: E402
import gpu_wheelhouse as W  # noqa: E402

NO_GPU_EXIT = 2

# Every tolerance the check asserts, stated once (printed by the dry run, stored in the JSON).
TOL: dict[str, Any] = {
    "attention_mean_loss_rel": 2e-3,  # |mean loss(variant) − mean loss(sdpa padded)| / loss: bf16 kernels differ in rounding
    "zero_step1_loss_rel": 5e-3,      # step 1: same weights; DeepSpeed holds them in bf16, plain in fp32 (autocast)
    "zero_loss_rel": 2e-2,            # steps 2..k: bf16 weights round Adam's small updates differently
    "liger_step1_loss_rel": 5e-3,     # fused linear cross entropy in bf16 chunks vs the eager loss
    "liger_loss_rel": 2e-2,
    "loss_falls_rel": 0.01,           # mean of the last 5 logged losses ≤ (1 − this) × mean of the first 5
    "memory_vs_plan_max": 1.15,       # peak max_memory_allocated ≤ this × rtf plan's total estimate
}


class Config(argparse.Namespace):
    pass


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", type=int, choices=[1, 2], default=None, help="1 or 2 (a dry run without it: both)")
    ap.add_argument("--dry-run", action="store_true", help="plans only, on CPU; no GPU needed")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "bench" / "out"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/rtf-gpu-check"), help="fixture and runs")
    ap.add_argument("--only", default=None, help="comma-separated sub-checks to run (fixture always runs)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for this part after the install; sub-checks that no longer fit are skipped "
                         "(default: part 1 380, part 2 150)")
    ap.add_argument("--seq", type=int, default=1024, help="max_seq_length, the packed row length")
    ap.add_argument("--rows", type=int, default=8, help="packed rows per step (LoRA, Liger, QLoRA)")
    ap.add_argument("--lora-steps", type=int, default=60)
    ap.add_argument("--lora-attn", default="auto", choices=["auto", "sdpa", "flex_attention", "flash_attention_2"],
                    help="model.attn_implementation of the lora_rtf run")
    ap.add_argument("--baseline-batch", type=int, default=48, help="examples per step of the padded HF script")
    ap.add_argument("--baseline-steps", type=int, default=40)
    ap.add_argument("--zero-steps", type=int, default=6)
    ap.add_argument("--zero-rows", type=int, default=4)
    ap.add_argument("--liger-steps", type=int, default=20)
    ap.add_argument("--qlora-steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="logged steps excluded from tokens/s")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--cpus", type=int, default=8, help="compute.cpus_per_worker of the rtf run")
    ap.add_argument("--rehearse", action="store_true",
                    help="run the real sub-checks on CPU with a tiny model and few steps (no GPU; slow, for "
                         "trying the script and a wheelhouse install on a CPU machine); figures are meaningless")
    # internal: one ZeRO variant in its own process (see zero_variant)
    ap.add_argument("--zero-runner", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--runner-cfg", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--runner-out", type=Path, default=None, help=argparse.SUPPRESS)
    return ap


# --------------------------------------------------------------------------- bookkeeping

T0 = time.time()


def log(msg: str) -> None:
    now = dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{time.time() - T0:6.1f}s {now}] {msg}", flush=True)


class CheckFailed(Exception):
    """An assertion of the check failed; ``data`` keeps what was measured."""

    def __init__(self, msg: str, data: dict[str, Any]):
        super().__init__(msg)
        self.data = data


class Asserts:
    """Collects the assertions of one sub-check; ``done`` raises CheckFailed if any failed."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def check(self, what: str, ok: bool, **detail: Any) -> bool:
        self.items.append({"what": what, "ok": bool(ok), **detail})
        return bool(ok)

    def done(self, data: dict[str, Any]) -> dict[str, Any]:
        data["assertions"] = self.items
        bad = [a["what"] for a in self.items if not a["ok"]]
        if bad:
            raise CheckFailed("failed: " + "; ".join(bad), data)
        return data


class Results:
    """The part's JSON, rewritten atomically after every sub-check."""

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = path
        self.doc: dict[str, Any] = {"meta": meta, "tolerances": TOL, "checks": []}
        self.write()

    def add(self, rec: dict[str, Any]) -> None:
        self.doc["checks"].append(rec)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=_jsonable))
        os.replace(tmp, self.path)

    @property
    def ok(self) -> bool:
        return all(c.get("ok") is not False for c in self.doc["checks"])


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    return repr(v)


def run_sub(res: Results, name: str, fn: Callable[[], dict[str, Any]], need_s: float, deadline: float) -> dict[str, Any]:
    left = deadline - time.time()
    if left < need_s:
        rec = {"name": name, "ok": None, "skipped": f"out of time budget: {left:.0f}s left, needs about {need_s:.0f}s"}
        log(f"{name}: SKIPPED ({rec['skipped']})")
        res.add(rec)
        return rec
    log(f"{name}: start ({left:.0f}s of budget left, needs about {need_s:.0f}s)")
    t = time.time()
    try:
        rec = {"name": name, "ok": True, **fn()}
    except CheckFailed as e:
        rec = {"name": name, "ok": False, "error": str(e), **e.data}
    except Exception as e:  # one broken sub-check must not lose the others
        rec = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}"[-3000:],
               "traceback": traceback.format_exc()[-4000:]}
    rec["seconds"] = round(time.time() - t, 1)
    res.add(rec)
    log(f"{name}: {'ok' if rec['ok'] else 'FAILED'} in {rec['seconds']:.0f}s" +
        (f": {rec['error'][:500]}" if not rec["ok"] else f": {summary(rec)}"))
    _free()
    return rec


def _free() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def versions() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "accelerate", "triton", "ray", "deepspeed", "bitsandbytes",
                "liger-kernel", "pydantic", "flash-attn", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            out["device"] = torch.cuda.get_device_name(0)
            out["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        d = pynvml.nvmlSystemGetDriverVersion()
        out["driver"] = d.decode() if isinstance(d, bytes) else d
    except Exception:  # no NVML here (CPU machine, or a container without it): the driver is optional
        pass
    return out


# --------------------------------------------------------------------------- specs and plans


def spec_doc(kind: str, fx: dict[str, str], storage: str, a: Config, **over: Any) -> dict[str, Any]:
    """An rtf spec for one sub-check. kind: lora | full | qlora. ``over``: training.* overrides."""
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    method: dict[str, Any] = {"type": kind}
    if kind != "full":
        method["lora"] = lora
    if kind == "qlora":
        method["quantization"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    steps = {"lora": a.lora_steps, "full": a.zero_steps, "qlora": a.qlora_steps}[kind]
    training: dict[str, Any] = {
        "max_steps": steps, "per_device_train_batch_size": a.zero_rows if kind == "full" else a.rows,
        "learning_rate": 1e-4 if kind == "full" else 5e-4, "lr_scheduler_type": "constant",
        "precision": "bf16", "gradient_checkpointing": kind != "lora", "logging_steps": 1,
        "save_steps": 100_000, "seed": 42,
    }
    if kind == "qlora":
        training["optimizer"] = "paged_adamw_8bit"
    training.update(over.pop("training", {}))
    if getattr(a, "rehearse", False):  # CPU: no GPU for the worker, fp32 (the figures mean nothing here)
        training["precision"] = "fp32"
    doc = {
        "name": over.pop("name", f"gpu-check-{kind}"),
        "model": {"name_or_path": fx["model"], "attn_implementation": over.pop("attn", "auto")},
        "method": method,
        "data": {"train": {"path": fx["train"], "format": "alpaca"}, "max_seq_length": a.seq, "packing": True},
        "training": training,
        "compute": {"num_workers": 1, "gpus_per_worker": 0 if getattr(a, "rehearse", False) else 1,
                    "cpus_per_worker": a.cpus},
        "storage": {"path": storage, "keep_checkpoints": 2},
        "fault_tolerance": {"max_failures": 0},
        "monitoring": {"report_to": ["none"]},
    }
    ds = over.pop("deepspeed", None)
    if ds:
        doc["deepspeed"] = {"stage": ds}
    if over:
        raise ValueError(f"unknown overrides {sorted(over)}")
    return doc


def plan_of(doc: dict[str, Any]) -> dict[str, Any]:
    """rtf's memory plan (GiB) for a spec doc, on the 1B architecture (no model files needed)."""
    from raytune_ft.plan import GIB, memory_estimate
    from raytune_ft.spec import spec_from_dict

    est = memory_estimate(spec_from_dict(doc), arch=G.arch())
    g = est.gib()
    g["total_without_overhead"] = round((est.total - est.overhead) / GIB, 2)
    g["trainable_params"] = est.trainable_params
    g["total_params"] = est.total_params
    return g


def flops_of(kind: str, trainable: int, seq_eff: float) -> dict[str, float]:
    return G.flops_per_token({"method": "full" if kind == "full" else "lora"}, seq_eff, n_trainable=trainable)


PLACEHOLDER_FX = {"model": "/nonexistent/llama-3.2-1b-shape", "train": "/nonexistent/quickstart.train.jsonl"}


def subchecks(part: int) -> list[tuple[str, float, str]]:
    """(name, seconds it is expected to take on an H100, what it does), in running order: the most wanted
    figures first. A sub-check starts only while its expected time still fits the budget."""
    fixture = ("fixture", 30, "quickstart data, BPE tokenizer, 1B-shaped model built on the GPU, saved in bf16")
    if part == 1:
        return [
            fixture,
            ("lora_rtf", 75, "rtf submit (embedded Ray, 1 worker, 1 GPU) LoRA bf16 on packed rows"),
            ("hf_baseline", 35, "plain HF Trainer + SDPA, padded batches, LoRA, same data"),
            ("attention", 50, "SDPA padded vs SDPA packed vs flex_attention packed: losses and tokens/s"),
            ("zero_plain", 35, "full FT + grad ckpt, no DeepSpeed (NCCL group of 1)"),
            ("zero2", 40, "full FT + grad ckpt, rtf's ZeRO-2 config"),
            ("zero3", 45, "full FT + grad ckpt, rtf's ZeRO-3 config"),
            ("liger", 45, "Liger kernels off / on (use_liger_kernel), LoRA packed rows"),
        ]
    return [fixture, ("qlora", 60, "QLoRA nf4 double-quant + paged_adamw_8bit + grad ckpt, in-process HF Trainer")]


DEFAULT_BUDGET_S = {1: 380, 2: 150}  # after the install: part 1 about 7 min, part 2 about 3 min in all


# --------------------------------------------------------------------------- the dry run


def dry_run(a: Config) -> int:
    """Every sub-check's plan, built through the same functions the GPU run uses."""
    # The names the GPU run imports: a rename elsewhere in the package fails here, in CI, first.
    from raytune_ft.data.packing import collate_packed, pack_examples  # noqa: F401
    from raytune_ft.data.pipeline import build_datasets  # noqa: F401
    from raytune_ft.plan import deepspeed_config
    from raytune_ft.spec import spec_from_dict
    from raytune_ft.train.modeling import apply_method, build_model, count_parameters  # noqa: F401
    from raytune_ft.train.recipe import training_arguments  # noqa: F401

    ar = G.arch()
    print(f"model: Llama-3.2-1B shape, {ar.params:,} parameters ({ar.linear_params:,} in decoder linears, "
          f"LM head tied to the {ar.vocab}x{ar.hidden} embedding); seq {a.seq}, bf16")
    seq_guess = 200.0
    fx = PLACEHOLDER_FX
    rows = []
    plans: dict[str, Any] = {}
    for name, need, what in subchecks(a.part):
        kind = {"lora_rtf": "lora", "hf_baseline": "lora", "liger": "lora", "attention": "full", "zero_plain": "full",
                "zero2": "full", "zero3": "full", "qlora": "qlora"}.get(name)
        if kind is None:
            rows.append([name, "-", "-", "-", "-", "-", need, what])
            continue
        ds = {"zero2": 2, "zero3": 3}.get(name)
        doc = spec_doc(kind, fx, "/tmp/rtf-gpu-check/runs", a, deepspeed=ds,
                       training={"max_steps": a.liger_steps} if name == "liger" else {})
        spec = spec_from_dict(doc)  # the spec validates, as rtf would validate it
        p = plan_of(doc)
        f = flops_of(kind, p["trainable_params"], seq_guess)
        dsc = deepspeed_config(spec)
        plans[name] = {"spec": doc, "memory_plan_gib": p, "flops": f,
                       "deepspeed_stage": dsc["zero_optimization"]["stage"] if dsc else None}
        steps = f"{doc['training']['max_steps']} x {doc['training']['per_device_train_batch_size'] * a.seq}"
        plan_gib: Any = f"{p['total']:.2f}"
        if name == "hf_baseline":  # not an rtf spec: its own padded batches; rtf's plan does not apply
            plan_gib, steps = "-", f"{a.baseline_steps} x {a.baseline_batch} ex. padded"
        if name == "attention":  # bf16 weights, fwd+bwd without an optimizer
            plan_gib, steps = "-", f"256 ex.: fwd + 8 fwd/bwd x {a.rows * a.seq}"
        rows.append([name, kind + (f" ZeRO-{ds}" if ds else ""), f"{p['trainable_params']:,}",
                     f"{f['flops_per_token'] / 1e9:.2f}", plan_gib, steps, need, what])
    print(C.fmt_table(["sub-check", "method", "trainable", "GFLOP/token*", "plan GiB", "steps x tokens/step",
                       "expect s", "what"], rows))
    print(f"* s = {seq_guess:.0f} for the attention term (the real Σs²/Σs is measured on the GPU)")
    budget = a.budget_s or DEFAULT_BUDGET_S[a.part]
    total_need = sum(n for _, n, _ in subchecks(a.part))
    print(f"time: budget {budget:.0f}s after the install; sub-checks expected to take {total_need:.0f}s "
          f"(one that no longer fits is skipped, not failed)")
    print("tolerances: " + ", ".join(f"{k} {v}" for k, v in TOL.items()))
    ok = True
    folder = f".whl{a.part}"
    wh = REPO / folder
    if wh.is_dir():
        rep = W.folder_report(wh)
        ok = bool(rep["ok"])
        missing = [n for n in W.FOLDERS[folder]
                   if not any(W._dist_name(f) == W._norm(n) for f in rep["files"])]  # type: ignore[union-attr]
        ok = ok and not missing
        print(f"wheelhouse {folder}/: {len(rep['files'])} files, {rep['mib']:.2f} MiB "  # type: ignore[arg-type]
              f"(limit {W.LIMIT_MIB} MiB: {'ok' if rep['ok'] else 'OVER'})"
              + (f"; MISSING {', '.join(missing)}" if missing else ""))
    else:
        print(f"wheelhouse {folder}/: not built here (make gpu-wheelhouse); planned: "
              + ", ".join(f"{n}=={W.PINS[n]}" for n in W.FOLDERS[folder]))
    print(f"install there: {W.install_line(folder)}")
    out = a.out / f"gpu_check_part{a.part}.dry.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"part": a.part, "plans": plans, "tolerances": TOL}, indent=2, default=_jsonable))
    print(f"dry run: nothing was started; {len(rows)} sub-checks planned; plans in {out}")
    return 0 if ok else 1


# --------------------------------------------------------------------------- shared GPU pieces


def peak_reset() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    """Peak torch.cuda.max_memory_allocated since peak_reset (0 in a CPU rehearsal)."""
    import torch

    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device() -> Any:
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def loss_falls(losses: list[float], asserts: Asserts) -> dict[str, float]:
    first = sum(losses[:5]) / len(losses[:5])
    last = sum(losses[-5:]) / len(losses[-5:])
    asserts.check("loss falls", last <= (1 - TOL["loss_falls_rel"]) * first and math.isfinite(last),
                  first5=first, last5=last, limit=f"last5 <= {1 - TOL['loss_falls_rel']} x first5")
    return {"loss_first5": first, "loss_last5": last}


def memory_vs_plan(peak: float, plan: dict[str, Any], asserts: Asserts) -> dict[str, float]:
    ratio = peak / plan["total"]
    asserts.check("peak memory within plan", ratio <= TOL["memory_vs_plan_max"], peak_gib=peak,
                  plan_gib=plan["total"], ratio=ratio, limit=f"<= {TOL['memory_vs_plan_max']} x plan")
    return {"peak_memory_gib": round(peak, 2), "plan_gib": plan, "peak_over_plan": round(ratio, 3),
            "peak_over_plan_without_overhead": round(peak / plan["total_without_overhead"], 3)}


def compare_losses(ref: list[float], other: list[float], step1_tol: float, tol: float, what: str,
                   asserts: Asserts) -> dict[str, Any]:
    n = min(len(ref), len(other))
    rel = [abs(o - r) / abs(r) for r, o in zip(ref[:n], other[:n])]
    asserts.check(f"{what}: {n} steps logged", n >= 2, steps=n)
    if n:
        asserts.check(f"{what}: step-1 loss within {step1_tol}", rel[0] <= step1_tol, rel=rel[0])
        asserts.check(f"{what}: steps 1..{n} losses within {tol}", max(rel) <= tol, max_rel=max(rel))
    return {"losses_ref": ref[:n], "losses": other[:n], "rel_diff": rel}


class Recorder:
    """A TrainerCallback that keeps ``{step, time, **logs}`` per logging step (what rtf's metrics.jsonl
    holds), so in-process runs are timed exactly like rtf runs (common.steady_rate)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Rec(TrainerCallback):
            def __init__(self) -> None:
                self.records: list[dict[str, Any]] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                self.records.append({"step": state.global_step, "time": time.time(), **(logs or {})})

        return _Rec()


def rate(records: list[dict[str, Any]], warmup: int) -> dict[str, float]:
    return C.steady_rate([r for r in records if r["step"] >= warmup])


def tokenizer_of(fx: dict[str, str]) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fx["model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def rtf_trainer(doc: dict[str, Any], fx: dict[str, str], work: Path, *, callbacks: list[Any],
                liger: bool = False) -> Any:
    """An HF Trainer assembled from rtf's own worker pieces (modeling, data, TrainingArguments, DeepSpeed
    config, collator), as recipe._run assembles it, without Ray (one process, this GPU)."""
    from functools import partial

    from transformers import Trainer

    from raytune_ft.data.packing import PaddedCollator, collate_packed
    from raytune_ft.data.pipeline import build_datasets
    from raytune_ft.plan import deepspeed_config
    from raytune_ft.spec import spec_from_dict
    from raytune_ft.train.modeling import apply_method, build_model
    from raytune_ft.train.recipe import training_arguments

    spec = spec_from_dict(doc)
    tok = tokenizer_of(fx)
    train_ds, _, _ = build_datasets(spec.data, tok, seed=spec.training.seed)
    dev = device()
    model, chosen = build_model(spec, tok, device=dev, seed=spec.training.seed)
    model = apply_method(model, spec)
    args = training_arguments(spec, str(work / "hf" / spec.name), deepspeed_config(spec), use_cpu=dev.type == "cpu")
    if liger and not getattr(spec.training, "liger_kernel", False):
        args.use_liger_kernel = True  # a spec without training.liger_kernel: set HF's flag directly
    if spec.data.packing:
        flatten = getattr(model.config, "_attn_implementation", None) == "flash_attention_2"
        collator = partial(collate_packed, pad_token_id=tok.pad_token_id, flatten=flatten)
    else:
        collator = PaddedCollator(tok.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                      processing_class=tok, callbacks=callbacks)
    trainer.rtf_chosen = chosen
    return trainer


def train_measured(trainer: Any, rec: Any) -> dict[str, Any]:
    peak_reset()
    t = time.time()
    trainer.train()
    wall = time.time() - t
    losses = [r["loss"] for r in rec.records if "loss" in r]
    return {"losses": losses, "peak": peak_gib(), "wall_s": wall}


# --------------------------------------------------------------------------- part 1


def check_fixture(ctx: dict[str, Any], a: Config) -> dict[str, Any]:
    fx = tiny_fixture(a.work / "fixture-tiny") if a.rehearse else G.build_model(a.work / "fixture")
    st = G.seq_stats(fx["train"], fx["model"], a.seq)
    ctx["fx"], ctx["seq"] = fx, st
    asserts = Asserts()
    expected = fx["params"] if a.rehearse else G.arch().params
    asserts.check("1B shape", fx["params"] == expected, params=fx["params"], expected=expected)
    return asserts.done({"params": fx["params"], "data": st, "model_dir": fx["model"]})


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True)


def tiny_fixture(root: Path) -> dict[str, Any]:
    """The rehearsal's fixture: bench/gpu.py's data and tokenizer, a Llama of the 1B's layout but tiny."""
    done = root / "fixture.json"
    if done.exists():
        return json.loads(done.read_text())
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytune_ft.data.pipeline import training_texts
    from raytune_ft.data.quickstart import build_quickstart_data
    from raytune_ft.data.tokenizer import train_tokenizer

    train, _ = build_quickstart_data(root / "data", max_examples=300)
    tok = train_tokenizer(training_texts({"train": [{"path": str(train), "format": "alpaca"}]}), 1024)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **TINY)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    out = {"train": str(train), "model": str(root / "model"), "params": sum(p.numel() for p in model.parameters())}
    done.write_text(json.dumps(out))
    return out


def check_lora_rtf(ctx: dict[str, Any], a: Config) -> dict[str, Any]:
    """``attn: auto``, what users get (SDPA without flash-attn: the second H200 run measured rtf's LoRA with
    flex_attention on packed rows at 16,480 tokens/s against SDPA's 29,681, so auto keeps SDPA). Pass
    ``--lora-attn flex_attention`` to measure flex again."""
    return _lora_rtf(ctx, a, a.lora_attn)


def _lora_rtf(ctx: dict[str, Any], a: Config, attn: str) -> dict[str, Any]:
    fx, st = ctx["fx"], ctx["seq"]
    storage = a.work / "runs"
    doc = spec_doc("lora", fx, str(storage), a, attn=attn)
    spec_path = C.write_yaml(a.work / f"lora_rtf_{attn}.yaml", doc)
    logf = a.work / f"lora_rtf_{attn}.log"
    env = C.bench_env(OMP_NUM_THREADS="4", MKL_NUM_THREADS="4", PYTHONUNBUFFERED="1")
    env.pop("PYTHONWARNINGS", None)
    t = time.time()
    with open(logf, "w") as f:  # `rtf submit` exactly as a user runs it (python -m raytune_ft == rtf)
        r = subprocess.run([sys.executable, "-m", "raytune_ft", "submit", str(spec_path), "--fresh"],
                           stdout=f, stderr=subprocess.STDOUT, env=env, cwd=a.work,
                           timeout=max(60, ctx["deadline"] - time.time() - 5))
    wall = time.time() - t
    text = logf.read_text(errors="replace")
    out: dict[str, Any] = {"wall_s": round(wall, 1), "exit_code": r.returncode, "log_tail": text[-3000:]}
    m = re.search(r"attention (\S+) \(([^)]*)\)", text)
    out["attention"] = f"{m.group(1)} ({m.group(2)})" if m else None
    asserts = Asserts()
    if not asserts.check("rtf submit exits 0", r.returncode == 0, exit_code=r.returncode):
        return asserts.done(out)
    run_dir = storage / doc["name"]
    meas = G.measure({"method": "lora"}, run_dir, a.warmup, st["seq_eff"], ctx["peak"])
    losses = [x["loss"] for x in C.read_jsonl(run_dir / "metrics.jsonl") if "loss" in x]
    out.update(meas, losses=losses, **loss_falls(losses, asserts))
    out.update(memory_vs_plan(meas["peak_memory_gib"], plan_of(doc), asserts))
    asserts.check(f"{a.lora_steps} steps", len(losses) >= a.lora_steps, logged=len(losses))
    out.pop("log_tail")
    ctx["lora_tokens_per_s"] = meas["tokens_per_s"]
    return asserts.done(out)


def check_hf_baseline(ctx: dict[str, Any], a: Config) -> dict[str, Any]:
    """The plain script users write (bench/hf_baseline.py's recipe, on the GPU): Alpaca prompt, tokenize with
    truncation, prompt labels -100, DataCollatorForSeq2Seq padding each batch to its longest, SDPA, bf16,
    LoRA r 16 on all linear layers, HF defaults for everything else (adamw_torch_fused)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    fx, st = ctx["fx"], ctx["seq"]
    tok = tokenizer_of(fx)
    prompt = "### Instruction:\n{instruction}\n\n### Response:\n"
    rows = C.read_jsonl(fx["train"])
    data = []
    for ex in rows:
        src = prompt.format(instruction=ex["instruction"])
        ids = tok(src + ex["output"] + tok.eos_token, truncation=True, max_length=a.seq)["input_ids"]
        n_src = len(tok(src, truncation=True, max_length=a.seq)["input_ids"])
        data.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n_src + ids[n_src:]})
    model = AutoModelForCausalLM.from_pretrained(fx["model"], attn_implementation="sdpa", dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(a.work / "hf_baseline"), max_steps=a.baseline_steps,
                             per_device_train_batch_size=a.baseline_batch, learning_rate=5e-4,
                             lr_scheduler_type="constant", bf16=True, logging_steps=1, save_strategy="no",
                             report_to="none", seed=42, disable_tqdm=True, use_cpu=device().type == "cpu",
                             include_num_input_tokens_seen="non_padding")
    rec = Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[rec],
                      data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
    m = train_measured(trainer, rec)
    w = rate(rec.records, a.warmup)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    f = flops_of("lora", trainable, st["seq_eff"])
    out = {"tokens_per_s": w["tokens_per_s"], "window_steps": w["steps"], "peak_memory_gib": round(m["peak"], 2),
           "losses": m["losses"], "trainable_params": trainable, "optimizer": args.optim,
           "mfu": w["tokens_per_s"] * f["flops_per_token"] / ctx["peak"] if ctx["peak"] else None}
    if ctx.get("lora_tokens_per_s"):
        out["rtf_over_hf"] = ctx["lora_tokens_per_s"] / w["tokens_per_s"]
    asserts = Asserts()
    loss_falls(m["losses"], asserts)
    del trainer, model
    return asserts.done(out)


def attention_batches(fx: dict[str, str], a: Config, n_examples: int = 256) -> dict[str, Any]:
    """The same examples three ways: padded batches, packed rows (rows stay rows) padded to ``seq`` so the
    compiled flex kernel sees one shape."""
    from raytune_ft.data.packing import PaddedCollator, collate_packed, pack_examples
    from raytune_ft.data.pipeline import build_datasets

    tok = tokenizer_of(fx)
    data = {"train": [{"path": fx["train"], "format": "alpaca"}], "max_seq_length": a.seq}
    examples, _, _ = build_datasets(data, tok, seed=42)
    examples = examples[:n_examples]
    pad = PaddedCollator(tok.pad_token_id)
    padded = [(pad(examples[i:i + 16]), _ntok(examples[i:i + 16])) for i in range(0, len(examples), 16)]
    rows = pack_examples(examples, a.seq)
    packed = [(pad_rows(collate_packed(rows[i:i + a.rows], pad_token_id=tok.pad_token_id), a.seq, tok.pad_token_id),
               _ntok(rows[i:i + a.rows])) for i in range(0, len(rows), a.rows)]
    return {"padded": padded, "packed": packed, "tokens": _ntok(examples), "examples": len(examples),
            "rows": len(rows)}


def _ntok(rows: list[dict[str, Any]]) -> int:
    return sum(len(r["input_ids"]) for r in rows)


def pad_rows(batch: dict[str, Any], width: int, pad_id: int) -> dict[str, Any]:
    """Right-pad a packed batch to ``width`` columns: pads are their own block (position_ids from 0, labels
    -100), exactly as collate_packed pads a short row, so no real token attends to them."""
    import torch

    b, n = batch["input_ids"].shape
    if n >= width:
        return batch
    extra = width - n
    return {"input_ids": torch.cat([batch["input_ids"], torch.full((b, extra), pad_id)], 1),
            "labels": torch.cat([batch["labels"], torch.full((b, extra), -100)], 1),
            "position_ids": torch.cat([batch["position_ids"], torch.arange(extra).expand(b, extra)], 1)}


def token_losses(model: Any, batch: dict[str, Any], device: Any) -> Any:
    """Per-target-token cross entropy (fp32), in row order; the causal shift inside each row."""
    import torch

    b = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    labels = batch["labels"].to(device)
    logits = model(**b, use_cache=False).logits
    tgt = labels[:, 1:]
    keep = tgt != -100
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), tgt[keep], reduction="none")
    return ce


def run_attention_variant(model: Any, batches: list[tuple[dict[str, Any], int]], device: Any,
                          timed: int) -> dict[str, Any]:
    """Forward losses over every batch (no grad), then fwd+bwd tokens/s: two warm-up batches (flex compiles
    there) and ``timed`` timed ones (0: losses only; flex_attention has no backward on CPU).
    ``batches``: (batch, real tokens in it)."""
    import torch

    model.eval()
    with torch.no_grad():
        ce = torch.cat([token_losses(model, b, device) for b, _ in batches])
    out = {"ce": ce, "mean_loss": float(ce.mean()), "targets": int(ce.numel()), "tokens_per_s": None,
           "timed_batches": timed}
    if timed <= 0:
        return out
    model.train()

    def step(b: dict[str, Any]) -> None:
        model(**{k: v.to(device) for k, v in b.items()}, use_cache=False).loss.backward()

    for b, _ in batches[:2]:
        step(b)
    model.zero_grad(set_to_none=True)
    _sync()
    t = time.time()
    tokens = 0
    for b, n in (batches * (1 + timed // max(1, len(batches))))[:timed]:
        tokens += n
        step(b)
    _sync()
    dt_ = time.time() - t
    model.zero_grad(set_to_none=True)
    out["tokens_per_s"] = tokens / dt_
    return out


def check_attention(ctx: dict[str, Any], a: Config) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    fx = ctx["fx"]
    bt = attention_batches(fx, a)
    dev = device()
    model = AutoModelForCausalLM.from_pretrained(fx["model"], attn_implementation="sdpa", dtype=torch.bfloat16).to(dev)
    out: dict[str, Any] = {"examples": bt["examples"], "tokens": bt["tokens"], "packed_rows": bt["rows"],
                           "variants": {}}
    res = {}
    for name, impl, batches in (("sdpa_padded", "sdpa", bt["padded"]), ("sdpa_packed", "sdpa", bt["packed"]),
                                ("flex_packed", "flex_attention", bt["packed"])):
        try:
            model.set_attn_implementation(impl)
            res[name] = run_attention_variant(model, batches, dev, timed=0 if a.rehearse else 8)
            out["variants"][name] = {k: v for k, v in res[name].items() if k != "ce"}
            log(f"  attention {name}: mean loss {res[name]['mean_loss']:.5f}, {res[name]['tokens_per_s'] or 0:,.0f} tok/s")
        except Exception as e:
            out["variants"][name] = {"error": f"{type(e).__name__}: {e}"[-1500:]}
            log(f"  attention {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
    asserts = Asserts()
    for name in ("sdpa_padded", "sdpa_packed", "flex_packed"):
        asserts.check(f"{name} ran", name in res)
    ref = res.get("sdpa_padded")
    for name in ("sdpa_packed", "flex_packed"):
        if ref and name in res:
            rel = abs(res[name]["mean_loss"] - ref["mean_loss"]) / ref["mean_loss"]
            asserts.check(f"{name} mean loss = sdpa_padded's within {TOL['attention_mean_loss_rel']}",
                          rel <= TOL["attention_mean_loss_rel"] and res[name]["targets"] == ref["targets"],
                          rel=rel, targets=res[name]["targets"], ref_targets=ref["targets"])
    if "sdpa_packed" in res and "flex_packed" in res:  # same layout: token by token
        d = (res["sdpa_packed"]["ce"] - res["flex_packed"]["ce"]).abs()
        out["flex_vs_sdpa_packed_token_abs_diff"] = {"mean": float(d.mean()), "max": float(d.max())}
    del model
    return asserts.done(out)


def zero_variant(a: Config) -> int:
    """One ZeRO variant in its own process (--zero-runner plain|2|3): rtf's pieces + HF Trainer + DeepSpeed
    over an NCCL process group of one GPU. Writes {losses, peak, ...} to --runner-out."""
    import torch
    import torch.distributed as dist

    cfg = json.loads(a.runner_cfg.read_text())
    fx, doc = cfg["fx"], cfg["doc"]
    out: dict[str, Any] = {"variant": a.zero_runner}
    try:
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
            dist.init_process_group("nccl", device_id=torch.device("cuda", 0))  # env:// (the parent set MASTER_*)
        else:  # a CPU rehearsal
            dist.init_process_group("gloo")
        out["backend"] = dist.get_backend()
        rec = Recorder()
        trainer = rtf_trainer(doc, fx, Path(cfg["work"]), callbacks=[rec])
        m = train_measured(trainer, rec)
        out.update(losses=m["losses"], peak_gib=m["peak"], wall_s=m["wall_s"],
                   engine=type(trainer.model_wrapped).__name__,
                   deepspeed=bool(getattr(trainer, "is_deepspeed_enabled", False)))
    except Exception as e:
        out.update(error=f"{type(e).__name__}: {e}"[-3000:], traceback=traceback.format_exc()[-4000:])
    a.runner_out.write_text(json.dumps(out, default=_jsonable))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if "error" not in out else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_zero(ctx: dict[str, Any], a: Config, stage: int | None) -> dict[str, Any]:
    fx = ctx["fx"]
    name = "plain" if stage is None else f"zero{stage}"
    doc = spec_doc("full", fx, str(a.work / "runs"), a, deepspeed=stage, name=f"gpu-check-{name}")
    cfgp = a.work / f"{name}.cfg.json"
    cfgp.write_text(json.dumps({"fx": fx, "doc": doc, "work": str(a.work)}))
    extra = ["--rehearse"] if a.rehearse else []
    outp = a.work / f"{name}.out.json"
    outp.unlink(missing_ok=True)
    env = C.bench_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()), DS_BUILD_OPS="0", PYTHONUNBUFFERED="1",
                      OMP_NUM_THREADS="4")
    env.pop("PYTHONWARNINGS", None)
    logf = a.work / f"{name}.log"
    with open(logf, "w") as f:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--zero-runner", name,
                            "--runner-cfg", str(cfgp), "--runner-out", str(outp), "--work", str(a.work), *extra],
                           stdout=f, stderr=subprocess.STDOUT, env=env,
                           timeout=max(60, ctx["deadline"] - time.time() - 5))
    res = json.loads(outp.read_text()) if outp.exists() else {"error": f"no result (exit {r.returncode})"}
    if "error" in res:
        res["log_tail"] = logf.read_text(errors="replace")[-3000:]
    asserts = Asserts()
    if not asserts.check(f"{name} trained", "error" not in res and r.returncode == 0, exit_code=r.returncode):
        return asserts.done(res)
    res.update(memory_vs_plan(res["peak_gib"], plan_of(doc), asserts))
    asserts.check("DeepSpeed engine in use" if stage else "no DeepSpeed", bool(res["deepspeed"]) == bool(stage),
                  engine=res["engine"])
    if stage is None:
        ctx["zero_plain_losses"] = res["losses"]
    elif ctx.get("zero_plain_losses"):
        res["vs_plain"] = compare_losses(ctx["zero_plain_losses"], res["losses"], TOL["zero_step1_loss_rel"],
                                         TOL["zero_loss_rel"], f"ZeRO-{stage} vs plain", asserts)
    else:
        asserts.check("plain reference available", False, why="zero_plain failed or was skipped")
    return asserts.done(res)


def check_liger(ctx: dict[str, Any], a: Config) -> dict[str, Any]:
    import importlib.util

    fx, st = ctx["fx"], ctx["seq"]
    asserts = Asserts()
    if not asserts.check("liger_kernel importable", importlib.util.find_spec("liger_kernel") is not None):
        return asserts.done({})
    from raytune_ft.spec.models import TrainingSpec

    has_field = "liger_kernel" in TrainingSpec.model_fields  # rtf's own switch, passed to HF's use_liger_kernel
    out: dict[str, Any] = {"via": "training.liger_kernel" if has_field else "TrainingArguments.use_liger_kernel"}
    f = None
    for on in (False, True):  # off first: Liger patches transformers' Llama classes for the whole process
        training: dict[str, Any] = {"max_steps": a.liger_steps}
        if has_field:
            training["liger_kernel"] = on
        doc = spec_doc("lora", fx, str(a.work / "runs"), a, attn="sdpa", name="gpu-check-liger", training=training)
        rec = Recorder()
        trainer = rtf_trainer(doc, fx, a.work, callbacks=[rec], liger=on)
        m = train_measured(trainer, rec)
        w = rate(rec.records, a.warmup)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        f = f or flops_of("lora", trainable, st["seq_eff"])
        out["on" if on else "off"] = {"tokens_per_s": w["tokens_per_s"], "peak_memory_gib": round(m["peak"], 2),
                                      "plan_gib": plan_of(doc)["total"], "losses": m["losses"],
                                      "mfu": w["tokens_per_s"] * f["flops_per_token"] / ctx["peak"] if ctx["peak"] else None}
        log(f"  liger {'on' if on else 'off'}: {w['tokens_per_s']:,.0f} tok/s, peak {m['peak']:.1f} GiB")
        del trainer
        _free()
    out["speedup"] = out["on"]["tokens_per_s"] / out["off"]["tokens_per_s"]
    out["memory_saved_gib"] = round(out["off"]["peak_memory_gib"] - out["on"]["peak_memory_gib"], 2)
    out["vs_off"] = compare_losses(out["off"]["losses"], out["on"]["losses"], TOL["liger_step1_loss_rel"],
                                   TOL["liger_loss_rel"], "Liger on vs off", asserts)
    return asserts.done(out)


# --------------------------------------------------------------------------- part 2


def check_qlora(ctx: dict[str, Any], a: Config) -> dict[str, Any]:
    fx = ctx["fx"]
    doc = spec_doc("qlora", fx, str(a.work / "runs"), a, attn="sdpa")
    rec = Recorder()
    trainer = rtf_trainer(doc, fx, a.work, callbacks=[rec])
    quantized = sum(1 for p in trainer.model.parameters() if p.__class__.__name__ == "Params4bit")
    m = train_measured(trainer, rec)
    w = rate(rec.records, a.warmup)
    asserts = Asserts()
    asserts.check("4-bit weights", quantized > 0, params4bit_tensors=quantized)
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    opt = type(inner).__name__
    # HF builds paged_adamw_8bit as bitsandbytes' generic AdamW(optim_bits=8, is_paged=True): the class name
    # says neither (first GPU run, 2026-11-28), so read the optimizer's own settings.
    bits = getattr(getattr(inner, "args", None), "optim_bits", None)
    paged = bool(getattr(inner, "is_paged", False) or getattr(getattr(inner, "args", None), "is_paged", False))
    opt = f"{type(inner).__module__}.{opt}(optim_bits={bits}, is_paged={paged})"
    asserts.check("paged 8-bit optimizer", bits == 8 and paged, optimizer=opt)
    from raytune_ft.train.modeling import count_parameters

    trainable, total = count_parameters(trainer.model)
    f = flops_of("lora", trainable, ctx["seq"]["seq_eff"])
    out = {"tokens_per_s": w["tokens_per_s"], "losses": m["losses"], "optimizer": opt,
           "attention": trainer.rtf_chosen.get("attention"), "trainable_params": trainable, "total_params": total,
           "mfu": w["tokens_per_s"] * f["flops_per_token"] / ctx["peak"] if ctx["peak"] else None,
           **loss_falls(m["losses"], asserts), **memory_vs_plan(m["peak"], plan_of(doc), asserts)}
    del trainer
    return asserts.done(out)


# --------------------------------------------------------------------------- the table


def summary(rec: dict[str, Any]) -> str:
    """One line of figures for a finished sub-check."""
    n = rec["name"]
    g = rec.get
    parts = []
    if g("tokens_per_s"):
        parts.append(f"{g('tokens_per_s'):,.0f} tok/s")
    if g("mfu"):
        parts.append(f"MFU {100 * g('mfu'):.1f}%")
    if g("peak_memory_gib") is not None and n != "liger":
        parts.append(f"peak {g('peak_memory_gib'):.1f} GiB")
    if g("peak_over_plan"):
        parts.append(f"plan {g('plan_gib')['total']:.1f} GiB (x{g('peak_over_plan'):.2f})")
    if g("loss_first5") is not None:
        parts.append(f"loss {g('loss_first5'):.3f}->{g('loss_last5'):.3f}")
    if g("rtf_over_hf"):
        parts.append(f"rtf/HF {g('rtf_over_hf'):.2f}x")
    if n == "attention" and g("variants"):
        for k, v in g("variants").items():
            parts.append(f"{k} {v.get('mean_loss', float('nan')):.4f} @ {v.get('tokens_per_s') or 0:,.0f} tok/s"
                         if "error" not in v else f"{k} FAILED")
    if g("vs_plain"):
        parts.append(f"max rel dloss vs plain {max(g('vs_plain')['rel_diff'] or [0]):.2e}")
    if n == "liger" and g("on"):
        parts.append(f"on/off {g('speedup'):.2f}x tok/s, {g('off')['peak_memory_gib']:.1f}->"
                     f"{g('on')['peak_memory_gib']:.1f} GiB, max rel dloss {max(g('vs_off')['rel_diff'] or [0]):.2e}")
    if g("attention") and n == "lora_rtf":
        parts.append(f"attn {g('attention').split(' ')[0]}")
    if n == "fixture" and g("params"):
        parts.append(f"{g('params'):,} params, Σs²/Σs {g('data')['seq_eff']:.0f}")
    return "; ".join(parts)


def table(res: Results) -> str:
    rows = []
    for c in res.doc["checks"]:
        status = "skipped" if c.get("ok") is None else ("ok" if c["ok"] else "FAILED")
        what = c.get("skipped") or (c.get("error", "")[:160] if c.get("ok") is False else summary(c))
        rows.append([c["name"], status, c.get("seconds", "-"), what])
    return C.fmt_table(["sub-check", "result", "s", "figures"], rows)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv, namespace=Config())
    if a.zero_runner:
        return zero_variant(a)
    if a.dry_run:
        codes = []
        for part in [a.part] if a.part else [1, 2]:
            a.part = part
            print(f"== part {part}")
            codes.append(dry_run(a))
        return max(codes)
    a.part = a.part or 1
    import torch

    if not torch.cuda.is_available() and not a.rehearse:
        print("bench/gpu_check.py needs an NVIDIA GPU: torch.cuda.is_available() is False here "
              f"(torch {torch.__version__}). Use --dry-run (make gpu-check-dry) on a CPU machine.", file=sys.stderr)
        return NO_GPU_EXIT
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    a.work.mkdir(parents=True, exist_ok=True)
    budget = a.budget_s or DEFAULT_BUDGET_S[a.part]
    deadline = T0 + budget
    ver = versions()
    peak, peak_src = G.peak_flops(ver.get("device", ""), a.peak_tflops)
    meta = {"part": a.part, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": ver, "peak_flops": peak, "peak_source": peak_src, "machine": C.machine_info(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "budget_s": budget}
    res = Results(a.out / f"gpu_check_part{a.part}.json", meta)
    log(f"part {a.part} on {ver.get('device')} ({ver.get('device_memory_gib')} GiB), torch {ver['torch']} "
        f"CUDA {ver.get('cuda')}, transformers {ver['transformers']}, peft {ver['peft']}, ray {ver['ray']}, "
        f"deepspeed {ver['deepspeed']}, bitsandbytes {ver['bitsandbytes']}, liger {ver['liger-kernel']}; "
        f"peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s ({peak_src}); budget {budget:.0f}s")
    if a.rehearse:  # tiny and short: the code paths, not the figures
        a.seq, a.rows, a.lora_steps, a.baseline_steps, a.zero_steps, a.liger_steps, a.qlora_steps = 256, 2, 8, 8, 3, 6, 8
        a.baseline_batch, a.zero_rows, a.warmup, a.cpus = 8, 2, 2, 1
        deadline = T0 + 10**6
        a.work = a.work.with_name(a.work.name + "-rehearsal")
        a.work.mkdir(parents=True, exist_ok=True)
    ctx: dict[str, Any] = {"peak": peak, "deadline": deadline}
    only = set(a.only.split(",")) if a.only else None
    fns: dict[str, Callable[[], dict[str, Any]]] = {
        "fixture": lambda: check_fixture(ctx, a),
        "lora_rtf": lambda: check_lora_rtf(ctx, a),
        "hf_baseline": lambda: check_hf_baseline(ctx, a),
        "attention": lambda: check_attention(ctx, a),
        "zero_plain": lambda: check_zero(ctx, a, None),
        "zero2": lambda: check_zero(ctx, a, 2),
        "zero3": lambda: check_zero(ctx, a, 3),
        "liger": lambda: check_liger(ctx, a),
        "qlora": lambda: check_qlora(ctx, a),
    }
    for name, need, _ in subchecks(a.part):
        if only and name not in only and name != "fixture":
            continue
        rec = run_sub(res, name, fns[name], need, deadline)
        if name == "fixture" and not rec.get("ok"):
            log("the fixture failed: nothing else can run")
            break
    res.doc["seconds"] = round(time.time() - T0, 1)
    res.write()
    print(table(res), flush=True)
    (a.out / f"gpu_check_part{a.part}.txt").write_text(table(res) + "\n")
    log(f"part {a.part} {'PASSED' if res.ok else 'FAILED'}; results in {res.path}")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
