"""Live progress from rank 0 to whoever watches the run (the local CLI, or a cluster driver's log).

Rank 0 pushes one event per logging step to a small named Ray actor (fire and forget: the
training loop never waits on it); the driver polls it and renders. Events are plain dicts:
``{"kind": "log"|"eval"|"checkpoint"|"info"|"done", "step": …, "max_steps": …, "loss": …, …}``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

NAMESPACE = "rtf"
EVENT_PREFIX = "RTF_EVENT "


def board_name(run_name: str) -> str:
    return f"rtf-progress-{run_name}"


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


class Publisher:
    """Used on rank 0: pushes events to the board when one exists, never raises."""

    def __init__(self, run_name: str | None) -> None:
        self.handle = None
        if not run_name:
            return
        try:
            import ray

            self.handle = ray.get_actor(board_name(run_name), namespace=NAMESPACE)
        except Exception:  # no board (a run started without a watcher): print events instead
            self.handle = None

    def push(self, event: dict[str, Any]) -> None:
        event = {"time": time.time(), **event}
        if self.handle is not None:
            try:
                self.handle.push.remote(event)
                return
            except Exception:
                self.handle = None
        print(EVENT_PREFIX + json.dumps(event, default=str), file=sys.stdout, flush=True)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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
                msg = e.get("message") or ""
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
