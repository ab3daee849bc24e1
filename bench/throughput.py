"""Training throughput on CPU: rtf local mode against the plain HF ``Trainer`` script users would otherwise run.

Three variants train the *same* model (the quickstart's 5.3M-parameter Llama shape, loaded from one saved
directory), on the *same* instruction data (the first ``--examples`` rows of the quickstart dataset), one
epoch (so every variant sees every example exactly once), ``max_seq_length`` 256, batch 8, lr 1e-3
linear, fp32, SDPA attention, ``--threads`` torch threads, each in its own process:

  a  bench/hf_baseline.py: HF Trainer + DataCollatorForSeq2Seq (pad to the longest in the batch) — baseline
  b  ``rtf submit`` with ``data.packing: true``
  c  ``rtf submit`` with ``data.packing: false``

Optional (``--variants``): d (c at nice 0), e (a as a Ray Train worker), f (b with attention ``auto``: on CPU
per-example SDPA over flattened rows), g (f at a's work per optimizer step: ``training.tokens_per_step`` set to
the packed rows a's batches fill, so g takes a's number of optimizer steps and its eval loss compares at equal
work, issue 17 item 6).

Throughput (identical for all three): non-pad input tokens / wall seconds, between the ``on_log`` of the
first optimizer step and the ``on_log`` of the last one, with ``logging_steps: 1``; tokens are HF's
``num_input_tokens_seen`` in ``non_padding`` mode (attention-mask sum when there is a mask, else
``input_ids != pad_token_id``). Startup, the first step and the final save are outside the window.
rtf's records come from the run's ``metrics.jsonl``, the baseline's from a callback writing the same
record. Also reported: the median of the per-step rates (robust to bursts of load on a shared machine).

Padding fraction: a's is counted in its collator; b's and c's are exact too: HF's sampler batches are
reproduced (same sampler and seed; checked against a's count) over rtf's example (c) or packed-row (b) order;
b's padding is the tail of each packed row up to the longest row of its batch.
"positions/s" counts every computed position, padding included: with a's and c's different random batch
compositions, it compares raw speed without the luck of the draw.

Work done: every variant is checked to see all examples, and the models are compared by the loss on the
quickstart's held-out eval set (token-weighted cross-entropy on the response tokens, computed here the
same way for each final model) and by the mean training loss of the last 5 steps.

Variants run interleaved (a b c a b c …); medians over the repetitions are reported. The CPU time of every
process of each run is sampled from /proc (common.TreeSampler), giving, for the same window: tokens per CPU
second of the training process (robust to a busy machine: the work done per token), the share of a core
the training process got, and the cores used by the run's other processes (for rtf: Ray's GCS, raylet,
the driver, the Train controller and the progress actor).

Then, in this process, the same examples in three batch layouts (``layouts``): where packing's time goes.

    python bench/throughput.py [--examples 256] [--reps 2] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

VARIANTS = {
    "a": "HF Trainer, pad to longest (baseline)",
    "b": "rtf local, packing",
    "c": "rtf local, no packing",
    "d": "c with Ray workers at nice 0",  # optional (--variants): RAY_worker_niceness=0, Ray's default is 15
    "e": "a's script as a Ray Train worker",  # optional: bench/_ray_baseline.py (Ray's environment, not rtf)
    "f": "b with attention auto (CPU: per-example SDPA)",  # optional: model.attn_implementation auto, not sdpa
    # optional: f at a's work per optimizer step (issue 17 item 6): training.tokens_per_step = rows × max_seq_length,
    # the rows a step of a's examples fill when packed, so g takes a's number of optimizer steps for the same data
    "g": "f at a's tokens per optimizer step (training.tokens_per_step)",
}
DEFAULT_VARIANTS = "abc"


def subset(src: str, dst: Path, n: int) -> Path:
    lines = [x for x in Path(src).read_text().splitlines() if x.strip()]
    if n > len(lines):
        raise SystemExit(f"--examples {n}: the quickstart train set has only {len(lines)} rows")
    dst.write_text("\n".join(lines[:n]) + "\n")
    return dst


# --------------------------------------------------------------------------- one run


def run_baseline(fx: dict[str, Any], out: Path, threads: int, in_ray: bool = False) -> dict[str, Any]:
    env = C.bench_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                      HF_DATASETS_CACHE=str(out.parent / "hf_datasets_cache"))
    sampler = C.TreeSampler()
    script = "_ray_baseline.py" if in_ray else "hf_baseline.py"
    wall, _ = C.run([C.PY, str(C.BENCH / script), "--model", fx["model"], "--train", fx["train_subset"],
                     "--out", str(out), "--epochs", "1", "--batch", str(C.BATCH), "--max-len", str(C.MAX_SEQ_LEN),
                     "--lr", "1e-3", "--logging-steps", "1", "--threads", str(threads)], env=env, sampler=sampler)
    res = json.loads((out / "result.json").read_text())
    records = C.read_jsonl(out / "metrics.jsonl")
    return {
        "wall_s": wall,
        "records": records,
        "steps": res["steps"],
        "examples": res["examples"],
        "tokens_total": res["tokens"],
        "train_runtime": res["train_runtime"],
        "padding_fraction": 1 - res["real_tokens"] / res["padded_tokens"],
        "padded_tokens": res["padded_tokens"],
        "padding_how": "measured (collator counts)",
        "final": res["final"],
        "optimizer": res["optimizer"],
        "torch_threads": res["torch_threads"],
        "sampler": sampler,
        "train_pid": res.get("pid", sampler.root),
    }


def run_rtf(fx: dict[str, Any], out: Path, threads: int, packing: bool, niceness: int | None = None,
            attn: str = "sdpa", rows_per_step: int | None = None) -> dict[str, Any]:
    name = "tp-packed" if packing else "tp-padded"
    doc = C.rtf_spec(name, {**fx, "train": fx["train_subset"]}, str(out / "storage"), packing=packing,
                     epochs=1.0, logging_steps=1, eval_data=False)
    doc["model"]["attn_implementation"] = attn
    if rows_per_step:  # the work per optimizer step set in tokens, one micro-batch of that many rows
        doc["training"].pop("gradient_accumulation_steps", None)  # tokens_per_step sets it (1 here)
        doc["training"].update(per_device_train_batch_size=rows_per_step, tokens_per_step=rows_per_step * C.MAX_SEQ_LEN)
    doc["compute"]["cpus_per_worker"] = threads
    spec = C.write_yaml(out / "spec.yaml", doc)
    env = C.bench_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if niceness is not None:
        env["RAY_worker_niceness"] = str(niceness)
    sampler = C.TreeSampler()
    wall, probe = C.probe_submit(spec, out / "probe.json", env=env, sampler=sampler)
    run_dir = out / "storage" / name
    res = json.loads((run_dir / "final" / "final_results.json").read_text())
    records = C.read_jsonl(run_dir / "metrics.jsonl")
    return {
        "wall_s": wall,
        "records": records,
        "steps": res["steps"],
        "examples": res["data"]["train_examples"],
        "tokens_total": res["tokens"],
        "train_runtime": res["runtime_s"],
        "final": str(run_dir / "final"),
        "packing_efficiency": res["data"].get("packing_efficiency"),
        "startup": C.startup_breakdown(probe),
        "sampler": sampler,
        "train_pid": res["workers"][0]["pid"],
    }


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    recs = r.pop("records")
    w = C.steady_rate(recs)
    logs = [x for x in recs if "loss" in x and "num_input_tokens_seen" in x]
    per_step = []
    for p, q in zip(logs, logs[1:]):
        dt = q["time"] - p["time"]
        if dt > 0 and q["step"] == p["step"] + 1:
            per_step.append((q["num_input_tokens_seen"] - p["num_input_tokens_seen"]) / dt)
    sampler = r.pop("sampler")
    t0, t1 = logs[0]["time"], logs[-1]["time"]
    cpu = sampler.cpu_between(t0, t1)
    train_cpu = cpu.get(r["train_pid"], ("", 0.0))[1]
    others = {f"{pid} {name}": c for pid, (name, c) in cpu.items() if pid != r["train_pid"] and c > 0}
    r.update(train_cpu_s=train_cpu, train_cpu_share=train_cpu / w["seconds"],
             tokens_per_cpu_s=w["tokens"] / train_cpu if train_cpu > 0 else None,
             other_cpu_s=sum(others.values()), other_cores=sum(others.values()) / w["seconds"],
             other_cpu_top=dict(sorted(others.items(), key=lambda kv: -kv[1])[:6]))
    r.update(tokens_per_s=w["tokens_per_s"], window_tokens=w["tokens"], window_s=w["seconds"],
             window_steps=w["steps"], step_rate_median=C.median(per_step),
             s_per_step=w["seconds"] / max(w["steps"], 1),
             runtime_tokens_per_s=r["tokens_total"] / r["train_runtime"] if r.get("train_runtime") else None,
             last5_train_loss=sum(x["loss"] for x in logs[-5:]) / len(logs[-5:]),
             first_loss=logs[0]["loss"])
    return r


# --------------------------------------------------------------------------- loss and padding


def eval_loss(model_dir: str, eval_file: str, max_len: int = C.MAX_SEQ_LEN) -> dict[str, float]:
    """Token-weighted cross-entropy on the response tokens of the eval set (rtf's alpaca tokenization,
    truncated to ``max_len``), one example at a time (no padding involved)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raytune_ft.data.formats import normalize_row, tokenize_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    rows = [normalize_row("alpaca", json.loads(x)) for x in Path(eval_file).read_text().splitlines() if x.strip()]
    total, n = 0.0, 0
    with torch.no_grad():
        for ex in tokenize_examples("alpaca", rows, tok):
            ids = torch.tensor([ex["input_ids"][:max_len]])
            labels = torch.tensor([ex["labels"][:max_len]])
            logits = model(input_ids=ids).logits[0, :-1]
            tgt = labels[0, 1:]
            total += float(torch.nn.functional.cross_entropy(logits, tgt, ignore_index=-100, reduction="sum"))
            n += int((tgt != -100).sum())
    return {"eval_loss": total / n, "eval_tokens": n}


