"""The one place that builds a Ray Train ``TorchTrainer`` for a run: scaling from the plan, the run's
identity in storage (name + storage root, so a resubmission resumes), failure and checkpoint policy, and the
worker contract (:class:`~raytune_ft.train.config.WorkerConfig`). A plain run (:mod:`raytune_ft.launch.driver`)
and every sweep trial (:mod:`raytune_ft.sweep.tune`) use it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from raytune_ft import storage as st
from raytune_ft.plan import Plan
from raytune_ft.rundir import RunDir
from raytune_ft.spec.models import JobSpec
from raytune_ft.train.config import WORKER_ENV, WorkerConfig


@dataclass
class RunResult:
    """How a run (or a sweep, through its best trial) ended, as the driver reports it."""

    ok: bool
    run_uri: str
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    interrupted: bool = False


def scaling_config(plan: Plan, in_process: bool = False):
    from ray.train import ScalingConfig

    if in_process:  # Ray Train's local mode: the train function runs in this process, no worker group
        return ScalingConfig(num_workers=0)

    kwargs: dict[str, Any] = dict(
        # elastic: Ray Train V2 starts as many as the cluster has room for, down to the minimum, and restarts
        # the group with fewer from the latest checkpoint when a node goes; it grows at a checkpoint
        # (raytune_ft.train.elastic)
        num_workers=(plan.min_workers, plan.num_workers) if plan.min_workers else plan.num_workers,
        use_gpu=plan.use_gpu,
        resources_per_worker=plan.resources_per_worker,
        placement_strategy=plan.placement_strategy,
    )
    if plan.accelerator_type:
        kwargs["accelerator_type"] = plan.accelerator_type
    if plan.min_workers:
        from raytune_ft.train import elastic

        if elastic.available():  # the workers grow the group at a committed checkpoint; Ray Train's resize
            # check, which restarts it wherever it is (the steps since the checkpoint redone), is the backstop
            kwargs["elastic_resize_monitor_interval_s"] = elastic.RAY_RESIZE_CHECK_S
    return ScalingConfig(**kwargs)


def failures_left(max_failures: int, spent: int) -> int:
    """What is left of ``max_failures`` (-1: unlimited) after ``spent`` failures."""
    return max_failures if max_failures < 0 else max(0, max_failures - spent)


def build_trainer(spec: JobSpec, worker: WorkerConfig, *, callbacks: Sequence[Any] = (), spent: int = 0):
    """A ``TorchTrainer`` that runs :func:`raytune_ft.train.entry.train_loop` with ``worker`` on every
    worker, named and stored as the run dir of ``spec`` (Ray Train's stale snapshot dropped first).
    ``spent``: failures an earlier ``fit()`` of this run used (elastic workers that grew start a new one),
    taken off ``fault_tolerance.max_failures``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raytune_ft.train.entry import train_loop  # light: the driver never imports transformers/peft

    plan = worker.plan
    run_dir = RunDir.of(spec)
    run_dir.forget_train_snapshot()
    fs, root = st.open(spec.storage)
    return TorchTrainer(
        train_loop,
        train_loop_config=worker,
        scaling_config=scaling_config(plan, worker.in_process),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        run_config=RunConfig(
            name=spec.name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=failures_left(spec.fault_tolerance.max_failures, spent),
                                         max_preemption_failures=spec.fault_tolerance.max_preemption_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # rtf prunes by its manifests
            worker_runtime_env={"env_vars": dict(WORKER_ENV)},
            callbacks=list(callbacks) or None,
        ),
    )
