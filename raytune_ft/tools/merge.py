"""``rtf merge``: fold a LoRA adapter into its base model and write a plain model directory.

The base is loaded unquantized in ``dtype`` on the CPU, the adapter put on it and merged with peft's
``merge_and_unload``; the result (safetensors), the tokenizer and the run's ``rtf_spec.yaml`` (so
``rtf generate OUT_DIR`` formats prompts as training did) are written to a temporary sibling of
``OUT_DIR`` that is renamed into place when complete. ``OUT_DIR`` may be an s3:// URI (uploaded at the end).

QLoRA: the adapter was trained against a 4/8-bit quantized base. Merging needs real weights, so the base
is loaded *unquantized* (a base saved pre-quantized is dequantized) and the merged model is a plain model
in ``dtype``. Its outputs differ slightly from the quantized base + adapter that training saw; the result
says so.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from typing import Any

from raytune_ft import rundir as rd
from raytune_ft import storage as st
from raytune_ft.errors import UserError
from raytune_ft.tools.loading import load_tokenizer, quiet_transformers, torch_dtype
from raytune_ft.tools.source import MODEL_CONFIG, Source, resolve_source

MERGE_INFO = "rtf_merge.json"


def merge(source: str | Source, out_dir: str, dtype: str = "float32", *, overwrite: bool = False) -> dict[str, Any]:
    """Merge the adapter of ``source`` into its base and save the model to ``out_dir``.

    Returns ``{"out_dir", "base", "adapter", "dtype", "dequantized", "messages"}``. A source that is
    already a full model raises :class:`UserError` (nothing to merge).
    """
    out_dir = str(out_dir)
    tdtype = torch_dtype(dtype)  # validates dtype before any loading
    src = source if isinstance(source, Source) else resolve_source(source)
    if not src.is_adapter:
        raise UserError(
            f"{src.describe()} is a full model (method {src.method}): there is no adapter, so nothing to merge",
            hint="use it directly: `rtf generate` and `from_pretrained` load it as it is",
        )
    remote_out = out_dir if st.is_s3(out_dir) else None
    local_out = None if remote_out else st.local_path(out_dir)
    if local_out is not None:
        if os.path.abspath(local_out) in (os.path.abspath(src.path), os.path.abspath(src.base_model or "")):
            raise UserError(f"{out_dir}: refusing to write the merged model over its own source")
        if os.path.exists(local_out) and (not os.path.isdir(local_out) or os.listdir(local_out)):
            if not overwrite:
                raise UserError(f"{out_dir} exists and is not empty", hint="choose a new directory, or pass --overwrite")

    quiet_transformers()
    messages = list(src.notes)
    dequantized = bool(src.quantized_base)
    head = None
    if os.path.exists(os.path.join(src.path, rd.HEAD_CONFIG)):  # a regression/reward run: its head is kept
        from raytune_ft.tools.scoring import read_head_config

        head = read_head_config(src)
    base = _load_base(src, tdtype, messages, head)
    tok = load_tokenizer(src)

    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, src.path, is_trainable=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the adapter {src.path} onto {src.base_model}: {str(e).splitlines()[0]}")
    merged = model.merge_and_unload()
    merged.eval()

    parent = os.path.dirname(local_out) if local_out else None
    work = os.path.join(parent, f".{os.path.basename(local_out)}.partial-{uuid.uuid4().hex[:8]}") if parent else None
    if work is None:
        import tempfile

        work = tempfile.mkdtemp(prefix="rtf-merge-")
    else:
        os.makedirs(parent, exist_ok=True)
    try:
        merged.save_pretrained(work, safe_serialization=True)
        tok.save_pretrained(work)
        if head is not None:  # the trained head beside the merged model, as beside the adapter
            for name in (rd.HEAD_WEIGHTS, rd.HEAD_CONFIG):
                shutil.copyfile(os.path.join(src.path, name), os.path.join(work, name))
        if src.spec_path and os.path.isfile(src.spec_path):
            shutil.copyfile(src.spec_path, os.path.join(work, rd.SPEC))
        info = {
            "source": src.origin,
            "adapter": src.remote or src.path,
            "base": src.base_model,
            "method": src.method,
            "dtype": dtype,
            "dequantized": dequantized,
            "step": src.step,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with open(os.path.join(work, MERGE_INFO), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)
        if remote_out:
            cfg = st.config_for(remote_out)
            with st.storage_errors(cfg, "write"):
                fs, path = st.open(cfg)
                st.upload_dir(work, fs, path)
        else:
            if os.path.exists(local_out):
                shutil.rmtree(local_out) if os.path.isdir(local_out) else os.remove(local_out)
            os.rename(work, local_out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if dequantized:
        messages.append(
            f"QLoRA adapter: the base was loaded unquantized in {dtype} (dequantized) and merged; the merged model "
            "is not quantized, and its outputs differ slightly from the quantized base + adapter used in training"
        )
    messages.append(f"merged {src.describe()} + base {src.base_model} ({dtype}) → {out_dir} "
                    "(a new model dir; the base model and the adapter are unchanged)")
    return {
        "out_dir": out_dir,
        "base": src.base_model,
        "adapter": src.remote or src.path,
        "dtype": dtype,
        "dequantized": dequantized,
        "messages": messages,
    }


def _load_base(src: Source, tdtype, messages: list[str], head: dict | None = None):
    """The base model, unquantized, in ``tdtype``, on the CPU (``head``: the scalar-head class with that head)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name = src.base_model
    from raytune_ft.tools.loading import trust_remote_code

    kwargs: dict[str, Any] = dict(dtype=tdtype, trust_remote_code=trust_remote_code(src))
    if src.spec is not None and src.spec.model.revision and name == src.spec.model.name_or_path:
        kwargs["revision"] = src.spec.model.revision
    prequantized = _prequantized(name)
    try:
        if head is not None:
            from raytune_ft.train.objectives import build_head

            base = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1, **kwargs)
            base.score = build_head(head).to(dtype=tdtype)
        else:
            base = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the base model {name}: {str(e).splitlines()[0]}")
    if prequantized:
        # a base saved in 4/8-bit: back to real weights before merging
        base = base.dequantize()
        base.to(dtype=tdtype)
        messages.append(f"the base {name} is saved quantized: dequantized it to {str(tdtype).removeprefix('torch.')}")
    base.to(torch.device("cpu"))
    return base


def _prequantized(name: str | None) -> bool:
    if not name:
        return False
    cfg = os.path.join(st.local_path(name), MODEL_CONFIG)
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            return "quantization_config" in json.load(f)
    except (OSError, ValueError):
        return False
