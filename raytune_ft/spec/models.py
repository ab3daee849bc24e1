"""The job spec: pydantic models, frozen, unknown keys forbidden.

Key names follow Hugging Face's ``TrainingArguments`` where one exists, so a user who knows HF
knows the spec. Cross-field rules live next to the section they concern; rules that span sections
live on :class:`JobSpec`. Every rule raises ``ValueError`` with a message that says what to change;
the loader turns it into ``file:line dotted.path: message``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Every pattern is used with fullmatch: ``$`` alone would accept a trailing newline ("abc\n"), which then
# becomes a job id, a storage prefix or a line of a rendered manifest.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRETISH = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASS|PASSPHRASE|APIKEY|API_KEY|KEY|PAT|ACCESS_KEY(_ID)?|SECRET_ACCESS_KEY"
    r"|PRIVATE_KEY|CREDENTIALS?)(_|$)"
    r"|TOKEN(?!IZER)|PASSW|SECRET",  # GITHUBTOKEN, DBPASSWORD (but not TOKENIZERS_PARALLELISM)
    re.I,
)
# Well-known credential prefixes: a value that starts so is a secret whatever its variable is called.
TOKEN_VALUE_RE = re.compile(r"(?<![A-Za-z0-9])(?:hf_|sk-|sk_live_|ghp_|gho_|ghs_|github_pat_|glpat-|xox[bp]-)[A-Za-z0-9_-]{8,}"
                             r"|(?<![A-Za-z0-9])(?:AKIA|ASIA)[A-Z0-9]{12,}")
# Fields that reach a command line, a shell variable or a Kubernetes resource: strict shapes, each named.
ACCELERATOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
K8S_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1123 label: namespaces
K8S_NAME_RE = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
K8S_QUANTITY_RE = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
K8S_LABEL_KEY_RE = re.compile(r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
K8S_LABEL_VALUE_RE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
IMAGE_RE = re.compile(  # an OCI image reference: [registry[:port]/]path[:tag][@sha256:digest]
    r"[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]{1,5})?(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?")
VERSION_RE = re.compile(r"[0-9]+\.[0-9]+(\.[0-9]+)?")
GPU_TYPE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}")
PIP_REQ_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?(\[[A-Za-z0-9._,-]+\])?"
                        r"(\s*(===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+(\s*,\s*(===|==|!=|~=|<=|>=|<|>)\s*"
                        r"[A-Za-z0-9.*+!_-]+)*)?")
_HOST_PATH = r"([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?(/[A-Za-z0-9._~%/-]*)?"  # host[:port][/path]
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _importable(module: str) -> bool:
    """Whether a package is installed, without importing it (validation stays import-light)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def check_shape(value: str, pattern: re.Pattern[str], what: str) -> str:
    """``value`` must match ``pattern`` whole; the message says what shape was expected."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"must be {what} (got {value!r})")
    return value


def no_userinfo(url: str) -> str:
    """Credentials in a URL (``https://KEY:SECRET@host``) would be printed, rendered and logged."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"not a valid URL ({e})")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("must not carry credentials (user:password@); name the environment variables that "
                         "hold them instead (storage.access_key_env / secret_key_env, or RAY_AUTH_TOKEN)")
    return url


def looks_like_token(value: str) -> bool:
    return bool(TOKEN_VALUE_RE.search(value))


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- model / tokenizer


