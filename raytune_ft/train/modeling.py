"""Model and tokenizer: load or build, quantize, wrap with PEFT, choose the attention kernel.

Every choice that is not spelled out in the spec is logged with its reason, so a run's log says
which attention kernel and which dtype it actually used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

import torch

from raytune_ft.errors import UserError
from raytune_ft.spec.models import JobSpec, QuantizationSpec

log = logging.getLogger("raytune_ft")

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_token() -> str | None:
    """The hub token, read from the environment where it is used (never from the spec)."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def flex_available() -> bool:
    """PyTorch's flex_attention (torch >= 2.5) is importable; on a GPU Triton compiles its kernels."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def choose_attention(requested: str, *, cuda: bool, model_class: Any = None, packed: bool = False) -> tuple[str, str]:
    """(implementation, why). ``auto``: flash_attention_2 when importable on a GPU, else sdpa (rtf_packed_sdpa
    for packed rows on CPU, below), else eager.
    ``flex_attention`` only when the spec asks for it (a GPU, torch >= 2.5).

    Why auto does not pick flex_attention for packed rows, although it skips the blocks between examples
    that SDPA's dense mask cannot: measured on an H200 (2026-11-28, bench/RESULTS.md), rtf's LoRA run on
    packed rows of 1024 trained at 16,480 tokens/s with flex_attention and 29,681 with SDPA, at the same
    loss; the isolated forward+backward was 1.06x SDPA, so the cost is in building the BlockMask and the
    compiled kernels each step. Longer rows may turn this around; ask for flex_attention to try it.

    ``auto`` on CPU for packed rows of a model class known to pass ``position_ids`` to its attention:
    ``rtf_packed_sdpa`` (:mod:`raytune_ft.train.attention`), SDPA run per example, so a packed row costs the sum of
    its examples' squared lengths instead of a masked row length squared (bench/packed_attention.py, one thread: the
    forward+backward of a packed batch 1.03-1.12x faster than ``sdpa`` on rows of 256, 1.3x on rows of 1024,
    2.0x on rows of 2048). Only on CPU: on a GPU flash-attention's
    varlen kernel already does this, and the per-example loop was not measured there."""
    flash = importlib.util.find_spec("flash_attn") is not None
    sdpa_ok = model_class is None or getattr(model_class, "_supports_sdpa", True)
    flex_ok = model_class is None or getattr(model_class, "_supports_flex_attn", False)
    if requested == "flash_attention_2":
        if not cuda:
            raise UserError("model.attn_implementation flash_attention_2 needs a CUDA GPU; use auto or sdpa")
        if not flash:
            raise UserError("model.attn_implementation flash_attention_2 needs the flash-attn package "
                            "(pip install 'raytune_ft[gpu]'); use auto or sdpa")
        return requested, "asked for in the spec"
    if requested == "flex_attention":
        if not cuda:
            raise UserError("model.attn_implementation flex_attention needs a CUDA GPU (it has no CPU "
                            "backward); use auto or sdpa")
        if not (flex_available() and flex_ok):
            raise UserError("model.attn_implementation flex_attention needs torch >= 2.5 and a model class "
                            "that supports it; use auto or sdpa")
        return requested, "asked for in the spec" + (" (block-diagonal BlockMask for packed rows)" if packed else "")
    if requested in ("sdpa", "eager"):
        return requested, "asked for in the spec"
    if cuda and flash:
        return "flash_attention_2", "auto: flash-attn is installed and a GPU is present"
    if sdpa_ok and packed and not cuda and _passes_position_ids(model_class):
        from raytune_ft.train.attention import NAME

        return NAME, "auto: no GPU, packed rows: PyTorch SDPA run per example, not over a masked row"
    if sdpa_ok:
        why = "no GPU" if not cuda else "flash-attn is not installed"
        return "sdpa", f"auto: {why}, PyTorch SDPA is available"
    return "eager", "auto: this model class supports neither flash-attn nor SDPA"


def _passes_position_ids(model_class: Any) -> bool:
    from raytune_ft.train.attention import MODEL_TYPES

    return getattr(getattr(model_class, "config_class", None), "model_type", None) in MODEL_TYPES


def load_dtype(spec: JobSpec) -> torch.dtype:
    """``model.dtype`` or, for ``auto``: 16-bit base weights for LoRA/QLoRA under bf16/fp16 training
    (adapters stay fp32), fp32 weights for full fine-tuning (mixed precision autocasts the compute)."""
    if spec.model.dtype != "auto":
        return TORCH_DTYPES[spec.model.dtype]
    prec = spec.training.precision
    if spec.method.type != "full" and prec in ("bf16", "fp16"):
        return torch.bfloat16 if prec == "bf16" else torch.float16
    return torch.float32


def build_config(spec: JobSpec, tokenizer: Any) -> Any:
    """A transformers config for ``model.init`` (no download)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    i = spec.model.init
    assert i is not None
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[i.arch]
    return cls(
        vocab_size=i.vocab_size or len(tokenizer),
        hidden_size=i.hidden_size,
        intermediate_size=i.intermediate_size,
        num_hidden_layers=i.num_layers,
        num_attention_heads=i.num_heads,
        num_key_value_heads=i.num_kv_heads or i.num_heads,
        max_position_embeddings=i.max_position_embeddings,
        tie_word_embeddings=i.tie_word_embeddings,
        rope_theta=i.rope_theta,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _class_for(config: Any) -> Any:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)


