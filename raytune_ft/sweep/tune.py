"""Sweeps on Ray Tune: a spec with a ``tune:`` section runs one Tune trial per sampled set of values.

Every trial is a whole run of the spec (the ``TorchTrainer`` of :mod:`raytune_ft.launch.trainer`, with
``compute.num_workers`` workers) with the sampled values applied as overrides, named ``trial-<n>`` and stored
under the sweep's dir (its layout: :mod:`raytune_ft.rundir`): each trial a normal run dir, Tune's experiment
state (what a resubmission restores), the sweep's resolved spec, and the results (:mod:`raytune_ft.sweep.results`).

The workers report each evaluation to Ray Train (``WorkerConfig.report_evals``); :class:`ReportToTune`, a Train
callback, forwards the reports that carry the sweep's metric to Tune as they happen, so ASHA can stop a
poor trial at a rung (a training step) and hand its resources to the next one. Resubmitting the same
spec restores the Tune experiment: finished trials are kept, unfinished ones resume from their latest
committed checkpoint, and ASHA's rungs are refilled from the results Tune recorded (:class:`ResumableASHA`),
so the resumed sweep stops poor trials as the uninterrupted one would.

Imported only to run a sweep (it imports Ray Tune); the spec-time checks of ``tune.space`` are in
:mod:`raytune_ft.spec.space`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import ray
import yaml
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import EXPR_RESULT_FILE
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from ray.util.placement_group import PlacementGroup, remove_placement_group

from raytune_ft import storage as st
from raytune_ft.errors import UserError
from raytune_ft.launch.progress import relay
from raytune_ft.launch.trainer import RunResult, build_trainer
from raytune_ft.plan import make_plan
from raytune_ft.rundir import TUNE_DIR, RunDir, trial_name
from raytune_ft.spec import dump_spec, spec_hash, to_yaml, validate_document
from raytune_ft.spec.models import JobSpec
from raytune_ft.spec.space import EVAL_METRICS, base_doc, numeric_kind, report_interval, with_values
from raytune_ft.sweep.results import (
    STATUS_COMPLETED,
    STATUS_ERROR,
    STATUS_STOPPED,
    STATUS_UNFINISHED,
    SweepResults,
    TrialRow,
    fmt,
    plain,
    render_table,
    write_results,
)
from raytune_ft.train.config import IN_PROCESS_REPORTS, WorkerConfig
from raytune_ft.train.progress import Publisher, board_name

DIVERGED = 1e30  # what Tune sees for a NaN/inf loss, so schedulers and ranking treat it as the worst
TRIAL_DRIVER_MEMORY = 256 * 2**20  # a trial only drives its TorchTrainer: no CPU (its workers have theirs), some memory
TRIAL_THREAD_TIMEOUT_S = 120  # how long Tune waits for a stopped in-process trial's thread to end
FREE_WAIT_S = 30.0  # how long to look for the placement group a stopped trial leaves behind


# --------------------------------------------------------------------------- trials


def tune_trial_name(trial: Any) -> str:
    """Tune's trial name and trial dir name: the trial's run dir name (``trial-003``)."""
    return trial_name(trial.trial_id)


def trial_base(spec: JobSpec) -> dict:
    """The document every trial starts from: the spec without tune:, stored under the sweep's dir."""
    doc = base_doc(spec)
    doc["storage"]["path"] = RunDir.of(spec).uri  # absolute: trial actors and workers have their own cwd
    return doc


def trial_spec(base: dict, values: dict[str, Any], name: str) -> JobSpec:
    doc = with_values(base, {p: plain(v) for p, v in values.items()})
    doc["name"] = name
    return validate_document(doc, label=f"(trial {name})")


