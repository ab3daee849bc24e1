"""Start-up and shutdown of a short run: rtf before and after issue 17, against a plain HF Trainer script.

What a quick iteration costs (a smoke run of a new spec): from the command to the first optimizer step, and
from the last step to the process's exit. Three variants, interleaved (hf, before, after; ``--reps`` times),
each a fresh process on the same fixture (the quickstart-shaped model and data of bench/common.py), full
fine-tuning, ``--steps`` steps, a log every step:

- ``hf``: bench/hf_baseline.py (the plain script), timed from its process start (the parent's clock) to its
  step-1 log line and from its last log line to its exit;
- ``rtf before``: ``rtf submit`` as it was: a worker group for the one worker (``RTF_IN_PROCESS=0``), Ray's
  workers at nice 15 and Ray Train's 2 s health check (the environment set so), ``optimizer: adamw_torch``;
- ``rtf after``: ``rtf submit`` with its defaults (one local worker in rtf's process, nice 0, a 0.25 s
  health check, the fused AdamW).

rtf runs go through bench/_probe.py (the CLI path in-process, every progress event kept), so the phases of
``common.startup_breakdown`` are printed too. Median of the reps; ratios against ``hf`` of the same run.

``--sweep N`` then runs the 4-trial sweep (learning rate × LoRA rank, FIFO, each trial ``--steps`` steps with
an evaluation at the end, 2 trials at a time, each 1 worker of 1 CPU), before and after, alternated N times:
``rtf submit`` in a fresh process, its wall time, and trials per hour = 4 / wall. ``before``: a worker group
per trial (``RTF_IN_PROCESS=0``, Ray's workers at nice 15, a 2 s health check, ``adamw_torch``); ``after``:
rtf's defaults, where each one-worker trial trains in its Tune trial's process and Tune reuses those
processes (the training stack imported once per concurrent trial), on the faster embedded Ray, fused AdamW.

    python bench/startup.py [--reps 3] [--steps 10] [--sweep 1] [--json out.json]   (--reps 0: the sweep only)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

BEFORE_ENV = {"RTF_IN_PROCESS": "0", "RAY_worker_niceness": "15", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}


def hf_run(fx: dict[str, str], out: Path, steps: int) -> dict[str, float]:
    t0 = time.time()
    wall, _ = C.run([C.PY, str(C.BENCH / "hf_baseline.py"), "--model", fx["model"], "--train", fx["train"],
                     "--out", str(out), "--max-steps", str(steps), "--logging-steps", "1",
                     "--threads", str(C.THREADS), "--batch", str(C.BATCH), "--max-len", str(C.MAX_SEQ_LEN)],
                    timeout=900)
    logs = [r for r in C.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    return {"submit_to_first_step": logs[0]["time"] - t0, "last_step_to_exit": t0 + wall - logs[-1]["time"],
            "total": wall, "steps": logs[-1]["step"]}


def rtf_run(fx: dict[str, str], work: Path, name: str, steps: int, before: bool) -> dict[str, float]:
    doc = C.rtf_spec(name, fx, str(work / "runs"), packing=False, max_steps=steps, logging_steps=1,
                     eval_data=False)
    if before:
        doc["training"]["optimizer"] = "adamw_torch"
    spec = C.write_yaml(work / f"{name}.yaml", doc)
    env = C.bench_env(**(BEFORE_ENV if before else {}))
    t0 = time.time()
    wall, rec = C.probe_submit(spec, work / f"{name}.json", env=env)
    phases = C.startup_breakdown(rec)
    logs = [e for e in rec["runs"][0]["events"] if e.get("kind") == "log"]
    return {**phases, "last_step_to_exit": t0 + wall - float(logs[-1]["time"]), "total": wall,
            "steps": logs[-1]["step"]}


def sweep_run(fx: dict[str, str], work: Path, name: str, steps: int, before: bool) -> dict[str, float]:
    doc = C.rtf_spec(name, fx, str(work / "runs"), packing=False, max_steps=steps, logging_steps=1,
                     method="lora", eval_data=True)
    doc["training"].update(eval_strategy="steps", eval_steps=steps)
    if before:
        doc["training"]["optimizer"] = "adamw_torch"
    doc["tune"] = {"space": {"training.learning_rate": {"grid": [1e-3, 3e-3]}, "method.lora.r": {"grid": [8, 16]}},
                   "search": "grid", "max_concurrent_trials": 2, "metric": "eval_loss"}
    spec = C.write_yaml(work / f"{name}.yaml", doc)
    wall, p = C.run([C.RTF, "submit", str(spec)], env=C.bench_env(**(BEFORE_ENV if before else {})), timeout=1800)
    assert "trial-003" in p.stdout + p.stderr, (p.stdout + p.stderr)[-2000:]
    return {"wall_s": wall, "trials_per_hour": 4 / wall * 3600}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sweep", type=int, default=0, metavar="N", help="N before/after pairs of the 4-trial sweep")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="rtf-bench-startup-"))
    fx = dict(C.build_fixture(work / "fixture"))
    runs: dict[str, list[dict[str, float]]] = {"hf": [], "rtf before": [], "rtf after": []}
    out: dict[str, Any] = {"machine": C.machine_info(), "steps": a.steps, "reps": a.reps}
    for rep in range(a.reps):
        runs["hf"].append(hf_run(fx, work / f"hf{rep}", a.steps))
        runs["rtf before"].append(rtf_run(fx, work, f"before{rep}", a.steps, before=True))
        runs["rtf after"].append(rtf_run(fx, work, f"after{rep}", a.steps, before=False))
        print(f"rep {rep + 1}/{a.reps}: " + ", ".join(
            f"{k} first step {v[-1]['submit_to_first_step']:.1f}s exit +{v[-1]['last_step_to_exit']:.1f}s"
            for k, v in runs.items()), flush=True)
    if a.reps:  # --reps 0: the sweep only
        med = {k: {m: C.median([r[m] for r in v if m in r]) for m in v[0]} for k, v in runs.items()}
        hf = med["hf"]
        rows = [[k, f"{m['submit_to_first_step']:.1f}",
                 f"{m['submit_to_first_step'] / hf['submit_to_first_step']:.2f}",
                 f"{m['last_step_to_exit']:.1f}", f"{m['total']:.1f}", f"{m['total'] / hf['total']:.2f}"]
                for k, m in med.items()]
        print(C.fmt_table(["variant", "start → first step s", "× hf", "last step → exit s", "total s", "× hf"], rows))
        phases = ["cli_start", "driver_prep", "ray_start", "worker_group", "data_prep", "model_load",
                  "trainer_setup", "first_step"]
        print(C.fmt_table(["phase", "rtf before", "rtf after"],
                          [[p, f"{med['rtf before'].get(p, 0):.2f}", f"{med['rtf after'].get(p, 0):.2f}"]
                           for p in phases]))
        out.update(runs=runs, median=med)
    if a.sweep:
        sweeps: dict[str, list[dict[str, float]]] = {"rtf before": [], "rtf after": []}
        for rep in range(a.sweep):
            for label, before in (("rtf before", True), ("rtf after", False)):
                sweeps[label].append(sweep_run(fx, work, f"sweep-{label.split()[1]}{rep}", a.steps, before))
                print(f"sweep {label} {rep + 1}/{a.sweep}: {sweeps[label][-1]['wall_s']:.1f}s", flush=True)
        smed = {k: {m: C.median([r[m] for r in v]) for m in v[0]} for k, v in sweeps.items()}
        print(C.fmt_table(["4-trial sweep", "wall s", "trials/hour"],
                          [[k, f"{m['wall_s']:.1f}", f"{m['trials_per_hour']:.0f}"] for k, m in smed.items()]))
        out["sweep"] = {"runs": sweeps, "median": smed}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
