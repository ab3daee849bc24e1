"""Where one training step's time goes: rtf's worker configuration against the HF Trainer defaults.

Not part of ``make bench`` (about a minute): a diagnostic for the throughput gap between
bench/throughput.py's variants a (HF Trainer script) and c (rtf, no packing). rtf's worker differs from the
plain script in three ways that touch every step:

- the optimizer: rtf's spec default ``training.optimizer: adamw_torch`` is ``torch.optim.AdamW`` with its
  default implementation (on CPU: the per-tensor loop), while HF's default since transformers 5 on torch
  >= 2.8 is ``adamw_torch_fused``;
- DistributedDataParallel: Ray Train initialises torch.distributed even for one worker, so HF's Trainer
  wraps the model in DDP (gradient bucketing + an all-reduce on a world of one, every backward), and with
  ``find_unused_parameters=True`` (HF's choice for a PreTrainedModel without gradient checkpointing when
  ``ddp_find_unused_parameters`` is unset, as rtf leaves it): a walk of the autograd graph after every forward;
- the thread: Ray Train runs the training function in a thread of the worker actor, not its main thread;
  glibc then serves that thread's allocations from a separate malloc arena (mmap'd heaps, trimmed eagerly),
  which shows as more page faults and system time per step.

Each configuration runs the same padded batches (8 examples, the quickstart data, the quickstart-shaped
model) in this process: forward, backward, gradient clipping, optimizer step, zero_grad. Timed in CPU
seconds of the running thread (``RUSAGE_THREAD``: with ``--threads 1`` that is all of the step's work, and
robust to a shared machine), with its system time and minor page faults; interleaved, median per step.

    python bench/diag_step.py [--steps 8] [--reps 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raytune_ft.data.packing import PaddedCollator
    from raytune_ft.data.pipeline import build_datasets

    torch.set_num_threads(a.threads)
    work = Path(a.work or tempfile.mkdtemp(prefix="rtf-bench-diag-"))
    fx = C.build_fixture(work / "fixture")
    tok = AutoTokenizer.from_pretrained(fx["model"])
    ex, _, _ = build_datasets({"train": [{"path": fx["train"], "format": "alpaca"}],
                               "max_seq_length": C.MAX_SEQ_LEN}, tok, seed=42)
    collate = PaddedCollator(tok.pad_token_id)
    batches = [collate(ex[i * C.BATCH:(i + 1) * C.BATCH]) for i in range(a.steps)]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)

    base = AutoModelForCausalLM.from_pretrained(fx["model"], attn_implementation="sdpa")
    base.config.use_cache = False

    def make(ddp: bool, fused: bool, find_unused: bool = False) -> tuple[Any, Any]:
        m = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0, **({"fused": True} if fused else {}))
        if ddp:
            m = torch.nn.parallel.DistributedDataParallel(m, find_unused_parameters=find_unused)
        return m, opt

    # HF's Trainer wraps a PreTrainedModel in DDP with find_unused_parameters=True unless
    # TrainingArguments.ddp_find_unused_parameters is set or gradient checkpointing is on (trainer.py).
    configs = {
        "HF default: no DDP, adamw_torch_fused (variant a)": make(False, True),
        "no DDP, adamw_torch": make(False, False),
        "DDP (world 1), adamw_torch_fused": make(True, True),
        "DDP (world 1, find_unused_parameters=True), adamw_torch_fused": make(True, True, True),
        "no DDP, adamw_torch_fused, in a non-main thread": make(False, True),
        "rtf worker: DDP (world 1, find_unused), adamw_torch, in a thread (c)": make(True, False, True),
    }
    parts = ("fwd+bwd", "clip", "optimizer", "total", "sys", "minflt")
    res: dict[str, dict[str, list[float]]] = {k: {p: [] for p in parts} for k in configs}

    def clock() -> tuple[float, float, int]:  # this thread's (user + sys, sys, minor faults)
        r = resource.getrusage(resource.RUSAGE_THREAD)
        return r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt

    def step(m, opt, b) -> dict[str, float]:
        c0, s0, f0 = clock()
        out = m(**b, use_cache=False)
        out.loss.backward()
        c1 = clock()[0]
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        c2 = clock()[0]
        opt.step()
        opt.zero_grad(set_to_none=True)
        c3, s3, f3 = clock()
        return {"fwd+bwd": c1 - c0, "clip": c2 - c1, "optimizer": c3 - c2, "total": c3 - c0, "sys": s3 - s0,
                "minflt": f3 - f0}

    def steps(m, opt, bs, sink: dict[str, list[float]]) -> None:
        for b in bs:
            for p, v in step(m, opt, b).items():
                sink[p].append(v)

    def run(name: str, bs, sink: dict[str, list[float]]) -> None:
        m, opt = configs[name]
        if "thread" in name:
            t = threading.Thread(target=steps, args=(m, opt, bs, sink))
            t.start()
            t.join()
        else:
            steps(m, opt, bs, sink)

    for name in configs:  # warm-up: lazy init, optimizer state
        run(name, batches[:1], {p: [] for p in parts})
    for _ in range(a.reps):
        for name in configs:
            run(name, batches, res[name])
    dist.destroy_process_group()

    rows = []
    ref = C.median(res[next(iter(res))]["total"])
    summary = {}
    for name, r in res.items():
        med = {p: (1000 if p != "minflt" else 1) * C.median(v) for p, v in r.items()}
        summary[name] = med
        rows.append([name, med["fwd+bwd"], med["clip"], med["optimizer"], med["total"], med["sys"], int(med["minflt"]),
                     ref * 1000 / med["total"]])
    print(f"per step (median of {a.steps * a.reps}, CPU ms of the training thread, {a.threads} torch thread(s), "
          f"batch {C.BATCH} padded examples)")
    print(C.fmt_table(["configuration", "fwd+bwd ms", "clip ms", "optimizer ms", "total ms", "of which sys ms",
                       "page faults", "speed vs HF default"], rows))
    if a.json:
        a.json.write_text(json.dumps({"threads": a.threads, "steps": a.steps, "reps": a.reps, "median_ms": summary,
                                      "pid": os.getpid()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
