"""Shared parts of the benchmarks: the fixture (data, tokenizer, model dir), specs, subprocess runs,
timing and machine information. Nothing here downloads anything.

The fixture is what the quickstart trains: its docstring → function dataset built from this machine's
standard library, a BPE tokenizer trained on it (4096 entries) and a Llama of the quickstart's shape
(hidden 256, 4 layers, 4 heads, intermediate 688: 5.3M parameters), initialised with a fixed seed and
saved with ``save_pretrained`` so every variant loads the *same* weights from the same directory,
exactly as a user's pretrained model would be loaded.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY = sys.executable
if str(REPO) not in sys.path:  # tests.s3server (the moto S3 server helper) lives in the repo's tests/
    sys.path.append(str(REPO))
RTF = str(Path(PY).with_name("rtf"))

# The quickstart's model shape (jobspecs/quickstart.yaml model.init).
MODEL_SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                   intermediate_size=688, max_position_embeddings=512)
VOCAB = 4096
MAX_SEQ_LEN = 256
BATCH = 8
THREADS = 1

# Environment of every benchmark subprocess: offline, no tokenizer threads, fixed torch threads.
BASE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": str(THREADS),
    "MKL_NUM_THREADS": str(THREADS),
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    "PYTHONWARNINGS": "ignore",
}


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(BASE_ENV)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- fixture


def build_fixture(root: Path, *, max_examples: int = 2000, seed: int = 0) -> dict[str, str]:
    """``{train, eval, model}`` under ``root`` (built once; reused when already there)."""
    root = Path(root)
    done = root / "fixture.json"
    if done.exists():
        return json.loads(done.read_text())
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raytune_ft.data.pipeline import training_texts
    from raytune_ft.data.quickstart import build_quickstart_data
    from raytune_ft.data.tokenizer import train_tokenizer

    train, evals = build_quickstart_data(root / "data", max_examples=max_examples)
    tok = train_tokenizer(training_texts({"train": [{"path": str(train), "format": "alpaca"}]}), VOCAB)
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **MODEL_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = {"train": str(train), "eval": str(evals), "model": str(model_dir),
           "params": sum(p.numel() for p in model.parameters())}
    done.write_text(json.dumps(out))
    return out


def rtf_spec(name: str, fx: dict[str, str], storage: str, *, packing: bool, epochs: float | None = 1.0,
             max_steps: int | None = None, method: str = "full", logging_steps: int = 5,
             save_steps: int = 100_000, eval_data: bool = True, batch: int = BATCH, lr: float = 1e-3,
             **storage_extra: Any) -> dict[str, Any]:
    """An rtf spec on the fixture. Defaults match the HF baseline (hf_baseline.py) argument for argument."""
    training: dict[str, Any] = {
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "learning_rate": lr,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "precision": "fp32",
        "logging_steps": logging_steps,
        "save_steps": save_steps,
        "seed": 42,
        "eval_strategy": "no",
    }
    if max_steps:
        training["max_steps"] = max_steps
    else:
        training["num_epochs"] = epochs
    doc: dict[str, Any] = {
        "name": name,
        "model": {"name_or_path": fx["model"], "attn_implementation": "sdpa"},
        "method": {"type": method} if method == "full" else
                  {"type": method, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "data": {"train": {"path": fx["train"], "format": "alpaca"}, "max_seq_length": MAX_SEQ_LEN,
                 "packing": packing},
        "training": training,
        "compute": {"num_workers": 1, "cpus_per_worker": THREADS},
        "storage": {"path": storage, "keep_checkpoints": 2, **storage_extra},
        "fault_tolerance": {"max_failures": 0},
        "monitoring": {"report_to": ["none"]},
    }
    if eval_data:
        doc["data"]["eval"] = {"path": fx["eval"], "format": "alpaca"}
    return doc


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# --------------------------------------------------------------------------- running


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
        timeout: float = 600, check: bool = True, sampler: TreeSampler | None = None
        ) -> tuple[float, subprocess.CompletedProcess]:
    """(wall seconds, completed process). With ``sampler``, the CPU time of the process and all its
    descendants is sampled while it runs (see :class:`TreeSampler`)."""
    t0 = time.perf_counter()
    if sampler is None:
        p = subprocess.run(cmd, env=env or bench_env(), cwd=str(cwd or REPO), capture_output=True, text=True,
                           timeout=timeout)
    else:
        proc = subprocess.Popen(cmd, env=env or bench_env(), cwd=str(cwd or REPO), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        sampler.start(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise
        finally:
            sampler.stop()
        p = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    dt = time.perf_counter() - t0
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n"
                           f"--- stderr\n{p.stderr[-4000:]}")
    return dt, p


class TreeSampler:
    """Samples, every ``interval`` seconds, the CPU time (user + system) of a process and all its
    descendants from /proc (Linux), so that the CPU used by each process in a time window can be told:
    the training process itself, and for rtf also Ray's own processes (GCS, raylet, the driver, the
    Train controller, the progress actor). Processes of other users/containers are invisible and not counted."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._names: dict[int, str] = {}

    def start(self, root: int) -> None:
        self.root = root
        self._thread = threading.Thread(target=self._loop, daemon=True, name="tree-sampler")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self._snapshot()))
            except Exception:
                pass
            self._stop.wait(self.interval)

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        stats: dict[int, tuple[int, float]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                raw = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            rest = raw[raw.rindex(")") + 2:].split()
            stats[int(d)] = (int(rest[1]), (int(rest[11]) + int(rest[12])) / self._tick)  # ppid, utime+stime
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        out, todo = {}, [self.root]
        while todo:
            pid = todo.pop()
            if pid not in stats:
                continue
            if pid not in self._names:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    cmd = "?"
                self._names[pid] = cmd.strip()[:120]
            out[pid] = (self._names[pid], stats[pid][1])
            todo += children.get(pid, [])
        return out

    def cpu_between(self, t0: float, t1: float) -> dict[int, tuple[str, float]]:
        """CPU seconds each process used between t0 and t1 (linear interpolation between samples)."""

        def at(pid: int, t: float) -> float:
            pts = [(ts, snap[pid][1]) for ts, snap in self.samples if pid in snap]
            if not pts:
                return 0.0
            if t <= pts[0][0]:
                return pts[0][1] if t >= pts[0][0] - self.interval else 0.0
            for (ta, ca), (tb, cb) in zip(pts, pts[1:]):
                if ta <= t <= tb:
                    return ca + (cb - ca) * (t - ta) / max(tb - ta, 1e-9)
            return pts[-1][1]

        pids = {pid for _, snap in self.samples for pid in snap}
        return {pid: (self._names.get(pid, "?"), at(pid, t1) - at(pid, t0)) for pid in pids}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            out.append(json.loads(line))
    return out


def steady_rate(records: list[dict[str, Any]]) -> dict[str, float]:
    """Throughput from per-log-step records ``{step, time, num_input_tokens_seen, loss}`` (rtf's
    metrics.jsonl, or hf_baseline.py's log of the same fields written by the same kind of callback).

    Window: from the first logged step (step 1: HF logs it with ``logging_first_step``) to the last
    logged step. Tokens = non-pad input tokens seen in that window (HF's ``num_input_tokens_seen``
    difference), time = wall clock between the two ``on_log`` calls. So the first step (warm-up, lazy
    init) and everything before it — process start, Ray, model load, data preparation — and
    everything after the last log (final save, eval) are excluded, identically for every variant."""
    logs = [r for r in records if "loss" in r and "num_input_tokens_seen" in r]
    if len(logs) < 2:
        raise ValueError(f"need >= 2 logged training steps, got {len(logs)}")
    a, b = logs[0], logs[-1]
    dt = b["time"] - a["time"]
    tokens = b["num_input_tokens_seen"] - a["num_input_tokens_seen"]
    steps = b["step"] - a["step"]
    return {"tokens": tokens, "seconds": dt, "steps": steps, "tokens_per_s": tokens / dt,
            "steps_per_s": steps / dt, "first_step": a["step"], "last_step": b["step"]}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return float(s[min(len(s) - 1, max(0, round(q / 100 * len(s)) - 1))])


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        info["cpu"] = platform.processor()
    info["cores"] = os.cpu_count()
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        kb = int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                      if x.startswith("MemTotal")).split()[1])
        info["memory_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("torch", "transformers", "ray", "peft", "datasets", "moto"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def fmt_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}"
    return "-" if v is None else str(v)


# --------------------------------------------------------------------------- rtf runs through the probe


def probe_submit(spec: Path, out_json: Path, *, env: dict[str, str] | None = None,
                 timeout: float = 900, sampler: TreeSampler | None = None) -> tuple[float, dict[str, Any]]:
    """``rtf submit SPEC`` (the CLI, in a fresh process, Ray started and stopped) with timestamps:
    (wall seconds, the probe's record; see _probe.py)."""
    env = dict(env or bench_env())
    env["RTF_BENCH_T0"] = repr(time.time())
    wall, _ = run([PY, str(BENCH / "_probe.py"), "--out", str(out_json), str(spec)], env=env, timeout=timeout,
                  sampler=sampler)
    return wall, json.loads(Path(out_json).read_text())


def startup_breakdown(rec: dict[str, Any], run_index: int = 0) -> dict[str, float]:
    """Seconds per phase of one probed run, from submit to the first optimizer step and on to exit.

    Phases (each ends where the next begins):
      cli_start      process start, Python and rtf CLI imports (cold runs only)
      driver_prep    spec load, plan, storage preflight, data check (everything before ray.init)
      ray_start      ray.init (cold runs only; 0 for a run trained in the rtf process, which starts no Ray)
      worker_group   TorchTrainer setup, worker process start and imports, torch.distributed; ends
                     at the worker's first event (cold: from ray.init's end; warm: from the call); in
                     the rtf process: the training stack's imports and Ray Train's local mode
      data_prep      tokenizer (load, or train and share) + read, tokenize, pack the data
      model_load     model load/build + LoRA wrap
      trainer_setup  TrainingArguments, resume lookup, callbacks, Trainer()
      first_step     Trainer.train() setup + the first optimizer step (ends at the step-1 log)
    and, after it: last_log_to_done (final save: trainer + checkpoint, fingerprint, upload of final/),
    done_to_exit (Ray Train teardown, ray.shutdown, process exit)."""
    run_rec = rec["runs"][run_index]
    ev = run_rec["events"]

    def first(pred) -> float | None:
        for e in ev:
            if pred(e):
                return float(e["time"])
        return None

    msg = lambda p: (lambda e: e.get("kind") in ("info", "workers") and str(e.get("message", "")).startswith(p))  # noqa: E731
    t_workers = first(lambda e: e.get("kind") == "workers")
    t_data = first(msg("data:"))
    t_model = first(msg("parameters:"))
    t_setup = first(msg("setup took"))
    t_step1 = first(lambda e: e.get("kind") == "log")
    logs = [e for e in ev if e.get("kind") == "log"]
    t_last = float(logs[-1]["time"]) if logs else None
    t_done = first(lambda e: e.get("kind") == "done")
    out: dict[str, float] = {}
    if "t_start" in run_rec:  # warm: Ray already up
        t_begin = run_rec["t_start"]
        ray_end = t_begin
        out["driver_prep+worker_group"] = t_workers - t_begin
    else:
        t0 = rec["t0"]
        t_begin = t0
        if run_rec["ray_init"]:
            (ri0, ri1), = run_rec["ray_init"][:1]
        else:  # trained in the rtf process (one local worker): no Ray started; the driver's run() began here
            ri0 = ri1 = run_rec["t_run"]
        out["cli_start"] = rec["t_cli_imported"] - t0
        out["driver_prep"] = ri0 - rec["t_cli_imported"]
        out["ray_start"] = ri1 - ri0
        ray_end = ri1
        out["worker_group"] = t_workers - ray_end
    out["data_prep"] = t_data - t_workers
    out["model_load"] = t_model - t_data
    out["trainer_setup"] = t_setup - t_model
    out["first_step"] = t_step1 - t_setup
    out["submit_to_first_step"] = t_step1 - t_begin
    if t_last is not None and t_done is not None:
        out["last_log_to_done"] = t_done - t_last
    if t_done is not None:
        out["done_to_exit"] = run_rec["t_end"] - t_done
    out["total"] = run_rec["t_end"] - t_begin
    return out