def _run_trial(config: dict[str, Any], base: dict | None = None, metric: str = "eval_loss",
               in_process: bool = False) -> None:
    """One Tune trial (Tune's function trainable, by this name in its experiment state): a whole run of the
    spec with this trial's values, through the same TorchTrainer as a plain run.

    ``in_process`` (a local sweep of one-worker trials, :func:`raytune_ft.launch.local.trials_in_process`): the
    trial trains in this trial actor's own process, in Ray Train's local mode, when Tune gave the trial its
    worker's resources (:func:`trial_resources`; a sweep first started with worker groups keeps their resources
    when resumed).
    No Train controller, helper actors or worker group start per trial, and Tune reuses its trial actors, so
    the training stack is imported once per concurrent trial rather than once per trial."""
    assert base is not None
    name = trial_name(tune.get_context().get_trial_id())
    spec = trial_spec(base, config, name)
    run_dir = RunDir.of(spec)
    done = run_dir.read_final_results()
    if isinstance(done, dict) and done.get("spec_hash") == spec_hash(spec):
        # this trial finished before the sweep was stopped, but Tune had not recorded it yet: report its
        # final results instead of training it again
        result = to_tune_result({"step": done.get("steps"), "loss": done.get("train_loss"),
                                 "eval_loss": done.get("eval_loss"), "done": True,
                                 **{k: v for k, v in done.items() if k in EVAL_METRICS and k != "eval_loss"}},
                                metric, False)
        if result is not None:
            tune.report(result)
        return
    run_dir.write_spec(to_yaml(spec))
    plan = make_plan(spec)
    in_process = in_process and _holds(tune.get_context().get_trial_resources(), trial_resources(plan, True))
    worker = WorkerConfig(plan, report_evals=True, in_process=in_process)
    if not in_process:
        build_trainer(spec, worker, callbacks=[ReportToTune(metric)]).fit()
        return

    def forward(metrics: dict[str, Any], checkpoint: bool) -> None:  # what ReportToTune does for a worker group
        result = to_tune_result(metrics, metric, checkpoint)
        if result is not None:
            tune.report(result)  # Tune may stop the trial here (an ASHA rung): this thread then ends (SystemExit)

    # a stopped trial's thread (ended at its report) must be gone before Tune reuses this actor for the next
    # trial, and it may still write its logs and delete its local checkpoints: more than Tune's 2 s default
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(TRIAL_THREAD_TIMEOUT_S))
    IN_PROCESS_REPORTS.append(forward)
    try:
        build_trainer(spec, worker).fit()
    finally:
        IN_PROCESS_REPORTS.remove(forward)


