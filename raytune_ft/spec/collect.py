"""Every problem of a spec document in one pass: field errors, the rules within and across sections, and a
sweep's ``tune:`` checks, each at its own location.

pydantic runs a model's rules only when all its fields are valid, and stops at the first rule that fails,
so a spec used to be fixed in rounds: field errors, then cross-field rules, then the evaluation-data rule,
with one ``tune:`` error hiding the rest. Here a section with errors is validated again without its failed
fields and without its rules, and then every rule (the section's own, each rule across sections in
:mod:`raytune_ft.spec.rules`, tune's) runs on a view in which reading a failed value raises
:class:`~raytune_ft.spec.rules.Blocked`: a rule is reported when what it reads is valid, and a rule that
reads a failed value is named in one note instead of silently dropped. Swept values are tried on the
spec only when the rest of it is valid.
"""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from raytune_ft.spec.base import RULE_ATTR
from raytune_ft.spec.document import unwrap_model
from raytune_ft.spec.models import Distribution, JobSpec, tune_rule_problems
from raytune_ft.spec.rules import Blocked, cross_problems
from raytune_ft.spec.space import base_doc, entry_problem, schedule_problems, value_problems

# The first pass leaves the rules across sections and tune's rules to this module (they run on whatever
# validated); the second, on a section without its failed fields, leaves out the section's own rules too.
NO_CROSS = {"cross_rules": False, "tune_rules": False}
NO_RULES = {**NO_CROSS, "section_rules": False}


@functools.cache
def _adapter(name: str) -> TypeAdapter:
    return TypeAdapter(JobSpec.model_fields[name].annotation)


class _Partial:
    """A validated section whose failed fields hold defaults: reading one of those raises Blocked instead.
    Properties are evaluated on this view, so one that reads a failed field blocks too."""

    def __init__(self, name: str, obj: Any, failed: set[str]):
        self._name, self._obj, self._failed = name, obj, failed

    def __getattr__(self, attr: str) -> Any:
        if attr in self._failed:
            raise Blocked(f"{self._name}.{attr}")
        prop = getattr(type(self._obj), attr, None)
        if isinstance(prop, property):
            return prop.fget(self)
        return getattr(self._obj, attr)


class _View:
    """The spec's sections as attributes, for the rules: a section that failed as a whole raises Blocked."""

    def __init__(self, sections: dict[str, Any]):
        self._sections = sections

    def __getattr__(self, name: str) -> Any:
        if name not in self._sections:
            raise Blocked(name)
        return self._sections[name]


def _own_rules(loc: tuple[str, ...], view: Any, obj: Any) -> tuple[list[dict], set[str]]:
    """Run the section's own rules (and those of the sections nested in it) on ``view``: the errors of the
    rules that fail, and the failed values that kept others from running."""
    errors: list[dict] = []
    blocked: set[str] = set()
    for dec in type(obj).__pydantic_decorators__.model_validators.values():
        rule = getattr(dec.func, RULE_ATTR, None)
        if rule is None:
            continue
        try:
            rule(view)
        except Blocked as b:
            blocked.add(b.what)
        except (ValueError, AssertionError) as e:
            errors.append(_error(loc, str(e)))
    for name in type(obj).model_fields:
        try:
            inner = getattr(view, name)
        except Blocked:
            continue
        if isinstance(inner, BaseModel):
            more, why = _own_rules((*loc, name), inner, inner)
            errors += more
            blocked |= why
    return errors, blocked


def _error(loc: tuple[Any, ...], msg: str, value: Any = None) -> dict:
    return {"type": "value_error", "loc": loc, "msg": msg, "input": value}


