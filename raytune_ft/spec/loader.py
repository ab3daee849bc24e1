"""YAML → JobSpec: line-tracked loading, ``extends:`` presets, ``--set`` overrides, validation (the
model's rules, then a sweep's ``tune.space``), readable errors.

Every problem comes back as one line ``file:line dotted.path: message`` inside a
:class:`~raytune_ft.errors.SpecError` (exit code 2). Nothing here imports torch or ray.
"""

from __future__ import annotations

import copy
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor

from raytune_ft.errors import SpecError, UserError
from raytune_ft.spec.collect import collect
from raytune_ft.spec.document import (
    Loc,
    Source,
    apply_override,
    dotted,
    dump_spec,
    format_errors,
    parse_override,
    shown_override,
)
from raytune_ft.spec.models import JobSpec

PRESETS_DIR = Path(__file__).resolve().parents[2] / "jobspecs"


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
                problems.append(f"{fname}:{knode.start_mark.line + 1} {dotted(loc) or '<top>'}: keys must be strings")
                continue
            if key in out:
                problems.append(
                    f"{fname}:{knode.start_mark.line + 1} {dotted(loc + (key,))}: duplicate key "
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


def _yaml_error(e: yaml.YAMLError, fname: str, text: str) -> str:
    """One line for a YAML error: ``file:line: not valid YAML: what`` (PyYAML's own text spans lines: the
    context, then 'in "<unicode string>", line N, column M'; a reader error has a position, not a mark)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = mark.line + 1 if mark is not None else None
    if isinstance(e, yaml.reader.ReaderError):  # a forbidden character (NUL, BEL, ...) at a character offset
        line = text.count("\n", 0, e.position) + 1
        what = f"unacceptable character #x{e.character:04x}" if isinstance(e.character, int) else str(e.reason)
    else:
        what = " ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
    what = " ".join(str(what).split())  # one line, whatever the parser put in it
    return f"{fname}{f':{line}' if line else ''}: not valid YAML: {what}"


# A job spec is a few kilobytes. These caps make hostile files (an alias bomb, a 50 MB string, 500-deep
# nesting) a one-line refusal in milliseconds instead of minutes of CPU, gigabytes or a RecursionError.
MAX_SPEC_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000  # after alias expansion: the line-tracking constructor visits every expanded node


def check_yaml_shape(text: str, fname: str) -> None:
    """Streams the parser's events (no recursion, no construction) to measure nesting depth and the
    node count aliases expand to; refuses either over its cap. Syntax errors are left to the composer."""
    stack: list[list[Any]] = []  # per open collection: [anchor, expanded node count]
    sizes: dict[str, int] = {}
    total = 0
    try:
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append([ev.anchor, 1])
                if len(stack) > MAX_DEPTH:
                    raise UserError(f"{fname}:{ev.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep; "
                                    "a job spec is a few levels of mappings")
                n = 0
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                anchor, n = stack.pop()
                if anchor:
                    sizes[anchor] = n
                total += 1
            elif isinstance(ev, yaml.ScalarEvent):
                n = 1
                if ev.anchor:
                    sizes[ev.anchor] = 1
                total += 1
            elif isinstance(ev, yaml.AliasEvent):
                n = sizes.get(ev.anchor, 1)
                total += n
            else:
                continue
            if stack and n:
                stack[-1][1] += n
            if total > MAX_NODES:
                raise UserError(f"{fname}:{ev.start_mark.line + 1}: expands to more than {MAX_NODES:,} values "
                                "(YAML aliases repeating aliases?); a job spec holds a few hundred")
    except yaml.YAMLError:
        return


def read_yaml(path: Path) -> tuple[dict, dict[Loc, tuple[str, int]]]:
    fname = _display(path)
    if not path.exists():
        raise UserError(f"spec file not found: {fname}")
    if path.is_dir():
        raise UserError(f"spec path is a directory, not a YAML file: {fname}")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise UserError(f"{fname}: {size:,} bytes; a job spec is at most {MAX_SPEC_BYTES:,} "
                        "(data belongs in data.train files, not in the spec)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{fname}: not UTF-8 text ({e.reason} at byte {e.start})")
    check_yaml_shape(text, fname)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise UserError(_yaml_error(e, fname, text)) from None
    if node is None:
        raise SpecError([f"{fname}: the file is empty; a job spec is a YAML mapping"])
    lines: dict[Loc, tuple[str, int]] = {}
    problems: list[str] = []
    try:
        data = _construct(node, fname, (), lines, problems)
    except yaml.YAMLError as e:
        raise UserError(_yaml_error(e, fname, text)) from None
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


# --------------------------------------------------------------------------- errors


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
        src.lines[loc] = (f"--set {shown_override(text)}", 0)
    return doc, src


def validate_document(doc: dict, src: Source | None = None, *, label: str | None = None) -> JobSpec:
    """The spec, or a SpecError listing every problem found in one pass (:mod:`raytune_ft.spec.collect`):
    fields, cross-section rules, and a sweep's swept paths and values (each value gives a valid spec)."""
    spec, errors, notes = collect(doc)
    if errors or spec is None:
        raise SpecError(format_errors(errors, src or Source()), source=label, notes=notes)
    return spec


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Load, merge presets, apply ``--set`` overrides and validate. Raises SpecError/UserError."""
    doc, src = load_document(path, overrides)
    return validate_document(doc, src)


def spec_from_dict(data: dict) -> JobSpec:
    return validate_document(copy.deepcopy(data))


def absolutize(spec: JobSpec, base: str | None = None) -> JobSpec:
    """Local paths in the spec made absolute (Ray workers run in their own working directory)."""
    base = base or os.getcwd()

    def fix(p: str | None, must_exist: bool = False) -> str | None:
        if p is None or "://" in p or os.path.isabs(p):
            return p
        full = os.path.normpath(os.path.join(base, os.path.expanduser(p)))
        return full if (os.path.exists(full) or not must_exist) else p

    d = dump_spec(spec)
    for key in ("train", "eval"):
        for src in d["data"].get(key) or []:
            src["path"] = fix(src["path"])
    d["model"]["name_or_path"] = fix(d["model"].get("name_or_path"), must_exist=True)
    if d.get("tokenizer", {}).get("name_or_path"):
        d["tokenizer"]["name_or_path"] = fix(d["tokenizer"]["name_or_path"], must_exist=True)
    if (d.get("deepspeed") or {}).get("config"):
        d["deepspeed"]["config"] = fix(d["deepspeed"]["config"])
    d["storage"]["path"] = fix(d["storage"]["path"])
    d = {k: v for k, v in d.items() if v is not None}
    d["model"] = {k: v for k, v in d["model"].items() if v is not None}
    return spec_from_dict(d)
