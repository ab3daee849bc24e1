"""Sweeps: a spec with a ``tune:`` section runs one Ray Tune trial per sampled set of values.

Every trial is a whole run of the spec (a ``TorchTrainer`` with ``compute.num_workers`` workers) with the
sampled values applied as overrides, named ``trial-<n>`` and stored under the sweep's dir::

    {storage.path}/{name}/
        sweep_spec.yaml      the sweep's resolved spec (with its tune section)
        trial-000/ …         each trial a normal run dir: rtf_spec.yaml, metrics.jsonl, checkpoint-*, final/
        tune/                Ray Tune's experiment state (what a resubmission restores)
        results.csv          a row per trial: swept values, best metric, steps, status
        best.yaml            the winning values in a complete spec without tune: → `rtf submit best.yaml`

The workers report each evaluation to Ray Train (``report_evals``); :class:`ReportToTune`, a Train
callback, forwards the reports that carry the sweep's metric to Tune as they happen, so ASHA can stop a
poor trial at a rung (a training step) and hand its resources to the next one. Resubmitting the same
spec restores the Tune experiment: finished trials are kept, unfinished ones resume from their latest
committed checkpoint.

This module is imported by the spec validator (:func:`check_space`): nothing heavy at module level.
"""

from __future__ import annotations

import copy
import csv
import difflib
import hashlib
import io
import itertools
import json
import math
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from raytune_ft import storage as st
from raytune_ft.errors import UserError
from raytune_ft.spec.loader import (
    Source,
    _model_at,
    _unwrap_model,
    apply_override,
    dump_spec,
    format_errors,
    spec_hash,
    to_yaml,
    validate_document,
)
from raytune_ft.spec.models import JobSpec

TRIAL_PREFIX = "trial-"
TUNE_DIR = "tune"
RESULTS_CSV = "results.csv"
BEST_YAML = "best.yaml"
SWEEP_SPEC = "sweep_spec.yaml"
FINAL_RESULTS = ("final", "final_results.json")

SWEEPABLE = ("model", "tokenizer", "method", "data", "training", "deepspeed")
EVAL_METRICS = ("eval_loss", "perplexity")
DIVERGED = 1e30  # what Tune sees for a NaN/inf loss, so schedulers and ranking treat it as the worst
MAX_COMBINATIONS = 256  # the whole-space check validates every combination of edge values up to this many
TRIAL_DRIVER_MEMORY = 256 * 2**20  # a trial only drives its TorchTrainer: no CPU (its workers have theirs), some memory

STATUS_COMPLETED = "completed"
STATUS_STOPPED = "stopped early"
STATUS_ERROR = "error"
STATUS_UNFINISHED = "unfinished"
FIXED_COLUMNS = ("trial", "steps", "status", "stopped_early", "error", "run_dir")


# --------------------------------------------------------------------------- the space, checked at spec load


def _field_at(path: str) -> tuple[Any, str | None]:
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
        model = _model_at(loc)
        if model is None:
            return None, f"`{'.'.join(parts[:i])}` is a value, not a section"
        if part not in model.model_fields:
            close = difflib.get_close_matches(part, list(model.model_fields), n=1, cutoff=0.6)
            where = ".".join(parts[:i]) or "the spec"
            hint = f"did you mean `{'.'.join(parts[:i] + [close[0]])}`?" if close else \
                f"valid keys of {where}: {', '.join(model.model_fields)}"
            return None, f"no field `{path}` in the spec schema; {hint}"
        loc += (part,)
    info = _model_at(loc[:-1]).model_fields[loc[-1]]  # type: ignore[union-attr]
    if _unwrap_model(info.annotation) is not None and not _accepts_list(info.annotation):
        return None, f"`{path}` is a section; sweep one of its values (e.g. `{path}.{next(iter(_unwrap_model(info.annotation).model_fields))}`)"
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
    info, _ = _field_at(path)
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


def _edge_values(dist: Any, kind: str | None) -> list[Any]:
    """The values whose validity stands for all the distribution can sample: its bounds, or each option."""
    if dist.options is not None:
        return list(dist.options)
    lo, hi = dist.lo_hi
    return [int(lo), int(hi)] if kind == "int" else [lo, hi]


def _base_doc(spec: JobSpec) -> dict:
    doc = dump_spec(spec)
    doc.pop("tune", None)
    doc.pop("extends", None)  # the dump is resolved: a preset merged again would change nothing
    return doc


def _with_values(base: dict, values: dict[str, Any]) -> dict:
    doc = copy.deepcopy(base)
    for path, value in values.items():
        apply_override(doc, path.split("."), value, f"tune.space.{path}={value!r}")
    return doc