class ModelInit(Section):
    """An architecture to build from scratch (no weights downloaded)."""

    arch: Literal["llama", "mistral", "qwen2"] = "llama"
    hidden_size: int = Field(256, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    intermediate_size: int = Field(688, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    vocab_size: int | None = Field(None, gt=0, description="Defaults to the tokenizer's size.")
    tie_word_embeddings: bool = False
    rope_theta: float = Field(10000.0, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelInit:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        return self


class ModelSpec(Section):
    name_or_path: str | None = Field(None, description="Hub id or local directory.")
    init: ModelInit | None = Field(None, description="Train from scratch with this architecture.")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.name_or_path is None) == (self.init is None):
            raise ValueError("give exactly one of model.name_or_path (pretrained) or model.init (from scratch)")
        if self.init is not None and self.revision is not None:
            raise ValueError("model.revision applies to a pretrained model, not to model.init")
        return self


class TokenizerTrain(Section):
    vocab_size: int = Field(4096, ge=300, le=1_000_000)
    min_frequency: int = Field(2, ge=1)


class TokenizerSpec(Section):
    name_or_path: str | None = Field(None, description="Defaults to the model's own tokenizer.")
    train: TokenizerTrain | None = Field(None, description="Train a BPE tokenizer on the training data.")

    @model_validator(mode="after")
    def _not_both(self) -> TokenizerSpec:
        if self.name_or_path is not None and self.train is not None:
            raise ValueError("give tokenizer.name_or_path or tokenizer.train, not both")
        return self


# --------------------------------------------------------------------------- method


class LoraSpec(Section):
    r: int = Field(16, gt=0, le=4096)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[list[str], str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | None = None

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, v):
        if isinstance(v, str) and v == "all-linear":
            return v
        if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
            raise ValueError(f'must be "all-linear" or a non-empty list of module names (got {v!r})')
        return v

    @field_validator("layers_to_transform")
    @classmethod
    def _layers(cls, v):
        if v is not None and any(i < 0 for i in v):
            raise ValueError("layer indices must be >= 0")
        return v

    @model_validator(mode="after")
    def _layers_need_names(self) -> LoraSpec:
        if self.layers_to_transform is not None and self.target_modules == "all-linear":
            raise ValueError('method.lora.layers_to_transform needs target_modules as a list of module names '
                             '(e.g. [q_proj, v_proj]), not "all-linear" (PEFT refuses the combination)')
        return self


class QuantizationSpec(Section):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class MethodSpec(Section):
    type: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraSpec | None = None
    quantization: QuantizationSpec | None = None

    @model_validator(mode="after")
    def _method_rules(self) -> MethodSpec:
        if self.type == "full" and self.lora is not None:
            raise ValueError("method.type full trains every weight and takes no method.lora; remove it or use lora")
        if self.type == "full" and self.quantization is not None:
            raise ValueError("full fine-tuning of a quantized model is not supported; use method.type qlora")
        if self.type == "qlora" and self.quantization is None:
            raise ValueError("method.type qlora needs method.quantization (e.g. {bits: 4, quant_type: nf4})")
        if self.type == "lora" and self.quantization is not None:
            raise ValueError("method.quantization is for qlora; set method.type: qlora or remove it")
        return self

    @property
    def lora_or_default(self) -> LoraSpec | None:
        if self.type == "full":
            return None
        return self.lora or LoraSpec()


# --------------------------------------------------------------------------- data


class DataSource(Section):
    path: str = Field(..., min_length=1, description="Local file/dir, HF save_to_disk dir, or s3:// URI.")
    format: Literal["alpaca", "chat", "text"] = "alpaca"
    fields: dict[str, str] | None = Field(None, description="Canonical field -> column name in the file.")
    weight: float = Field(1.0, gt=0)

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, v):
        if v is None:
            return v
        allowed = {"instruction", "input", "output", "messages", "text", "system"}
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"unknown canonical field(s) {bad}; allowed: {sorted(allowed)}")
        return v


def _as_list(v):
    """A single source may be written as a mapping; it is stored as a one-element list."""
    return [v] if isinstance(v, dict) else v


class DataSpec(Section):
    train: list[DataSource] = Field(..., description="One source or a list (a weighted mixture).")
    eval: list[DataSource] | None = None
    eval_split: float | None = Field(None, gt=0, lt=1)
    max_seq_length: int | None = Field(None, gt=0)
    packing: bool = False
    train_on_prompt: bool = False
    on_bad_row: Literal["error", "skip"] = "error"

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _sources(cls, v):
        v = _as_list(v)
        if isinstance(v, list) and not v:
            raise ValueError("needs at least one source")
        return v

    @model_validator(mode="after")
    def _data_rules(self) -> DataSpec:
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("give data.eval (a source) or data.eval_split (a fraction of train), not both")
        if self.packing and self.max_seq_length is None:
            raise ValueError("data.packing needs data.max_seq_length (the packed row length)")
        return self

    @property
    def train_sources(self) -> list[DataSource]:
        return list(self.train)

    @property
    def eval_sources(self) -> list[DataSource]:
        return list(self.eval or [])

    @property
    def has_eval(self) -> bool:
        return self.eval is not None or self.eval_split is not None


