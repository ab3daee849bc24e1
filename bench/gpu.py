"""GPU throughput, MFU and peak memory of rtf on a Llama-3.2-1B-shaped model (``make bench-gpu``).

The model is built from its configuration (nothing is downloaded): hidden 2048, 16 layers, 32 heads,
8 KV heads, intermediate 8192, vocab 128256, tied embeddings, rope theta 500000 (1,235,814,400
parameters), random weights saved once in bf16 with ``save_pretrained`` and loaded by rtf exactly as a
user's pretrained model. The tokenizer is a BPE trained on the quickstart data (its ids are a subset of the
model's 128256; the LM head still computes every vocab logit, so the compute is the 1B model's).
Data: the quickstart dataset (docstring → function pairs from the standard library).

The grid, each a cold ``rtf submit`` (one worker, one GPU, bf16, SDPA or flash-attn 2, rtf's defaults
for everything else):

  method   lora (r 16, all linear layers, bf16 base) | full (fp32 weights, bf16 autocast)
  attn     sdpa | flash_attention_2 (only when flash_attn is importable)
  packing  on (rows of max_seq_length, batch --batch-packed rows) | off (batch --batch-unpacked examples,
           padded to the longest in the batch)
  gc       gradient checkpointing on | off

Measured per run (from the run's metrics.jsonl, logging_steps 1): non-pad tokens/s between the log of step
``--warmup`` and the last step's; MFU; peak ``torch.cuda.max_memory_allocated`` (rtf logs it as
``peak_memory_mb``) against ``raytune_ft.plan.memory_estimate`` for the same spec.

MFU = model FLOP/s ÷ the GPU's peak dense bf16 FLOP/s (H100 SXM 989e12, H200 989e12, A100 312e12, ...;
``--peak-tflops`` overrides). Model FLOPs per token:
  full: 6·N + A        lora: 4·N + 6·N_trainable + A
  N = every weight that multiplies an activation for each token: the decoder's linear layers (the
      non-embedding parameters, norms aside) plus the LM head (vocab × hidden: counted although it is
      tied to the input embedding, whose lookup costs nothing). Kaplan-style "non-embedding N" (no LM
      head) is in the JSON as ``mfu_nonembedding``.
  A = 12 · layers · hidden · s  (PaLM's attention term: QKᵀ and AV, forward + backward, without halving
      for the causal mask), where s is the token-weighted mean sequence length Σ sᵢ² / Σ sᵢ over the
      training examples: attention is per example, packed or not, so this counts the useful attention
      FLOPs only; compute spent on padding or on cross-example blocks is waste and lowers MFU.
  Gradient-checkpointing recomputation is not counted (MFU, not hardware FLOP utilisation).

    python bench/gpu.py                 # the whole grid (about 15-25 min on one H100)
    python bench/gpu.py --dry-run       # build the configs, print the planned runs; no GPU needed
    python bench/gpu.py --methods lora --attn sdpa --gc off --steps 20
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

NO_GPU_EXIT = 2

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-5)

# Peak dense (no sparsity) bf16 tensor-core FLOP/s, by a substring of torch.cuda.get_device_name().
# Checked in order: the first match wins.
PEAK_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),   # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A6000", 155e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("4090", 165e12),
]


def peak_flops(name: str, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    for key, flops in PEAK_BF16:
        if key in name:
            return flops, f"table entry {key!r}"
    return None, "unknown GPU: pass --peak-tflops"


# --------------------------------------------------------------------------- the grid


def arch():
    from raytune_ft.plan import Arch

    c = LLAMA_32_1B
    return Arch(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"],
                c["intermediate_size"], c["vocab_size"], c["tie_word_embeddings"], "Llama-3.2-1B shape")


def grid(a: argparse.Namespace, flash_ok: bool) -> list[dict[str, Any]]:
    attns = [x for x in a.attn if x != "flash" or flash_ok]
    runs = []
    for method, attn, packing, gc in itertools.product(a.methods, attns, a.packing, a.gc):
        runs.append({"name": f"gpu-{method}-{attn}-{'pack' if packing == 'on' else 'pad'}-gc{gc}",
                     "method": method, "attn": "flash_attention_2" if attn == "flash" else "sdpa",
                     "packing": packing == "on", "gc": gc == "on",
                     "batch": a.batch_packed if packing == "on" else a.batch_unpacked})
    return runs


def spec_doc(run: dict[str, Any], model_dir: str, train: str, storage: str, a: argparse.Namespace) -> dict[str, Any]:
    method: dict[str, Any] = {"type": run["method"]}
    if run["method"] == "lora":
        method["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
    return {
        "name": run["name"],
        "model": {"name_or_path": model_dir, "attn_implementation": run["attn"]},
        "method": method,
        "data": {"train": {"path": train, "format": "alpaca"}, "max_seq_length": a.seq, "packing": run["packing"]},
        "training": {"max_steps": a.steps, "per_device_train_batch_size": run["batch"],
                     "learning_rate": 1e-4 if run["method"] == "lora" else 1e-5, "lr_scheduler_type": "constant",
                     "precision": "bf16", "gradient_checkpointing": run["gc"], "logging_steps": 1,
                     "save_steps": 100_000, "seed": 42},
        "compute": {"num_workers": 1, "gpus_per_worker": 1, "cpus_per_worker": a.cpus},
        "storage": {"path": storage, "keep_checkpoints": 2},
        "fault_tolerance": {"max_failures": 0},
        "monitoring": {"report_to": ["none"]},
    }


def flops_per_token(run: dict[str, Any], seq_eff: float, n_trainable: int | None = None) -> dict[str, float]:
    from raytune_ft.plan import lora_trainable
    from raytune_ft.spec import spec_from_dict

    ar = arch()
    n_nonemb = ar.linear_params + ar.layers * 2 * ar.hidden + ar.hidden
    n_head = ar.vocab * ar.hidden
    n = n_nonemb + n_head
    attn = 12 * ar.layers * ar.hidden * seq_eff
    if run["method"] == "full":
        f, f_ne = 6 * n + attn, 6 * n_nonemb + attn
        trainable = ar.params
    else:
        if n_trainable is None:
            doc = spec_doc(run, "/nonexistent", "/nonexistent", "/tmp", _defaults())
            n_trainable = lora_trainable(ar, spec_from_dict(doc))
        trainable = n_trainable
        f, f_ne = 4 * n + 6 * n_trainable + attn, 4 * n_nonemb + 6 * n_trainable + attn
    return {"flops_per_token": f, "flops_per_token_nonembedding": f_ne, "N": n, "N_nonembedding": n_nonemb,
            "N_trainable": trainable, "attention_flops_per_token": attn, "seq_eff": seq_eff}


def _defaults() -> argparse.Namespace:
    return parser().parse_args([])


def memory_plan(run: dict[str, Any], a: argparse.Namespace, model_dir: str | None = None) -> dict[str, float]:
    from raytune_ft.plan import GIB, memory_estimate
    from raytune_ft.spec import spec_from_dict

    doc = spec_doc(run, model_dir or "/nonexistent-model", "/nonexistent.jsonl", "/tmp/rtf-bench-gpu", a)
    est = memory_estimate(spec_from_dict(doc), arch=arch())
    g = est.gib()
    g["total_without_overhead"] = round((est.total - est.overhead) / GIB, 2)
    return g


def seq_stats(train: str, model_dir: str, max_len: int) -> dict[str, float]:
    """Token-weighted mean example length Σs²/Σs and the mean, from rtf's own tokenization."""
    from transformers import AutoTokenizer

    from raytune_ft.data.pipeline import build_datasets

    tok = AutoTokenizer.from_pretrained(model_dir)
    ex, _, _ = build_datasets({"train": [{"path": train, "format": "alpaca"}], "max_seq_length": max_len}, tok, seed=42)
    lens = [len(e["input_ids"]) for e in ex]
    return {"seq_eff": sum(s * s for s in lens) / sum(lens), "mean_len": sum(lens) / len(lens), "examples": len(lens)}