def quantization_config(quant: QuantizationSpec, *, compute_dtype: torch.dtype | None = None) -> Any:
    """The ``BitsAndBytesConfig`` of ``method.quantization``: training loads its QLoRA base with it, and the
    tools (:mod:`raytune_ft.tools.loading`) load that base the same way; ``compute_dtype`` overrides the
    compute dtype there (float32 on CPU)."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = TORCH_DTYPES[quant.compute_dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype or compute,
        bnb_4bit_quant_storage=compute,  # lets ZeRO-3 shard the 4-bit weights like any other tensor
    )


def build_model(spec: JobSpec, tokenizer: Any, *, device: torch.device, seed: int) -> tuple[Any, dict[str, str]]:
    """The model, ready for the method (not yet wrapped), and what was chosen and why."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    m = spec.model
    head = spec.method.objective in ("regression", "reward")  # a scalar head (raytune_ft.train.objectives)
    auto = AutoModelForSequenceClassification if head else AutoModelForCausalLM
    head_kwargs: dict[str, Any] = {"num_labels": 1} if head else {}
    cuda = device.type == "cuda"
    dtype = load_dtype(spec)
    chosen: dict[str, str] = {"dtype": str(dtype).replace("torch.", "")}
    from raytune_ft.train.attention import register

    register()  # rtf_packed_sdpa is one of transformers' attention implementations from here on
    if m.init is not None:
        config = build_config(spec, tokenizer)
        attn, why = choose_attention(m.attn_implementation, cuda=cuda, packed=spec.data.packing,
                                     model_class=_class_for(config))
        config._attn_implementation = attn
        torch.manual_seed(seed)
        config.num_labels = 1 if head else config.num_labels
        model = auto.from_config(config, dtype=dtype)
        chosen["source"] = f"built from model.init ({m.init.arch})"
    else:
        kwargs: dict[str, Any] = dict(
            revision=m.revision, trust_remote_code=m.trust_remote_code, token=hf_token(), dtype=dtype,
        )
        try:
            cfg = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision,
                                             trust_remote_code=m.trust_remote_code, token=hf_token())
        except OSError as e:
            raise UserError(f"model.name_or_path {m.name_or_path}: cannot load its config ({e})")
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(cfg), None)
        attn, why = choose_attention(m.attn_implementation, cuda=cuda, model_class=model_class,
                                     packed=spec.data.packing)
        kwargs["attn_implementation"] = attn
        if spec.method.type == "qlora":
            assert spec.method.quantization is not None
            kwargs["quantization_config"] = quantization_config(spec.method.quantization)
            if cuda:
                kwargs["device_map"] = {"": device.index or 0}
        if head:
            torch.manual_seed(seed)  # a new head's initial weights
        model = auto.from_pretrained(m.name_or_path, **kwargs, **head_kwargs)
        chosen["source"] = f"pretrained {m.name_or_path}"
    chosen["attention"] = f"{attn} ({why})"
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
        chosen["embeddings"] = f"resized to the tokenizer's {len(tokenizer)} tokens"
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, chosen


def apply_method(model: Any, spec: JobSpec, *, wrap: bool = True) -> Any:
    """Wrap with LoRA (every ``method.lora`` option) or prepare a quantized base for QLoRA. ``wrap=False``:
    only the preparation (a trainer that applies :func:`lora_config` itself, as TRL's DPO does)."""
    if spec.method.type == "full":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if spec.method.type == "qlora":
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=spec.training.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    if not wrap:
        return model
    # the adapter's initial weights (LoRA's A is random) from the run's seed, whatever drew from torch's
    # generator before: the same spec starts from the same adapter in every process
    torch.manual_seed(spec.training.seed)
    try:
        return get_peft_model(model, lora_config(spec))
    except ValueError as e:
        raise UserError(f"method.lora: {e}")


def lora_config(spec: JobSpec) -> Any:
    """PEFT's ``LoraConfig`` of ``method.lora``; a scalar-head objective trains (and saves) its ``score`` head
    whole (PEFT's SEQ_CLS task adds it to ``modules_to_save``)."""
    from peft import LoraConfig

    lora = spec.method.lora_or_default
    assert lora is not None
    head = spec.method.objective in ("regression", "reward")
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
        layers_to_transform=lora.layers_to_transform,
        task_type="SEQ_CLS" if head else "CAUSAL_LM",
    )


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total). 4-bit weights count by their logical size, as PEFT reports them."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
