"""Live progress, the driver's side: the board actor that collects the events rank 0 (or a sweep's Tune
callback) publishes (:mod:`raytune_ft.train.progress`), and their rendering: a live bar on a TTY, one line per
event elsewhere, and the summary at the end. Events are plain dicts:
``{"kind": "log"|"eval"|"checkpoint"|"info"|"preemption"|"workers"|"retry"|"done", "step": …, "max_steps": …, "loss": …, …}``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from raytune_ft import storage as st
from raytune_ft.rundir import FINAL
from raytune_ft.train.progress import EVENT_PREFIX, NAMESPACE, board_name

__all__ = ["EVENT_PREFIX", "NAMESPACE", "Renderer", "attempt_of", "board_name", "fmt_duration", "make_board_class",
           "open_board", "print_summary", "relay", "retry_message"]

def make_board_class():
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1)
    class ProgressBoard:
        def __init__(self) -> None:
            self.events: list[dict[str, Any]] = []

        def push(self, event: dict[str, Any]) -> None:
            self.events.append(event)

        def since(self, index: int) -> list[dict[str, Any]]:
            return self.events[index:]

    return ProgressBoard


def open_board(name: str) -> Any:
    """The progress board named ``name``, made on this process's node (the driver's) if it does not exist.
    Pinned there: left to Ray, it can land on a worker node, and when that node goes (a preemption) Ray restarts
    it elsewhere empty, so the driver, which reads it by index, saw nothing more of the run (its restart, the
    rest of training, the summary). Its own node going takes the driver with it anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return make_board_class().options(name=name, namespace=NAMESPACE, get_if_exists=True,
                                      scheduling_strategy=here).remote()


@contextlib.contextmanager
def relay(name: str, emit: Callable[[dict[str, Any]], None], poll_s: float = 0.5) -> Iterator[None]:
    """While the block runs, a progress board named ``name`` whose events a background thread passes to
    ``emit``; at the end the rest are passed on and the board is removed. (A sweep's lines: the block runs
    Tune in this thread, which must keep the main thread for Ctrl-C.)"""
    import ray

    board = open_board(name)
    stop = threading.Event()

    def pump() -> None:
        seen = 0
        while True:
            last = stop.is_set()
            try:
                events = ray.get(board.since.remote(seen), timeout=10)
            except Exception:
                events = []
            seen += len(events)
            for e in events:
                try:
                    emit(e)
                except Exception:  # noqa: BLE001 - progress lines never stop the work
                    pass
            if last:
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=pump, name="rtf-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        try:
            ray.kill(board)
        except Exception:
            pass


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def attempt_of(e: dict[str, Any]) -> str:
    total = e.get("attempts")
    return f"attempt {e.get('attempt')} of {total if total else 'unlimited'}"


def retry_message(e: dict[str, Any]) -> str:
    """One line for a ``retry`` event (the driver's :class:`~raytune_ft.launch.driver.Attempts`): what failed,
    the attempt count, and what the run waits for next."""
    if e.get("preempted"):  # the group Ray Train ended at a preemption's deadline
        limit = e.get("max_preemptions")
        count = f"preemption {e['preempted']} of {limit if limit is not None and limit >= 0 else 'unlimited'}"
        head = f"node preempted ({attempt_of(e)} ended: {e.get('error') or '?'})"
        if e.get("next") == "restart":
            return (f"{head}; Ray Train restarts the workers from the last committed checkpoint once nodes are free "
                    f"({count}, fault_tolerance.max_preemption_failures; max_failures is not used)")
        return f"{head}; no restarts left ({count}, fault_tolerance.max_preemption_failures)"
    what = f"storage unreachable at {e['storage']}" if e.get("storage") else "a worker failed"
    if e.get("in_process"):  # one worker in the driver's process: no attempts to count
        what = what if e.get("storage") else "training failed"
        head = f"{what} ({e.get('error') or '?'})"
    else:
        head = f"{what} ({attempt_of(e)} failed: {e.get('error') or '?'})"
    nxt = e.get("next")
    if nxt == "restart":
        tail = ("Ray Train restarts the workers; they resume from the last committed checkpoint"
                + (" once storage answers" if e.get("storage") else ""))
    elif nxt == "driver_wait":
        tail = (f"no restarts left: the driver waits up to {float(e.get('wait_s') or 0):.0f}s for storage to "
                "answer, then starts the run again from the last committed checkpoint")
    elif e.get("in_process"):
        tail = "it ran in this process, which restarts nothing: resubmit to resume from the last committed checkpoint"
    else:
        tail = "no restarts left (fault_tolerance.max_failures)"
    return f"{head}; {tail}"


