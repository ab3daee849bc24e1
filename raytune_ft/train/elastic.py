"""Elastic workers grow back at a checkpoint boundary.

The gap this fills: Ray Train V2 (2.60) grows an elastic worker group at its own resize check
(``ScalingConfig.elastic_resize_monitor_interval_s``, every 60 s) by ending the group wherever it is and
restarting it from the latest committed checkpoint, so the steps since that checkpoint are trained twice (up
to a whole ``save_steps`` of work, often many minutes). rtf asks the same question at each checkpoint
instead: when Ray would start more workers than run now, the workers stop right after that checkpoint is
committed and the driver starts the run again from it, at the larger size (Ray Train's own start decision
picks it). Nothing is trained twice. Ray's check stays as a backstop, every RAY_RESIZE_CHECK_S.

"How many workers would Ray start now" is answered the way Ray Train's elastic policy answers it: the
resources Ray's AutoscalingCoordinator reserves for this run (its requester id is ``train-<run id>``),
refreshed first (the coordinator's own refresh is every 20 s), counted with the policy's own
``_count_possible_workers``. Those are Ray's private names; when they are not there (another Ray version),
:func:`available` is False and Ray's own resize check keeps its default.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Ray Train's resize check of a running group, kept as a backstop to rtf's (a run whose checkpoints are further
# apart than this, or a Ray whose coordinator stopped answering rtf's question): every 30 min, not every minute
RAY_RESIZE_CHECK_S = 1800.0
ASK_TIMEOUT_S = 5.0
_warned = False


def available() -> bool:
    """Whether the workers can ask how many workers Ray would start (Ray's private names are there)."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (  # noqa: F401
            get_or_create_autoscaling_coordinator,
        )
        from ray.train.v2._internal.execution.context import get_train_context  # noqa: F401
        from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy
    except ImportError:
        return False
    return hasattr(ElasticScalingPolicy, "_count_possible_workers")


def workers_ray_would_start() -> int | None:
    """In a worker of an elastic group: how many workers Ray Train would start if the group started now (the
    AutoscalingCoordinator's reservation for this run, refreshed against the nodes alive now, counted as Ray
    Train's elastic policy counts it); None when it cannot be asked (the answer is then "no change")."""
    global _warned
    try:
        import ray
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.train.v2._internal.execution.context import get_train_context
        from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy

        run: Any = get_train_context().train_run_context
        # recompute: the coordinator refreshes its view of the nodes first (a ray.nodes() call), so a node that
        # joined is seen at this checkpoint, and the next group's start decision, made from the same view, agrees
        reserved = ray.get(get_or_create_autoscaling_coordinator().get_reserved_resources.remote(
            f"train-{run.run_id}", recompute=True), timeout=ASK_TIMEOUT_S)
        if not reserved:
            raise LookupError(f"Ray's AutoscalingCoordinator reserves nothing for train-{run.run_id}")
        return int(ElasticScalingPolicy(run.scaling_config)._count_possible_workers(reserved))
    except Exception as e:  # noqa: BLE001 - asking is an optimization: the run goes on at its size
        if not _warned:  # once: Ray's own resize check (every RAY_RESIZE_CHECK_S) is what grows the group now
            log.warning("elastic: cannot ask Ray how many workers it would start (%s); the group grows back at "
                        "Ray Train's resize check instead, from the latest checkpoint", e)
            _warned = True
        return None
