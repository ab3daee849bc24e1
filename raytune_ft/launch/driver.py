"""The driver: runs next to the Ray head (or in-process for local mode) and builds the TorchTrainer.

Every target runs this same code with the same spec. ``python -m raytune_ft.launch.driver SPEC``
is the entry point on clusters (Ray Jobs, KubeRay, RunPod); local mode calls :func:`run` directly.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from raytune_ft import storage as st
from raytune_ft.errors import UserError
from raytune_ft.launch.progress import board_name, open_board
from raytune_ft.launch.trainer import RunResult, build_trainer, failures_left
from raytune_ft.plan import Plan, make_plan
from raytune_ft.rundir import FINAL, SPEC, RunDir
from raytune_ft.spec import to_yaml
from raytune_ft.spec.models import JobSpec
from raytune_ft.train.config import STOP, StopRequested, WorkerConfig
from raytune_ft.train.progress import LOCAL_BOARDS, LocalBoard

EventHandler = Callable[[dict[str, Any]], None]


def keep_aside(spec: JobSpec) -> str | None:
    """``--fresh``: move an existing run dir aside (never delete it). Returns where it went."""
    return RunDir.of(spec).move_aside()


def before_start(spec: JobSpec, *, fresh: bool, resume_from: str | None,
                 emit: EventHandler | None = None) -> Finished | None:
    """What a resubmission must settle before anything starts or is written: a changed spec may not resume
    the run's checkpoints (UserError), and a finished run is not trained again (returned). Nothing to
    settle for --fresh, --resume-from (explicit acts) or sweeps (trials keep their own state)."""
    if fresh or resume_from or spec.tune is not None:
        return None
    try:
        check_same_run(spec, RunDir.of(spec), emit or (lambda e: None))
    except OSError:  # storage unreachable: the preflight that follows says so properly
        return None
    return finished_run(spec)


def check_same_run(spec: JobSpec, run: RunDir, emit: EventHandler) -> None:
    """A resubmitted spec resumes the run's checkpoints only when nothing that defines the run changed
    (model, tokenizer, method, data, sequence length, precision, seed, optimizer...); extending or
    observing it (max_steps, epochs, intervals, monitoring, compute) is allowed and said. The previous
    spec is the YAML the driver stored in the run dir (read as data only)."""
    import yaml

    from raytune_ft import checkpoints as ck
    from raytune_ft.spec import dump_spec, identity

    data = st.read_bytes(run.fs, run.spec_file)
    if data is None or ck.latest_committed(run.fs, run.path) is None:
        return  # nothing to resume: the new spec simply starts the run
    try:
        old = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        old = None
    if not isinstance(old, dict):
        raise UserError(f"{run.uri_of(SPEC)} is not a spec rtf wrote, so this run's "
                        "checkpoints cannot be checked against the new spec",
                        hint="--fresh starts over (the old run is kept aside), or give the run a new name")
    new = dump_spec(spec)
    defining, allowed = identity.changes(old, new)
    if defining:
        raise UserError(
            f"run {spec.name} has checkpoints trained with a different spec: {identity.describe(old, new, defining)}. "
            "Resuming would continue those weights under another setup",
            hint=f"--fresh starts over (the old run is kept aside), or give the run a new name "
                 f"(--set name={spec.name}-2)")
    if allowed:
        emit({"kind": "info", "message": "resuming with changed " + identity.describe(old, new, allowed)})


@dataclass(frozen=True)
class Finished:
    """A run whose ``final/`` is committed for the length the spec asks for."""

    run_uri: str
    steps: int
    epoch: float | None
    reason: str

    def message(self) -> str:
        return (f"already complete: {self.reason}; outputs in {st.join(self.run_uri, FINAL)}. Nothing was changed. "
                f"To train on, raise training.max_steps or training.num_epochs (for example "
                f"--set training.max_steps={self.steps * 2}); to start over, --fresh.")


def finished_run(spec: JobSpec) -> Finished | None:
    """The run is finished when ``final/`` holds its results and they reach the spec's length: the
    steps of its final results against ``training.max_steps``, or the epoch of its trainer state against
    ``training.num_epochs``. Reads two JSON files; writes nothing.

    Resubmitting a finished run must not resume it: Trainer, resumed from a checkpoint at max_steps,
    takes one more step before its stop check, commits it and prunes the real checkpoints."""
    if spec.tune is not None:  # a sweep's trials keep their own state (results.csv)
        return None
    run = RunDir.of(spec)
    try:
        res = run.read_final_results()
        state = run.read_final_state() or {}
    except (ValueError, OSError):  # not JSON, or storage unreachable: the preflight and training decide
        return None
    if not isinstance(res, dict) or not isinstance(res.get("steps"), int) or not isinstance(state, dict):
        return None
    steps = res["steps"]
    epoch = state.get("epoch") if isinstance(state.get("epoch"), (int, float)) else None
    uri = run.uri
    t = spec.training
    if t.max_steps:
        if steps >= t.max_steps:
            return Finished(uri, steps, epoch, f"final/ was written at step {steps} "
                            f"(training.max_steps: {t.max_steps})")
        return None
    if t.num_epochs and epoch is not None and epoch >= t.num_epochs - 1e-6:
        return Finished(uri, steps, epoch, f"final/ was written after epoch {epoch:g} at step {steps} "
                        f"(training.num_epochs: {t.num_epochs:g})")
    return None


def mark_stopped(spec: JobSpec, reason: str) -> None:
    """Record in the run dir why the run ended without final/ (with its last committed step), so `rtf runs`
    reports a stopped run from this record instead of guessing from file times. Best effort: a run dir that
    was never created stays absent, and storage errors are ignored (the run is stopping anyway)."""
    from raytune_ft import checkpoints as ck

    try:
        run = RunDir.of(spec)
        if not run.exists():
            return
        last = None if spec.tune is not None else ck.latest_committed(run.fs, run.path)
        run.mark_stopped(reason, last.step if last else None)
    except (OSError, UserError):
        pass


def check_resume_from(spec: JobSpec, uri: str, base: str | None = None) -> str:
    """``--resume-from`` as the worker will read it: a local path made absolute against the directory rtf
    was run from (Ray workers run in their own working directory), and checked to be a committed
    checkpoint before anything starts, so a wrong path fails in a second with one line instead of after
    Ray's retries, and leaves no run directory behind. Returns the path to pass on."""
    import pyarrow.fs as pafs

    from raytune_ft import checkpoints as ck
    from raytune_ft import storage as st
    from raytune_ft.errors import UserError

    if spec.tune is not None:
        raise UserError("--resume-from names one run's checkpoint; a sweep resumes its own trials: "
                        "resubmit the same spec to continue it")
    if st.is_s3(uri):
        fs, _ = st.open(spec.storage)
        bucket, key = st.split_s3(uri)
        path, shown = f"{bucket}/{key}".rstrip("/"), uri
    else:
        if "://" in uri:
            raise UserError(f"--resume-from {uri}: only local paths and s3:// URIs are supported")
        path = os.path.normpath(os.path.join(base or os.getcwd(), os.path.expanduser(uri)))
        fs, shown = pafs.LocalFileSystem(), path
        if not os.path.isdir(path):
            raise UserError(f"--resume-from {uri}: no such checkpoint directory ({path})")
    info = ck.inspect_checkpoint(fs, path)
    if not info.committed:
        raise UserError(f"--resume-from {uri}: not a committed checkpoint ({info.reason}); "
                        f"`rtf checkpoints list` on its run dir shows the committed ones")
    return shown


