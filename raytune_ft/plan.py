"""Spec → Plan: everything the run will use, resolved and printable, before anything starts.

Pure: no torch, no ray. The memory estimate is arithmetic on the architecture, the method, the
precision, ZeRO stage and gradient checkpointing; it is documented in ``memory_estimate`` so a
user can check it by hand.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raytune_ft import rundir
from raytune_ft.spec import dump_spec, spec_hash
from raytune_ft.spec.models import JobSpec

GIB = 1024**3

# Usable memory (GiB) by accelerator. Keys are what users write in compute.accelerator_type.
ACCELERATOR_MEMORY_GIB: dict[str, float] = {
    "A100-40G": 40,
    "A100-80G": 80,
    "A100": 80,
    "H100": 80,
    "H100-80G": 80,
    "H100-NVL": 94,
    "H200": 141,
    "B200": 180,
    "A40": 48,
    "L40S": 48,
    "L40": 48,
    "A10G": 24,
    "A10": 24,
    "L4": 24,
    "RTX4090": 24,
    "RTX3090": 24,
    "RTX-A6000": 48,
    "V100-16G": 16,
    "V100-32G": 32,
    "T4": 16,
}

# Ray's accelerator_type resource names for the ones Ray knows; others are passed unchanged.
RAY_ACCELERATOR = {"A100-40G": "A100-40G", "A100-80G": "A100-80G", "H100-80G": "H100", "V100-16G": "V100"}

# Architecture shapes of popular hub models, so `rtf plan` works offline for them (from their configs).
KNOWN_ARCHS: dict[str, dict[str, int]] = {
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv=8, inter=8192, vocab=128256, tied=1),
    "llama-3.2-3b": dict(hidden=3072, layers=28, heads=24, kv=8, inter=8192, vocab=128256, tied=1),
    "llama-3.1-8b": dict(hidden=4096, layers=32, heads=32, kv=8, inter=14336, vocab=128256, tied=0),
    "llama-3-8b": dict(hidden=4096, layers=32, heads=32, kv=8, inter=14336, vocab=128256, tied=0),
    "llama-3.1-70b": dict(hidden=8192, layers=80, heads=64, kv=8, inter=28672, vocab=128256, tied=0),
    "llama-3.3-70b": dict(hidden=8192, layers=80, heads=64, kv=8, inter=28672, vocab=128256, tied=0),
    "mistral-7b": dict(hidden=4096, layers=32, heads=32, kv=8, inter=14336, vocab=32768, tied=0),
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151936, tied=1),
    "qwen2.5-1.5b": dict(hidden=1536, layers=28, heads=12, kv=2, inter=8960, vocab=151936, tied=1),
    "qwen2.5-7b": dict(hidden=3584, layers=28, heads=28, kv=4, inter=18944, vocab=152064, tied=0),
    "qwen2.5-14b": dict(hidden=5120, layers=48, heads=40, kv=8, inter=13824, vocab=152064, tied=0),
    "qwen2.5-32b": dict(hidden=5120, layers=64, heads=40, kv=8, inter=27648, vocab=152064, tied=0),
}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOGIT_BYTES = 12  # per token per vocab entry at the loss: 16-bit logits + fp32 copy + fp32 log-softmax


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv: int
    inter: int
    vocab: int
    tied: bool
    source: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder linear, named as in HF Llama/Mistral/Qwen2."""
        kvd = self.kv * self.head_dim
        return {
            "q_proj": (self.hidden, self.hidden),
            "k_proj": (self.hidden, kvd),
            "v_proj": (self.hidden, kvd),
            "o_proj": (self.hidden, self.hidden),
            "gate_proj": (self.hidden, self.inter),
            "up_proj": (self.hidden, self.inter),
            "down_proj": (self.inter, self.hidden),
        }

    @property
    def linear_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.linear_params + self.embed_params + norms