# --------------------------------------------------------------------------- training

Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    "sgd",
    "lion_8bit",
    "paged_lion_8bit",
]
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]


EVAL_METRICS = ("eval_loss",)  # what an evaluation reports (HF's names, with their eval_ prefix)


class EarlyStopping(Section):
    patience: int = Field(3, ge=1)
    threshold: float = Field(0.0, ge=0)


class TrainingSpec(Section):
    num_epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    per_device_train_batch_size: int = Field(1, gt=0)
    per_device_eval_batch_size: int | None = Field(None, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler_type: Scheduler = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: Optimizer = "adamw_torch"
    gradient_checkpointing: bool = False
    liger_kernel: bool = Field(False, description="Liger's Triton kernels (fused linear cross-entropy, RMSNorm, "
                               "RoPE, SwiGLU) through HF's use_liger_kernel; GPU only, pip install "
                               "'raytune_ft[gpu]'. Measured on an H200: 1.14x tokens/s, half the peak memory.")
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    tf32: bool | None = None
    logging_steps: int = Field(10, gt=0)
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    eval_steps: int | None = Field(None, gt=0)
    save_steps: int = Field(500, gt=0)
    load_best_model_at_end: bool = False
    metric_for_best_model: str = "eval_loss"
    greater_is_better: bool | None = None
    early_stopping: EarlyStopping | None = None
    seed: int = 42
    data_seed: int | None = None
    dataloader_num_workers: int = Field(0, ge=0)
    group_by_length: bool = False

    @field_validator("metric_for_best_model")
    @classmethod
    def _best_metric(cls, v: str) -> str:
        """HF's Trainer compares ``eval_<name>`` when the name lacks the prefix; rtf's checkpoint keeping
        must compare the same metric, so the name is stored as the trainer uses it."""
        name = v if v.startswith("eval_") else f"eval_{v}"
        if name not in EVAL_METRICS:
            raise ValueError(f"{v!r} is not a metric evaluation reports; use one of {', '.join(EVAL_METRICS)}")
        return name

    @model_validator(mode="after")
    def _training_rules(self) -> TrainingSpec:
        if self.max_steps is None and self.num_epochs is None:
            raise ValueError("give training.max_steps or training.num_epochs (how long to train)")
        if self.warmup_ratio and self.warmup_steps:
            raise ValueError("give training.warmup_ratio or training.warmup_steps, not both")
        if self.eval_steps is not None and self.eval_strategy != "steps":
            raise ValueError("training.eval_steps needs training.eval_strategy: steps")
        if self.load_best_model_at_end:
            if self.eval_strategy == "no":
                raise ValueError("training.load_best_model_at_end needs training.eval_strategy steps or epoch")
            if self.eval_strategy == "steps":
                every = self.eval_steps or self.logging_steps
                if self.save_steps % every:
                    raise ValueError(
                        f"training.load_best_model_at_end needs save_steps ({self.save_steps}) to be a "
                        f"multiple of eval_steps ({every}) so every saved checkpoint has an eval metric"
                    )
        if self.early_stopping is not None and not self.load_best_model_at_end:
            raise ValueError(
                "training.early_stopping needs training.load_best_model_at_end: true (and an eval_strategy)"
            )
        return self

    @property
    def eval_batch_size(self) -> int:
        return self.per_device_eval_batch_size or self.per_device_train_batch_size


# --------------------------------------------------------------------------- systems


class DeepSpeedSpec(Section):
    stage: Literal[0, 1, 2, 3] = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    config: str | None = Field(None, description="Path to a raw DeepSpeed JSON; replaces the generated one.")

    @model_validator(mode="after")
    def _ds_rules(self) -> DeepSpeedSpec:
        if self.config is not None and (self.stage or self.offload_optimizer or self.offload_params):
            raise ValueError("deepspeed.config replaces the generated config; drop stage/offload_* or drop config")
        if self.offload_params and self.stage != 3:
            raise ValueError(f"deepspeed.offload_params needs ZeRO stage 3 (got stage {self.stage})")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs ZeRO stage 1, 2 or 3 (got stage 0)")
        return self


class ComputeSpec(Section):
    num_workers: int = Field(1, ge=1, le=4096)
    gpus_per_worker: float = Field(0, ge=0, le=16)
    cpus_per_worker: float = Field(1, gt=0)
    accelerator_type: str | None = Field(None, description="e.g. A100-80G, H100, A40, RTX4090, L4")
    placement: Literal["pack", "spread", "strict_spread", "strict_pack"] = "pack"
    assumed_mfu: float | None = Field(None, gt=0, le=1, description="Model FLOP utilisation for `rtf plan`'s "
                                      "time estimate (default: a figure measured by this project, else a table).")
    price_per_hour: float | None = Field(None, ge=0, description="USD per GPU-hour for `rtf plan`'s cost "
                                         "estimate (default: a list price table).")

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

    @field_validator("head_cpu", "head_memory", "worker_cpu", "worker_memory")
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
    address: str | None = Field(None, description="Ray cluster address (ray://, http:// dashboard, or auto).")
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
        if not re.fullmatch(rf"(ray|https?)://{_HOST_PATH}|[A-Za-z0-9._-]+:[0-9]{{1,5}}", v):
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
        if not re.fullmatch(rf"https?://{_HOST_PATH}", v):
            raise ValueError(f"must be an http:// or https:// URL (got {v!r})")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
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


class Monitoring(Section):
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = ["tensorboard"]
    experiment: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                                   description="MLflow experiment and W&B project (default: the run name).")


