"""The model card (the Hub repo's README.md) of a finished run: YAML metadata the Hub reads (base model,
library, tags, hub datasets), then the method, the training results, the data sources, the loss plot,
the spec and how to load it. Pure: it renders what it is given.

Everything shown comes from storage (the run's stored spec and results), so text is escaped before it is
rendered (HTML in the spec's description stays text) and the spec goes into a code fence longer than any
run of backticks in it."""

from __future__ import annotations

import html
import re
from typing import Any

import yaml

RESULT_ROWS = (("train_loss", "train loss (last logged)"), ("eval_loss", "eval loss"), ("perplexity", "eval perplexity"),
               ("steps", "optimizer steps"), ("tokens", "tokens trained on"), ("runtime_s", "runtime (s)"),
               ("tokens_per_s", "tokens/s"), ("trainable_params", "trainable parameters"),
               ("total_params", "total parameters"))
HF_DATASET = "hf://datasets/"


def _text(value: Any) -> str:
    """One line of stored text, safe inside Markdown/HTML: escaped, no newlines, no table pipes."""
    s = html.escape(" ".join(str(value).split()))
    return s.replace("|", "&#124;").replace("`", "&#96;").replace("[", "&#91;").replace("]", "&#93;")


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return _text(v)


def _fence(body: str, lang: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", body)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{body.rstrip()}\n{ticks}"


def data_sources(spec_doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec's training and eval sources as ``{split, path, format, weight}``."""
    data = spec_doc.get("data") or {}
    out = []
    for split in ("train", "eval"):
        srcs = data.get(split)
        if srcs is None:
            continue
        for s in srcs if isinstance(srcs, list) else [srcs]:
            if isinstance(s, dict):
                out.append({"split": split, "path": s.get("path"), "format": s.get("format", "alpaca"),
                            "weight": s.get("weight", 1.0)})
    return out


def render_card(*, repo_id: str, spec_doc: dict[str, Any], results: dict[str, Any], kind: str,
                has_plot: bool, spec_yaml: str) -> str:
    """The README.md text. ``kind`` is ``adapter`` or ``model``; ``spec_doc`` the stored spec as data."""
    method = (spec_doc.get("method") or {}).get("type", "lora")
    base = (spec_doc.get("model") or {}).get("name_or_path")
    sources = data_sources(spec_doc)
    hub_sets = sorted({str(s["path"])[len(HF_DATASET):].split("@")[0] for s in sources
                       if str(s["path"]).startswith(HF_DATASET)})
    meta: dict[str, Any] = {"library_name": "peft" if kind == "adapter" else "transformers",
                            "tags": ["raytune_ft", method] + (["lora"] if method == "qlora" else []),
                            "pipeline_tag": "text-generation"}
    hub_base = isinstance(base, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", base) is not None
    if hub_base:  # a hub id (a local path would be meaningless on the Hub)
        meta["base_model"] = base
    if hub_sets:
        meta["datasets"] = hub_sets
    name = spec_doc.get("name", repo_id.split("/")[-1])
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {_text(repo_id)}", ""]
    what = {"lora": "a LoRA adapter", "qlora": "a QLoRA adapter (LoRA trained on a 4/8-bit base)",
            "full": "a fully fine-tuned model"}.get(method, _text(method))
    base_txt = f"`{_text(base)}`" if base else "a model built from scratch (`model.init`)"
    lines += [f"{what[0].upper()}{what[1:]} of {base_txt}, trained with raytune_ft (run `{_text(name)}`).", ""]
    if spec_doc.get("description"):
        lines += [_text(spec_doc["description"]), ""]

    lines += ["## Results", "", "| metric | value |", "|---|---|"]
    for key, label in RESULT_ROWS:
        if results.get(key) is not None:
            lines.append(f"| {label} | {_fmt(results[key])} |")
    if results.get("resumed_from_step") is not None:
        lines.append(f"| resumed from step | {_fmt(results['resumed_from_step'])} |")
    lines.append("")
    if has_plot:
        lines += ["![train and eval loss, learning rate](loss.png)", ""]

    lines += ["## Data", "", "| split | source | format | weight |", "|---|---|---|---|"]
    for s in sources:
        lines.append(f"| {s['split']} | `{_text(s['path'])}` | {_text(s['format'])} | {_fmt(s['weight'])} |")
    d = results.get("data") or {}
    if d:
        lines += ["", f"{_fmt(d.get('train_examples'))} training and {_fmt(d.get('eval_examples'))} eval "
                  f"examples; {_fmt(d.get('truncated'))} truncated, {_fmt(d.get('skipped_bad_rows'))} bad rows "
                  "skipped."]
    lines.append("")

    lines += ["## Use it", ""]
    if kind == "adapter":
        load = (f'from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n'
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
    else:
        load = (f'from transformers import AutoModelForCausalLM, AutoTokenizer\n\n'
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
    lines += [_fence(load, "python"), ""]
    lines += ["## Training spec", "", "The job spec this was trained from (environment variables by name "
              "only):", "", _fence(spec_yaml, "yaml"), ""]
    return "\n".join(lines)
