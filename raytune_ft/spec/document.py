"""A spec document and the schema it follows: locations in it (for error lines and ``tune.space`` paths),
``--set`` overrides, readable validation errors, and the resolved spec as plain data, YAML and a hash.

Pure: pydantic and YAML only, nothing heavy.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raytune_ft.errors import UserError
from raytune_ft.spec.models import SECRETISH, TOKEN_VALUE_RE, JobSpec

Loc = tuple[Any, ...]


@dataclass
class Source:
    """Where each key of the merged document came from: (file, line) per path."""

    lines: dict[Loc, tuple[str, int]] = field(default_factory=dict)

    def where(self, loc: Loc) -> str:
        loc = tuple(loc)
        while True:
            if loc in self.lines:
                f, n = self.lines[loc]
                return f"{f}:{n}" if n else f
            if not loc:
                return ""
            loc = loc[:-1]


# --------------------------------------------------------------------------- overrides


def shown_override(text: str) -> str:
    """An override as errors may show it: credentials in URLs, token-like values and the value of a
    secret-looking key are masked (errors are printed, logged and pasted into issues)."""
    key, sep, raw = text.partition("=")
    if sep and SECRETISH.search(key.rsplit(".", 1)[-1]):
        return f"{key}=***"
    raw = re.sub(r"(://)[^/@\s]*@", r"\1***@", raw)
    return key + sep + TOKEN_VALUE_RE.sub("***", raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"--set {shown_override(text)}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {shown_override(text)}: the key `{key}` is not a dotted path like training.learning_rate")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(doc: dict, parts: list[str], value: Any, text: str) -> Loc:
    cur: Any = doc
    loc: list[Any] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):
            if not part.isdigit():
                raise UserError(f"--set {shown_override(text)}: `{dotted(loc)}` is a list; index it with a number, not `{part}`")
            idx = int(part)
            if idx > len(cur):
                raise UserError(f"--set {shown_override(text)}: `{dotted(loc)}` has {len(cur)} item(s); index {idx} is out of range")
            if last:
                if idx == len(cur):
                    cur.append(value)
                else:
                    cur[idx] = value
            else:
                if idx == len(cur):
                    cur.append({})
                cur = cur[idx]
            loc.append(idx)
            continue
        if not isinstance(cur, dict):
            raise UserError(f"--set {shown_override(text)}: `{dotted(loc)}` is a {type(cur).__name__}, not a section")
        loc.append(part)
        if last:
            cur[part] = value
        else:
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            cur = nxt
    return tuple(loc)


# --------------------------------------------------------------------------- schema locations and errors


def dotted(loc: Loc) -> str:
    return ".".join(str(x) for x in loc)


def unwrap_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        m = unwrap_model(arg)
        if m is not None:
            return m
    return None


def model_at(loc: Loc) -> type[BaseModel] | None:
    model: type[BaseModel] | None = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = unwrap_model(model.model_fields[part].annotation)
    return model


def clean_loc(loc: Loc) -> Loc:
    """Drop pydantic's union tags (e.g. 'list[str]', 'function-after[...]') from an error location."""
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in {"str", "int", "float"}))


# pydantic's messages for shapes, in the words of a YAML file (its own read as Python: "a valid dictionary
# or object to extract fields from").
PLAIN_WORDS = {
    "model_type": "must be a mapping of keys (key: value lines, or {key: value})",
    "model_attributes_type": "must be a mapping of keys (key: value lines, or {key: value})",
    "dict_type": "must be a mapping of keys (key: value lines, or {key: value})",
    "list_type": "must be a list ([a, b] or - item lines)",
    "tuple_type": "must be a list of two values, [low, high]",
    "string_type": "must be text",
    "int_type": "must be a whole number",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "union_tag_invalid": "type must be one of {expected_tags} (got {tag})",
    "union_tag_not_found": "needs a `{discriminator}` key",
}


def _message(err: dict) -> str:
    typ, msg, got = err["type"], err["msg"], err.get("input")
    if typ == "extra_forbidden":
        key = err["loc"][-1]
        parent = model_at(clean_loc(err["loc"][:-1]))
        names = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
        if close:
            return f"unknown key; did you mean `{close[0]}`?"
        return f"unknown key; valid keys here: {', '.join(names)}" if names else "unknown key"
    if typ == "missing":
        return "is required"
    if typ in ("value_error", "assertion_error"):
        return msg.split(", ", 1)[1] if msg.startswith(("Value error, ", "Assertion failed, ")) else msg
    plain = PLAIN_WORDS.get(typ)
    if plain is not None:
        ctx = err.get("ctx") or {}
        for k in ("expected_tags", "discriminator", "tag"):
            plain = plain.replace("{" + k + "}", str(ctx.get(k, "")).replace("'", ""))
        if typ == "union_tag_invalid":
            return plain
        return plain + (f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) else
                        f" (got a {type(got).__name__})" if got is not None else
                        " (got null: the value is empty)" if "input" in err else "")
    msg = msg.replace("Input should be", "must be").replace("Input", "value")
    if got is not None and not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    elif got is None and "input" in err:
        msg += " (got null: the value is empty)"
    return msg


def format_errors(exc: ValidationError | list[dict], where: Source) -> list[str]:
    """One ``file:line dotted.path: message`` line per error (pydantic's, or dicts shaped like them)."""
    out: list[str] = []
    seen: set[str] = set()
    for err in exc if isinstance(exc, list) else exc.errors(include_url=False):
        loc = clean_loc(err["loc"])
        path = dotted(loc) or "<spec>"
        place = where.where(loc)
        line = f"{place} {path}: {_message(err)}" if place else f"{path}: {_message(err)}"
        if line not in seen:
            seen.add(line)
            out.append(line)
    return out


# --------------------------------------------------------------------------- the resolved spec as data


def dump_spec(spec: JobSpec) -> dict:
    """The resolved spec as plain data (presets already merged, so no ``extends``). It holds only env
    var *names* for secrets, never values."""
    d = spec.model_dump(mode="json", exclude_none=True, exclude={"extends"})
    if d.get("method", {}).get("objective") == "sft":  # the default: SFT specs dump (and hash) as before objectives
        del d["method"]["objective"]
    return d


def to_yaml(spec: JobSpec) -> str:
    return yaml.safe_dump(dump_spec(spec), sort_keys=False, default_flow_style=False)


def spec_hash(spec: JobSpec) -> str:
    """A short digest of what the run computes. ``name``, ``description`` and where/how it runs are
    left out so a retry on another cluster or storage is recognised as the same training."""
    d = dump_spec(spec)
    for k in ("name", "extends", "description", "cluster", "storage", "fault_tolerance", "monitoring", "tune", "env"):
        d.pop(k, None)
    blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