# --------------------------------------------------------------------------- sweeps (Ray Tune)

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "grid")


class Distribution(Section):
    """One swept value, written as a one-key mapping: ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``,
    ``{choice: [a, b, ...]}`` (sampled) or ``{grid: [a, b, ...]}`` (every value). On an integer field,
    loguniform/uniform sample integers in [lo, hi]."""

    loguniform: tuple[Union[int, float], Union[int, float]] | None = None
    uniform: tuple[Union[int, float], Union[int, float]] | None = None
    choice: list[Any] | None = Field(None, min_length=1)
    grid: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, v):
        example = "a one-key mapping such as {loguniform: [1.0e-5, 1.0e-3]} or {choice: [8, 16]}"
        if not isinstance(v, dict):
            raise ValueError(f"must be {example} (got {v!r})")
        if len(v) != 1:
            raise ValueError(f"must be {example}; got {len(v)} keys ({', '.join(map(str, v)) or 'none'})")
        key = next(iter(v))
        if key not in DISTRIBUTIONS:
            import difflib

            close = difflib.get_close_matches(str(key), DISTRIBUTIONS, n=1)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ValueError(f"unknown distribution `{key}`; {hint}use one of {', '.join(DISTRIBUTIONS)}")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> Distribution:
        if self.lo_hi is not None:
            lo, hi = self.lo_hi
            if isinstance(lo, bool) or isinstance(hi, bool) or not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{self.kind} bounds must be finite numbers (got [{lo}, {hi}])")
            if not lo < hi:
                raise ValueError(f"{self.kind} needs lo < hi (got [{lo}, {hi}])")
            if self.kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform needs lo > 0 (got {lo}); use uniform for ranges that include 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    @property
    def lo_hi(self) -> tuple[int | float, int | float] | None:
        return self.loguniform or self.uniform

    @property
    def options(self) -> list[Any] | None:
        """The finite values of choice/grid (None for a range)."""
        return self.choice if self.choice is not None else self.grid


