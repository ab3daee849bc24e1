"""YAML → JobSpec: line-tracked loading, ``extends:`` presets, ``--set`` overrides, readable errors.

Every problem comes back as one line ``file:line dotted.path: message`` inside a
:class:`~raytune_ft.errors.SpecError` (exit code 2). Nothing here imports torch or ray.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from yaml.constructor import SafeConstructor

from raytune_ft.errors import SpecError, UserError
from raytune_ft.spec.models import JobSpec

Loc = tuple[Any, ...]
PRESETS_DIR = Path(__file__).resolve().parents[2] / "jobspecs"


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


# --------------------------------------------------------------------------- YAML with lines


def _display(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def _construct(node: yaml.Node, fname: str, loc: Loc, lines: dict, problems: list[str]) -> Any:
    lines[loc] = (fname, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for knode, vnode in node.value:
            key = yaml.safe_load(yaml.serialize(knode)) if not isinstance(knode, yaml.ScalarNode) else knode.value
            if not isinstance(key, str):
                problems.append(f"{fname}:{knode.start_mark.line + 1} {_dotted(loc) or '<top>'}: keys must be strings")
                continue
            if key in out:
                problems.append(
                    f"{fname}:{knode.start_mark.line + 1} {_dotted(loc + (key,))}: duplicate key "
                    f"(first given on line {lines[loc + (key,)][1]})"
                )
                continue
            lines[loc + (key,)] = (fname, knode.start_mark.line + 1)
            out[key] = _construct(vnode, fname, loc + (key,), lines, problems)
            lines[loc + (key,)] = (fname, knode.start_mark.line + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, fname, loc + (i,), lines, problems) for i, v in enumerate(node.value)]
    # a scalar, constructed as safe_load would; an empty value (`key:`) is null, which re-serialising the
    # node and loading that text turned into "not valid YAML … line 1, column 1"
    return SafeConstructor().construct_object(node, deep=True)


def read_yaml(path: Path) -> tuple[dict, dict[Loc, tuple[str, int]]]:
    fname = _display(path)
    if not path.exists():
        raise UserError(f"spec file not found: {fname}")
    if path.is_dir():
        raise UserError(f"spec path is a directory, not a YAML file: {fname}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{fname}: not UTF-8 text ({e.reason} at byte {e.start})")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{fname}:{mark.line + 1}" if mark else fname
        raise UserError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}")
    if node is None:
        raise SpecError([f"{fname}: the file is empty; a job spec is a YAML mapping"])
    lines: dict[Loc, tuple[str, int]] = {}
    problems: list[str] = []
    try:
        data = _construct(node, fname, (), lines, problems)
    except yaml.YAMLError as e:
        raise UserError(f"{fname}: not valid YAML: {e}")
    if problems:
        raise SpecError(problems)
    if not isinstance(data, dict):
        raise SpecError([f"{fname}:1: a job spec must be a YAML mapping (got {type(data).__name__})"])
    return data, lines


# --------------------------------------------------------------------------- extends


def resolve_preset(ref: str, relative_to: Path | None) -> Path:
    """Find ``extends: ref``: a path (relative to the spec's dir) or a preset name in jobspecs/."""
    cands: list[Path] = []
    p = Path(ref)
    if relative_to is not None:
        cands += [relative_to / p, relative_to / f"{ref}.yaml"]
    cands += [p, PRESETS_DIR / p, PRESETS_DIR / f"{ref}.yaml"]
    extra = os.environ.get("RTF_PRESETS_DIR")
    if extra:
        cands.insert(0, Path(extra) / f"{ref}.yaml")
    for c in cands:
        if c.is_file():
            return c.resolve()
    names = sorted(x.stem for x in PRESETS_DIR.glob("*.yaml")) if PRESETS_DIR.is_dir() else []
    close = difflib.get_close_matches(ref, names, n=1)
    hint = f"did you mean `{close[0]}`? " if close else ""
    raise UserError(f"extends: preset or file `{ref}` not found; {hint}presets: {', '.join(names) or 'none'}")


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` wins; mappings merge key by key; lists and scalars are replaced whole."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_chain(path: Path, seen: tuple[Path, ...]) -> tuple[dict, dict]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(_display(p) for p in (*seen, path))
        raise UserError(f"extends: cycle: {chain}")
    data, lines = read_yaml(path)
    ref = data.get("extends")
    if ref is None:
        return data, lines
    if not isinstance(ref, str):
        raise SpecError([f"{lines[('extends',)][0]}:{lines[('extends',)][1]} extends: must be a preset name or a path"])
    base, base_lines = _load_chain(resolve_preset(ref, path.parent), (*seen, path))
    base.pop("extends", None)
    merged = deep_merge(base, data)
    merged_lines = dict(base_lines)
    # keys the child sets (and everything under them when it replaces a list/scalar) come from the child
    for loc, where in lines.items():
        merged_lines[loc] = where
    return merged, merged_lines


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"--set {text}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"--set {text}: the key `{key}` is not a dotted path like training.learning_rate")
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
                raise UserError(f"--set {text}: `{_dotted(loc)}` is a list; index it with a number, not `{part}`")
            idx = int(part)
            if idx > len(cur):
                raise UserError(f"--set {text}: `{_dotted(loc)}` has {len(cur)} item(s); index {idx} is out of range")
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
            raise UserError(f"--set {text}: `{_dotted(loc)}` is a {type(cur).__name__}, not a section")
        loc.append(part)
        if last:
            cur[part] = value
        else:
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            cur = nxt
    return tuple(loc)


# --------------------------------------------------------------------------- errors


def _dotted(loc: Loc) -> str:
    return ".".join(str(x) for x in loc)


def _unwrap_model(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in typing.get_args(ann):
        m = _unwrap_model(arg)
        if m is not None:
            return m
    return None


def _model_at(loc: Loc) -> type[BaseModel] | None:
    model: type[BaseModel] | None = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _unwrap_model(model.model_fields[part].annotation)
    return model


def _clean_loc(loc: Loc) -> Loc:
    """Drop pydantic's union tags (e.g. 'list[str]', 'function-after[...]') from an error location."""
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in p and p not in {"str", "int", "float"}))


def _message(err: dict) -> str:
    typ, msg, got = err["type"], err["msg"], err.get("input")
    if typ == "extra_forbidden":
        key = err["loc"][-1]
        parent = _model_at(_clean_loc(err["loc"][:-1]))
        names = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
        if close:
            return f"unknown key; did you mean `{close[0]}`?"
        return f"unknown key; valid keys here: {', '.join(names)}" if names else "unknown key"
    if typ == "missing":
        return "is required"
    if typ in ("value_error", "assertion_error"):
        return msg.split(", ", 1)[1] if msg.startswith(("Value error, ", "Assertion failed, ")) else msg
    msg = msg.replace("Input should be", "must be").replace("Input", "value")
    if got is not None and not isinstance(got, (dict, list)):
        msg += f" (got {got!r})"
    elif got is None and "input" in err:
        msg += " (got null: the value is empty)"
    return msg


def format_errors(exc: ValidationError, where: Source) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False):
        loc = _clean_loc(err["loc"])
        path = _dotted(loc) or "<spec>"
        place = where.where(loc)
        line = f"{place} {path}: {_message(err)}" if place else f"{path}: {_message(err)}"
        if line not in seen:
            seen.add(line)
            out.append(line)
    return out


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Loaded:
    spec: JobSpec
    path: Path | None
    source: Source


LIST_OR_ONE = (("data", "train"), ("data", "eval"))


def _normalize(doc: dict, lines: dict[Loc, tuple[str, int]]) -> None:
    """Store a source written as one mapping as a one-element list, so `--set data.train.0.path=…`
    and error locations are the same whichever way the user wrote it."""
    for loc in LIST_OR_ONE:
        parent = doc
        for part in loc[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and isinstance(parent.get(loc[-1]), dict):
            parent[loc[-1]] = [parent[loc[-1]]]
            n = len(loc)
            for old in [k for k in lines if k[:n] == loc and len(k) > n]:
                lines[loc + (0,) + old[n:]] = lines.pop(old)


def load_document(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict, Source]:
    """The merged document (presets + file + overrides) before validation, with line info."""
    path = Path(path)
    doc, lines = _load_chain(path, ())
    _normalize(doc, lines)
    src = Source(lines)
    for text in overrides:
        parts, value = parse_override(text)
        loc = apply_override(doc, parts, value, text)
        src.lines[loc] = (f"--set {text}", 0)
    return doc, src


def validate_document(doc: dict, src: Source | None = None, *, label: str | None = None) -> JobSpec:
    src = src or Source()
    try:
        return JobSpec.model_validate(doc)
    except ValidationError as e:
        raise SpecError(format_errors(e, src), source=label)


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load, merge presets, apply ``--set`` overrides and validate. Raises SpecError/UserError."""
    doc, src = load_document(path, overrides)
    return validate_document(doc, src)


def spec_from_dict(data: dict) -> JobSpec:
    return validate_document(copy.deepcopy(data))


def dump_spec(spec: JobSpec) -> dict:
    """The resolved spec as plain data (presets already merged, so no ``extends``). It holds only env
    var *names* for secrets, never values."""
    return spec.model_dump(mode="json", exclude_none=True, exclude={"extends"})


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