def _sections(doc: dict, errors: list[dict]) -> tuple[dict[str, Any], list[dict], set[str]]:
    """Each top-level section that can be read, the errors of the rules of the sections that had errors,
    and the failed values that kept rules from running. A section whose errors are its rules or some of its
    fields is validated again without those fields (their defaults instead) and without its rules, and is
    read through a view that raises Blocked for the failed fields. A section that failed as a whole (wrong
    type, missing) is left out: reading it raises Blocked."""
    whole: set[str] = set()
    failed: dict[str, set[str]] = {}
    for e in errors:
        loc = e["loc"]
        if len(loc) == 1 and e["type"] not in ("value_error", "assertion_error"):
            whole.add(str(loc[0]))
        elif loc:
            fields = failed.setdefault(str(loc[0]), set())
            if len(loc) > 1:
                fields.add(str(loc[1]))
    out: dict[str, Any] = {}
    found: list[dict] = []
    blocked: set[str] = set()
    for name, info in JobSpec.model_fields.items():
        raw = doc.get(name)
        if name in whole:
            continue
        fields = failed.get(name, set())
        model = unwrap_model(info.annotation)
        if name in failed:
            if not isinstance(raw, dict) or model is None:
                continue
            raw = {k: v for k, v in raw.items() if k not in fields or (name, k) == ("tune", "space")}
            if name == "tune" and isinstance(raw.get("space"), dict):  # keep the swept paths that are valid
                bad = {e["loc"][2] for e in errors if e["loc"][:2] == ("tune", "space") and len(e["loc"]) > 2}
                raw["space"] = {k: v for k, v in raw["space"].items() if k not in bad}
                fields = fields - {"space"}
        if name not in doc:
            out[name] = info.get_default(call_default_factory=True)
            continue
        if model is None:
            out[name] = raw  # a scalar or mapping of scalars that validated as part of the whole
            continue
        try:
            obj = _adapter(name).validate_python(raw, context=NO_RULES if name in failed else NO_CROSS)
        except ValidationError:
            continue
        out[name] = _Partial(name, obj, fields) if fields else obj
        if name in failed and name != "tune" and obj is not None:  # tune's own rules: in _tune_checks
            more, why = _own_rules((name,), out[name], obj)
            found += more
            blocked |= why
    return out, found, blocked


def _tune_entries(doc: dict, tune: Any, errors: list[dict]) -> tuple[list[tuple[str, Any]], str]:
    """(path, Distribution) for each swept path whose distribution is valid, and the search in force."""
    if tune is not None:
        try:
            search = tune.search
        except Blocked:
            search = "random"  # a failed search: the checks that depend on it wait for it
        return list(tune.space.items()), search
    raw = doc.get("tune")
    raw = raw if isinstance(raw, dict) else {}
    failed = {tuple(e["loc"][:3]) for e in errors}
    search = raw.get("search", "random") if ("tune", "search") not in failed else "random"
    entries = []
    space = raw.get("space")
    for path, value in (space.items() if isinstance(space, dict) else ()):
        if ("tune", "space", path) in failed or not isinstance(path, str):
            continue
        try:
            entries.append((path, Distribution.model_validate(value)))
        except ValidationError:
            continue
    return entries, search


def collect(doc: dict) -> tuple[JobSpec | None, list[dict], list[str]]:
    """(the spec when valid, every error as pydantic-shaped dicts, notes on the checks that were skipped)."""
    try:
        spec: JobSpec | None = JobSpec.model_validate(doc, context=NO_CROSS)
        errors: list[dict] = []
    except ValidationError as e:
        spec, errors = None, e.errors(include_url=False)
    if spec is None:
        sections, found_within, blocked = _sections(doc, errors)
        errors += found_within
    else:
        sections, blocked = {n: getattr(spec, n) for n in JobSpec.model_fields}, set()
    found, blocked_across = cross_problems(_View(sections))
    errors += [_error(loc, msg) for loc, msg in found]
    blocked |= blocked_across
    notes = []
    if blocked:
        notes.append(f"cross-field checks involving {', '.join(sorted(blocked))} skipped: "
                     "fix the field errors above first")
    if doc.get("tune") is not None:
        notes += _tune_checks(doc, spec, sections, errors)
    return (spec if not errors else None), errors, notes


def _tune_checks(doc: dict, spec: JobSpec | None, sections: dict, errors: list[dict]) -> list[str]:
    """Adds the tune section's problems to ``errors``; returns a note on what could not be checked."""
    entries, search = _tune_entries(doc, sections.get("tune"), errors)
    clean = []
    for path, dist in entries:
        problem = entry_problem(path, dist, search)
        if problem is not None:
            errors.append(_error(("tune", "space", path), *problem))
        else:
            clean.append((path, dist))
    skipped = []
    try:
        if "tune" in sections:
            errors += [_error(("tune", *loc), msg, value) for loc, msg, value in tune_rule_problems(sections["tune"])]
    except Blocked:
        skipped.append("tune.mode and tune.num_samples (they read failed values)")
    rest = None  # the spec without its tune section, when that is valid: the values are tried on it
    if not any(e["loc"][:1] != ("tune",) for e in errors):
        try:
            rest = spec or JobSpec.model_validate({k: v for k, v in doc.items() if k != "tune"})
        except ValidationError:
            pass
    if rest is not None:
        errors += [_error(*p) for p in value_problems(base_doc(rest), clean, combinations=len(clean) == len(entries))]
    else:
        skipped.append("the swept values (each is tried on the spec, which has errors)")
    try:
        errors += [_error(loc, msg, value) for loc, msg, value in schedule_problems(_View(sections))]
    except Blocked:
        skipped.append("tune.metric and ASHA's rungs (they read failed values)")
    return [f"tune checks skipped for {' and '.join(skipped)}: fix the problems above first"] if skipped else []
