"""A sweep's ``tune:`` section checked against the spec schema when the spec is loaded: every swept path
exists and is sweepable, each distribution fits its field, every value it can take (and, for small spaces,
every combination of edge values) gives a valid spec, and the scheduler's rungs fall on reported steps.

Pure functions of the spec: pydantic only, nothing from Ray Tune (:mod:`raytune_ft.sweep.tune` turns a
checked space into Tune's objects); :mod:`raytune_ft.spec.collect` runs these checks with the rest of the spec's.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import typing
from typing import Any

from raytune_ft.errors import UserError
from raytune_ft.spec.document import Source, apply_override, dump_spec, format_errors, model_at, unwrap_model
from raytune_ft.spec.models import JobSpec
from raytune_ft.spec.objectives import ALL_METRICS

SWEEPABLE = ("model", "tokenizer", "method", "data", "training", "deepspeed")
EVAL_METRICS = (*ALL_METRICS, "perplexity")  # reported by an evaluation (each objective its own)
MAX_COMBINATIONS = 256  # the whole-space check validates every combination of edge values up to this many


def field_at(path: str) -> tuple[Any, str | None]:
    """The pydantic FieldInfo a dotted spec path names, or (None, why not)."""
    parts = path.split(".")
    if any(not p for p in parts):
        return None, f"`{path}` is not a dotted spec path like training.learning_rate"
    if parts[0] not in SWEEPABLE:
        if parts[0] in JobSpec.model_fields:
            return None, (f"`{parts[0]}` cannot be swept: only values under {', '.join(SWEEPABLE)} change between "
                          "trials (name, storage, compute and cluster are the sweep's own)")
        close = difflib.get_close_matches(parts[0], SWEEPABLE, n=1)
        return None, f"no section `{parts[0]}` in the spec" + (f"; did you mean `{close[0]}`?" if close else "")
    loc: tuple[Any, ...] = ()
    for i, part in enumerate(parts):
        if part.isdigit():
            loc += (int(part),)
            continue
        model = model_at(loc)
        if model is None:
            return None, f"`{'.'.join(parts[:i])}` is a value, not a section"
        if part not in model.model_fields:
            close = difflib.get_close_matches(part, list(model.model_fields), n=1, cutoff=0.6)
            where = ".".join(parts[:i]) or "the spec"
            hint = f"did you mean `{'.'.join(parts[:i] + [close[0]])}`?" if close else \
                f"valid keys of {where}: {', '.join(model.model_fields)}"
            return None, f"no field `{path}` in the spec schema; {hint}"
        loc += (part,)
    info = model_at(loc[:-1]).model_fields[loc[-1]]  # type: ignore[union-attr]
    if unwrap_model(info.annotation) is not None and not _accepts_list(info.annotation):
        return None, f"`{path}` is a section; sweep one of its values (e.g. `{path}.{next(iter(unwrap_model(info.annotation).model_fields))}`)"
    return info, None


def _accepts_list(ann: Any) -> bool:
    return typing.get_origin(ann) is list or any(_accepts_list(a) for a in typing.get_args(ann))


def _scalar_types(ann: Any) -> set[type]:
    if isinstance(ann, type):
        return {ann}
    out: set[type] = set()
    for a in typing.get_args(ann):
        out |= _scalar_types(a)
    return out


def numeric_kind(path: str) -> str | None:
    """``int`` or ``float`` for a numeric field, None for anything else (bool, str, Literal, list)."""
    info, _ = field_at(path)
    if info is None or typing.get_origin(info.annotation) is typing.Literal:
        return None
    types = _scalar_types(info.annotation)
    if bool in types or str in types:
        return None
    if float in types:
        return "float"
    if int in types:
        return "int"
    return None


def edge_values(dist: Any, kind: str | None) -> list[Any]:
    """The values whose validity stands for all the distribution can sample: its bounds, or each option."""
    if dist.options is not None:
        return list(dist.options)
    lo, hi = dist.lo_hi
    return [int(lo), int(hi)] if kind == "int" else [lo, hi]


def base_doc(spec: JobSpec) -> dict:
    doc = dump_spec(spec)
    doc.pop("tune", None)
    doc.pop("extends", None)  # the dump is resolved: a preset merged again would change nothing
    return doc


def with_values(base: dict, values: dict[str, Any]) -> dict:
    doc = copy.deepcopy(base)
    for path, value in values.items():
        apply_override(doc, path.split("."), value, f"tune.space.{path}={value!r}")
    return doc


def invalid(base: dict, values: dict[str, Any]) -> str | None:
    """Why the spec with these values is invalid, or None."""
    from pydantic import ValidationError

    try:
        JobSpec.model_validate(with_values(base, values))
    except UserError as e:  # from apply_override: "--set <text>: why"
        return e.message.split(": ", 1)[1] if e.message.startswith("--set ") and ": " in e.message else e.message
    except ValidationError as e:
        return "; ".join(format_errors(e, Source()))
    return None


def entry_problem(path: str, dist: Any, search: str) -> tuple[str, Any] | None:
    """What is wrong with sweeping ``path`` with ``dist`` under ``search`` whatever the rest of the spec
    holds (the path exists and is sweepable, the distribution fits its field and the search), or None."""
    info, why = field_at(path)
    if info is None:
        return why, path
    kind = numeric_kind(path)
    if dist.lo_hi is not None:
        if kind is None:
            return (f"{dist.kind} samples numbers but `{path}` is not numeric; "
                    "list its values with choice or grid", dist.kind)
        if kind == "int" and not all(float(x).is_integer() for x in dist.lo_hi):
            return f"`{path}` is an integer: {dist.kind} bounds must be whole numbers (got {list(dist.lo_hi)})", \
                list(dist.lo_hi)
    if search == "grid" and dist.lo_hi is not None:
        return (f"tune.search grid runs every value: give a list with {{grid: [...]}} "
                f"or {{choice: [...]}}, not {dist.kind}", dist.kind)
    if search == "optuna" and dist.kind == "grid":
        return "tune.search optuna samples values: use {choice: [...]} instead of grid", "grid"
    return None


def value_problems(base: dict, entries: list[tuple[str, Any]], combinations: bool = True
                   ) -> list[tuple[tuple[Any, ...], str, Any]]:
    """Each swept value tried on ``base`` (a valid spec's document without ``tune``): the edge values of
    every entry, then (for small spaces, when each value alone is valid) every combination of them."""
    problems: list[tuple[tuple[Any, ...], str, Any]] = []
    edges: dict[str, list[Any]] = {}
    for path, dist in entries:
        values = edge_values(dist, numeric_kind(path))
        bad = next(((v, err) for v in values if (err := invalid(base, {path: v}))), None)
        if bad is not None:
            problems.append((("tune", "space", path), f"the value {bad[0]!r} gives an invalid spec: {bad[1]}", bad[0]))
            continue
        edges[path] = values
    if combinations and not problems and len(edges) > 1:
        combos = math.prod(len(v) for v in edges.values())
        if combos <= MAX_COMBINATIONS:
            for combo in itertools.product(*edges.values()):
                values = dict(zip(edges, combo))
                err = invalid(base, values)
                if err:
                    shown = ", ".join(f"{p}={v!r}" for p, v in values.items())
                    problems.append((("tune", "space"), f"the combination {shown} gives an invalid spec: {err}", None))
                    break
    return problems


def schedule_problems(spec: Any) -> list[tuple[tuple[Any, ...], str, Any]]:
    """The metric comes from what the run reports and ASHA's rungs fall on reported steps. Reads only
    ``spec.tune``, ``spec.training`` and ``spec.data`` (any object holding those validated sections)."""
    tune, t = spec.tune, spec.training
    problems: list[tuple[tuple[Any, ...], str, Any]] = []
    if tune.metric in EVAL_METRICS and (not spec.data.has_eval or t.eval_strategy == "no"):
        problems.append((("tune", "metric"), f"{tune.metric} comes from evaluation: set training.eval_strategy "
                         "(steps, with eval_steps) and data.eval or data.eval_split, or use tune.metric loss",
                         tune.metric))
    sched = tune.scheduler
    if sched.type == "asha":
        every = report_interval(spec)
        grace = sched.grace_period or every
        what = "training.eval_steps" if tune.metric in EVAL_METRICS else "training.save_steps"
        if sched.grace_period is not None and every and sched.grace_period % every:
            problems.append((("tune", "scheduler", "grace_period"),
                             f"must be a multiple of {what} ({every}) so that every rung falls on a step where "
                             f"{tune.metric} is reported", sched.grace_period))
        elif grace and t.max_steps is not None and grace >= t.max_steps:
            problems.append((("tune", "scheduler", "grace_period"),
                             f"ASHA's first rung ({grace} steps{'' if sched.grace_period else ', from ' + what}) must "
                             f"come before training.max_steps ({t.max_steps}), or no trial can be stopped early",
                             grace))
        elif grace is None:
            problems.append((("tune", "scheduler", "grace_period"),
                             "set it (in training steps): evaluation per epoch has no step interval to default to",
                             None))
    return problems


def report_interval(spec: Any) -> int | None:
    """Every how many steps the sweep's metric reaches Tune (None: per epoch)."""
    t = spec.training
    assert spec.tune is not None
    if spec.tune.metric in EVAL_METRICS:
        return (t.eval_steps or t.logging_steps) if t.eval_strategy == "steps" else None
    return t.save_steps
