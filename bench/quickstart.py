"""The quickstart's training as `make demo` runs it, timed: the figures README.md quotes.

Builds the quickstart data, runs ``rtf submit jobspecs/quickstart.yaml`` (storage and data in a work
directory, nothing else changed) and reads the run's own records: the first and last logged train loss,
the last evaluation, the tokens trained and the training time (``final_results.json``, ``metrics.jsonl``).

bench/RESULTS.md holds these figures in the block between the ``quickstart`` markers and README.md quotes
them in its own marked sentence; both are rendered here from one set of figures (``run_all.py
--update-docs`` rewrites both), and tests/test_readme_figures.py checks that the two agree.

    python bench/quickstart.py [--work DIR] [--update-docs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
README = REPO / "README.md"
BEGIN, END = "<!-- quickstart figures: begin -->", "<!-- quickstart figures: end -->"

# (key, label in RESULTS.md, format): the block's rows, in order
ROWS = (
    ("train_s", "training time", "{:.1f} s"),
    ("tokens", "tokens trained", "{:,}"),
    ("tokens_per_s", "tokens/s", "{:,.0f}"),
    ("loss_first", "train loss at step 1", "{:.2f}"),
    ("loss_last", "train loss, last step", "{:.2f}"),
    ("steps", "steps", "{}"),
    ("eval_loss", "eval loss (last evaluation)", "{:.2f}"),
    ("perplexity", "perplexity", "{:.0f}"),
    ("source", "measured", "{}"),
)


def run(work: Path) -> dict:
    """Train the quickstart once in ``work``; the figures from the run's records."""
    sys.path.insert(0, str(REPO))
    from raytune_ft import rundir as rd

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    data = work / "data"
    subprocess.run([sys.executable, "-m", "raytune_ft.data.quickstart", str(data)], check=True, env=env, cwd=REPO)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "raytune_ft", "submit", "jobspecs/quickstart.yaml",
                    "--set", f"data.train.0.path={data / 'quickstart.train.jsonl'}",
                    "--set", f"data.eval.0.path={data / 'quickstart.eval.jsonl'}",
                    "--set", f"storage.path={work / 'runs'}"], check=True, env=env, cwd=REPO)
    wall = time.time() - t0
    run_dir = work / "runs" / "quickstart"
    final = json.loads((run_dir / rd.FINAL / rd.FINAL_RESULTS).read_text())
    losses = [r for r in map(json.loads, (run_dir / rd.METRICS).read_text().splitlines()) if "loss" in r]
    assert losses and losses[0]["step"] == 1, "the quickstart logs its first step (the README quotes its loss)"
    return {
        "train_s": final["runtime_s"], "tokens": final["tokens"], "tokens_per_s": final["tokens_per_s"],
        "loss_first": losses[0]["loss"], "loss_last": losses[-1]["loss"],
        "steps": final["steps"], "eval_loss": final["eval_loss"], "perplexity": final["perplexity"],
        "submit_wall_s": wall,
    }


def block(q: dict) -> str:
    """The RESULTS.md block (a table between the markers)."""
    rows = [f"| {label} | {fmt.format(q[key])} |" for key, label, fmt in ROWS]
    return "\n".join([BEGIN, "| quickstart (`make demo`'s training) | |", "|---|---|", *rows, END])


def parse(text: str) -> dict:
    """The figures of the block in ``text`` (RESULTS.md), typed as :func:`block` wrote them."""
    m = re.search(re.escape(BEGIN) + r"(.*?)" + re.escape(END), text, re.S)
    if not m:
        raise ValueError("no quickstart block in the text")
    cells = dict(re.findall(r"^\| ([^|]+?) \| ([^|]*?) \|$", m.group(1), re.M))
    q: dict = {}
    for key, label, fmt in ROWS:
        raw = cells[label]
        if key == "source":
            q[key] = raw
        elif fmt.endswith(" s"):
            q[key] = float(raw[:-2])
        elif "." in fmt:
            q[key] = float(raw.replace(",", ""))
        else:
            q[key] = int(raw.replace(",", ""))
    return q


def sentence(q: dict) -> str:
    """README.md's sentence, between the same markers, from the same figures."""
    return (f"{BEGIN}\nthe training loss falls from **{q['loss_first']:.2f}** at step 1 to **{q['loss_last']:.2f}** at "
            f"step {q['steps']} (eval loss {q['eval_loss']:.2f}, perplexity {q['perplexity']:.0f}), "
            f"{q['tokens']:,} tokens in {q['train_s']:.1f} s of training ({q['tokens_per_s']:,.0f} tokens/s; "
            f"measured: {q['source']}).\n{END}")


def replace(text: str, new: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError("no quickstart markers in the text")
    return pattern.sub(lambda _: new, text, count=1)


def update_docs(q: dict) -> None:
    RESULTS.write_text(replace(RESULTS.read_text(), block(q)))
    README.write_text(replace(README.read_text(), sentence(q)))


def source_label(machine: dict) -> str:
    load = machine.get("loadavg")
    return (f"`make bench`, {time.strftime('%Y-%m-%d', time.gmtime())}, {machine.get('cores')} cores"
            + (f", load average {load}" if load else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--update-docs", action="store_true", help="write the figures into RESULTS.md and README.md")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common as C

    work = a.work or Path(tempfile.mkdtemp(prefix="rtf-quickstart-"))
    q = run(work)
    q["source"] = source_label(C.machine_info())
    print(block(q))
    if a.update_docs:
        update_docs(q)
    return 0 if math.isfinite(q["loss_last"]) else 1


if __name__ == "__main__":
    sys.exit(main())