def cached_config(repo_id: str, revision: str | None = None) -> Path | None:
    """A hub model's config.json from the local Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or
    ~/.cache/huggingface/hub), without any network: the snapshot of ``revision`` (a branch or commit),
    else of ``main``, else any snapshot."""
    import os

    if "/" not in repo_id or repo_id.startswith(("/", ".")):
        return None
    root = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface"), "hub")
    repo = Path(root) / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else (revision or "")
    if commit and (repo / "snapshots" / commit / "config.json").is_file():
        return repo / "snapshots" / commit / "config.json"
    found = sorted((repo / "snapshots").glob("*/config.json")) if (repo / "snapshots").is_dir() else []
    return found[0] if found else None


def resolve_arch(spec: JobSpec) -> Arch | None:
    """The model's shape: model.init, a local config.json, the HF cache's, a known hub id, or (only for an
    unknown id, and not offline) its config.json from the Hub with a short timeout."""
    m = spec.model
    if m.init is not None:
        i = m.init
        vocab = i.vocab_size or (spec.tokenizer.train.vocab_size if spec.tokenizer.train else 32000)
        return Arch(i.hidden_size, i.num_layers, i.num_heads, i.num_kv_heads or i.num_heads,
                    i.intermediate_size, vocab, i.tie_word_embeddings, "model.init")
    assert m.name_or_path is not None
    cfg_path = Path(m.name_or_path) / "config.json"
    if not cfg_path.is_file():
        cfg_path = cached_config(m.name_or_path, m.revision) or cfg_path
    if cfg_path.is_file():
        return _arch_from_config(cfg_path)
    key = m.name_or_path.lower().split("/")[-1]
    key = re.sub(r"-(instruct|chat|hf|base|it)$", "", key)
    key = key.replace("meta-llama-", "llama-")
    for name, a in KNOWN_ARCHS.items():
        if key == name or key.startswith(name + "-"):
            return Arch(a["hidden"], a["layers"], a["heads"], a["kv"], a["inter"], a["vocab"], bool(a["tied"]),
                        f"known shape of {name}")
    fetched = fetch_config(m.name_or_path, m.revision)
    return _arch_from_config(fetched) if fetched is not None else None


HUB_TIMEOUT_S = 5.0
_hub_misses: dict[tuple[str, str | None], str] = {}  # (id, revision) -> why its config could not be fetched


def fetch_config(repo_id: str, revision: str | None = None) -> Path | None:
    """A hub model's config.json fetched into the HF cache, when the Hub answers within HUB_TIMEOUT_S.

    huggingface_hub's own download retries unreachable hosts for about 25 s before it gives up, too long for
    `rtf plan`: one metadata request with a short timeout and no retries decides first (the gap this fills).
    Offline (HF_HUB_OFFLINE) nothing is tried. Why it failed is kept for the plan's note (``hub_miss``)."""
    key = (repo_id, revision)
    if key in _hub_misses or "/" not in repo_id or repo_id.startswith(("/", ".")):
        return None
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url

    if constants.is_offline_mode():
        _hub_misses[key] = "offline mode is on (HF_HUB_OFFLINE)"
        return None
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision), timeout=HUB_TIMEOUT_S)
        return Path(hf_hub_download(repo_id, "config.json", revision=revision, etag_timeout=HUB_TIMEOUT_S))
    except Exception as e:  # unreachable, timed out, gated, not found: the plan says which and goes on
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        _hub_misses[key] = f"the Hub at {constants.ENDPOINT} did not give its config.json ({text})"
        return None


def hub_miss(repo_id: str | None, revision: str | None = None) -> str | None:
    return _hub_misses.get((repo_id or "", revision))


def _unknown_arch_note(name: str | None, revision: str | None) -> str:
    miss = hub_miss(name, revision)
    return (f"architecture of {name} unknown: not a local dir, not in the Hugging Face cache, not a known hub id"
            + (f", and {miss}" if miss else "") + f"; download its config once (hf download {name} config.json) "
            "or give a local dir")


