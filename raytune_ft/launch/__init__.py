"""Targets: where the driver runs and how it gets there. :func:`submit` picks one and says why.

One module per target: :mod:`~raytune_ft.launch.local` (an embedded Ray), :mod:`~raytune_ft.launch.ray_jobs`
(a Ray cluster's Jobs API), :mod:`~raytune_ft.launch.k8s` (KubeRay manifests), :mod:`~raytune_ft.launch.runpod`
(RunPod pods and their bootstrap). Every target runs the same driver (:mod:`~raytune_ft.launch.driver`), which
builds its ``TorchTrainer`` in one place (:mod:`~raytune_ft.launch.trainer`)."""

from raytune_ft.launch.targets import choose_target, submit

__all__ = ["choose_target", "submit"]
