"""Run ``rtf submit`` in this process, exactly as the CLI does, and record when things happened.

Instrumentation lives here only (rtf's files are not touched): ``ray.init`` is wrapped to time it, and the
progress renderer's ``handle`` is wrapped to keep every event rtf's worker publishes (each carries the
worker-side ``time`` at which it was pushed). Written to ``--out`` as JSON.

    python bench/_probe.py --out events.json SPEC              # cold: the CLI path, Ray started and stopped
    python bench/_probe.py --out events.json --warm SPEC...    # one Ray for several runs (run_local reuses it)

``RTF_BENCH_T0`` (set by the parent just before it starts this process) is the submit time.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

T_MAIN = time.time()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--callback-bench", type=int, default=0, metavar="N",
                    help="warm only: time N calls of rtf's logging callback (metrics line + progress event)")
    ap.add_argument("specs", nargs="*")
    a = ap.parse_args()
    rec: dict = {"t0": float(os.environ.get("RTF_BENCH_T0", T_MAIN)), "t_main": T_MAIN, "runs": []}

    import raytune_ft.cli as cli

    rec["t_cli_imported"] = time.time()
    import ray

    import raytune_ft.launch.progress as progress

    events: list[dict] = []
    orig_handle = progress.Renderer.handle

    def handle(self, e):
        events.append({**e, "t_seen": time.time()})
        return orig_handle(self, e)

    progress.Renderer.handle = handle
    orig_init = ray.init
    inits: list[tuple[float, float]] = []

    def timed_init(*args, **kwargs):
        t = time.time()
        try:
            return orig_init(*args, **kwargs)
        finally:
            inits.append((t, time.time()))

    ray.init = timed_init
    import raytune_ft.launch.local as local

    orig_run = local.run
    runs_at: list[float] = []

    def timed_run(*args, **kwargs):  # when the driver's run() began (a run without ray.init: in process)
        runs_at.append(time.time())
        return orig_run(*args, **kwargs)

    local.run = timed_run

    if not a.warm:
        assert len(a.specs) == 1
        code = 0
        try:
            cli.main(["submit", a.specs[0]])
        except SystemExit as e:
            code = e.code or 0
        rec["runs"].append({"spec": a.specs[0], "code": code, "events": events, "t_end": time.time(),
                            "ray_init": inits[:1], "t_run": runs_at[0] if runs_at else None})
    else:
        from raytune_ft.launch import submit
        from raytune_ft.spec import load_spec

        timed_init(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, log_to_driver=False,
                   configure_logging=False, namespace="rtf")
        rec["ray_init"] = inits[:1]
        if a.callback_bench:
            rec["callback_bench"] = callback_bench(a.callback_bench)
        for path in a.specs:
            events.clear()
            t = time.time()
            out = io.StringIO()
            code = submit(load_spec(path), out=out)
            rec["runs"].append({"spec": path, "code": code, "events": list(events), "t_start": t,
                                "t_end": time.time(), "output": out.getvalue()[-3000:]})
        ray.shutdown()
    rec["t_exit"] = time.time()
    with open(a.out, "w") as f:
        json.dump(rec, f, default=str)
    code = 0 if all(r["code"] == 0 for r in rec["runs"]) else 1
    if not a.warm:  # the end of the `rtf` process, as the CLI's own entry point ends it
        from raytune_ft.cli.app import exit_now_if_trained_here

        exit_now_if_trained_here(code)
    return code


def callback_bench(n: int) -> dict:
    """Time rtf's per-log-step work in isolation: ``RtfCallback.on_log`` (peak memory, a metrics.jsonl
    line, a progress event pushed to the Ray actor), and ``Publisher.push`` alone, ``n`` calls each,
    against a real ProgressBoard actor on the running Ray. Returns per-call seconds."""
    import shutil
    import tempfile
    import types

    import ray

    from raytune_ft.launch.progress import make_board_class
    from raytune_ft.train.callbacks import RtfCallback
    from raytune_ft.train.progress import NAMESPACE, Publisher, board_name

    name = "bench-callback"
    board = make_board_class().options(name=board_name(name), namespace=NAMESPACE, get_if_exists=True).remote()
    ray.get(board.since.remote(0))
    pub = Publisher(board_name(name))
    work = tempfile.mkdtemp(prefix="rtf-bench-cb-")
    cb = RtfCallback(run=types.SimpleNamespace(rank=0), spec_hash="bench", publisher=pub, work_dir=work)
    args = types.SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=1, world_size=1)
    state = types.SimpleNamespace(global_step=0, max_steps=n, epoch=0.0, num_input_tokens_seen=0)
    cb.on_train_begin(args, state, None)
    on_log, push = [], []
    try:
        for i in range(n):
            state.global_step, state.epoch = i + 1, (i + 1) / n
            state.num_input_tokens_seen += 1500
            logs = {"loss": 5.0 + 1 / (i + 1), "grad_norm": 1.25, "learning_rate": 1e-3, "epoch": state.epoch,
                    "num_input_tokens_seen": state.num_input_tokens_seen}
            t = time.perf_counter()
            cb.on_log(args, state, None, logs=logs)
            on_log.append(time.perf_counter() - t)
        for i in range(n):
            event = {"kind": "log", "step": i, "max_steps": n, "loss": 1.0, "tokens_per_s": 1.0, "eta_s": 1.0}
            t = time.perf_counter()
            pub.push(event)
            push.append(time.perf_counter() - t)
        delivered = len(ray.get(board.since.remote(0)))
    finally:
        ray.kill(board)
        shutil.rmtree(work, ignore_errors=True)
    return {"n": n, "on_log_s": on_log, "push_s": push, "events_delivered": delivered}


if __name__ == "__main__":
    sys.exit(main())