def _invalid(base: dict, values: dict[str, Any]) -> str | None:
    """Why the spec with these values is invalid, or None."""
    from pydantic import ValidationError

    try:
        JobSpec.model_validate(_with_values(base, values))
    except UserError as e:  # from apply_override: "--set <text>: why"
        return e.message.split(": ", 1)[1] if e.message.startswith("--set ") and ": " in e.message else e.message
    except ValidationError as e:
        return "; ".join(format_errors(e, Source()))
    return None


def space_problems(spec: JobSpec) -> list[tuple[tuple[Any, ...], str, Any]]:
    """(location, message, value) for every problem of the spec's tune section against the schema."""
    tune = spec.tune
    assert tune is not None
    problems: list[tuple[tuple[Any, ...], str, Any]] = []
    base = _base_doc(spec)
    edges: dict[str, list[Any]] = {}
    for path, dist in tune.space.items():
        loc = ("tune", "space", path)
        info, why = _field_at(path)
        if info is None:
            problems.append((loc, why, path))
            continue
        kind = numeric_kind(path)
        if dist.lo_hi is not None:
            if kind is None:
                problems.append((loc, f"{dist.kind} samples numbers but `{path}` is not numeric; "
                                      "list its values with choice or grid", dist.kind))
                continue
            if kind == "int" and not all(float(x).is_integer() for x in dist.lo_hi):
                problems.append((loc, f"`{path}` is an integer: {dist.kind} bounds must be whole numbers "
                                      f"(got {list(dist.lo_hi)})", list(dist.lo_hi)))
                continue
        if tune.search == "grid" and dist.lo_hi is not None:
            problems.append((loc, f"tune.search grid runs every value: give a list with {{grid: [...]}} "
                                  f"or {{choice: [...]}}, not {dist.kind}", dist.kind))
            continue
        if tune.search == "optuna" and dist.kind == "grid":
            problems.append((loc, "tune.search optuna samples values: use {choice: [...]} instead of grid", "grid"))
            continue
        values = _edge_values(dist, kind)
        bad = next(((v, err) for v in values if (err := _invalid(base, {path: v}))), None)
        if bad is not None:
            problems.append((loc, f"the value {bad[0]!r} gives an invalid spec: {bad[1]}", bad[0]))
            continue
        edges[path] = values
    if not problems and len(edges) > 1:
        combos = math.prod(len(v) for v in edges.values())
        if combos <= MAX_COMBINATIONS:
            for combo in itertools.product(*edges.values()):
                values = dict(zip(edges, combo))
                err = _invalid(base, values)
                if err:
                    shown = ", ".join(f"{p}={v!r}" for p, v in values.items())
                    problems.append((("tune", "space"), f"the combination {shown} gives an invalid spec: {err}", None))
                    break
    t = spec.training
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


def report_interval(spec: JobSpec) -> int | None:
    """Every how many steps the sweep's metric reaches Tune (None: per epoch)."""
    t = spec.training
    assert spec.tune is not None
    if spec.tune.metric in EVAL_METRICS:
        return (t.eval_steps or t.logging_steps) if t.eval_strategy == "steps" else None
    return t.save_steps


def check_space(spec: JobSpec) -> None:
    """Raise pydantic's ValidationError located at ``tune.space.<path>`` (the loader adds file:line)."""
    problems = space_problems(spec)
    if not problems:
        return
    from pydantic import ValidationError
    from pydantic_core import PydanticCustomError

    raise ValidationError.from_exception_data("JobSpec", [
        {"type": PydanticCustomError("value_error", "{msg}", {"msg": msg}), "loc": loc, "input": value}
        for loc, msg, value in problems
    ])


# --------------------------------------------------------------------------- trials


def trial_run_name(trial_id: str) -> str:
    """``trial-003`` for Tune's ``<experiment>_00003`` ids (random and grid search), else ``trial-<id>``."""
    head, _, tail = str(trial_id).rpartition("_")
    if head and tail.isdigit():
        return f"{TRIAL_PREFIX}{int(tail):03d}"
    return f"{TRIAL_PREFIX}{trial_id}"


def _trial_name(trial: Any) -> str:
    return trial_run_name(trial.trial_id)


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            return v.item()
        except (TypeError, ValueError):
            return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def trial_base(spec: JobSpec) -> dict:
    """The document every trial starts from: the spec without tune:, stored under the sweep's dir."""
    doc = _base_doc(spec)
    doc["storage"]["path"] = sweep_dir_uri(spec)  # absolute: trial actors and workers have their own cwd
    return doc


def trial_spec(base: dict, values: dict[str, Any], name: str) -> JobSpec:
    doc = _with_values(base, {p: _plain(v) for p, v in values.items()})
    doc["name"] = name
    return validate_document(doc, label=f"(trial {name})")