def sampler_batches(n: int, batch: int, seed: int = 42) -> list[list[int]]:
    """The example indices of each training batch, as HF's Trainer draws them for a dataset of ``n`` rows
    (its sampler, seeded by ``TrainingArguments.seed`` at the start of ``train()``): a Trainer on ``n``
    placeholder rows is built and its train dataloader iterated after ``set_seed(seed)``. a and c use the
    same sampler, seed and ``n``, so both get these index batches (over their own row order)."""
    import torch
    from transformers import Trainer, TrainingArguments, set_seed

    class Nothing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids=None, **kw):
            return {"loss": self.w.sum()}

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=batch, seed=seed, use_cpu=True,
                                 report_to="none", remove_unused_columns=False, disable_tqdm=True)
        tr = Trainer(model=Nothing(), args=args, train_dataset=[{"input_ids": [i]} for i in range(n)],
                     data_collator=lambda f: {"input_ids": torch.tensor([x["input_ids"][0] for x in f])})
        set_seed(seed)
        return [b["input_ids"].tolist() for b in tr.get_train_dataloader()]


def padded_positions(fx: dict[str, Any], batch: int) -> dict[str, Any]:
    """Exact positions computed per batch (longest example × batch size) for a (file order) and c (rtf's
    shuffled order), from the sampler's index batches and the examples' token lengths (rtf's tokenization;
    the baseline's token sequences are the same, as their equal totals show)."""
    from transformers import AutoTokenizer

    from raytune_ft.data.formats import normalize_row, tokenize_examples
    from raytune_ft.data.pipeline import build_datasets

    tok = AutoTokenizer.from_pretrained(fx["model"])
    rows = [normalize_row("alpaca", json.loads(x)) for x in Path(fx["train_subset"]).read_text().splitlines() if x.strip()]
    len_a = [min(len(e["input_ids"]), C.MAX_SEQ_LEN) for e in tokenize_examples("alpaca", rows, tok)]
    ex, _, _ = build_datasets({"train": [{"path": fx["train_subset"], "format": "alpaca"}],
                               "max_seq_length": C.MAX_SEQ_LEN}, tok, seed=42)
    len_c = [len(e["input_ids"]) for e in ex]
    rows, _, _ = build_datasets({"train": [{"path": fx["train_subset"], "format": "alpaca"}],
                                 "max_seq_length": C.MAX_SEQ_LEN, "packing": True}, tok, seed=42)
    len_b = [len(r["input_ids"]) for r in rows]
    order = sampler_batches(len(len_c), batch)
    order_b = sampler_batches(len(len_b), batch)
    per = {name: [max(lens[i] for i in b) * len(b) for b in o]
           for name, lens, o in (("a", len_a, order), ("c", len_c, order), ("b", len_b, order_b))}
    per["f"] = [sum(len_b[i] for i in b) for b in order_b]  # the batch flattened into one row: no padding
    return {"positions": per, "real": {"a": sum(len_a), "b": sum(len_b), "c": sum(len_c)}}