def trial_resources(plan: Any, in_process: bool) -> dict[str, float]:
    """What Tune reserves for one trial's actor: its worker's resources when the trial trains in it, otherwise
    only some memory (the worker group's placement group holds the workers' CPUs and GPUs)."""
    if not in_process:
        return {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    out = {**plan.resources_per_worker, "memory": TRIAL_DRIVER_MEMORY}
    if plan.accelerator_type:  # as Ray Train asks for it: a sliver of the node's accelerator_type:<T> resource
        out[f"accelerator_type:{plan.accelerator_type}"] = 0.001
    return out


def _holds(pgf: Any, need: dict[str, float]) -> bool:
    have = getattr(pgf, "required_resources", None) or {}
    return all(have.get(k, 0) >= v for k, v in need.items() if k != "memory" and v > 0)


def to_tune_result(metrics: dict[str, Any], metric: str, has_checkpoint: bool) -> dict[str, Any] | None:
    """What one Ray Train report becomes in Tune, or None when it does not carry a fresh ``metric``.

    Checkpoint reports repeat the last eval, so for an eval metric only evaluation reports and the final
    report count. ``done`` is renamed ``final`` (Tune would otherwise stop the trial before the trainer
    returns), and a NaN/inf loss becomes :data:`DIVERGED` with ``diverged: true``.
    """
    m = {k: plain(v) for k, v in metrics.items()}  # perplexity comes with the report (next-token objectives only)
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


class ReportToTune(TuneReportCallback):
    """Ray Train callback (runs in the Train controller): forwards reports with the metric to Tune."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        result = to_tune_result(metrics[0] if metrics else {}, self.metric, checkpoint is not None)
        if result is not None:
            super().after_report(run_context, [result], checkpoint)


class SweepEvents(tune.Callback):
    """Tune callback (runs in the driver): one line per trial start, metric, stop, end, failure.

    Tune pickles its callbacks into the experiment state and a resubmission restores them from there, so
    this holds names only: the lines go to the sweep's progress board (:func:`raytune_ft.launch.progress.relay`),
    found by name, whichever process restored it."""

    def __init__(self, metric: str, paths: list[str], storage: dict[str, Any], board: str | None = None) -> None:
        self.metric, self.paths, self.storage = metric, list(paths), dict(storage)
        self.board = board

    def say(self, message: str) -> None:
        try:
            Publisher(self.board).push({"kind": "info", "message": message})
        except Exception:  # noqa: BLE001 - progress lines never stop a sweep
            pass

    def _finished(self, name: str) -> bool:
        sweep = RunDir.at(self.storage["path"], storage=st.StorageConfig(**self.storage))
        return sweep.child(name).has_final_results()

    def _values(self, config: dict[str, Any]) -> str:
        return ", ".join(f"{p}={fmt(plain(config.get(p)))}" for p in self.paths)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.say(f"{tune_trial_name(trial)} started: {self._values(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        seen = self.__dict__.setdefault("_seen", set())
        key = (trial.trial_id, result.get("step"))
        if self.metric in result and key not in seen:
            seen.add(key)
            value = "diverged (nan/inf)" if result.get("diverged") else f"{result[self.metric]:.4f}"
            self.say(f"{tune_trial_name(trial)} step {result.get('step')}: {self.metric} {value}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        name = tune_trial_name(trial)
        last = trial.last_result or {}
        if self._finished(name):
            self.say(f"{name} completed at step {last.get('step')}")
        else:
            self._free_later(name)
            self.say(f"{name} stopped early by the scheduler at step {last.get('step')}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._free_later(tune_trial_name(trial))
        self.say(f"{tune_trial_name(trial)} failed: {_error_line(trial)}")

    def _free_later(self, name: str) -> None:
        # the trial's actor, and the Train controller with it, end a moment after this: look for the
        # group it leaves behind (free_orphaned_placement_groups) once a second for a while
        self.__dict__["_free_until"] = time.monotonic() + FREE_WAIT_S

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now < self.__dict__.get("_free_until", 0.0) and now >= self.__dict__.get("_next_free", 0.0):
            self.__dict__["_next_free"] = now + 1.0
            try:
                free_orphaned_placement_groups()
            except Exception:  # noqa: BLE001 - best effort: the sweep's end frees the rest
                pass

    def __getstate__(self):  # Tune pickles callbacks into its experiment state: names only, no clock readings
        return {k: v for k, v in self.__dict__.items() if k not in ("_free_until", "_next_free")}


def free_orphaned_placement_groups() -> int:
    """Remove the placement groups of this job whose creating actor is dead; returns how many.

    The gap this fills (ray-project/ray#54305): a Train controller creates its workers' placement group, and
    when Tune ends the trial's actor (an ASHA stop, Ctrl-C, an error) the controller dies with it, often
    before it removes that group. A group made by a non-detached actor lives until its *job* ends, so it
    would hold its CPUs/GPUs for the rest of the sweep (for good, in a long-lived driver). Ray Train's own
    PlacementGroupCleaner covers this only where the state API answers (a dashboard). No one can use a
    group whose creator is gone, so removing it is always safe; groups made by the driver itself or by a
    live actor (a running trial) are left alone. The public placement_group_table() leaves out who created
    a group, so this reads GCS's table through the accessor that function itself uses.
    """
    from ray._private.state import state as gcs_state
    from ray.core.generated import gcs_pb2

    data = gcs_pb2.PlacementGroupTableData
    job = ray.get_runtime_context().get_job_id()
    freed = 0
    for raw in gcs_state._connect_and_get_accessor().get_placement_group_table():
        pg = data.FromString(raw)
        by_actor = pg.creator_actor_id and any(b != 0xFF for b in pg.creator_actor_id)  # nil id: the driver
        if (pg.creator_job_id.hex() == job and by_actor and pg.creator_actor_dead and not pg.is_detached
                and pg.state != data.REMOVED):
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                freed += 1
            except Exception:  # noqa: BLE001 - removed meanwhile
                pass
    return freed


def release_ended_trials(timeout_s: float = 15.0) -> int:
    """At the sweep's end: free the groups of the trials Tune ended (Ctrl-C ends them as the sweep returns;
    their controllers die a moment later), waiting until no group of this job made by a live actor is left,
    at most ``timeout_s``."""
    freed, deadline = 0, time.monotonic() + timeout_s
    while True:
        freed += free_orphaned_placement_groups()
        if not _held_by_live_actors() or time.monotonic() >= deadline:
            return freed
        time.sleep(0.5)


def _held_by_live_actors() -> bool:
    from ray._private.state import state as gcs_state
    from ray.core.generated import gcs_pb2

    data = gcs_pb2.PlacementGroupTableData
    job = ray.get_runtime_context().get_job_id()
    for raw in gcs_state._connect_and_get_accessor().get_placement_group_table():
        pg = data.FromString(raw)
        if (pg.creator_job_id.hex() == job and pg.creator_actor_id and any(b != 0xFF for b in pg.creator_actor_id)
                and not pg.creator_actor_dead and not pg.is_detached and pg.state != data.REMOVED):
            return True
    return False


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


class ResumableASHA(ASHAScheduler):
    """Ray Tune's ASHA, whose rungs survive a resubmission of the sweep.

    The gap it fills: ``Tuner.restore`` (Ray 2.60) brings back the trials, the searcher and the callbacks,
    but not the scheduler's state. ``TuneController.save_to_dir`` leaves ``_scheduler_alg`` out of the
    experiment state, and the scheduler a restored Tuner runs with is the one pickled in ``tuner.pkl`` when
    the Tuner was first built, its rungs still empty. The resumed sweep then compares its next trials with
    nothing and runs every one to its end, however poor.

    Tune hands every restored trial to ``on_trial_add`` (the finished ones too, and before any trial runs);
    a trial that had reported then replays what Tune recorded of it, its lines in Tune's ``result.json``
    (JSON, read from the sweep's storage: no pickle of ours), through ASHA's own ``on_trial_result``. That
    refills each rung exactly as the first run did: a rung keeps a trial's first result at or past it,
    whatever order the trials come in. (Pickling ASHA's state ourselves would mean reading a pickle back
    from storage, which rtf never does; the recorded results are the same information as data.)
    """

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if trial.has_reported_at_least_once:  # restored from the experiment state; a new trial has not
            for result in recorded_results(trial):
                super().on_trial_result(tune_controller, trial, result)


def recorded_results(trial: Trial) -> list[dict[str, Any]]:
    """What Tune recorded of a trial, in order: its ``result.json`` lines in the sweep's storage (the last
    result it kept in the experiment state when that file is missing or unreadable)."""
    out: list[dict[str, Any]] = []
    try:
        data = st.read_bytes(trial.storage.storage_filesystem, f"{trial.path}/{EXPR_RESULT_FILE}")
    except OSError:
        data = None
    for line in (data or b"").decode(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut short when the sweep was stopped
        if isinstance(r, dict):
            out.append(r)
    return out or [dict(trial.last_result)]


def scheduler(spec: JobSpec) -> Any:
    assert spec.tune is not None
    s = spec.tune.scheduler
    if s.type == "fifo":
        return FIFOScheduler()
    # rungs at grace × rf^k steps below max_t; a trial that reaches max_t is never stopped for it
    # (stop_last_trials=False), so a trial finishing its last steps is never cut short while it saves
    return ResumableASHA(time_attr="step", grace_period=s.grace_period or report_interval(spec),
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
    return BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency)


def default_concurrency(spec: JobSpec) -> int:
    """As many trials as the cluster fits at once (each needs all its workers' resources)."""
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


def collect_results(spec: JobSpec, fs: Any, tune_path: str) -> SweepResults:
    """The sweep's trials as Tune recorded them, with each trial's status from its run dir."""
    assert spec.tune is not None
    metric = spec.tune.metric
    analysis = ExperimentAnalysis(tune_path, storage_filesystem=fs, default_metric=metric,
                                  default_mode=spec.tune.mode)
    sweep = RunDir.of(spec)
    frames = analysis.trial_dataframes
    rows = []
    for trial in analysis.trials:
        name = tune_trial_name(trial)
        values = {p: plain(trial.config.get(p)) for p in spec.tune.space}
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
        trial_dir = sweep.child(name)
        done = trial_dir.has_final_results()
        if trial.status == Trial.ERROR:
            status, error = STATUS_ERROR, _error_line(trial)
        elif trial.status == Trial.TERMINATED:
            status, error = (STATUS_COMPLETED if done else STATUS_STOPPED), None
        else:
            status, error = STATUS_UNFINISHED, None
        if done:
            final = trial_dir.read_final_results() or {}
            steps = final.get("steps", steps)
        rows.append(TrialRow(name, values, best, steps, status, trial_dir.uri, error, diverged))
    rows.sort(key=lambda r: r.trial)
    sched = spec.tune.scheduler.type
    return SweepResults(spec.name, metric, spec.tune.mode, list(spec.tune.space), rows, sched, sweep.uri)


# --------------------------------------------------------------------------- the sweep driver


def run_sweep(spec: JobSpec, *, fresh: bool = False, on_event: Callable[[dict[str, Any]], None] | None = None,
              in_process: bool = False) -> RunResult:
    """Run (or continue) the sweep on the Ray cluster this process is connected to; ``in_process``: each trial
    trains in its trial actor (see :func:`_run_trial`), not in a worker group.

    Returns the driver's ``RunResult`` for the best trial (its run dir and final results). A sweep stopped
    by Ctrl-C writes what it has and raises KeyboardInterrupt: resubmitting continues it."""
    assert spec.tune is not None
    emit = on_event or (lambda e: None)
    sweep = RunDir.of(spec)
    if fresh:
        aside = sweep.move_aside()
        if aside:
            emit({"kind": "info", "message": f"--fresh: the previous sweep was moved aside to {aside}"})
    restore = _check_identity(spec, sweep)
    tuner = _tuner(spec, sweep, restore, emit, in_process)
    # Tune's new output engine prints its experiment table and a TensorBoard hint even at verbose=0; the
    # legacy engine is silent at verbose=0, and the SweepEvents callback reports the sweep instead
    air_output = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        with relay(board_name(spec.name), emit):  # the trials' lines, from SweepEvents
            tuner.fit()
    finally:  # trials Tune stopped at the end (Ctrl-C) leave their workers' placement groups behind
        if air_output is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = air_output
        release_ended_trials()
    res = collect_results(spec, sweep.fs, sweep.tune_dir)
    files = write_results(spec, res)
    lines = [render_table(res), f"results: {files['results']}"]
    if "best" in files:
        lines.append(f"best spec: {files['best']}   (promote the winner: rtf submit {files['best']})")
    emit({"kind": "info", "message": "\n" + "\n".join(lines)})
    if res.unfinished:
        raise KeyboardInterrupt(f"sweep {spec.name} interrupted with {len(res.unfinished)} unfinished trial(s)")
    best = res.best
    if best is None:
        errors = [r.error for r in res.rows if r.error]
        return RunResult(False, sweep.uri, {"sweep": True},
                         error=f"no trial of sweep {spec.name} reported {spec.tune.metric}"
                               + (f"; first error: {errors[0]}" if errors else ""))
    final = sweep.child(best.trial).read_final_results()
    summary = final if isinstance(final, dict) else {"steps": best.steps, spec.tune.metric: best.best}
    return RunResult(True, best.run_dir, {**summary, "sweep": True, "best_trial": best.trial,
                                          "results": files["results"], "best_spec": files.get("best")})


def _check_identity(spec: JobSpec, sweep: RunDir) -> bool:
    """Whether Tune has an experiment to restore in ``sweep`` (refused when it is another sweep's); records
    this sweep's identity and resolved spec."""
    identity = sweep_identity(spec)
    restore = tune.Tuner.can_restore(sweep.tune_dir, storage_filesystem=sweep.fs)
    if restore:
        before = st.read_bytes(sweep.fs, sweep.sweep_spec_file)
        was = yaml.safe_load(before.decode()) if before else None
        if not isinstance(was, dict) or was.get("identity") != identity:
            raise UserError(
                f"a different sweep already lives in {sweep.uri} (its spec or tune section changed since it started)",
                hint="resubmit with --fresh to start over (the old sweep is moved aside, never deleted), "
                     "or give this sweep another name")
    st.write_bytes(sweep.fs, sweep.sweep_spec_file,
                   yaml.safe_dump({"identity": identity, "spec": dump_spec(spec)}, sort_keys=False).encode())
    return restore


def _tuner(spec: JobSpec, sweep: RunDir, restore: bool, emit: Callable[[dict[str, Any]], None],
           in_process: bool = False):
    """Tune's Tuner for the sweep: restored from its experiment state, or new."""
    t = spec.tune
    assert t is not None
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=trial_base(spec), metric=t.metric, in_process=in_process),
        trial_resources(make_plan(spec), in_process))
    if restore:
        tuner = tune.Tuner.restore(sweep.tune_dir, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=sweep.fs)
        emit({"kind": "info", "message": f"sweep {spec.name}: continuing from {sweep.uri_of(TUNE_DIR)} "
              "(finished trials are kept, unfinished ones resume from their last checkpoint)"})
        return tuner
    concurrency = t.max_concurrent_trials or default_concurrency(spec)
    storage = {k: getattr(spec.storage, k) for k in ("path", "endpoint_url", "region", "access_key_env",
                                                      "secret_key_env", "session_token_env")}
    storage["path"] = sweep.uri
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, scheduler=scheduler(spec),
            search_alg=search_algorithm(spec, concurrency), num_samples=t.num_samples or 1,
            max_concurrent_trials=concurrency if t.search == "optuna" else None,
            trial_name_creator=tune_trial_name, trial_dirname_creator=tune_trial_name,
            # a trial actor that trained in process has the training stack imported; one that drives a worker
            # group is blocked in Ray Train's fit, which Tune's stop never reaches: never reused
            reuse_actors=in_process,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=sweep.path, storage_filesystem=sweep.fs, verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[SweepEvents(t.metric, list(t.space), storage, board_name(spec.name))],
        ),
    )
    emit({"kind": "info", "message": f"sweep {spec.name}: {_describe(spec)}; up to {concurrency} trial(s) "
          f"at once, each {spec.compute.num_workers} worker(s)"
          f"{' trained in its trial process' if in_process else ''}; in {sweep.uri}"})
    return tuner


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