class _DropTokenAuthNotice:
    """Drops Ray's "Token authentication is enabled for this Ray cluster…" notice, logged on every new
    local cluster: auth on is what rtf wants, and there is nothing for the user to do. The warning that
    auth is *disabled* passes."""

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith("Token authentication is enabled")


def quiet_ray_console(out) -> None:
    """Keep Ray's chatter that is not the user's to act on off the console: the token-auth notice, and the
    color codes Ray wraps its '(raylet)' prefixes in when the output is not a terminal (a file, a CI log,
    `rtf logs`), where they show as raw escape sequences. An explicit RAY_COLOR_PREFIX is kept."""
    import logging

    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropTokenAuthNotice) for f in auth.filters):
        auth.addFilter(_DropTokenAuthNotice())
    isatty = getattr(out, "isatty", None)
    if not (callable(isatty) and isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


STORAGE_MARKERS = ("AWS Error", "NETWORK_CONNECTION", "Could not connect to server", "curlCode",
                   "EndpointConnectionError", "Connection refused", "Could not resolve host", "SlowDown",
                   "ServiceUnavailable")


def _chain(exc: BaseException) -> list[BaseException]:
    out, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())
    return out


def classify_failure(exc: BaseException) -> str:
    """Principle 7, a pure function: ``user`` (the spec or data: never retried), ``storage`` (the object
    store was unreachable: retried once it answers again), or ``training`` (a worker or node failure that
    Ray's own FailureConfig already retried)."""
    chain = _chain(exc)
    if any(isinstance(e, UserError) for e in chain):
        return "user"
    return classify_text(" ".join(str(e) for e in chain))