def equal_work_rows(fx: dict[str, Any], batch: int) -> int:
    """Packed rows per optimizer step that give a's work per step: the packed rows of the data over a's
    number of optimizer steps (one epoch of ``batch`` examples per step), rounded."""
    from transformers import AutoTokenizer

    from raytune_ft.data.pipeline import build_datasets

    tok = AutoTokenizer.from_pretrained(fx["model"])
    n = sum(1 for x in Path(fx["train_subset"]).read_text().splitlines() if x.strip())
    rows, _, _ = build_datasets({"train": [{"path": fx["train_subset"], "format": "alpaca"}],
                                 "max_seq_length": C.MAX_SEQ_LEN, "packing": True}, tok, seed=42)
    return max(1, round(len(rows) / math.ceil(n / batch)))


# --------------------------------------------------------------------------- where packing's time goes


def layouts(fx: dict[str, Any], examples: int = 32, reps: int = 2, threads: int = 1) -> dict[str, Any]:
    """Forward + backward of the same examples in three batch layouts, in this process, timed in process
    CPU seconds with ``threads`` torch threads (robust to a busy machine), interleaved ``reps`` times:

      padded     [8, longest example]: rtf's PaddedCollator (= DataCollatorForSeq2Seq's layout)
      flattened  collate_packed(flatten=True): the 8 packed rows as one row [1, Σ], no mask — the layout
                 for flash-attention's varlen kernel, and rtf's only layout before commit 3b75b87; with SDPA
                 the mask built from position_ids is a dense [Σ, Σ] block diagonal: attention over the batch
      rows       collate_packed (rtf's default since 3b75b87): [8, longest row], position_ids per row,
                 pad tail as its own block: per-row masks
      per-example  the rows, and the flattened row, under rtf_packed_sdpa (what attention auto runs for
                 packed rows on CPU): SDPA per example, no mask

    The summed loss over all examples must agree between layouts (same work, no cross-example attention)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raytune_ft.data.packing import PaddedCollator, collate_packed, pack_examples
    from raytune_ft.data.pipeline import build_datasets
    from raytune_ft.train.attention import register

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tok = AutoTokenizer.from_pretrained(fx["model"])
        model = AutoModelForCausalLM.from_pretrained(fx["model"], attn_implementation="sdpa")
        model.config.use_cache = False
        ex, _, _ = build_datasets({"train": [{"path": fx["train_subset"], "format": "alpaca"}],
                                   "max_seq_length": C.MAX_SEQ_LEN}, tok, seed=42)
        ex = ex[:examples]
        rows = pack_examples(ex, C.MAX_SEQ_LEN)
        padded = PaddedCollator(tok.pad_token_id)
        chunks = lambda xs: [xs[i:i + C.BATCH] for i in range(0, len(xs), C.BATCH)]  # noqa: E731
        batches = {
            "padded [8, longest]": [padded(b) for b in chunks(ex)],
            "packed, flattened [1, sum] (flash-attn layout; rtf before 3b75b87)":
                [collate_packed(b, tok.pad_token_id, flatten=True) for b in chunks(rows)],
            "packed rows [8, longest row] (rtf's collate_packed), sdpa":
                [collate_packed(b, tok.pad_token_id) for b in chunks(rows)],
        }
        batches["packed rows, per-example SDPA (rtf_packed_sdpa: auto on CPU)"] = batches[
            "packed rows [8, longest row] (rtf's collate_packed), sdpa"]
        batches["packed, flattened [1, sum], per-example SDPA (rtf_packed_sdpa)"] = batches[
            "packed, flattened [1, sum] (flash-attn layout; rtf before 3b75b87)"]
        impl = {k: register() if "per-example" in k else "sdpa" for k in batches}
        real = sum(len(e["input_ids"]) for e in ex)

        def one_pass(bs):
            cpu = wall = loss_sum = 0.0
            for b in bs:
                c0, w0 = time.process_time(), time.perf_counter()
                out = model(**b, use_cache=False)
                out.loss.backward()
                cpu += time.process_time() - c0
                wall += time.perf_counter() - w0
                model.zero_grad(set_to_none=True)
                loss_sum += float(out.loss.detach()) * int((b["labels"][:, 1:] != -100).sum())
            return cpu, wall, loss_sum

        one_pass(batches["padded [8, longest]"][:1])  # warm-up
        res: dict[str, Any] = {k: {"cpu_s": [], "wall_s": []} for k in batches}
        for _ in range(reps):
            for k, bs in batches.items():
                model.set_attn_implementation(impl[k])
                cpu, wall, loss_sum = one_pass(bs)
                res[k]["cpu_s"].append(cpu)
                res[k]["wall_s"].append(wall)
                res[k]["loss_sum"] = loss_sum
                res[k]["positions"] = sum(int(b["input_ids"].numel()) for b in bs)
                res[k]["batches"] = len(bs)
                res[k]["shape_first"] = list(bs[0]["input_ids"].shape)
        base = None
        for r in res.values():
            r["tokens_per_cpu_s"] = real / C.median(r["cpu_s"])
            base = base or r["tokens_per_cpu_s"]
            r["vs_padded"] = r["tokens_per_cpu_s"] / base
        return {"examples": len(ex), "real_tokens": real, "threads": threads, "reps": reps, "layouts": res}
    finally:
        torch.set_num_threads(old_threads)


def layouts_table(lay: dict[str, Any]) -> str:
    rows = [[k, r["batches"], "×".join(map(str, r["shape_first"])), r["positions"], r["tokens_per_cpu_s"],
             r["vs_padded"], r["loss_sum"]] for k, r in lay["layouts"].items()]
    return C.fmt_table(["layout (same examples, fwd+bwd)", "batches", "first batch", "positions computed",
                        "real tokens / CPU-s", "vs padded", "summed loss"], rows)


# --------------------------------------------------------------------------- main


def bench(examples: int = 256, reps: int = 2, threads: int = 1, work: Path | None = None,
          with_layouts: bool = True, variants: str = DEFAULT_VARIANTS, log=print) -> dict[str, Any]:
    own = work is None
    work = Path(work or tempfile.mkdtemp(prefix="rtf-bench-tp-"))
    t0 = time.time()
    try:
        fx = dict(C.build_fixture(work / "fixture"))
        fx["train_subset"] = str(subset(fx["train"], work / "fixture" / f"train_{examples}.jsonl", examples))
        if "a" not in variants:
            raise ValueError("variant a (the baseline) is needed: every ratio is against it")
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in VARIANTS if k in variants}
        rows_per_step = equal_work_rows(fx, C.BATCH) if "g" in runs else None
        if rows_per_step:
            log(f"  throughput g: {rows_per_step} packed rows per optimizer step (training.tokens_per_step "
                f"{rows_per_step * C.MAX_SEQ_LEN:,}) match a's {C.BATCH} examples per step")
        for rep in range(reps):
            for v in runs:
                out = work / f"{v}{rep}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir(parents=True)
                t = time.time()
                if v in ("a", "e"):
                    r = run_baseline(fx, out, threads, in_ray=(v == "e"))
                else:
                    r = run_rtf(fx, out, threads, packing=v in ("b", "f", "g"), niceness=0 if v == "d" else None,
                                attn="auto" if v in ("f", "g") else "sdpa",
                                rows_per_step=rows_per_step if v == "g" else None)
                r = summarize(r)
                r.update(eval_loss(r["final"], fx["eval"]))
                runs[v].append(r)
                log(f"  throughput {v} rep {rep + 1}/{reps}: {r['tokens_per_s']:,.0f} tok/s "
                    f"(per-step median {r['step_rate_median']:,.0f}), {r['steps']} steps, "
                    f"eval loss {r['eval_loss']:.4f}, {time.time() - t:.0f}s wall")
        pos = padded_positions(fx, C.BATCH)
        for v, rs in runs.items():
            per = pos["positions"][{"d": "c", "e": "a", "g": "f"}.get(v, v)]
            for r in rs:
                if v in ("a", "e"):
                    r["padding_check"] = {"measured": r["padded_tokens"], "reproduced": sum(per)}
                elif v in ("b", "f", "g"):
                    r["padding_fraction"] = 1 - pos["real"]["b"] / sum(per)
                    r["padding_how"] = ("exact: packed rows padded to the longest row of each batch (rtf's "
                                        "collate_packed), HF's sampler batches reproduced over rtf's row order"
                                        if v == "b" else "none: rtf_packed_sdpa's batches are flattened into "
                                        "one row (collate_packed(flatten=True))")
                else:
                    r["padding_fraction"] = 1 - pos["real"]["c"] / sum(per)
                    r["padding_how"] = ("exact: HF's sampler batches (same seed and size as a's, reproduced) "
                                        "over rtf's example order")
                # window = steps 2..N: every batch but the first (g's batches are not f's: every position is a
                # token, flattened, so its positions are its tokens)
                if v == "g":
                    r["positions_per_s"] = r["tokens_per_s"]
                else:
                    r["positions_per_s"] = sum(per[1:]) / r["window_s"] if len(per) == r["steps"] else None
        result = {"config": {"examples": examples, "reps": reps, "threads": threads, "batch": C.BATCH,
                             "max_seq_length": C.MAX_SEQ_LEN, "epochs": 1, "params": fx["params"],
                             "lr": 1e-3, "logging_steps": 1},
                  "variants": {}, "seconds": 0.0}
        med = {}
        for v, rs in runs.items():
            med[v] = {k: C.median([r[k] for r in rs]) for k in
                      ("tokens_per_s", "step_rate_median", "s_per_step", "eval_loss", "last5_train_loss",
                       "padding_fraction", "runtime_tokens_per_s", "wall_s", "tokens_per_cpu_s",
                       "train_cpu_share", "other_cores", "positions_per_s")}
            med[v].update(steps=rs[0]["steps"], examples=rs[0]["examples"], tokens_total=rs[0]["tokens_total"],
                          label=VARIANTS[v], padding_how=rs[0]["padding_how"])
            result["variants"][v] = {"median": med[v], "runs": rs}
        a = med["a"]
        result["ratios"] = {
            f"{v}/a": {"tokens_per_s": med[v]["tokens_per_s"] / a["tokens_per_s"],
                       "step_rate_median": med[v]["step_rate_median"] / a["step_rate_median"],
                       "tokens_per_cpu_s": med[v]["tokens_per_cpu_s"] / a["tokens_per_cpu_s"],
                       "positions_per_s": med[v]["positions_per_s"] / a["positions_per_s"],
                       "per_rep": [rs["tokens_per_s"] / ra["tokens_per_s"] for rs, ra in zip(runs[v], runs["a"])]}
            for v in runs if v != "a"}
        if with_layouts:
            t = time.time()
            result["layouts"] = layouts(fx, threads=threads)
            log(f"  throughput layouts (where packing's time goes): {time.time() - t:.0f}s")
        result["seconds"] = time.time() - t0
        return result
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def table(result: dict[str, Any]) -> str:
    rows = []
    for v, d in result["variants"].items():
        m = d["median"]
        ratio = 1.0 if v == "a" else result["ratios"][f"{v}/a"]["tokens_per_s"]
        cpu_ratio = 1.0 if v == "a" else result["ratios"][f"{v}/a"]["tokens_per_cpu_s"]
        rows.append([f"{v}: {m['label']}", m["tokens_per_s"], ratio, m["step_rate_median"], m["tokens_per_cpu_s"],
                     cpu_ratio, m["positions_per_s"], f"{m['train_cpu_share']:.2f} / {m['other_cores']:.2f}",
                     m["steps"], m["tokens_total"], f"{100 * m['padding_fraction']:.1f}%", m["last5_train_loss"],
                     m["eval_loss"]])
    return C.fmt_table(["variant", "tokens/s", "vs a", "per-step median tok/s", "tokens/CPU-s", "vs a",
                        "positions/s (incl. pad)", "cores: trainer / others", "steps", "non-pad tokens", "padding",
                        "train loss (last 5)", "eval loss"], rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="Keep the runs here (default: a temp dir, removed).")
    ap.add_argument("--json", type=Path, default=None, help="Write the full result here.")
    ap.add_argument("--no-layouts", action="store_true", help="skip the in-process batch-layout comparison")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="which of a b c d e to run (d: c with RAY_worker_niceness=0; e: a's script as a Ray "
                         "Train worker); a is always needed")
    a = ap.parse_args(argv)
    result = bench(a.examples, a.reps, a.threads, a.work, with_layouts=not a.no_layouts, variants=a.variants)
    print(table(result))
    if "layouts" in result:
        print(layouts_table(result["layouts"]))
    for k, r in result["ratios"].items():
        print(f"{k}: {r['tokens_per_s']:.2f} (per rep {', '.join(f'{x:.2f}' for x in r['per_rep'])}); "
              f"per-step median ratio {r['step_rate_median']:.2f}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
