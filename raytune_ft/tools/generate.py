"""``rtf generate``: completions from a trained run, checkpoint, adapter or model dir.

Prompts are formatted and tokenized exactly as training formatted its data
(:func:`raytune_ft.data.formats.encode_prompt`: alpaca template, chat template, or the raw text for
``format: text``), so the model sees what it learned to continue. ``temperature == 0`` is greedy decoding;
otherwise sampling with ``top_p``, seeded per prompt (the same seed and prompt give the same text, in any
order). With ``compare_base`` the base model answers the same prompts: an adapter's base is the same model
with the adapter switched off (peft's ``disable_adapter()``); a full fine-tune's base is the spec's
``model.name_or_path`` when it is on this machine.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from raytune_ft import rundir as rd
from raytune_ft.errors import UserError
from raytune_ft.tools.loading import Loaded, load_base_for_full, load_model
from raytune_ft.tools.source import Source, resolve_source

Prompt = str | Mapping[str, Any]  # text, or {"instruction", "input", "system"} / {"messages": [...]}


def generate(
    source: str | Source,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    compare_base: bool = False,
    seed: int = 0,
    *,
    data_format: str | None = None,
    dtype: str | None = None,
    info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One dict per prompt: ``prompt``, ``formatted_prompt``, ``completion``, ``new_tokens`` and, with
    ``compare_base``, ``base_completion`` (``None`` with ``base_note`` saying why when there is no base).

    ``data_format`` overrides the run's format (alpaca/chat/text); ``info``, when given, receives what was
    loaded (``source``, ``format``, ``notes``).
    """
    if not prompts:
        raise UserError("no prompts given: pass --prompt TEXT or --file PROMPTS")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (got {temperature})")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (got {top_p})")
    src = source if isinstance(source, Source) else resolve_source(source)
    if src.spec is not None and src.spec.method.objective in ("regression", "reward"):
        raise UserError(f"a {src.spec.method.objective} run scores texts with its head, it does not generate",
                        hint="rtf score SOURCE --file TEXTS")
    fmt = data_format or src.data_format
    notes = list(src.notes)
    if fmt is None:
        fmt = "text"
        notes.append(f"no {rd.SPEC} with a data format next to this model: prompts are used as raw text")
    loaded = load_model(src, dtype=dtype)
    notes += loaded.notes
    tok = loaded.tokenizer

    encoded = [_encode(fmt, tok, p) for p in prompts]
    results = []
    for p, (text, ids) in zip(prompts, encoded, strict=True):
        completion, n_new = _complete(loaded.model, loaded, ids, max_new_tokens, temperature, top_p, seed)
        results.append(
            {"prompt": p, "formatted_prompt": text, "completion": completion, "new_tokens": n_new}
        )

    if compare_base:
        base_model, why = _base(src, loaded)
        for r, (_, ids) in zip(results, encoded, strict=True):
            if base_model is None and not src.is_adapter:
                r["base_completion"], r["base_note"] = None, why
                continue
            if src.is_adapter:
                with loaded.model.disable_adapter():
                    r["base_completion"], r["base_new_tokens"] = _complete(
                        loaded.model, loaded, ids, max_new_tokens, temperature, top_p, seed
                    )
            else:
                r["base_completion"], r["base_new_tokens"] = _complete(
                    base_model, loaded, ids, max_new_tokens, temperature, top_p, seed
                )
        if why:
            notes.append(why)
    if info is not None:
        info.update(source=src.describe(), format=fmt, notes=notes, base=src.base_model)
    return results


def read_prompts(path: str) -> list[Prompt]:
    """Prompts from a file: JSONL/JSON (strings, or objects with ``instruction``/``input``/``system``,
    ``messages``, ``prompt`` or ``text``), else one prompt per non-empty line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"cannot read prompts from {path}: {e.strerror or e}")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})")
    low = path.lower()
    if low.endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON: {e.msg}")
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON list of prompts")
        return [_check_item(x, f"{path}[{i}]") for i, x in enumerate(items)]
    if low.endswith(".jsonl"):
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(_check_item(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON: {e.msg}")
        return out
    return [line for line in (x.strip() for x in text.splitlines()) if line]


def _check_item(item: Any, where: str) -> Prompt:
    if isinstance(item, str) and item.strip():
        return item
    if isinstance(item, dict) and any(k in item for k in ("instruction", "messages", "prompt", "text")):
        return item
    raise UserError(f"{where}: a prompt is a non-empty string or an object with instruction, messages, prompt or text")


def _encode(fmt: str, tok, prompt: Prompt) -> tuple[str, list[int]]:
    """The prompt text and ids exactly as training formatted them (see the module docstring)."""
    from raytune_ft.data.formats import encode_prompt, format_prompt

    if isinstance(prompt, str):
        kwargs: dict[str, Any] = {"instruction": prompt}
    else:
        kwargs = {
            "instruction": prompt.get("instruction", prompt.get("prompt", prompt.get("text"))),
            "input": prompt.get("input"),
            "system": prompt.get("system"),
            "messages": prompt.get("messages"),
        }
    return format_prompt(fmt, tok, **kwargs), encode_prompt(fmt, tok, **kwargs)


def generation_kwargs(tok, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
    """The ``model.generate`` arguments ``generate`` uses (greedy when temperature is 0)."""
    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if temperature == 0:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    return kw


def _complete(model, loaded: Loaded, ids: list[int], max_new_tokens, temperature, top_p, seed) -> tuple[str, int]:
    import torch

    tok = loaded.tokenizer
    input_ids = torch.tensor([ids], device=loaded.device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **generation_kwargs(tok, max_new_tokens, temperature, top_p),
        )
    new = out[0, input_ids.shape[1] :].tolist()
    return tok.decode(new, skip_special_tokens=True), len(new)


def _base(src: Source, loaded: Loaded):
    if src.is_adapter:
        return None, None
    return load_base_for_full(src, dtype=loaded.dtype, device=loaded.device)


# --------------------------------------------------------------------------------------------------
# printing


def _prompt_label(p: Prompt) -> str:
    if isinstance(p, str):
        return p
    if p.get("messages"):
        return p["messages"][-1].get("content", "")
    return str(p.get("instruction") or p.get("prompt") or p.get("text") or "")


def render(results: list[dict[str, Any]], info: dict[str, Any] | None = None, width: int | None = None) -> str:
    """The completions as text: for each prompt, the completion (and the base's, one after the other, with
    headers) under a header naming the prompt."""
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 100)
    lines: list[str] = []
    if info:
        lines.append(f"# {info.get('source')}  (format: {info.get('format')})")
        lines += [f"# note: {n}" for n in info.get("notes") or []]
    for i, r in enumerate(results, 1):
        lines.append("=" * width)
        lines.append(f"[{i}] {_prompt_label(r['prompt'])}")
        if "base_completion" in r:
            lines.append("-" * 3 + " fine-tuned " + "-" * max(0, width - 15))
            lines.append(r["completion"])
            lines.append("-" * 3 + " base " + "-" * max(0, width - 9))
            lines.append(r["base_completion"] if r["base_completion"] is not None else f"(no base: {r.get('base_note')})")
        else:
            lines.append("-" * width)
            lines.append(r["completion"])
    return "\n".join(lines)
