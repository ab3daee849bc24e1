"""The spec's systems sections: DeepSpeed, compute, cluster (Kubernetes, RunPod), storage, fault tolerance
and monitoring."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raytune_ft.spec.base import (
    ACCELERATOR_RE,
    ENV_NAME_RE,
    GPU_TYPE_RE,
    HOST_PATH,
    IMAGE_RE,
    K8S_LABEL_KEY_RE,
    K8S_LABEL_RE,
    K8S_LABEL_VALUE_RE,
    K8S_NAME_RE,
    K8S_QUANTITY_RE,
    PIP_REQ_RE,
    REGION_RE,
    VERSION_RE,
    Section,
    check_shape,
    no_userinfo,
    plain_text,
    section_rule,
)


class DeepSpeedSpec(Section):
    stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    config: str | None = Field(None, description="Path to a raw DeepSpeed JSON; replaces the generated one.")

    @section_rule
    def _ds_rules(self) -> None:
        if self.config is not None and (self.stage or self.offload_optimizer or self.offload_params):
            raise ValueError("deepspeed.config replaces the generated config; drop stage/offload_* or drop config")
        if self.offload_params and self.stage != 3:
            raise ValueError(f"deepspeed.offload_params needs ZeRO stage 3 (got stage {self.stage})")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3 (got stage 0)")


class ComputeSpec(Section):
    num_workers: int = Field(1, ge=1, le=4096, description=(
        "Training workers (one per GPU). Written {min: M, max: N}: elastic, the same as num_workers N with "
        "min_workers M."))
    min_workers: int | None = Field(None, ge=1, le=4096, description=(
        "Elastic workers: when nodes are lost and none replace them, Ray Train restarts the run from its latest "
        "checkpoint with as few as this many workers (and grows back, up to num_workers, when capacity returns: "
        "at the next committed checkpoint, with no step trained twice). The global batch stays "
        "per_device_train_batch_size × accumulation × num_workers: the accumulation is recomputed for each "
        "worker count."))

    @model_validator(mode="before")
    @classmethod
    def _worker_range(cls, data: Any) -> Any:
        """``num_workers: {min: M, max: N}`` is ``num_workers: N`` with ``min_workers: M``."""
        if not isinstance(data, dict) or not isinstance(data.get("num_workers"), dict):
            return data
        from raytune_ft.spec.rules import located_error

        rng = data["num_workers"]
        bad = sorted(set(map(str, rng)) - {"min", "max"})
        problem = (f"unknown key(s) {', '.join(bad)}: write {{min: M, max: N}}" if bad else
                   "needs both min and max, as {min: M, max: N}" if not {"min", "max"} <= set(rng) else
                   "give the range as num_workers {min, max} or min_workers, not both" if "min_workers" in data
                   else None)
        if problem:
            raise located_error([(("num_workers",), problem, rng)], "ComputeSpec")
        return {**data, "num_workers": rng["max"], "min_workers": rng["min"]}

    @section_rule
    def _range(self) -> None:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"compute.min_workers {self.min_workers} is more than num_workers {self.num_workers} "
                             "(the most workers)")

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may train with."""
        return range(self.min_workers if self.elastic else self.num_workers, self.num_workers + 1)
    gpus_per_worker: float = Field(0, ge=0, le=16)
    cpus_per_worker: float = Field(1, gt=0)
    accelerator_type: str | None = Field(None, description="e.g. A100-80G, H100, A40, RTX4090, L4")
    placement: Literal["pack", "spread", "strict_spread", "strict_pack"] = "pack"
    assumed_mfu: float | None = Field(None, gt=0, le=1, description="Model FLOP utilisation for `rtf plan`'s "
                                      "time estimate (default: a figure measured by this project, else a table).")
    price_per_hour: float | None = Field(None, ge=0, description="USD per GPU-hour for `rtf plan`'s cost "
                                         "estimate (default: a list price table).")
    peak_tflops: float | None = Field(None, gt=0, le=100_000, description="Peak dense TFLOP/s of one worker's "
                                      "device for `rtf plan`'s time estimate (default: a table by "
                                      "accelerator_type; on CPU, only this; `make bench` measures this CPU's).")

    @field_validator("accelerator_type")
    @classmethod
    def _accelerator(cls, v):
        if v is None:
            return v
        return check_shape(v, ACCELERATOR_RE, "an accelerator name of letters, digits, '.', '_' or '-' "
                           "(e.g. A100-80G, H100), at most 64 characters")

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class KubernetesSpec(Section):
    namespace: str = "default"
    service_account: str | None = None
    node_selector: dict[str, str] | None = None
    tolerations: list[dict[str, Any]] | None = None
    head_cpu: str = "4"
    head_memory: str = "16Gi"
    worker_cpu: str | None = None
    worker_memory: str | None = None
    secret_name: str = "rtf-secrets"
    shutdown_after_job_finishes: bool = True
    ttl_seconds_after_finished: int = Field(3600, ge=0)
    ray_version: str | None = None
    shm_size: str | None = Field(None, description="Memory-backed /dev/shm on the pods (NCCL, DataLoader "
                                 "workers; Kubernetes' default is 64 MiB). Default: a quarter of the pod's "
                                 "memory, at least 1Gi, at most 64Gi. It counts against the pod's memory.")
    termination_grace_seconds: int = Field(120, ge=0, le=3600, description="What a pod gets between SIGTERM "
                                           "(eviction, spot reclaim) and SIGKILL: time for a checkpoint.")

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v):
        return check_shape(v, K8S_LABEL_RE, "a Kubernetes namespace (lowercase letters, digits and '-', "
                           "at most 63, starting and ending with a letter or digit)")

    @field_validator("service_account", "secret_name")
    @classmethod
    def _k8s_name(cls, v):
        if v is None:
            return v
        return check_shape(v, K8S_NAME_RE, "a Kubernetes object name (lowercase letters, digits, '-' and '.')")

    @field_validator("head_cpu", "head_memory", "worker_cpu", "worker_memory", "shm_size")
    @classmethod
    def _quantity(cls, v):
        if v is None:
            return v
        return check_shape(v, K8S_QUANTITY_RE, "a Kubernetes quantity such as 4, 500m, 16Gi")

    @field_validator("node_selector")
    @classmethod
    def _selector(cls, v):
        for key, value in (v or {}).items():
            check_shape(key, K8S_LABEL_KEY_RE, "a Kubernetes label key such as nvidia.com/gpu.product")
            check_shape(value, K8S_LABEL_VALUE_RE, f"a Kubernetes label value for {key}")
        return v

    @field_validator("ray_version")
    @classmethod
    def _ray_version(cls, v):
        if v is None:
            return v
        return check_shape(v, VERSION_RE, "a Ray version such as 2.60.0")