class AshaScheduler(Section):
    """Asynchronous successive halving over training steps: at each rung (grace_period × reduction_factor^k
    steps) a trial whose metric is worse than the best 1/reduction_factor so far is stopped."""

    type: Literal["asha"]
    grace_period: int | None = Field(None, gt=0, description="Steps before a trial can be stopped; "
                                     "defaults to the step interval at which the metric is reported.")
    reduction_factor: int = Field(3, ge=2)


class FifoScheduler(Section):
    """Every trial runs to its end."""

    type: Literal["fifo"]


class TuneSpec(Section):
    """A sweep: each trial is a whole run of this spec with the sampled values applied."""

    space: dict[str, Distribution] = Field(..., min_length=1, description="Dotted spec path -> distribution.")
    num_samples: int | None = Field(None, ge=1, description="Trials to sample (random, optuna); with grid "
                                    "values, how many times the whole grid runs (default 1).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="Defaults to what the cluster fits.")
    metric: Literal["eval_loss", "perplexity", "loss"] = "eval_loss"
    mode: Literal["min", "max"] = "min"
    scheduler: Union[AshaScheduler, FifoScheduler] = Field(FifoScheduler(type="fifo"), discriminator="type")
    search: Literal["random", "grid", "optuna"] = "random"
    seed: int | None = Field(None, description="Seed of the random search (a repeatable set of samples).")

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_short(cls, v):
        """`scheduler: asha` is the short form of `scheduler: {type: asha}` (its defaults)."""
        return {"type": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _tune_rules(self) -> TuneSpec:
        if self.mode == "max":
            raise ValueError(f"tune.metric {self.metric} is a loss (lower is better): tune.mode must be min")
        sampled = [p for p, d in self.space.items() if d.kind != "grid"]
        if self.search in ("random", "optuna") and sampled and self.num_samples is None:
            raise ValueError(f"tune.search {self.search} samples {', '.join(sampled)}: set tune.num_samples "
                             "(how many trials to run)")
        return self



# --------------------------------------------------------------------------- the job


class JobSpec(Section):
    name: str = Field(..., description="The run's identity: resubmitting the same name resumes it.")
    extends: str | None = Field(None, description="A preset in jobspecs/ or a path; deep-merged under this spec.")
    description: str | None = None
    model: ModelSpec
    tokenizer: TokenizerSpec = TokenizerSpec()
    method: MethodSpec = MethodSpec()
    data: DataSpec
    training: TrainingSpec
    deepspeed: DeepSpeedSpec | None = None
    compute: ComputeSpec = ComputeSpec()
    cluster: ClusterSpec = ClusterSpec()
    storage: StorageSpec = StorageSpec()
    fault_tolerance: FaultTolerance = FaultTolerance()
    monitoring: Monitoring = Monitoring()
    tune: TuneSpec | None = Field(None, description="A sweep: Ray Tune runs one trial per sampled set of values.")
    env: dict[str, str | None] = Field(
        default_factory=dict,
        description="Worker env vars: a literal value, or null to forward the submitter's variable by name.",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(
                f"must be 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter "
                f"or digit (got {v!r})"
            )
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env_scalars(cls, v):
        """YAML reads `false` and `1` as bool/int; environment values are strings."""
        if isinstance(v, dict):
            return {k: (str(x).lower() if isinstance(x, bool) else str(x)) if isinstance(x, (bool, int, float)) else x
                    for k, x in v.items()}
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str | None]) -> dict[str, str | None]:
        for key, value in v.items():
            if not ENV_NAME_RE.fullmatch(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
            if value is not None and SECRETISH.search(key):
                raise ValueError(
                    f"{key} looks like a secret but has a literal value; write `{key}: null` to forward "
                    f"it from the submitting environment (its value is never written anywhere)"
                )
            if value is not None and looks_like_token(value):
                raise ValueError(
                    f"{key}'s value looks like a credential (it holds what looks like an API token or access "
                    f"key); "
                    f"put it in an environment variable and write `{key}: null` to forward it"
                )
            if value is not None and _CONTROL_RE.search(value):
                raise ValueError(f"{key}'s value holds a control character (a newline?); environment values "
                                 "are one line")
        return v

    @model_validator(mode="after")
    def _cross_rules(self) -> JobSpec:
        t, m, ds = self.training, self.method, self.deepspeed
        if m.type == "qlora" and m.quantization is not None:
            q = m.quantization
            if t.precision == "fp16" and q.compute_dtype == "bfloat16":
                raise ValueError(
                    "training.precision fp16 with method.quantization.compute_dtype bfloat16 mixes two "
                    "half types; use precision bf16, or compute_dtype float16"
                )
            if t.precision == "bf16" and q.compute_dtype == "float16":
                raise ValueError(
                    "training.precision bf16 with method.quantization.compute_dtype float16 mixes two "
                    "half types; use compute_dtype bfloat16"
                )
        if ds is not None and m.type == "qlora" and m.quantization is not None:
            if ds.stage == 3 and m.quantization.bits == 8:
                raise ValueError(
                    "deepspeed stage 3 cannot partition 8-bit bitsandbytes weights; use 4-bit QLoRA or ZeRO stage 2"
                )
            if ds.offload_params:
                raise ValueError(
                    "deepspeed.offload_params cannot move quantized (QLoRA) weights to CPU; "
                    "drop offload_params or use method.type lora"
                )
        if self.data.has_eval is False and t.eval_strategy != "no":
            raise ValueError(
                f"training.eval_strategy {t.eval_strategy} needs evaluation data: set data.eval or data.eval_split"
            )
        if self.model.init is not None and self.tokenizer.name_or_path is None and self.tokenizer.train is None:
            raise ValueError(
                "model.init builds a model from scratch, which has no tokenizer: set tokenizer.train "
                "(BPE trained on your data) or tokenizer.name_or_path"
            )
        if self.tokenizer.train is not None and m.type != "full":
            raise ValueError(
                "a freshly trained tokenizer changes the vocabulary, so the embeddings must train too: "
                "use method.type full with tokenizer.train"
            )
        pips = {"mlflow": ("mlflow", "mlflow-skinny", "raytune_ft[mlflow]"), "wandb": ("wandb", "raytune_ft[wandb]")}
        missing = [r for r in self.monitoring.report_to if r in pips and not _importable(r) and not self.cluster.image
                   and not any({n, n.split("[")[0]} & set(pips[r])
                               for n in (re.split(r"[=<>!~ ;]", p.strip())[0] for p in self.cluster.pip or []))]
        if missing:
            raise ValueError(
                f"monitoring.report_to names {', '.join(missing)}, which is not installed here (training would "
                f"silently report nothing): pip install 'raytune_ft[{','.join(missing)}]', or list it in "
                "cluster.pip, or run in a cluster.image that has it")
        if "mlflow" in self.monitoring.report_to and "MLFLOW_TRACKING_URI" not in self.env:
            raise ValueError("monitoring.report_to mlflow needs the tracking store: set env.MLFLOW_TRACKING_URI "
                             "(a literal such as sqlite:///mlflow.db or http://host:5000, or null to forward "
                             "yours)")
        if t.liger_kernel and not self.compute.use_gpu:
            raise ValueError("training.liger_kernel runs Triton GPU kernels: it needs compute.gpus_per_worker >= 1")
        if self.model.init is not None and m.type != "full":
            raise ValueError("model.init starts from random weights; LoRA on random weights is pointless: use method.type full")
        return self

    @model_validator(mode="after")
    def _tune_space(self) -> JobSpec:
        """Every swept path exists and every value it can take gives a valid spec (raytune_ft.sweep)."""
        if self.tune is not None:
            from raytune_ft.sweep import check_space

            check_space(self)
        return self

    @property
    def forwarded_env(self) -> list[str]:
        """Names of variables forwarded from the submitting environment (secrets travel this way)."""
        return sorted(k for k, v in self.env.items() if v is None)