class Renderer:
    """Turns events into a live progress bar on a TTY, or one line per event elsewhere."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last_len = 0
        self.last: dict[str, Any] = {}

    def _line(self, e: dict[str, Any]) -> str:
        step, total = e.get("step", 0), e.get("max_steps") or 0
        width = 24
        done = int(width * step / total) if total else 0
        bar = "█" * done + "·" * (width - done)
        parts = [f"[{bar}] {step}/{total or '?'}"]
        if e.get("loss") is not None:
            parts.append(f"loss {e['loss']:.4f}")
        if e.get("tokens_per_s"):
            parts.append(f"{e['tokens_per_s']:,.0f} tok/s")
        if e.get("eta_s") is not None:
            parts.append(f"ETA {fmt_duration(e['eta_s'])}")
        return "  ".join(parts)

    def handle(self, e: dict[str, Any]) -> None:
        kind = e.get("kind")
        if kind == "log":
            self.last = e
            line = self._line(e)
            if self.tty:
                pad = max(0, self.last_len - len(line))
                self.stream.write("\r" + line + " " * pad)
                self.last_len = len(line)
            else:
                self.stream.write(line + "\n")
        else:
            msg = e.get("message") or ""
            if kind == "workers":
                if e.get("attempt", 1) > 1:  # Ray Train restarted the worker group: the setup lines follow again
                    msg = f"workers restarted ({attempt_of(e)}): " + msg.removeprefix("workers: ")
                most, n = e.get("elastic_max"), len(e.get("workers") or [])
                if most and n < most:  # elastic: fewer than the most, as many as the cluster had room for
                    msg += f" ({n} of {most} workers, elastic)"
            elif kind == "retry":
                msg = retry_message(e)
            elif kind == "eval":
                msg = f"eval at step {e.get('step')}: eval_loss {e.get('eval_loss', float('nan')):.4f}" + (
                    f", perplexity {e['perplexity']:.2f}" if e.get("perplexity") else "")
            elif kind == "checkpoint":
                msg = f"checkpoint committed: step {e.get('step')} → {e.get('path')}"
            if self.tty and self.last_len:
                self.stream.write("\r" + " " * self.last_len + "\r")
            self.stream.write(msg + "\n")
            if self.tty and self.last:
                line = self._line(self.last)
                self.stream.write(line)
                self.last_len = len(line)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last_len:
            self.stream.write("\n")
            self.stream.flush()
            self.last_len = 0


def print_summary(summary: dict[str, Any], run_uri: str, out) -> None:
    def f(v: Any, fmt: str = "{:.4f}") -> str:
        return "-" if v is None else fmt.format(v)

    rows = [
        ("steps", f"{summary.get('steps', '-')}"),
        ("final train loss", f(summary.get("train_loss"))),
        ("eval loss", f(summary.get("eval_loss"))),
        # a language model's measure: the other objectives show their own eval metrics instead
        *([("perplexity", f(summary.get("perplexity"), "{:.2f}"))]
          if summary.get("perplexity") is not None or summary.get("objective", "sft") == "sft" else []),
        *[(k.removeprefix("eval_").replace("_", " "), f(v)) for k, v in summary.items()
          if k.startswith("eval_") and k != "eval_loss" and isinstance(v, (int, float)) and not isinstance(v, bool)],
        ("tokens", f(summary.get("tokens"), "{:,}")),
        *([("tokens since resume", f(summary["attempt_tokens"], "{:,}"))]  # what runtime and tokens/s cover
          if summary.get("resumed_from_step") is not None and summary.get("attempt_tokens") is not None else []),
        ("runtime", f(summary.get("runtime_s"), "{:.1f}s")),
        ("tokens/s", f(summary.get("tokens_per_s"), "{:,.0f}")),
    ]
    if summary.get("resumed_from_step") is not None:
        rows.append(("resumed from step", str(summary["resumed_from_step"])))
    skipped = (summary.get("data") or {}).get("skipped_bad_rows") or {}
    if skipped:
        rows.append(("skipped bad rows", ", ".join(f"{k}: {v}" for k, v in skipped.items())))
    width = max(len(k) for k, _ in rows)
    print("", file=out)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)
    print(f"\noutputs: {st.join(run_uri, FINAL)}", file=out)