class RunpodSpec(Section):
    gpu_type: str = "NVIDIA H100 80GB HBM3"
    gpu_count: int = Field(1, ge=1)
    pod_count: int | None = Field(None, ge=1, description="Defaults to compute.num_workers / gpu_count.")
    volume_gb: int = Field(100, gt=0)
    container_disk_gb: int = Field(50, gt=0)
    cloud_type: Literal["SECURE", "COMMUNITY"] = "SECURE"

    @field_validator("gpu_type")
    @classmethod
    def _gpu_type(cls, v):
        return check_shape(v, GPU_TYPE_RE, "a RunPod GPU type id such as 'NVIDIA H100 80GB HBM3'")


class ClusterSpec(Section):
    address: str | None = Field(None, description="Ray cluster: its dashboard URL http://HEAD:8265 "
                                "(ray://HEAD means the same head's dashboard).")
    image: str | None = None
    pip: list[str] | None = Field(None, description="Extra pip packages for the job's runtime_env.")
    kubernetes: KubernetesSpec | None = None
    runpod: RunpodSpec | None = None

    @field_validator("address")
    @classmethod
    def _address(cls, v):
        if v is None or v == "auto":
            return v
        no_userinfo(v)  # first: the next message shows the value
        if not re.fullmatch(rf"(ray|https?)://{HOST_PATH}|[A-Za-z0-9._-]+:[0-9]{{1,5}}", v):
            raise ValueError(f"must be http(s)://HOST:8265 (the dashboard), ray://HOST:10001, HOST:PORT or auto "
                             f"(got {v!r})")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v):
        if v is None:
            return v
        return check_shape(v, IMAGE_RE, "a container image reference such as ghcr.io/you/rtf:0.1.0")

    @field_validator("pip")
    @classmethod
    def _pip(cls, v):
        for req in v or []:
            check_shape(req, PIP_REQ_RE, "a package requirement such as 'liger-kernel>=0.5' (no options, URLs "
                        "or paths)")
        return v