# --------------------------------------------------------------------------- fixture


def build_model(root: Path) -> dict[str, str]:
    """Quickstart data, a BPE tokenizer and the 1B-shaped model in bf16 (about 2.5 GB), built once."""
    done = root / "gpu-fixture.json"
    if done.exists():
        return json.loads(done.read_text())
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytune_ft.data.pipeline import training_texts
    from raytune_ft.data.quickstart import build_quickstart_data
    from raytune_ft.data.tokenizer import train_tokenizer

    train, _ = build_quickstart_data(root / "data")
    tok = train_tokenizer(training_texts({"train": [{"path": str(train), "format": "alpaca"}]}), 8192)
    cfg = LlamaConfig(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **LLAMA_32_1B)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init of 1.2B weights: seconds on a GPU
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model_dir = root / "llama-3.2-1b-shape"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = {"train": str(train), "model": str(model_dir), "params": sum(p.numel() for p in model.parameters())}
    done.write_text(json.dumps(out))
    return out


# --------------------------------------------------------------------------- measuring


def measure(run: dict[str, Any], run_dir: Path, warmup: int, seq_eff: float, peak: float | None) -> dict[str, Any]:
    recs = [r for r in C.read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    res = json.loads((run_dir / "final" / "final_results.json").read_text())
    w = C.steady_rate([r for r in recs if r["step"] >= warmup])
    f = flops_per_token(run, seq_eff, n_trainable=res.get("trainable_params") if run["method"] == "lora" else None)
    achieved = w["tokens_per_s"] * f["flops_per_token"]
    out = {
        "tokens_per_s": w["tokens_per_s"], "window_steps": w["steps"], "s_per_step": w["seconds"] / w["steps"],
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "mfu_nonembedding": w["tokens_per_s"] * f["flops_per_token_nonembedding"] / peak if peak else None,
        "peak_memory_gib": max(r.get("peak_memory_mb") or 0 for r in recs) / 1024,
        "final_loss": recs[-1]["loss"], "trainable_params": res.get("trainable_params"), **f,
    }
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="Build the configs and print the planned runs.")
    ap.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--attn", nargs="+", default=["sdpa", "flash"], choices=["sdpa", "flash"])
    ap.add_argument("--packing", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--gc", nargs="+", default=["off", "on"], choices=["on", "off"])
    ap.add_argument("--seq", type=int, default=2048, help="data.max_seq_length (the packed row length)")
    ap.add_argument("--batch-packed", type=int, default=4, help="packed rows per step")
    ap.add_argument("--batch-unpacked", type=int, default=16, help="examples per step without packing")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing window")
    ap.add_argument("--cpus", type=int, default=4, help="compute.cpus_per_worker")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of this GPU")
    ap.add_argument("--work", type=Path, default=None, help="fixture and runs (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, default=None)
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.warmup < 1 or a.steps <= a.warmup + 1:
        raise SystemExit("--steps must exceed --warmup + 1 (and --warmup >= 1)")
    flash_ok = importlib.util.find_spec("flash_attn") is not None
    runs = grid(a, flash_ok)
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("bench/gpu.py needs an NVIDIA GPU with CUDA: torch.cuda.is_available() is False on this "
                  f"machine (torch {torch.__version__}). Nothing was run. Use --dry-run to print the planned "
                  "runs without a GPU.", file=sys.stderr)
            return NO_GPU_EXIT
    skipped = [] if flash_ok or "flash" not in a.attn else ["flash_attention_2: flash_attn is not installed"]

    if a.dry_run:
        ar = arch()
        print(f"model: Llama-3.2-1B shape, {ar.params:,} parameters ({ar.linear_params:,} in decoder linears, "
              f"LM head tied to the {ar.vocab}×{ar.hidden} embedding)")
        seq_guess = min(a.seq, 200)
        rows = []
        for r in runs:
            f = flops_per_token(r, seq_guess)
            m = memory_plan(r, a)
            rows.append([r["name"], r["method"], r["attn"], "on" if r["packing"] else "off", "on" if r["gc"] else "off",
                         r["batch"], a.seq, f"{f['N_trainable']:,}", f"{f['flops_per_token'] / 1e9:.2f}", m["total"]])
        print(C.fmt_table(["run", "method", "attention", "packing", "grad ckpt", "batch", "max_seq_length",
                           "trainable", "GFLOP/token*", "plan est GiB"], rows))
        print(f"* with s = {seq_guess} for the attention term; the real s (Σs²/Σs of the data) is measured at run time")
        for s in skipped:
            print(f"skipped: {s}")
        print(f"{len(runs)} run(s), {a.steps} steps each (timed from step {a.warmup}); dry run: nothing was started")
        return 0

    import torch

    name = torch.cuda.get_device_name(0)
    peak, peak_src = peak_flops(name, a.peak_tflops)
    own = a.work is None
    work = Path(a.work or tempfile.mkdtemp(prefix="rtf-bench-gpu-"))
    t0 = time.time()
    result: dict[str, Any] = {"gpu": name, "peak_flops": peak, "peak_source": peak_src, "machine": C.machine_info(),
                              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                              "skipped": skipped, "runs": []}
    try:
        fx = build_model(work / "fixture")
        st = seq_stats(fx["train"], fx["model"], a.seq)
        result["data"] = st
        print(f"GPU: {name}; peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s ({peak_src}); "
              f"s = Σs²/Σs = {st['seq_eff']:.0f} tokens over {st['examples']} examples", flush=True)
        env = C.bench_env(OMP_NUM_THREADS=str(a.cpus), MKL_NUM_THREADS=str(a.cpus))
        for r in runs:
            storage = work / "runs" / r["name"]
            spec = C.write_yaml(work / f"{r['name']}.yaml", spec_doc(r, fx["model"], fx["train"], str(storage), a))
            entry: dict[str, Any] = {**r, "plan_memory_gib": memory_plan(r, a, fx["model"])}
            try:
                wall, rec = C.probe_submit(spec, work / f"{r['name']}.probe.json", env=env, timeout=1800)
                entry.update(measure(r, storage / r["name"], a.warmup, st["seq_eff"], peak), wall_s=wall,
                             startup=C.startup_breakdown(rec), ok=True)
                entry["memory_vs_plan"] = entry["peak_memory_gib"] / entry["plan_memory_gib"]["total_without_overhead"]
            except Exception as e:  # an OOM or a failure in one run should not lose the others
                entry.update(ok=False, error=str(e)[-2000:])
            finally:
                shutil.rmtree(storage, ignore_errors=True)  # full runs write ~20 GB of checkpoints
            result["runs"].append(entry)
            if entry["ok"]:
                print(f"  {r['name']}: {entry['tokens_per_s']:,.0f} tok/s, MFU "
                      f"{100 * entry['mfu'] if entry['mfu'] else float('nan'):.1f}%, peak {entry['peak_memory_gib']:.1f} GiB "
                      f"(plan {entry['plan_memory_gib']['total']:.1f} GiB)", flush=True)
            else:
                print(f"  {r['name']}: FAILED {entry['error'][-300:]}", flush=True)
        result["seconds"] = time.time() - t0
        print(table(result))
        if a.json:
            a.json.write_text(json.dumps(result, indent=2, default=str))
        return 0 if all(r["ok"] for r in result["runs"]) else 1
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def table(result: dict[str, Any]) -> str:
    rows = []
    for r in result["runs"]:
        if not r["ok"]:
            rows.append([r["name"], "FAILED", None, None, None, r["plan_memory_gib"]["total"], None])
            continue
        rows.append([r["name"], r["tokens_per_s"], f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-",
                     r["achieved_tflops"], r["peak_memory_gib"], r["plan_memory_gib"]["total"], r["memory_vs_plan"]])
    return C.fmt_table(["run", "tokens/s", "MFU", "TFLOP/s", "peak GiB (max_memory_allocated)", "plan est GiB",
                        "peak / (plan − overhead)"], rows)


if __name__ == "__main__":
    sys.exit(main())