def _arch_from_config(cfg_path: Path) -> Arch | None:
    try:
        c = json.loads(cfg_path.read_text())
        heads = c["num_attention_heads"]
        return Arch(c["hidden_size"], c["num_hidden_layers"], heads, c.get("num_key_value_heads") or heads,
                    c["intermediate_size"], c["vocab_size"], bool(c.get("tie_word_embeddings", False)),
                    str(cfg_path))
    except (KeyError, ValueError, TypeError, OSError):
        return None


# --------------------------------------------------------------------------- DeepSpeed


def deepspeed_config(spec: JobSpec) -> dict[str, Any] | None:
    """The DeepSpeed dict handed to HF TrainingArguments, or None without DeepSpeed.

    'auto' values are filled by HF Trainer from TrainingArguments, so batch sizes, LR and precision
    are never specified twice.
    """
    ds = spec.deepspeed
    if ds is None:
        return None
    if ds.config is not None:
        try:
            return json.loads(Path(ds.config).read_text())
        except FileNotFoundError:
            from raytune_ft.errors import UserError

            raise UserError(f"deepspeed.config: file not found: {ds.config}")
        except ValueError as e:
            from raytune_ft.errors import UserError

            raise UserError(f"deepspeed.config: {ds.config} is not valid JSON: {e}")
    prec = spec.training.precision
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.stage >= 1:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size="auto")
    if ds.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------- memory


@dataclass
class MemoryEstimate:
    """Per-GPU bytes. ``known`` is False when the architecture could not be resolved offline."""

    known: bool
    total_params: int = 0
    trainable_params: int = 0
    weights: float = 0
    gradients: float = 0
    optimizer: float = 0
    activations: float = 0
    overhead: float = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    def gib(self) -> dict[str, float]:
        keys = ("weights", "gradients", "optimizer", "activations", "overhead", "total")
        return {k: round(getattr(self, k) / GIB, 2) for k in keys}


def lora_trainable(arch: Arch, spec: JobSpec) -> int:
    lora = spec.method.lora_or_default
    assert lora is not None
    shapes = arch.linear_shapes()
    targets = list(shapes) if lora.target_modules == "all-linear" else [t for t in lora.target_modules if t in shapes]
    layers = len(lora.layers_to_transform) if lora.layers_to_transform else arch.layers
    per_layer = sum(lora.r * (shapes[t][0] + shapes[t][1]) for t in targets)
    return per_layer * layers


def optimizer_bytes_per_param(optimizer: str) -> float:
    if "8bit" in optimizer:
        return 2.0
    if optimizer == "sgd":
        return 0.0
    if optimizer == "adafactor":
        return 0.1  # factored second moment, no first moment by default
    if optimizer.startswith("lion") or "lion" in optimizer:
        return 4.0
    return 8.0  # AdamW: two fp32 moments