def sweep_dir_uri(spec: JobSpec) -> str:
    base = spec.storage.path
    if st.is_s3(base):
        return st.join(base, spec.name)
    return st.join(st.local_path(base), spec.name)


def best_name(name: str) -> str:
    return f"{name[:58]}-best"


def _run_trial(config: dict[str, Any], base: dict | None = None, metric: str = "eval_loss",
               registry: str = "") -> None:
    """One Tune trial: a whole TorchTrainer run of the spec with this trial's values (the Train driver)."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raytune_ft.launch.driver import scaling_config
    from raytune_ft.train.entry import train_loop  # light: see raytune_ft.train.entry

    assert base is not None
    name = trial_run_name(ray.tune.get_context().get_trial_id())
    spec = trial_spec(base, config, name)
    fs, root = st.pyarrow_filesystem(spec.storage)
    done = st.read_json(fs, st.fs_join(root, name, *FINAL_RESULTS))
    if isinstance(done, dict) and done.get("spec_hash") == spec_hash(spec):
        # this trial finished before the sweep was stopped, but Tune had not recorded it yet: report its
        # final results instead of training it again
        result = to_tune_result({"step": done.get("steps"), "loss": done.get("train_loss"),
                                 "eval_loss": done.get("eval_loss"), "done": True}, metric, False)
        if result is not None:
            ray.tune.report(result)
        return
    st.write_bytes(fs, st.fs_join(root, name, "rtf_spec.yaml"), to_yaml(spec).encode())
    from raytune_ft.launch.driver import forget_train_snapshot

    forget_train_snapshot(fs, st.fs_join(root, name))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": dump_spec(spec), "resume_from": None, "progress": None, "report_evals": True},
        scaling_config=scaling_config(spec),
        torch_config=TorchConfig(backend="nccl" if spec.compute.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=spec.fault_tolerance.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
            callbacks=[_lazy("ReportToTune")(metric), _lazy("TrackPlacementGroup")(registry, name)],
        ),
    )
    trainer.fit()


def to_tune_result(metrics: dict[str, Any], metric: str, has_checkpoint: bool) -> dict[str, Any] | None:
    """What one Ray Train report becomes in Tune, or None when it does not carry a fresh ``metric``.

    Checkpoint reports repeat the last eval, so for an eval metric only evaluation reports and the final
    report count. ``done`` is renamed ``final`` (Tune would otherwise stop the trial before the trainer
    returns), and a NaN/inf loss becomes :data:`DIVERGED` with ``diverged: true``.
    """
    m = {k: _plain(v) for k, v in metrics.items()}
    if m.get("eval_loss") is not None and m.get("perplexity") is None:
        m["perplexity"] = math.exp(min(float(m["eval_loss"]), 50.0)) if math.isfinite(m["eval_loss"]) else m["eval_loss"]
    final = bool(m.pop("done", False))
    if m.get(metric) is None or "step" not in m:
        return None
    if has_checkpoint and metric in EVAL_METRICS and not final:
        return None
    m["final"] = final
    value = float(m[metric])
    m["diverged"] = not math.isfinite(value)
    if m["diverged"]:
        m[metric] = DIVERGED
    return m


def _make_report_to_tune() -> type:
    from ray.tune.integration.ray_train import TuneReportCallback

    class ReportToTune(TuneReportCallback):
        """Ray Train callback (runs in the Train controller): forwards reports with the metric to Tune."""

        def __init__(self, metric: str) -> None:
            super().__init__()
            self.metric = metric

        def after_report(self, run_context, metrics, checkpoint):
            result = to_tune_result(metrics[0] if metrics else {}, self.metric, checkpoint is not None)
            if result is not None:
                super().after_report(run_context, [result], checkpoint)

    return ReportToTune


def _make_track_placement_group() -> type:
    from ray.train.v2._internal.execution.callback import WorkerGroupCallback

    class TrackPlacementGroup(WorkerGroupCallback):
        """Ray Train callback (runs in the Train controller): records which placement group holds this
        trial's workers in the sweep's registry.

        When Tune stops a trial (ASHA, Ctrl-C) it ends the trial's actor, and the Train controller dies with
        it before it can remove its workers' placement group, which belongs to the sweep's job and so
        would hold its CPUs/GPUs until the sweep ends (ray-project/ray#54305). Ray's PlacementGroupCleaner
        covers this only where the state API answers (a dashboard); the sweep driver frees it instead.
        """

        def __init__(self, registry: str, trial: str) -> None:
            self.registry, self.trial = registry, trial

        def after_worker_group_start(self, worker_group) -> None:
            import ray

            try:
                pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
                ray.get_actor(self.registry, namespace=NAMESPACE).put.remote(self.trial, pg)
            except Exception as e:  # noqa: BLE001 - never fail a trial for its bookkeeping
                print(f"rtf: could not record the placement group of {self.trial}: {e}")

    return TrackPlacementGroup


class PlacementGroupRegistry:
    """A small actor in the sweep driver's namespace: trial name -> its workers' placement group."""

    def __init__(self) -> None:
        self.groups: dict[str, Any] = {}

    def put(self, trial: str, pg: Any) -> None:
        self.groups[trial] = pg

    def pop(self, trial: str) -> Any:
        return self.groups.pop(trial, None)

    def names(self) -> list[str]:
        return list(self.groups)


NAMESPACE = "rtf"
FREE_AFTER_S = 5.0


def registry_name(spec_name: str) -> str:
    return f"rtf-sweep-pgs-{spec_name}"


def free_placement_group(registry: str, trial: str) -> bool:
    """Remove the placement group of a trial that Tune stopped (True when one was still held)."""
    import ray
    from ray.util.placement_group import placement_group_table, remove_placement_group

    try:
        pg = ray.get(ray.get_actor(registry, namespace=NAMESPACE).pop.remote(trial), timeout=30)
        if pg is None or placement_group_table(pg).get("state") in (None, "REMOVED"):
            return False
        remove_placement_group(pg)
        return True
    except Exception:  # noqa: BLE001 - best effort: the sweep's end frees the rest with the job
        return False


# --------------------------------------------------------------------------- live events in the driver

_EMIT: Callable[[dict[str, Any]], None] = lambda e: None  # noqa: E731 - set by run_sweep for this process


def _say(message: str) -> None:
    try:
        _EMIT({"kind": "info", "message": message})
    except Exception:  # noqa: BLE001 - progress lines never stop a sweep
        pass


def _values_text(config: dict[str, Any], paths: list[str]) -> str:
    return ", ".join(f"{p}={_fmt(_plain(config.get(p)))}" for p in paths)


def _make_sweep_events() -> type:
    from ray.tune import Callback

    class SweepEvents(Callback):
        """Tune callback (runs in the driver): one line per trial start, metric, stop, end, failure."""

        def __init__(self, metric: str, paths: list[str], storage: dict[str, Any], registry: str = "") -> None:
            self.metric, self.paths, self.storage, self.registry = metric, list(paths), dict(storage), registry

        def _finished(self, name: str) -> bool:
            fs, root = st.pyarrow_filesystem(st.StorageConfig(**self.storage))
            return st.exists(fs, st.fs_join(root, name, *FINAL_RESULTS))

        def on_trial_start(self, iteration, trials, trial, **info):
            _say(f"{_trial_name(trial)} started: {_values_text(trial.config, self.paths)}")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            seen = getattr(self, "_seen", None)
            if seen is None:
                seen = self._seen = set()
            key = (trial.trial_id, result.get("step"))
            if self.metric in result and key not in seen:
                seen.add(key)
                value = "diverged (nan/inf)" if result.get("diverged") else f"{result[self.metric]:.4f}"
                _say(f"{_trial_name(trial)} step {result.get('step')}: {self.metric} {value}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            name = _trial_name(trial)
            last = trial.last_result or {}
            if self._finished(name):
                _say(f"{name} completed at step {last.get('step')}")
            else:
                self._free_later(name)
                _say(f"{name} stopped early by the scheduler at step {last.get('step')}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._free_later(_trial_name(trial))
            _say(f"{_trial_name(trial)} failed: {_error_line(trial)}")

        def _free_later(self, name: str) -> None:
            # once the trial's actor (and the Train controller with it) is gone, so that no controller is
            # left to start its workers again in a new placement group
            pending = self.__dict__.setdefault("_pending", {})
            pending[name] = time.monotonic() + FREE_AFTER_S

        def on_step_end(self, iteration, trials, **info):
            pending = self.__dict__.get("_pending") or {}
            for name, when in list(pending.items()):
                if time.monotonic() >= when:
                    del pending[name]
                    free_placement_group(self.registry, name)

    return SweepEvents


def __getattr__(name: str) -> Any:
    """``ReportToTune`` and ``SweepEvents`` subclass Ray classes; they are made on first use so that
    importing this module stays light, and are module attributes so that pickles refer to them by name."""
    makers = {"ReportToTune": _make_report_to_tune, "SweepEvents": _make_sweep_events,
              "TrackPlacementGroup": _make_track_placement_group}
    if name not in makers:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = makers[name]()
    cls.__module__, cls.__qualname__ = __name__, name
    globals()[name] = cls
    return cls


def _lazy(name: str) -> type:
    return globals().get(name) or __getattr__(name)


def _error_line(trial: Any) -> str:
    text = ""
    try:
        path = trial.error_file
        if path:
            with open(path) as f:
                text = f.read()
    except Exception:  # noqa: BLE001
        text = ""
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "see the trial's error.txt under tune/"


# --------------------------------------------------------------------------- Tune objects


def param_space(spec: JobSpec) -> dict[str, Any]:
    from ray import tune

    assert spec.tune is not None
    out: dict[str, Any] = {}
    for path, d in spec.tune.space.items():
        integer = numeric_kind(path) == "int"
        if d.kind == "grid" or (d.kind == "choice" and spec.tune.search == "grid"):
            out[path] = tune.grid_search(list(d.options))
        elif d.kind == "choice":
            out[path] = tune.choice(list(d.options))
        else:
            lo, hi = d.lo_hi
            if integer:
                out[path] = (tune.lograndint if d.kind == "loguniform" else tune.randint)(int(lo), int(hi) + 1)
            else:
                out[path] = (tune.loguniform if d.kind == "loguniform" else tune.uniform)(float(lo), float(hi))
    return out


def scheduler(spec: JobSpec) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    assert spec.tune is not None
    s = spec.tune.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    # rungs at grace × rf^k steps below max_t; a trial that reaches max_t is never stopped for it
    # (stop_last_trials=False), so a trial finishing its last steps is never cut short while it saves
    return ASHAScheduler(time_attr="step", grace_period=s.grace_period or report_interval(spec),
                         reduction_factor=s.reduction_factor, max_t=spec.training.max_steps or 10**9,
                         stop_last_trials=False)


def search_algorithm(spec: JobSpec, concurrency: int) -> Any:
    """Random/grid: Tune's variant generator, limited to ``concurrency`` trials in flight (Tune ignores
    TuneConfig.max_concurrent_trials for a generator passed in). Optuna: limited by Tune."""
    assert spec.tune is not None
    t = spec.tune
    if t.search == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise UserError("tune.search optuna needs the optuna package", hint="pip install optuna") from None
        return OptunaSearch(seed=t.seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency)


def default_concurrency(spec: JobSpec) -> int:
    """As many trials as the cluster fits at once (each needs all its workers' resources)."""
    import ray

    from raytune_ft.plan import make_plan

    plan = make_plan(spec)
    have = ray.cluster_resources()
    fits = [int(have.get(k, 0) // (v * plan.num_workers)) for k, v in plan.resources_per_worker.items() if v > 0]
    return max(1, min(fits) if fits else 1)


def sweep_identity(spec: JobSpec) -> str:
    """What a resubmission must keep to continue the same sweep: the training and the search."""
    assert spec.tune is not None
    tune = spec.tune.model_dump(mode="json", exclude={"max_concurrent_trials"})
    blob = json.dumps({"spec": spec_hash(spec), "tune": tune}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- results


@dataclass
class TrialRow:
    trial: str
    values: dict[str, Any]
    best: float | None
    steps: int | None
    status: str
    run_dir: str
    error: str | None = None
    diverged: bool = False

    @property
    def stopped_early(self) -> bool:
        return self.status == STATUS_STOPPED


@dataclass
class SweepResults:
    name: str
    metric: str
    mode: str
    paths: list[str]
    rows: list[TrialRow]
    scheduler: str = "fifo"
    location: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> TrialRow | None:
        ok = [r for r in self.rows if r.best is not None and not r.diverged and math.isfinite(r.best)]
        if not ok:
            return None
        return (min if self.mode == "min" else max)(ok, key=lambda r: r.best)  # type: ignore[arg-type,return-value]

    @property
    def unfinished(self) -> list[TrialRow]:
        return [r for r in self.rows if r.status == STATUS_UNFINISHED]


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower() if isinstance(v, bool) else "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def collect_results(spec: JobSpec, fs: Any, tune_path: str) -> SweepResults:
    """The sweep's trials as Tune recorded them, with each trial's status from its run dir."""
    from ray.tune import ExperimentAnalysis
    from ray.tune.experiment import Trial

    assert spec.tune is not None
    metric = spec.tune.metric
    analysis = ExperimentAnalysis(tune_path, storage_filesystem=fs, default_metric=metric,
                                  default_mode=spec.tune.mode)
    _, root = st.pyarrow_filesystem(spec.storage)
    sweep_path = st.fs_join(root, spec.name)
    uri = sweep_dir_uri(spec)
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        name = _trial_name(trial)
        values = {p: _plain(trial.config.get(p)) for p in spec.tune.space}
        df = frames.get(trial.trial_id)
        series: list[float] = []
        steps = None
        diverged = False
        if df is not None and metric in df.columns:
            series = [float(x) for x in df[metric].dropna().tolist()]
            if "step" in df.columns and len(df["step"].dropna()):
                steps = int(df["step"].dropna().max())
            if "diverged" in df.columns:
                diverged = bool(df["diverged"].fillna(False).astype(bool).any())
        elif trial.last_result:
            last = trial.last_result
            series = [float(last[metric])] if last.get(metric) is not None else []
            steps = last.get("step")
        finite = [x for x in series if math.isfinite(x) and x < DIVERGED]
        best = (min(finite) if spec.tune.mode == "min" else max(finite)) if finite else None
        diverged = diverged or len(finite) < len(series)
        done = st.exists(fs, st.fs_join(sweep_path, name, *FINAL_RESULTS))
        if trial.status == Trial.ERROR:
            status, error = STATUS_ERROR, _error_line(trial)
        elif trial.status == Trial.TERMINATED:
            status, error = (STATUS_COMPLETED if done else STATUS_STOPPED), None
        else:
            status, error = STATUS_UNFINISHED, None
        if done:
            final = st.read_json(fs, st.fs_join(sweep_path, name, *FINAL_RESULTS)) or {}
            steps = final.get("steps", steps)
        rows.append(TrialRow(name, values, best, steps, status, st.join(uri, name), error, diverged))
    rows.sort(key=lambda r: r.trial)
    sched = spec.tune.scheduler.type
    return SweepResults(spec.name, metric, spec.tune.mode, list(spec.tune.space), rows, sched, uri)


def results_csv(res: SweepResults) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial", *res.paths, res.metric, "steps", "status", "stopped_early", "error", "run_dir"])
    for r in res.rows:
        value = "nan" if r.diverged and r.best is None else ("" if r.best is None else repr(r.best))
        status = r.status + (", diverged" if r.diverged and r.best is not None else "")
        w.writerow([r.trial, *(json.dumps(r.values.get(p)) for p in res.paths), value,
                    "" if r.steps is None else r.steps, status, str(r.stopped_early).lower(), r.error or "",
                    r.run_dir])
    return buf.getvalue()


def parse_results_csv(text: str, *, name: str = "", location: str = "") -> SweepResults:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or not rows[0] or rows[0][0] != "trial":
        raise UserError(f"{location or 'results.csv'}: not a sweep results file")
    header = rows[0]
    metrics = [c for c in header if c in ("eval_loss", "perplexity", "loss")]
    if len(metrics) != 1:
        raise UserError(f"{location or 'results.csv'}: no metric column in {header}")
    metric = metrics[0]
    paths = [c for c in header if c not in FIXED_COLUMNS and c != metric]
    out = []
    for raw in rows[1:]:
        rec = dict(zip(header, raw))
        vals = {}
        for p in paths:
            try:
                vals[p] = json.loads(rec.get(p, ""))
            except ValueError:
                vals[p] = rec.get(p)
        best_text = rec.get(metric, "")
        best = float(best_text) if best_text not in ("", "nan") else None
        status = rec.get("status", "")
        diverged = best_text == "nan" or status.endswith(", diverged")
        status = status.removesuffix(", diverged")
        out.append(TrialRow(rec["trial"], vals, best, int(rec["steps"]) if rec.get("steps") else None,
                            status, rec.get("run_dir", ""), rec.get("error") or None, diverged))
    return SweepResults(name, metric, "min", paths, out, location=location)


def render_table(res: SweepResults) -> str:
    head = ["trial", *res.paths, f"best {res.metric}", "steps", "status"]
    body = []
    for r in res.rows:
        best = "diverged" if r.diverged and r.best is None else ("-" if r.best is None else f"{r.best:.4f}")
        status = r.status + (", diverged" if r.diverged else "") + (f": {r.error}" if r.error else "")
        body.append([r.trial, *(_fmt(r.values.get(p)) for p in res.paths), best,
                     "-" if r.steps is None else str(r.steps), status])
    right = {len(head) - 3, len(head) - 2} | set(range(1, 1 + len(res.paths)))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join((c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    counts: dict[str, int] = {}
    for r in res.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    title = f"sweep {res.name}: {len(res.rows)} trial(s), " + ", ".join(f"{n} {s}" for s, n in counts.items())
    out = [title, line(head), *(line(b) for b in body)]
    best = res.best
    if best is not None:
        out.append(f"best: {best.trial} ({res.metric} {best.best:.4f}): "
                   + " ".join(f"{p}={_fmt(best.values.get(p))}" for p in res.paths))
    return "\n".join(out)


def best_spec(spec: JobSpec, res: SweepResults) -> JobSpec | None:
    """The spec of a full run with the winning values: no tune:, named ``{name}-best``."""
    best = res.best
    if best is None:
        return None
    doc = _with_values(_base_doc(spec), best.values)
    doc["name"] = best_name(spec.name)
    doc["description"] = (f"the best trial of sweep {spec.name}: {best.trial} ({res.metric} {best.best:.4f}) with "
                          + ", ".join(f"{p}={_fmt(best.values.get(p))}" for p in res.paths))
    return validate_document(doc, label="(best of the sweep)")


def write_results(spec: JobSpec, fs: Any, res: SweepResults) -> dict[str, str]:
    _, root = st.pyarrow_filesystem(spec.storage)
    sweep_path = st.fs_join(root, spec.name)
    st.write_bytes(fs, st.fs_join(sweep_path, RESULTS_CSV), results_csv(res).encode())
    out = {"results": st.join(res.location, RESULTS_CSV)}
    best = best_spec(spec, res)
    if best is not None:
        text = (f"# the best trial of sweep {spec.name}, as a complete spec: rtf submit this file\n"
                + to_yaml(best))
        st.write_bytes(fs, st.fs_join(sweep_path, BEST_YAML), text.encode())
        out["best"] = st.join(res.location, BEST_YAML)
    return out


# --------------------------------------------------------------------------- the sweep driver


def run_sweep(spec: JobSpec, *, fresh: bool = False, on_event: Callable[[dict[str, Any]], None] | None = None):
    """Run (or continue) the sweep on the Ray cluster this process is connected to.

    Returns the driver's ``RunResult`` for the best trial (its run dir and final results). A sweep stopped
    by Ctrl-C writes what it has and raises KeyboardInterrupt: resubmitting continues it."""
    global _EMIT
    import ray
    from ray import tune

    from raytune_ft.launch.driver import RunResult, keep_aside

    assert spec.tune is not None
    emit = on_event or (lambda e: None)
    _EMIT = emit
    fs, root = st.pyarrow_filesystem(spec.storage)
    sweep_path = st.fs_join(root, spec.name)
    tune_path = st.fs_join(sweep_path, TUNE_DIR)
    uri = sweep_dir_uri(spec)
    if fresh:
        aside = keep_aside(spec)
        if aside:
            emit({"kind": "info", "message": f"--fresh: the previous sweep was moved aside to {aside}"})
    identity = sweep_identity(spec)
    restore = tune.Tuner.can_restore(tune_path, storage_filesystem=fs)
    if restore:
        before = st.read_bytes(fs, st.fs_join(sweep_path, SWEEP_SPEC))
        was = yaml.safe_load(before.decode()) if before else None
        if not isinstance(was, dict) or was.get("identity") != identity:
            raise UserError(
                f"a different sweep already lives in {uri} (its spec or tune section changed since it started)",
                hint="resubmit with --fresh to start over (the old sweep is moved aside, never deleted), "
                     "or give this sweep another name")
    st.write_bytes(fs, st.fs_join(sweep_path, SWEEP_SPEC),
                   yaml.safe_dump({"identity": identity, "spec": dump_spec(spec)}, sort_keys=False).encode())

    t = spec.tune
    registry = registry_name(spec.name)
    holder = ray.remote(num_cpus=0)(PlacementGroupRegistry).options(
        name=registry, namespace=NAMESPACE, get_if_exists=True).remote()
    trainable = tune.with_resources(tune.with_parameters(_run_trial, base=trial_base(spec), metric=t.metric,
                                                         registry=registry),
                                    {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    if restore:
        tuner = tune.Tuner.restore(tune_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
        emit({"kind": "info", "message": f"sweep {spec.name}: continuing from {st.join(uri, TUNE_DIR)} "
              "(finished trials are kept, unfinished ones resume from their last checkpoint)"})
    else:
        concurrency = t.max_concurrent_trials or default_concurrency(spec)
        storage = {k: getattr(spec.storage, k) for k in ("path", "endpoint_url", "region", "access_key_env",
                                                          "secret_key_env", "session_token_env")}
        storage["path"] = uri
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(
                metric=t.metric, mode=t.mode, scheduler=scheduler(spec),
                search_alg=search_algorithm(spec, concurrency), num_samples=t.num_samples or 1,
                max_concurrent_trials=concurrency if t.search == "optuna" else None,
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
            ),
            run_config=tune.RunConfig(
                name=TUNE_DIR, storage_path=sweep_path, storage_filesystem=fs, verbose=0,
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[_lazy("SweepEvents")(t.metric, list(t.space), storage, registry)],
            ),
        )
        emit({"kind": "info", "message": f"sweep {spec.name}: {_describe(spec)}; up to {concurrency} trial(s) "
              f"at once, each {spec.compute.num_workers} worker(s); in {uri}"})
    import os

    # Tune's new output engine prints its experiment table and a TensorBoard hint even at verbose=0; the
    # legacy engine is silent at verbose=0, and the SweepEvents callback above reports the sweep instead
    air_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        tuner.fit()
    finally:  # trials Tune stopped at the end (Ctrl-C) leave their workers' placement groups behind
        if air_output is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = air_output
        for name in ray.get(holder.names.remote()):
            free_placement_group(registry, name)
        ray.kill(holder)
    res = collect_results(spec, fs, tune_path)
    files = write_results(spec, fs, res)
    table = render_table(res)
    lines = [table, f"results: {files['results']}"]
    if "best" in files:
        lines.append(f"best spec: {files['best']}   (promote the winner: rtf submit {files['best']})")
    emit({"kind": "info", "message": "\n" + "\n".join(lines)})
    if res.unfinished:
        raise KeyboardInterrupt(f"sweep {spec.name} interrupted with {len(res.unfinished)} unfinished trial(s)")
    best = res.best
    if best is None:
        errors = [r.error for r in res.rows if r.error]
        return RunResult(False, uri, {"sweep": True},
                         error=f"no trial of sweep {spec.name} reported {t.metric}"
                               + (f"; first error: {errors[0]}" if errors else ""))
    final = st.read_json(fs, st.fs_join(sweep_path, best.trial, *FINAL_RESULTS))
    summary = final if isinstance(final, dict) else {"steps": best.steps, t.metric: best.best}
    return RunResult(True, best.run_dir, {**summary, "sweep": True, "best_trial": best.trial,
                                          "results": files["results"], "best_spec": files.get("best")})


def _describe(spec: JobSpec) -> str:
    assert spec.tune is not None
    t = spec.tune
    dims = ", ".join(f"{p} {d.kind} {list(d.options) if d.options is not None else list(d.lo_hi)}"
                     for p, d in t.space.items())
    sched = t.scheduler
    how = (f"ASHA (rungs from step {sched.grace_period or report_interval(spec)}, ×{sched.reduction_factor})"
           if sched.type == "asha" else "FIFO (every trial runs to its end)")
    n = t.num_samples or 1
    grid = math.prod(len(d.options) for d in t.space.values() if d.kind == "grid" or
                     (d.kind == "choice" and t.search == "grid"))
    return f"{n * grid} trial(s), {t.search} search over {dims}; {how}; metric {t.metric} ({t.mode})"


# --------------------------------------------------------------------------- `rtf sweep results`


def locate(target: str, *, storage: str = "./rtf_runs", endpoint_url: str | None = None) -> tuple[Any, str, str]:
    """(filesystem, sweep dir path, display URI) for a sweep NAME (under ``storage``), a dir, an s3:// URI,
    or a spec file."""
    import os

    if target.endswith((".yaml", ".yml")) and os.path.isfile(target):
        from raytune_ft.spec import load_spec

        spec = load_spec(target)
        fs, root = st.pyarrow_filesystem(spec.storage)
        return fs, st.fs_join(root, spec.name), sweep_dir_uri(spec)
    if st.is_s3(target):
        cfg = st.StorageConfig.from_uri(target, endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
        fs, path = st.pyarrow_filesystem(cfg)
        return fs, path, target.rstrip("/")
    if os.path.isdir(target) or os.sep in target or target.startswith("."):
        path = st.local_path(target)
    else:
        base = storage
        if st.is_s3(base):
            return locate(st.join(base, target), endpoint_url=endpoint_url)
        path = os.path.join(st.local_path(base), target)
    import pyarrow.fs as pafs

    return pafs.LocalFileSystem(), path, path


def load_results(target: str, *, storage: str = "./rtf_runs", endpoint_url: str | None = None) -> tuple[SweepResults, str | None]:
    """The results.csv of a sweep, and the URI of its best.yaml when there is one."""
    import posixpath

    fs, path, shown = locate(target, storage=storage, endpoint_url=endpoint_url)
    with st.storage_errors(st.StorageConfig.from_uri(shown, endpoint_url=endpoint_url), "read"):
        data = st.read_bytes(fs, st.fs_join(path, RESULTS_CSV))
        has_best = st.exists(fs, st.fs_join(path, BEST_YAML))
    if data is None:
        hint = ("the sweep may still be running its first trials, or this is not a sweep dir"
                if st.exists(fs, path) else "pass a sweep name (with --storage), its dir, an s3:// URI or its spec")
        raise UserError(f"no {RESULTS_CSV} in {shown}", hint=hint)
    res = parse_results_csv(data.decode(), name=posixpath.basename(path.rstrip("/")), location=shown)
    return res, (st.join(shown, BEST_YAML) if has_best else None)


def read_best(target: str, *, storage: str = "./rtf_runs", endpoint_url: str | None = None) -> str:
    """The text of a sweep's best.yaml."""
    fs, path, shown = locate(target, storage=storage, endpoint_url=endpoint_url)
    data = st.read_bytes(fs, st.fs_join(path, BEST_YAML))
    if data is None:
        raise UserError(f"no {BEST_YAML} in {shown} (no trial reported the sweep's metric yet)")
    return data.decode()
