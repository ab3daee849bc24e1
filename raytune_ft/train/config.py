"""The driver → worker contract: one frozen :class:`WorkerConfig`, built once per fit by the driver
(:mod:`raytune_ft.launch.trainer`) and handed to Ray Train as ``train_loop_config``; every worker's
``train_loop`` reads it. Ray pickles it to each worker: it holds plain data only, and secrets by name only."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raytune_ft.plan import Plan
from raytune_ft.spec import spec_from_dict
from raytune_ft.spec.models import JobSpec

# RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train V2 replaces print() in its workers with a call to the root logger
# (whose console handler writes the line) plus, whenever sys.stdout is not sys.__stdout__, the real print as
# well; Ray itself reopens a worker's stdout for its log files, so that is always, and every print() of a
# worker reached the job's log (`rtf logs`) twice. Without the patch a print goes to stdout once; logging
# calls still go through Ray Train's handlers.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


@dataclass(frozen=True)
class WorkerConfig:
    plan: Plan
    """The resolved spec (``plan.spec``) and what was computed from it once: scaling, DeepSpeed dict, batch."""
    resume_from: str | None = None
    """``--resume-from``: a committed checkpoint (local path or s3:// URI) to start from. None: the run's own
    latest committed checkpoint, looked up by the workers at every start (Ray Train restarts them after a
    worker failure, and they must then resume from what they committed since)."""
    started: float | None = None
    """When the driver started this submission (epoch s): with ``resume_from``, a checkpoint the run committed
    since then is where a restarted worker group goes on from."""
    report_evals: bool = False
    """A sweep trial: every evaluation is reported to Ray Train at once (and so reaches Ray Tune's scheduler)."""
    progress_board: str | None = None
    """The name of the Ray actor that collects rank 0's progress events (None: rank 0 prints them)."""
    in_process: bool = False
    """One worker, run in the driver's own process (Ray Train's local mode, ``ScalingConfig(num_workers=0)``):
    no worker group to start. Ray Train then neither uploads checkpoints nor restarts a failed worker: the
    recipe uploads each checkpoint itself, and a failure ends the run (resubmit to resume)."""

    def job_spec(self) -> JobSpec:
        return spec_from_dict(self.plan.spec)


class StopRequested(KeyboardInterrupt):
    """Raised in an in-process run's training thread at the next step once :data:`STOP` is set (Ctrl-C reaches
    the driver's main thread; the training thread has no signal of its own)."""


STOP = threading.Event()
"""Set by the driver to stop an in-process run at the next step boundary (nothing half-written: a checkpoint
is committed whole or not at all)."""

SAVE_AND_STOP = threading.Event()
"""Set by the driver on SIGTERM (a Kubernetes eviction, a RunPod stop, ``kill``): an in-process run commits a
checkpoint at the next step boundary, then stops, so that a resubmission loses at most one step."""


IN_PROCESS_REPORTS: list[Callable[[dict[str, Any], bool], None]] = []
"""Where an in-process run's reports go (the metrics, and whether a checkpoint came with them), once each is
done (its checkpoint committed); a worker's go to ``ray.train.report``. The gap this fills: Ray Train's local
mode keeps only the last report and runs no Train callbacks, and inside a Ray Tune trial ``ray.train``'s API
refuses to run at all, so a sweep trial that trains in its own process (no worker group) forwards its reports
to Tune through a listener here instead of :class:`raytune_ft.sweep.tune.ReportToTune`. A plain in-process run
has none."""


def tell_in_process(metrics: dict[str, Any], checkpoint: bool = False) -> None:
    """Hand one report of an in-process run to :data:`IN_PROCESS_REPORTS`."""
    for listener in list(IN_PROCESS_REPORTS):
        listener(metrics, checkpoint)