def memory_estimate(spec: JobSpec, arch: Arch | None = None) -> MemoryEstimate:
    """Per-GPU memory by component.

    - weights: params × bytes of the load dtype (fp32 for precision fp32, else 2 bytes); QLoRA 4-bit is
      0.5 byte/param for the quantized linears (+ ~3% for quantization constants), 8-bit 1 byte/param;
      embeddings and norms stay in the compute dtype. ZeRO-3 divides by the world size; offload_params → 0.
    - gradients: trainable params × 4 bytes (fp32 grads for LoRA adapters and mixed precision master
      copies), ZeRO-2/3 divide by world size.
    - optimizer: trainable × bytes/param of the optimizer (AdamW 8, 8-bit 2) plus an fp32 master copy
      (4) for full fine-tuning in bf16/fp16; ZeRO-1+ divides by world size; offload_optimizer → 0.
    - activations: per layer, per token, (24·h + 8·I) bytes in 16-bit for a Llama-style layer with a
      gated MLP of width I: the saved inputs of q/k/v/o and the attention output (~12·h), RMSNorm's
      fp32 inputs (2 × 6·h), and gate, up, SiLU(gate) and their product (4 × 2·I). Korthikanti et al.'s
      34·h assumes a 4h GeLU MLP and undercounted this one by ~45% on the first GPU check (H200,
      2026-11-28). With gradient checkpointing only each layer's input (2·h bytes) is kept plus one
      layer's full activations. Plus the logits: 12 bytes × vocab per token (the 16-bit logits, their
      fp32 copy for the loss and the fp32 log-softmax the loss keeps for its backward), the term that
      dominates small models with large vocabularies (Liger's fused cross-entropy removes it).
      Checked on that GPU for a 1B-shaped model: LoRA 0.99×, QLoRA with checkpointing 0.95×, full
      with checkpointing 0.87-1.04× (plain, ZeRO-2, ZeRO-3) of the measured peak.
    - overhead: CUDA context, allocator fragmentation, kernels: 1.5 GiB.
    """
    arch = arch or resolve_arch(spec)
    est = MemoryEstimate(known=arch is not None)
    if arch is None:
        est.notes.append(_unknown_arch_note(spec.model.name_or_path, spec.model.revision))
        return est
    t, m, ds = spec.training, spec.method, spec.deepspeed
    world = max(1, spec.compute.num_workers)
    stage = ds.stage if ds and ds.config is None else 0
    half = 4 if t.precision == "fp32" else 2
    load_bytes = DTYPE_BYTES.get(spec.model.dtype, half)
    est.total_params = arch.params
    non_linear = arch.params - arch.linear_params
    if m.type == "qlora":
        q = m.quantization
        assert q is not None
        qb = 0.5 * 1.03 if q.bits == 4 else 1.0 * 1.01
        weights = arch.linear_params * qb + non_linear * DTYPE_BYTES[q.compute_dtype]
        est.notes.append(f"base linears quantized to {q.bits}-bit")
    else:
        weights = arch.params * load_bytes
    if m.type == "full":
        trainable = arch.params
    else:
        trainable = lora_trainable(arch, spec)
    est.trainable_params = trainable
    grads = trainable * (load_bytes if m.type == "full" else 4)
    master = 4 if (m.type == "full" and load_bytes == 2) else 0
    optim = trainable * (optimizer_bytes_per_param(t.optimizer) + master)

    if stage >= 1:
        optim /= world
    if stage >= 2:
        grads /= world
    if stage == 3:
        weights /= world
    if ds and ds.offload_optimizer:
        optim = 0
        est.notes.append("optimizer states offloaded to CPU")
    if ds and ds.offload_params:
        weights = 0
        est.notes.append("parameters offloaded to CPU")

    seq = spec.data.max_seq_length or 2048
    tokens = t.per_device_train_batch_size * seq
    act_bytes = 2 if t.precision != "fp32" else 4
    per_layer_full = (24 * arch.hidden + 8 * arch.inter) * tokens * act_bytes / 2
    if t.gradient_checkpointing:
        acts = arch.layers * 2 * arch.hidden * tokens * act_bytes / 2 + per_layer_full
        est.notes.append("gradient checkpointing: only layer inputs kept")
    else:
        acts = arch.layers * per_layer_full
    if t.liger_kernel:  # fused linear cross-entropy: the logits are never materialised whole
        est.notes.append("Liger kernels: no full logits at the loss")
    else:
        acts += tokens * arch.vocab * LOGIT_BYTES
    if seq == 2048 and spec.data.max_seq_length is None:
        est.notes.append("data.max_seq_length unset: activations estimated at 2048 tokens")
    est.weights, est.gradients, est.optimizer, est.activations = weights, grads, optim, acts
    _objective_memory(spec, arch, est, load_bytes, stage, world, tokens)
    est.overhead = 1.5 * GIB if spec.compute.use_gpu else 0.5 * GIB
    return est


def head_params(spec: JobSpec, hidden: int) -> int:
    """Parameters of the objective's head: regression's MLP (method.head), reward's linear score, else 0."""
    obj = spec.method.objective
    if obj == "reward":
        return hidden
    if obj != "regression":
        return 0
    h = spec.method.head
    depth, width = (h.depth, h.width or hidden) if h else (2, hidden)
    if depth == 1:
        return hidden + 1
    return hidden * width + width + (depth - 2) * (width * width + width) + width + 1


