"""Load a resolved :class:`~raytune_ft.tools.source.Source` for inference: tokenizer, model (base + adapter
or the full model), device and dtype. Shared by generate, evaluate and merge.

Defaults: CPU runs in float32; on a GPU the dtype follows the run's ``training.precision`` (bf16/fp16),
float32 for fp32. A QLoRA adapter is loaded onto its base quantized the way the run trained it
(``method.quantization``), unless ``quantize=False`` (then unquantized, in ``dtype``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from raytune_ft import rundir as rd
from raytune_ft.errors import UserError
from raytune_ft.tools.source import Source

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Loaded:
    model: Any  # a PeftModel for adapters, else a PreTrainedModel
    tokenizer: Any
    device: Any
    dtype: Any
    quantized: bool = False
    notes: list[str] = field(default_factory=list)


def quiet_transformers() -> None:
    """No per-shard progress bars or info chatter in CLI output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def torch_dtype(name: str | None, src: Source | None = None, device: Any = None):
    """The torch dtype for ``name`` (one of :data:`DTYPES`), or the default for ``src`` on ``device``."""
    import torch

    if name is not None:
        if name not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)} (got {name!r})")
        return getattr(torch, name)
    if device is None or getattr(device, "type", "cpu") == "cpu":
        return torch.float32
    precision = src.spec.training.precision if src is not None and src.spec is not None else "bf16"
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_tokenizer(src: Source):
    from transformers import AutoTokenizer

    where = src.tokenizer_path
    if where is None:
        raise UserError(
            f"{src.origin}: no tokenizer files in {src.path} and no tokenizer or base model to take them from",
            hint="the run's final/ holds the tokenizer; point SOURCE at the run dir or at final/",
        )
    try:
        tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code(src))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer from {where}: {e}")
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def trust_remote_code(src: Source) -> bool:
    """The user's --trust-remote-code, never the stored spec's: a run whose spec asked for remote code is
    refused in one line until the user says so on the command line."""
    if src.trust_remote_code:
        return True
    if src.spec is not None and src.spec.model.trust_remote_code:
        raise UserError(
            f"{src.origin}: this run's spec has model.trust_remote_code: true, which rtf does not take from "
            "storage (whoever can write the run dir would choose what code runs here)",
            hint="pass --trust-remote-code if you trust the model's own Python code")
    return False


def _revision(src: Source, name: str | None) -> str | None:
    spec = src.spec
    if spec is not None and spec.model.revision and name == spec.model.name_or_path:
        return spec.model.revision
    return None


