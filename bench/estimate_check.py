"""``make bench-estimate``: `rtf plan`'s time estimate against measured training time on this CPU.

The plan's time is ``training tokens × FLOPs per token ÷ (devices × peak FLOP/s × MFU)``. On a CPU there is
no table of peaks, so this script measures one: the best fp32 matmul rate torch reaches here with the
training processes' thread count (``peak_tflops``). It then trains three real rtf runs of different kinds on
the quickstart's fixture (local Ray, the same process layout as `rtf submit`):

- ``full-packed``: full fine-tuning, packed rows (the quickstart's kind): the calibration run;
- ``lora-padded``: LoRA r=16, no packing: a different FLOPs formula (4N + 6N_trainable) and row lengths;
- ``full-ckpt``: full fine-tuning, packed, with gradient checkpointing (one more forward per step).

Each run's MFU is measured (its FLOPs by the plan's model ÷ its training time ÷ peak). The estimate for every
run uses the calibration run's MFU, as a user who measured once would set ``compute.assumed_mfu``; the
error of the other two is what the model gets wrong (formula, row lengths, overheads it does not count).
Training time is HF Trainer's ``train_runtime`` (``final_results.json``: the training loop, without Ray
start-up or the final save).

    python bench/estimate_check.py [--steps 40] [--threads 1] [--out bench/out]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

RUNS = {  # name: (method, packing, gradient checkpointing)
    "full-packed": ("full", True, False),
    "lora-padded": ("lora", False, False),
    "full-ckpt": ("full", True, True),
}
CALIBRATION = "full-packed"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_peak_tflops(threads: int, n: int = 1024, reps: int = 7) -> float:
    """The best fp32 matmul rate of ``reps`` timed ``n × n`` products (after a warm-up) with ``threads``."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n**3 / best / 1e12


def run_one(name: str, fx: dict, work: Path, steps: int, threads: int, peak: float) -> dict:
    from raytune_ft.estimate import estimate
    from raytune_ft.spec import absolutize, load_spec

    method, packing, ckpt = RUNS[name]
    doc = C.rtf_spec(f"est-{name}", fx, str(work / "storage"), packing=packing, max_steps=steps, method=method,
                     logging_steps=max(1, steps // 4), eval_data=False)
    doc["training"]["gradient_checkpointing"] = ckpt
    doc["compute"]["cpus_per_worker"] = threads
    doc["compute"]["peak_tflops"] = round(peak, 6)
    path = C.write_yaml(work / f"{name}.yaml", doc)
    env = C.bench_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    wall, _ = C.run([C.RTF, "submit", str(path)], env=env, timeout=1800)
    res = json.loads((work / "storage" / f"est-{name}" / "final" / "final_results.json").read_text())
    spec = absolutize(load_spec(path))
    est = estimate(spec)  # at the default MFU; only its FLOPs and tokens are used below
    compute_tokens = est.compute_tokens or est.train_tokens  # padded rows compute their padding too
    flops = compute_tokens * est.flops_per_token
    runtime = float(res["runtime_s"])
    return {"name": name, "method": method, "packing": packing, "gradient_checkpointing": ckpt,
            "steps": res["steps"], "runtime_s": runtime, "wall_s": wall, "train_tokens": compute_tokens,
            "flops_per_token": est.flops_per_token, "tokens_how": est.tokens.how,
            "mfu": flops / runtime / (peak * 1e12)}


def bench(steps: int, threads: int, work: Path) -> dict:
    fx = C.build_fixture(work / "fixture")
    peak = cpu_peak_tflops(threads)
    log(f"CPU fp32 matmul peak with {threads} thread(s): {peak:.4f} TFLOP/s")
    runs = {}
    for name in RUNS:
        log(f"training {name} ({steps} steps)")
        runs[name] = run_one(name, fx, work, steps, threads, peak)
    mfu = runs[CALIBRATION]["mfu"]
    for r in runs.values():
        r["estimate_s"] = r["train_tokens"] * r["flops_per_token"] / (peak * 1e12 * mfu)
        r["error"] = r["estimate_s"] / r["runtime_s"] - 1
    return {"peak_tflops": peak, "threads": threads, "steps": steps, "calibration": CALIBRATION,
            "calibration_mfu": mfu, "runs": runs}


def table(res: dict) -> str:
    rows = [[r["name"], f"{r['flops_per_token'] / 1e6:.1f}", f"{r['train_tokens']:,}", f"{100 * r['mfu']:.1f}%",
             f"{r['estimate_s']:.1f}", f"{r['runtime_s']:.1f}",
             "(calibration)" if r["name"] == res["calibration"] else f"{100 * r['error']:+.0f}%"]
            for r in res["runs"].values()]
    head = (f"CPU peak (fp32 matmul, {res['threads']} thread(s)): {res['peak_tflops']:.4f} TFLOP/s; "
            f"MFU from {res['calibration']}: {100 * res['calibration_mfu']:.1f}%; {res['steps']} steps each")
    return head + "\n\n" + C.fmt_table(["run", "MFLOP/token", "tokens computed", "own MFU", "estimate s", "measured s",
                                        "error"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=C.THREADS)
    ap.add_argument("--out", type=Path, default=C.BENCH / "out")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rtf-estimate-") as tmp:
        res = bench(a.steps, a.threads, Path(tmp))
    res["machine"] = C.machine_info()
    text = table(res)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "estimate.json").write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
