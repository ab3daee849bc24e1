"""Live progress, the worker's side: rank 0 pushes one event per logging step (and per evaluation,
checkpoint, message) to a small named Ray actor, the progress board, fire and forget: the training loop
never waits on it. The driver creates the board and renders what arrives (:mod:`raytune_ft.launch.progress`).
Without a board (a run started without a watcher) the events are printed as ``RTF_EVENT {json}`` lines,
which the Ray Jobs target reads back from the job's log. A run in the driver's own process (one local worker)
has an in-process board instead (:class:`LocalBoard`): no Ray needed to watch it."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

NAMESPACE = "rtf"
EVENT_PREFIX = "RTF_EVENT "


def board_name(run_name: str) -> str:
    return f"rtf-progress-{run_name}"


class LocalBoard:
    """The progress board of a run trained in this process: the same ``push``/``since`` as the Ray actor."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def push(self, event: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(event)

    def since(self, index: int) -> list[dict[str, Any]]:
        with self.lock:
            return self.events[index:]


LOCAL_BOARDS: dict[str, LocalBoard] = {}  # board name -> the board of an in-process run


class Publisher:
    """Used on rank 0 (and by a sweep's Tune callback): pushes events to the board named ``board`` (see
    :func:`board_name`) when it exists, never raises."""

    def __init__(self, board: str | None) -> None:
        self.handle = None
        self.local = LOCAL_BOARDS.get(board) if board else None
        if not board or self.local is not None:
            return
        try:
            import ray

            self.handle = ray.get_actor(board, namespace=NAMESPACE)
        except Exception:  # no board (a run started without a watcher): print events instead
            self.handle = None

    def push(self, event: dict[str, Any]) -> None:
        event = {"time": time.time(), **event}
        if self.local is not None:
            self.local.push(event)
            return
        if self.handle is not None:
            try:
                self.handle.push.remote(event)
                return
            except Exception:
                self.handle = None
        print(EVENT_PREFIX + json.dumps(event, default=str), file=sys.stdout, flush=True)