def _objective_memory(spec: JobSpec, arch: Arch, est: MemoryEstimate, load_bytes: int, stage: int, world: int,
                      tokens: int) -> None:
    """What ``method.objective`` changes: a scalar head replaces the LM head (no vocabulary logits; the head
    trains in fp32); preference pairs run chosen and rejected in one batch (twice the activations); DPO under
    full fine-tuning holds a frozen reference copy of the weights (under LoRA the reference is the base with
    the adapter disabled: no copy)."""
    obj = spec.method.objective
    if obj == "sft":
        return
    if obj in ("regression", "reward"):
        n = head_params(spec, arch.hidden)
        lm_head = 0 if arch.tied else arch.vocab * arch.hidden
        est.weights += n * 4 - lm_head * (est.weights / max(arch.params, 1))
        est.gradients += n * 4
        est.optimizer += n * (optimizer_bytes_per_param(spec.training.optimizer))
        est.trainable_params += n
        est.total_params += n - lm_head
        if not spec.training.liger_kernel:
            est.activations -= tokens * arch.vocab * LOGIT_BYTES
        est.notes.append(f"{obj}: a {human_count(n)}-parameter head instead of the LM head (no vocabulary logits)")
    if obj in ("reward", "dpo", "orpo"):
        est.activations *= 2
        est.notes.append(f"{obj}: chosen and rejected run together (twice the activations of the batch)")
    if obj == "dpo" and spec.method.type == "full":
        ref = arch.params * load_bytes / (world if stage == 3 else 1)
        est.weights += ref
        est.notes.append("dpo: a frozen reference copy of the model (full fine-tuning)")
    elif obj == "dpo":
        est.notes.append("dpo: the reference is the base with the adapter disabled (no copy)")


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    name: str
    spec_hash: str
    run_uri: str
    spec: dict[str, Any]
    method: str
    num_workers: int
    resources_per_worker: dict[str, float]
    use_gpu: bool
    placement_strategy: str
    accelerator_type: str | None
    global_batch_size: int
    tokens_per_step: int | None
    deepspeed: dict[str, Any] | None
    memory: MemoryEstimate
    accelerator_memory_gib: float | None
    warnings: list[str]
    min_workers: int | None = None  # elastic workers: as few as this (num_workers is the most)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["memory"] = {**self.memory.gib(), "known": self.memory.known,
                       "total_params": self.memory.total_params,
                       "trainable_params": self.memory.trainable_params, "notes": self.memory.notes}
        return d


PLACEMENT = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD", "strict_pack": "STRICT_PACK"}


def run_uri(spec: JobSpec) -> str:
    return rundir.run_uri(spec.storage.path, spec.name)


def memory_remedies(spec: JobSpec) -> list[str]:
    """What would lower memory and is not on yet, in order of effect for a typical fine-tune."""
    t, m, ds, c = spec.training, spec.method, spec.deepspeed, spec.compute
    out = []
    if not t.gradient_checkpointing:
        out.append("enable training.gradient_checkpointing")
    if not t.liger_kernel and c.use_gpu:
        out.append("enable training.liger_kernel (no full logits at the loss)")
    if t.per_device_train_batch_size > 1:
        out.append("lower per_device_train_batch_size (raise gradient_accumulation_steps to keep the global batch)")
    stage = ds.stage if ds else 0
    if m.type == "full" and c.num_workers > 1 and stage < 3:
        out.append(f"a higher ZeRO stage (deepspeed.stage {stage} -> {2 if stage < 2 else 3})")
    if m.type == "full" and not (ds and ds.offload_optimizer):
        out.append("deepspeed.offload_optimizer")
    if m.type == "lora":
        out.append("method.type qlora (4-bit base)")
    out.append("a shorter data.max_seq_length")
    return out


PLACEHOLDER_BUCKETS = frozenset({"my-bucket", "your-bucket", "example-bucket", "bucket"})
_PLACEHOLDER_WORD = re.compile(r"<[^<>]+>|\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b")  # <account>, ACCOUNT_ID, YOUR_BUCKET