def classify_text(text: str) -> str:
    """``storage`` when an error's text says the object store could not be reached, else ``training``."""
    if any(m in text for m in STORAGE_MARKERS):
        return "storage"
    return "training"


def retries_left(kind: str, attempt: int, max_failures: int) -> bool:
    """Whether the driver starts the run again after a failure of ``kind`` (attempt counts from 1)."""
    if kind != "storage":
        return False
    return max_failures < 0 or attempt <= max_failures


def wait_for_storage(storage: Any, timeout_s: float, poll_s: float = 2.0) -> bool:
    """Poll the storage preflight until it passes or ``timeout_s`` runs out."""
    end = time.time() + timeout_s
    while True:
        try:
            st.preflight(storage, timeout=5, max_attempts=1)
            return True
        except UserError:
            if time.time() >= end:
                return False
            time.sleep(poll_s)


STORAGE_WAIT_S = 120.0


def run(spec: JobSpec, *, fresh: bool = False, resume_from: str | None = None,
        on_event: EventHandler | None = None, plan: Plan | None = None, settled: bool = False,
        in_process: bool = False) -> RunResult:
    """Run the spec on the Ray cluster this process is connected to (``ray.init`` already called).

    A failure is classified: a user error is raised as such; when storage dropped out, the run is
    started again (same name and storage, so it resumes from the last committed checkpoint) once
    storage answers, within ``fault_tolerance.max_failures`` and a bounded wait.

    A spec with a ``tune:`` section is a sweep: :func:`raytune_ft.sweep.tune.run_sweep` runs it (one whole run
    of the spec per Ray Tune trial) and returns the best trial's result; ``in_process`` then means each trial
    trains in its Tune trial's process (:func:`raytune_ft.launch.local.trials_in_process`)."""
    if spec.tune is not None:
        if resume_from:
            raise UserError("--resume-from names one run's checkpoint; a sweep resumes its own trials: "
                            "resubmit the same spec to continue it")
        from raytune_ft.sweep.tune import run_sweep

        RunDir.of(spec).clear_stopped()
        return run_sweep(spec, fresh=fresh, on_event=on_event, in_process=in_process)
    plan = plan or make_plan(spec)
    emit = on_event or (lambda e: None)
    run_dir = RunDir.of(spec)
    done = None if settled else before_start(spec, fresh=fresh, resume_from=resume_from, emit=emit)
    if done is not None:
        emit({"kind": "info", "message": done.message()})
        return RunResult(True, run_dir.uri, {"already_complete": done.message()})
    if fresh:
        aside = run_dir.move_aside()
        if aside:
            emit({"kind": "info", "message": f"--fresh: the previous run was moved aside to {aside}"})
    run_dir.write_spec(to_yaml(spec))
    run_dir.clear_stopped()
    worker = WorkerConfig(plan, resume_from=resume_from, started=time.time(), progress_board=board_name(spec.name),
                          in_process=in_process)
    attempt = spent = 0  # spent: the failures earlier fit()s used (Ray Train's own restarts)
    while True:
        attempt += 1
        outcome, summary = _fit_once(spec, worker, emit, spent=spent,
                                     driver_retry=retries_left("storage", attempt, spec.fault_tolerance.max_failures))
        # a later fit() resumes from the run's own latest committed checkpoint, not from --resume-from
        worker = replace(worker, resume_from=None)
        grow = outcome.get("grow")
        if "error" not in outcome and not grow and not summary and (behind := final_behind(run_dir)) is not None:
            grow = {"step": behind}  # the workers stopped without final/ and their word was lost: a grow
        if "error" not in outcome and grow:
            # elastic workers stopped at a committed checkpoint because Ray has room for more
            # (raytune_ft.train.elastic): a new fit() resumes from it at the size Ray Train starts, with what
            # this one left of max_failures (a node that keeps going and coming does not reset the count)
            attempt -= 1  # not a retry
            spent += outcome.get("failures", 0)
            emit({"kind": "info", "message": f"elastic: starting the workers again from step {grow.get('step')} "
                  f"(as many as Ray has room for, up to {spec.compute.num_workers})"})
            continue
        spent = 0  # the driver's own retry (storage) starts Ray Train's count again, as before
        if "error" not in outcome:
            return RunResult(True, run_dir.uri, summary)
        err = outcome["error"]
        kind = classify_failure(err)
        if kind == "user":
            user = next(e for e in _chain(err) if isinstance(e, UserError))
            raise user
        first = st.scrub(str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__,
                         spec.storage)
        if kind == "storage":
            where = st.describe(spec.storage)
            if retries_left(kind, attempt, spec.fault_tolerance.max_failures):
                n = spec.fault_tolerance.max_failures
                emit({"kind": "info", "message": f"storage unreachable during training at {where}: {first}; the "
                      f"driver waits up to {STORAGE_WAIT_S:.0f}s for it to answer, then starts the run again from the "
                      f"last committed checkpoint (driver retry {attempt} of {n if n >= 0 else 'unlimited'})"})
                if wait_for_storage(spec.storage, STORAGE_WAIT_S):
                    emit({"kind": "info", "message": "storage is back: resuming from the last committed checkpoint"})
                    continue
            return RunResult(False, run_dir.uri, summary, error=(
                f"storage error: {where} became unreachable during training ({first}). Committed "
                f"checkpoints are intact; resubmit the same spec to resume from the latest one."))
        return RunResult(False, run_dir.uri, summary, error=f"{type(err).__name__}: {st.scrub(str(err), spec.storage)}")


