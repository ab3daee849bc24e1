"""The driver → worker contract: one frozen :class:`WorkerConfig`, built once per fit by the driver
(:mod:`raytune_ft.launch.trainer`) and handed to Ray Train as ``train_loop_config``; every worker's
``train_loop`` reads it. Ray pickles it to each worker: it holds plain data only, and secrets by name only."""

from __future__ import annotations

from dataclasses import dataclass

from raytune_ft.plan import Plan
from raytune_ft.spec import spec_from_dict
from raytune_ft.spec.models import JobSpec


@dataclass(frozen=True)
class WorkerConfig:
    plan: Plan
    """The resolved spec (``plan.spec``) and what was computed from it once: scaling, DeepSpeed dict, batch."""
    resume_from: str | None = None
    """``--resume-from``: a committed checkpoint (local path or s3:// URI) to start from. None: the run's own
    latest committed checkpoint, looked up by the workers at every start (Ray Train restarts them after a
    worker failure, and they must then resume from what they committed since)."""
    report_evals: bool = False
    """A sweep trial: every evaluation is reported to Ray Train at once (and so reaches Ray Tune's scheduler)."""
    progress_board: str | None = None
    """The name of the Ray actor that collects rank 0's progress events (None: rank 0 prints them)."""

    def job_spec(self) -> JobSpec:
        return spec_from_dict(self.plan.spec)
