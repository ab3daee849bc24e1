"""``make bench``: the CPU benchmarks (CLI latency, training throughput, overhead, the quickstart) and a
summary.

Runs, in order: bench/cli_latency.py, bench/throughput.py, bench/overhead.py (which takes its cold-start
breakdown from the throughput run's rtf submits instead of starting more), bench/quickstart.py (the
training `make demo` runs: the figures README.md quotes). Prints every table and a summary; writes the
full results to bench/out/latest.json and the tables to bench/out/latest.md; with ``--update-docs``, also
the quickstart figures into bench/RESULTS.md and README.md (run it on a quiet machine). Designed to finish
in about 10 minutes on 2 quiet cores (more when the machine is busy; ``--no-quickstart`` saves ~2 minutes).

    python bench/run_all.py [--examples 160] [--reps 2] [--threads 1] [--out bench/out] [--update-docs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_latency  # noqa: E402
import common as C  # noqa: E402
import overhead  # noqa: E402
import quickstart  # noqa: E402
import throughput  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summary(res: dict) -> str:
    tp, ov, cl = res["throughput"], res["overhead"], res["cli"]
    v = tp["variants"]
    cm = ov["cold"]["median"]
    ck = ov["checkpoints"]
    cmds = cl["commands"]
    rows = [
        ["tokens/s a (HF Trainer, padded)", f"{v['a']['median']['tokens_per_s']:,.0f}"],
        ["tokens/s b (rtf, packing)", f"{v['b']['median']['tokens_per_s']:,.0f}"],
        ["tokens/s c (rtf, no packing)", f"{v['c']['median']['tokens_per_s']:,.0f}"],
        *[[f"{k} (per rep; ratios of per-step median, tokens/CPU-s, positions/s)",
           f"{r['tokens_per_s']:.2f} ({', '.join(f'{x:.2f}' for x in r['per_rep'])}; {r['step_rate_median']:.2f}, "
           f"{r['tokens_per_cpu_s']:.2f}, {r['positions_per_s']:.2f})"] for k, r in tp["ratios"].items()],
        ["padding a / b / c", " / ".join(f"{100 * v[k]['median']['padding_fraction']:.1f}%" for k in "abc")],
        ["eval loss a / b / c", " / ".join(f"{v[k]['median']['eval_loss']:.3f}" for k in "abc")],
        ["optimizer steps a / b / c", " / ".join(str(v[k]['median']['steps']) for k in "abc")],
        ["submit → first step (cold)", f"{cm['submit_to_first_step']:.1f}s (Ray start {cm['ray_start']:.1f}s, "
         f"worker group {cm['worker_group']:.1f}s, driver prep {cm['driver_prep']:.1f}s)"],
        ["submit → first step (Ray already up)", f"{ov['warm']['median']['submit_to_first_step']:.1f}s"],
        ["reporting cost per logged step (rtf callback)", f"{ov['reporting']['on_log_median_ms']:.2f} ms = "
         f"{100 * ov['reporting']['on_log_median_ms'] / 1000 / v['c']['median']['s_per_step']:.2f}% of a step of c"],
        ["checkpoint full local / S3", f"{ck['full-local']['bytes'] / 2**20:.1f} MiB: {ck['full-local']['median_s']:.2f}s / "
         f"{ck['full-s3']['median_s']:.2f}s"],
        ["checkpoint LoRA local / S3", f"{ck['lora-local']['bytes'] / 2**20:.1f} MiB: {ck['lora-local']['median_s']:.2f}s / "
         f"{ck['lora-s3']['median_s']:.2f}s"],
    ]
    for name, r in cmds.items():
        if name.startswith("rtf"):
            rows.append([name, f"{r['median_s']:.2f}s"])
    return C.fmt_table(["measure", "value"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=160, help="throughput: training examples (one epoch)")
    ap.add_argument("--reps", type=int, default=2, help="throughput: repetitions of each variant (interleaved)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every training process")
    ap.add_argument("--cli-reps", type=int, default=5)
    ap.add_argument("--e2e-reporting", action="store_true",
                    help="overhead: also the 4 end-to-end logging_steps runs (about 2-3 more minutes)")
    ap.add_argument("--out", type=Path, default=C.BENCH / "out")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (printed)")
    ap.add_argument("--no-quickstart", action="store_true", help="skip the quickstart's training (~2 min quiet)")
    ap.add_argument("--update-docs", action="store_true",
                    help="write the quickstart figures into bench/RESULTS.md and README.md")
    a = ap.parse_args(argv)

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="rtf-bench-"))
    res: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": C.machine_info(),
                 "args": {k: str(v) for k, v in vars(a).items()}}
    try:
        log(f"[1/4] CLI latency ({a.cli_reps} runs of each command)")
        res["cli"] = cli_latency.bench(a.cli_reps, log=log)
        log(f"[2/4] throughput: a/b/c × {a.reps}, {a.examples} examples, {a.threads} thread(s)")
        res["throughput"] = throughput.bench(a.examples, a.reps, a.threads, work / "tp", log=log)
        cold = [r["startup"] for k in ("b", "c") for r in res["throughput"]["variants"][k]["runs"]]
        log("[3/4] overhead: reporting cost and checkpoints (cold starts taken from the throughput runs)")
        res["overhead"] = overhead.bench(work / "ov", cold_from=cold, e2e_reporting=a.e2e_reporting, log=log)
        if not a.no_quickstart:
            log("[4/4] quickstart: `make demo`'s training (the figures README.md quotes)")
            res["quickstart"] = quickstart.run(work / "qs")
            res["quickstart"]["source"] = quickstart.source_label(C.machine_info())
    finally:
        if a.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.time() - t0
    res["machine"]["loadavg_end"] = C.machine_info().get("loadavg")

    md = [f"# rtf benchmarks, {res['date']}", "",
          f"machine: {res['machine'].get('cpu')}, {res['machine'].get('cores')} cores, "
          f"{res['machine'].get('memory_gib')} GiB; torch {res['machine'].get('torch')}, transformers "
          f"{res['machine'].get('transformers')}, ray {res['machine'].get('ray')}; load average at start "
          f"{res['machine'].get('loadavg')}, at end {res['machine'].get('loadavg_end')}",
          "", "## Summary", "", summary(res),
          "", "## CLI latency", "", cli_latency.table(res["cli"]),
          "", f"## Throughput ({a.examples} examples, 1 epoch, {a.threads} thread(s), median of {a.reps})", "",
          throughput.table(res["throughput"]),
          *(["", "Where packing's time goes (same examples, forward + backward, in-process, CPU time):", "",
             throughput.layouts_table(res["throughput"]["layouts"])] if "layouts" in res["throughput"] else []),
          "", "## Overhead", "", overhead.tables(res["overhead"]),
          *(["", "## Quickstart", "", quickstart.block(res["quickstart"])] if "quickstart" in res else []),
          "", f"make bench took {res['seconds']:.0f}s"]
    text = "\n".join(md)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "latest.json").write_text(json.dumps(res, indent=2, default=str))
    (a.out / "latest.md").write_text(text + "\n")
    log(f"results: {a.out / 'latest.md'}, {a.out / 'latest.json'}")
    if a.update_docs and "quickstart" in res:
        quickstart.update_docs(res["quickstart"])
        log(f"quickstart figures written to {quickstart.RESULTS} and {quickstart.README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