def final_behind(run_dir: RunDir) -> int | None:
    """After a fit() that ended without an error and without the workers' last word (their `done` or `grow`
    event lost, e.g. the progress board not answering): the step of the latest committed checkpoint when
    final/ is missing or older than it (the workers stopped to grow), else None (final/ is this run's)."""
    from raytune_ft import checkpoints as ck

    try:
        latest = ck.latest_committed(run_dir.fs, run_dir.path)
        res = run_dir.read_final_results()
    except (ValueError, OSError):
        return None
    steps = res.get("steps") if isinstance(res, dict) else None
    if latest is None or (isinstance(steps, int) and steps >= latest.step):
        return None
    return latest.step


PREEMPTION_DEFAULT_DEADLINE_S = 120.0  # Ray Train's DEFAULT_PREEMPTION_DEADLINE_S: a notice without a deadline
DEADLINE_SLACK_S = 3.0  # the controller polls its workers about once a second


class Attempts:
    """Counts Ray Train's attempts within one ``fit()`` and says what happens between them.

    Ray Train restarts a failed worker group by itself (``FailureConfig(max_failures)``); without this a
    restart shows only the setup lines again. Each group's rank 0 announces itself (a ``workers`` event:
    attempt k), a failing worker says why (``worker_failed``, from the recipe); the first failure of each
    attempt becomes one ``retry`` event: what failed (storage unreachable at its endpoint, or the error),
    attempt k of N, and what comes next (Ray Train restarts the workers from the last committed
    checkpoint, or, with no restarts left, the driver's own wait for storage)."""

    def __init__(self, spec: JobSpec, emit: EventHandler, *, driver_retry: bool = False,
                 in_process: bool = False, spent: int = 0) -> None:
        self.spec, self.emit = spec, emit
        # Ray Train's max_failures for this fit(): what earlier ones (before elastic workers grew) left
        self.max_failures = failures_left(spec.fault_tolerance.max_failures, spent)
        self.grow: dict[str, Any] | None = None  # the workers stopped at a checkpoint to grow (a `grow` event)
        self.driver_retry = driver_retry  # after the last attempt, the driver waits for storage and runs again
        self.attempt = 0  # worker groups started in this fit()
        self.reported: set[tuple[int, bool]] = set()  # (attempt, said storage)
        self.failures = 0  # attempts that failed, preempted ones not counted (Ray Train counts them apart)
        self.preempted: set[int] = set()  # attempts whose workers had a preemption notice (a `preemption` event)
        self.in_process = in_process
        self.deadline: float | None = None  # the current attempt's preemption deadline (epoch s)

    def tick(self, now: float | None = None) -> None:
        """Past a preemption's deadline (and a little slack for the controller's poll), Ray Train has ended the
        preempted group: say so now if no worker did (a worker killed in a collective says nothing)."""
        k = max(self.attempt, 1)
        if self.deadline is None or (now or time.time()) < self.deadline + DEADLINE_SLACK_S:
            return
        self.deadline = None
        if k in self.preempted and (k, False) not in self.reported and (k, True) not in self.reported:
            self.handle({"kind": "worker_failed", "error": "stopped at the preemption's deadline"})

    @property
    def total(self) -> int | None:
        """Ray Train's attempts: the first + max_failures + one per preemption so far; in-process (local mode)
        Ray Train restarts nothing."""
        n = self.max_failures
        return 1 if self.in_process else n + 1 + len(self.preempted) if n >= 0 else None

    def handle(self, e: dict[str, Any]) -> None:
        kind = e.get("kind")
        if kind == "workers":
            k = self.attempt
            if k in self.preempted and (k, False) not in self.reported and (k, True) not in self.reported:
                # the preempted group was ended with no worker saying why (its node's processes were killed)
                self.handle({"kind": "worker_failed", "error": "stopped at the preemption's deadline"})
            self.attempt += 1
            if self.attempt > 1:
                e = {**e, "attempt": self.attempt, "attempts": self.total}
            if self.spec.compute.elastic:
                e = {**e, "elastic_max": self.spec.compute.num_workers}
        elif kind == "preemption":
            self.preempted.add(max(self.attempt, 1))
            # when Ray Train ends the group (its controller's clock; with no deadline given, Ray's default after
            # the notice): said then by tick(), not only when the next group starts, which can be much later
            # (it waits for nodes) or never (no restarts left)
            self.deadline = float(e.get("deadline") or time.time() + PREEMPTION_DEFAULT_DEADLINE_S)
        elif kind == "done":
            self.deadline = None
        elif kind == "grow":
            self.grow = e
        elif kind == "worker_failed":
            k = max(self.attempt, 1)
            error = str(e.get("error") or "")
            storage = classify_text(error) == "storage"
            # one line per attempt, however many ranks fail; but a storage cause said after another rank's
            # consequence (a collective broken by the failed peer) is said too: it is the one to act on
            if (k, True) in self.reported or ((k, False) in self.reported and not storage):
                return
            self.reported.add((k, storage))
            if k in self.preempted:  # Ray Train ends a preempted group at the deadline: a PreemptionError
                limit = self.spec.fault_tolerance.max_preemption_failures
                n = sum(1 for a in self.preempted if a <= k)
                last = 0 <= limit < n
                e = {"kind": "retry", "attempt": k, "attempts": self.total, "error": error, "preempted": n,
                     "max_preemptions": limit, "next": "fail" if last else "restart", "in_process": False}
            else:
                self.failures += 1
                n = self.max_failures
                last = self.in_process or 0 <= n < self.failures
                e = {"kind": "retry", "attempt": k, "attempts": self.total, "error": error,
                     "storage": st.describe(self.spec.storage) if storage else None,
                     "next": ("driver_wait" if storage and self.driver_retry else "fail") if last else "restart",
                     "wait_s": STORAGE_WAIT_S, "in_process": self.in_process}
        self.emit(e)