def load_pretrained(name: str, src: Source, *, dtype, device, quantization: Any = None, local_only: bool = False,
                    head: dict | None = None):
    """``AutoModelForCausalLM.from_pretrained`` with the run's settings; UserError when it cannot be loaded.
    ``head`` (a run's ``head.json``): the sequence-classification class with that head (regression, reward)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code(src))
    if head is not None:
        kwargs["num_labels"] = 1
    rev = _revision(src, name)
    if rev:
        kwargs["revision"] = rev
    if local_only:
        kwargs["local_files_only"] = True
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        auto = AutoModelForSequenceClassification if head is not None else AutoModelForCausalLM
        model = auto.from_pretrained(name, **kwargs)
        if head is not None:
            from raytune_ft.train.objectives import build_head

            model.score = build_head(head).to(dtype=dtype if dtype is not None else model.score.weight.dtype)
    except (OSError, ValueError) as e:
        where = "on this machine" if local_only or os.environ.get("HF_HUB_OFFLINE") else "locally or on the Hub"
        raise UserError(f"cannot load the model {name} {where}: {str(e).splitlines()[0]}")
    if quantization is None:
        model.to(device)
    model.eval()
    return model


def bnb_config(src: Source, dtype):
    """The BitsAndBytesConfig the run trained its QLoRA base with (training's own), computing in float32
    when the tools run in float32."""
    import torch

    from raytune_ft.train.modeling import quantization_config

    q = src.spec.method.quantization if src.spec is not None else None
    if q is None:
        return None
    return quantization_config(q, compute_dtype=torch.float32 if dtype == torch.float32 else None)


def load_model(
    src: Source,
    *,
    dtype: str | None = None,
    device: Any = None,
    quantize: bool | None = None,
    head: dict | None = None,
) -> Loaded:
    """Tokenizer and model for ``src``: base + adapter (a PeftModel) or the full model, in eval mode.

    ``quantize``: for a QLoRA adapter, load its base quantized as in training (``None``/``True``) or
    unquantized in ``dtype`` (``False``). Ignored for other sources. ``head``: the run's ``head.json`` (a
    regression or reward run): the scalar-head model, its head's weights loaded from ``head.safetensors``.
    """
    quiet_transformers()
    device = device or default_device()
    tdtype = torch_dtype(dtype, src, device)
    tok = load_tokenizer(src)
    notes: list[str] = []
    quantized = False
    if src.is_adapter:
        from peft import PeftModel

        qcfg = None
        if src.method == "qlora" and quantize is not False:
            qcfg = _usable_bnb(src, tdtype, notes)
        base = load_pretrained(src.base_model, src, dtype=tdtype, device=device, quantization=qcfg, head=head)
        quantized = qcfg is not None
        if quantized:
            notes.append(f"base {src.base_model} loaded quantized ({src.spec.method.quantization.bits}-bit) as in training")
        try:
            model = PeftModel.from_pretrained(base, src.path, is_trainable=False)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"cannot load the adapter {src.path} onto {src.base_model}: {str(e).splitlines()[0]}")
        model.eval()
    else:
        model = load_pretrained(src.path, src, dtype=tdtype, device=device, head=head)
    if head is not None:
        _load_head(model, src, device)
    _check_vocab(model, tok, src)
    return Loaded(model=model, tokenizer=tok, device=device, dtype=tdtype, quantized=quantized, notes=notes)


def _load_head(model: Any, src: Source, device: Any) -> None:
    """The head's own weights (``head.safetensors``, beside the adapter or model) into the loaded head."""
    from safetensors.torch import load_file

    from raytune_ft.train.objectives import head_module

    path = os.path.join(src.path, rd.HEAD_WEIGHTS)
    if not os.path.exists(path):
        raise UserError(f"{src.origin}: no {rd.HEAD_WEIGHTS} beside the model (not a regression or reward run)")
    head = head_module(model)
    state = load_file(path)
    try:
        head.load_state_dict({k: v.to(next(head.parameters()).dtype) for k, v in state.items()})
    except RuntimeError as e:
        raise UserError(f"{src.origin}: {rd.HEAD_WEIGHTS} does not fit the head of {rd.HEAD_CONFIG}: "
                        f"{str(e).splitlines()[0]}")
    model.to(device)
    model.eval()


def _usable_bnb(src: Source, dtype, notes: list[str]):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        notes.append("bitsandbytes is not installed: the QLoRA base is loaded unquantized (outputs differ slightly)")
        return None
    return bnb_config(src, dtype)


def _check_vocab(model, tok, src: Source) -> None:
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tok) > n_emb:
        raise UserError(
            f"the tokenizer ({len(tok)} tokens, from {src.tokenizer_path}) does not fit the model "
            f"({n_emb} embeddings): they are not from the same run"
        )


def load_base_for_full(src: Source, *, dtype, device):
    """The pretrained model a full fine-tune started from, if it is on this machine.

    Returns ``(model, None)`` or ``(None, reason)``; never downloads.
    """
    if src.from_scratch:
        return None, "the run trained its model from scratch (model.init): there is no base model to compare with"
    if not src.base_model:
        return None, f"no base model is known for this model (no {rd.SPEC} with model.name_or_path next to it)"
    try:
        return load_pretrained(src.base_model, src, dtype=dtype, device=device, local_only=True), None
    except UserError as e:
        return None, f"base model not available locally: {e}"