def placeholders(spec: JobSpec) -> list[str]:
    """Storage and data locations still holding a preset's placeholder (``s3://my-bucket/…``,
    ``https://ACCOUNT_ID.r2…``), each as ``field value``: they are to be replaced, not checked."""
    fields: list[tuple[str, str | None]] = [("storage.path", str(spec.storage.path)),
                                            ("storage.endpoint_url", spec.storage.endpoint_url)]
    for key, sources in (("train", spec.data.train_sources), ("eval", spec.data.eval_sources)):
        fields += [(f"data.{key}" + (f"[{i}]" if len(sources) > 1 else "") + ".path", s.path)
                   for i, s in enumerate(sources)]
    out = []
    for name, value in fields:
        if not value or "://" not in value:
            continue
        host = value.split("://", 1)[1].split("/", 1)[0]
        if (value.startswith("s3://") and host.lower() in PLACEHOLDER_BUCKETS) or _PLACEHOLDER_WORD.search(host):
            out.append(f"{name} {value}")
    return out


def make_plan(spec: JobSpec) -> Plan:
    c, t = spec.compute, spec.training
    warnings: list[str] = []
    gbs = t.per_device_train_batch_size * spec.accumulation_steps * c.num_workers
    tps = gbs * spec.data.max_seq_length if spec.data.max_seq_length else None
    resources = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    mem = memory_estimate(spec)
    acc_mem = None
    if c.accelerator_type:
        acc_mem = ACCELERATOR_MEMORY_GIB.get(c.accelerator_type)
        if acc_mem is None:
            warnings.append(
                f"compute.accelerator_type {c.accelerator_type} has no known memory size; "
                f"known: {', '.join(ACCELERATOR_MEMORY_GIB)}"
            )
        if acc_mem is not None and mem.known and mem.total / GIB > acc_mem:
            warnings.append(
                f"estimated {mem.total / GIB:.1f} GiB per GPU exceeds the {acc_mem:g} GiB of a {c.accelerator_type}: "
                + ", ".join(memory_remedies(spec)) + " (`rtf plan --fit` proposes the smallest change)"
            )
    if spec.deepspeed and spec.deepspeed.stage > 0 and c.num_workers == 1 and not (
        spec.deepspeed.offload_optimizer or spec.deepspeed.offload_params
    ):
        warnings.append("ZeRO shards across workers: with one worker and no offload it saves no memory")
    if c.use_gpu and t.precision == "fp32":
        warnings.append("training.precision fp32 on GPUs is slow; bf16 is the usual choice on Ampere and newer")
    if not c.use_gpu and t.precision != "fp32":
        warnings.append(f"training.precision {t.precision} without GPUs runs slow CPU autocast; fp32 is faster on CPU")
    if spec.method.type == "qlora" and not c.use_gpu:
        warnings.append("QLoRA without GPUs runs bitsandbytes' CPU kernels: fine for tests, slow for real runs")
    return Plan(
        name=spec.name,
        spec_hash=spec_hash(spec),
        run_uri=run_uri(spec),
        spec=dump_spec(spec),
        method=spec.method.type,
        num_workers=c.num_workers,
        resources_per_worker=resources,
        use_gpu=c.use_gpu,
        placement_strategy=PLACEMENT[c.placement],
        accelerator_type=RAY_ACCELERATOR.get(c.accelerator_type, c.accelerator_type) if c.accelerator_type else None,
        global_batch_size=gbs,
        tokens_per_step=tps,
        deepspeed=deepspeed_config(spec),
        memory=mem,
        accelerator_memory_gib=acc_mem,
        warnings=warnings,
        min_workers=c.min_workers if c.elastic else None,
    )


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


__all__ = ["Plan", "make_plan", "memory_estimate", "deepspeed_config", "resolve_arch", "Arch",
           "ACCELERATOR_MEMORY_GIB", "human_count", "run_uri"]