def _fit_once(spec: JobSpec, worker: WorkerConfig, emit: EventHandler, *, driver_retry: bool = False,
              spent: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """One TorchTrainer.fit(), with the progress board polled while it runs (an actor on the Ray cluster, or
    for a run in this process, an in-process board: such a run needs no Ray started at all). The outcome:
    ``result`` or ``error``, the ``failures`` Ray Train restarted after, and ``grow`` when elastic workers
    stopped at a checkpoint to start again with more."""
    if worker.in_process:
        board: Any = LOCAL_BOARDS.setdefault(worker.progress_board or "", LocalBoard())

        def since(seen: int) -> list[dict[str, Any]]:
            return board.since(seen)
    else:
        import ray

        board = open_board(worker.progress_board)

        def since(seen: int) -> list[dict[str, Any]]:
            return ray.get(board.since.remote(seen), timeout=10)
    trainer = build_trainer(spec, worker, spent=spent)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            outcome["error"] = e

    if worker.in_process:
        STOP.clear()
    thread = threading.Thread(target=fit, name="rtf-fit", daemon=True)
    thread.start()
    seen = 0
    summary: dict[str, Any] = {}
    attempts = Attempts(spec, emit, driver_retry=driver_retry, in_process=worker.in_process, spent=spent)
    try:
        unanswered = 0  # polls after fit() returned that the board did not answer
        while True:
            alive = thread.is_alive()
            try:
                events: list[dict[str, Any]] | None = since(seen)
            except Exception:
                events = None
            for e in events or []:
                if e.get("kind") == "done":
                    summary = e.get("summary") or {}
                attempts.handle(e)
            seen += len(events or [])
            if alive:
                attempts.tick()
            elif events is not None or unanswered >= LAST_POLLS:
                break  # one answer after the end holds the workers' last word (`done`, or `grow`)
            else:
                unanswered += 1
            time.sleep(0.5)
    except BaseException:
        if worker.in_process:  # Ctrl-C: the training thread stops at its next step (Ray Train's local mode
            STOP.set()         # has no abort of its own), and this process does not exit under it
            thread.join(timeout=IN_PROCESS_STOP_S)
            try:  # what it said since the last poll (the steps and checkpoints up to the stop)
                for e in since(seen):
                    attempts.handle(e)
            except Exception:  # noqa: BLE001 - the stop is what matters now
                pass
        raise
    finally:
        if worker.in_process:
            LOCAL_BOARDS.pop(worker.progress_board or "", None)
        else:
            try:
                ray.kill(board)
            except Exception:
                pass
    if worker.in_process and isinstance(outcome.get("error"), StopRequested):
        raise outcome["error"]  # stopped on request (SIGTERM after its checkpoint): the caller says so
    outcome["failures"] = attempts.failures
    if attempts.grow is not None and not summary:
        outcome["grow"] = attempts.grow
    return outcome, summary


LAST_POLLS = 3  # asks of the progress board after fit() returned, when it does not answer (a loaded machine)
IN_PROCESS_STOP_S = 120.0  # the longest a step (or a save under way) may take to finish after Ctrl-C


def main(argv: list[str] | None = None) -> int:
    """Cluster entry point: ``python -m raytune_ft.launch.driver SPEC [--fresh] [--resume-from URI]``.

    With ``RTF_EVENTS=1`` (set by the Ray Jobs target) progress goes to stdout as ``RTF_EVENT {json}``
    lines, which ``rtf submit --follow`` and ``rtf logs`` render; otherwise as readable lines."""
    import argparse
    import json
    import signal

    import ray

    from raytune_ft.data.pipeline import check_data
    from raytune_ft.launch.progress import EVENT_PREFIX, Renderer
    from raytune_ft.spec import load_spec
    from raytune_ft.train.env import install_sealed

    ap = argparse.ArgumentParser(prog="raytune_ft.launch.driver")
    ap.add_argument("spec")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--resume-from")
    a = ap.parse_args(argv)
    if os.environ.get("RTF_EVENTS") == "1":
        def on_event(e: dict[str, Any]) -> None:
            print(EVENT_PREFIX + json.dumps(e, default=str), flush=True)
    else:
        on_event = Renderer(sys.stdout).handle

    def stopped(signum, frame):  # `rtf stop` / `ray job stop` send SIGTERM
        raise KeyboardInterrupt

    spec = None
    try:
        install_sealed()  # secrets forwarded by `rtf submit --address`, before anything reads them
        spec = load_spec(a.spec)
        done = before_start(spec, fresh=a.fresh, resume_from=a.resume_from, emit=on_event)
        if done is not None:  # before the preflight's marker and before Ray: nothing starts, nothing is written
            print(f"done: {done.message()}", flush=True)
            return 0
        if a.resume_from:  # checked where the path means something (this machine), before Ray
            a.resume_from = check_resume_from(spec, a.resume_from)
        on_event({"kind": "info", "message": f"storage preflight: {st.preflight(spec.storage)}"})
        skipped = check_data(spec)
        if skipped:
            on_event({"kind": "info", "message": f"data: {skipped} bad row(s) will be skipped (data.on_bad_row: skip)"})
        quiet_ray_console(sys.stdout)  # the job's log: no raw color codes, no token-auth notice
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
        signal.signal(signal.SIGTERM, stopped)  # after ray.init, which sets its own (a bare sys.exit)
        result = run(spec, fresh=a.fresh, resume_from=a.resume_from, on_event=on_event, settled=True)
    except UserError as e:  # a SealError among them: one line, exit 2
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        if spec is not None:
            mark_stopped(spec, "stopped")
        print("stopped: training stopped; committed checkpoints are intact, submit the same spec to resume "
              "from the latest one", file=sys.stderr, flush=True)
        return 143
    if not result.ok:
        mark_stopped(spec, f"failed: {result.error}")
        print(f"error: training failed: {result.error}", file=sys.stderr, flush=True)
        return 1
    print(f"done: outputs in {st.join(result.run_uri, FINAL)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