class StorageSpec(Section):
    path: str = Field("./rtf_runs", min_length=1, description="Local dir or s3://bucket/prefix.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2, Ceph).")
    region: str | None = None
    access_key_env: str = "AWS_ACCESS_KEY_ID"
    secret_key_env: str = "AWS_SECRET_ACCESS_KEY"
    session_token_env: str = "AWS_SESSION_TOKEN"
    keep_checkpoints: int = Field(3, ge=2)
    upload: Literal["auto", "sync", "async"] = Field(
        "auto", description="How a checkpoint reaches storage: async trains on while it uploads (at most one "
        "upload in flight per worker, the manifest still written last); sync waits for it. auto: async to an "
        "object store (s3://), sync to a local path. A sweep trial trained in its trial's process always waits.")

    @property
    def async_upload(self) -> bool:
        return self.upload == "async" or (self.upload == "auto" and self.path.startswith("s3://"))

    @field_validator("access_key_env", "secret_key_env", "session_token_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not ENV_NAME_RE.fullmatch(v):
            raise ValueError(
                "must be the NAME of an environment variable (got something else); "
                "put the value in that variable, never in the spec"
            )
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v):
        if v is None:
            return v
        no_userinfo(v)  # first: the next message shows the value
        if not re.fullmatch(rf"https?://{HOST_PATH}", v):
            raise ValueError(f"must be an http:// or https:// URL (got {v!r})")
        return v

    @field_validator("region")
    @classmethod
    def _region(cls, v):
        if v is None:
            return v
        # it signs every request and, on AWS, names the host the requests go to
        return check_shape(v, REGION_RE, "a region name such as us-east-1 (letters, digits, '-' and '_')")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        plain_text(v, "a storage path")  # it becomes every run's prefix, job id part and shown location
        if "://" in v and not v.startswith("s3://"):
            raise ValueError(f"must be a local directory or an s3://bucket/prefix URI (got {v!r})")
        if v.startswith("s3://") and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x1f\x7f]*)?", v):
            raise ValueError(f"not a valid s3://bucket/prefix URI (got {v!r})")
        return v

    @property
    def is_s3(self) -> bool:
        return self.path.startswith("s3://")


class FaultTolerance(Section):
    max_failures: int = Field(3, ge=-1, description="Retries from the last checkpoint; -1 = unlimited.")
    max_preemption_failures: int = Field(-1, ge=-1, description=(
        "Restarts after a node was preempted (Ray reports the drain of a spot node before it goes), counted "
        "apart from max_failures; -1 = unlimited."))
    preemption_check_steps: int | None = Field(None, ge=0, description=(
        "Worker groups ask Ray whether a node of theirs is being preempted every this many optimizer steps "
        "(a collective across the workers, about 8 ms); on a notice they commit a checkpoint at once if it fits "
        "before the deadline, then train on. null = chosen after the first steps so that asking costs at most "
        "1% of the step time and happens at least every 5 s; 0 = never ask."))


class Monitoring(Section):
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = ["tensorboard"]
    experiment: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                                   description="MLflow experiment and W&B project (default: the run name).")
    log_examples: bool = Field(False, description=(
        "Record which training rows each optimizer step took (every worker's, as indices into the prepared "
        "training set) in the run's metrics log, beside the losses: {step, epoch, examples}. Shows each row "
        "trained once per epoch across resumes and worker-count changes. SFT only; one small collective per "
        "step."))
