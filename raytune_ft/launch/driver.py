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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from raytune_ft import storage as st
from raytune_ft.errors import UserError
from raytune_ft.launch.progress import NAMESPACE, board_name, make_board_class
from raytune_ft.plan import make_plan
from raytune_ft.spec import dump_spec, to_yaml
from raytune_ft.spec.models import JobSpec

EventHandler = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    ok: bool
    run_uri: str
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    interrupted: bool = False


def scaling_config(spec: JobSpec):
    from ray.train import ScalingConfig

    plan = make_plan(spec)
    kwargs: dict[str, Any] = dict(
        num_workers=plan.num_workers,
        use_gpu=plan.use_gpu,
        resources_per_worker=plan.resources_per_worker,
        placement_strategy=plan.placement_strategy,
    )
    if plan.accelerator_type:
        kwargs["accelerator_type"] = plan.accelerator_type
    return ScalingConfig(**kwargs)


def keep_aside(spec: JobSpec) -> str | None:
    """``--fresh``: move an existing run dir aside (never delete it). Returns where it went."""
    fs, root = st.pyarrow_filesystem(spec.storage)
    run_path = st.fs_join(root, spec.name)
    if not st.exists(fs, run_path):
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    aside = f"{run_path}.old-{stamp}"
    if st.is_local_fs(fs):
        os.rename(run_path, aside)
    else:
        for rel in st.list_files(fs, run_path):
            fs.copy_file(st.fs_join(run_path, rel), st.fs_join(aside, rel))
        st.delete_dir(fs, run_path)
    return aside


@dataclass(frozen=True)
class Finished:
    """A run whose ``final/`` is committed for the length the spec asks for."""

    run_uri: str
    steps: int
    epoch: float | None
    reason: str

    def message(self) -> str:
        sep = "/" if self.run_uri.startswith("s3://") else os.sep
        return (f"already complete: {self.reason}; outputs in {self.run_uri}{sep}final. Nothing was changed. "
                f"To train on, raise training.max_steps or training.num_epochs (for example "
                f"--set training.max_steps={self.steps * 2}); to start over, --fresh.")


def finished_run(spec: JobSpec) -> Finished | None:
    """The run is finished when ``final/`` holds its results and they reach the spec's length: the
    steps of ``final_results.json`` against ``training.max_steps``, or the epoch of ``final/``'s
    ``trainer_state.json`` against ``training.num_epochs``. Reads two JSON files; writes nothing.

    Resubmitting a finished run must not resume it: Trainer, resumed from a checkpoint at max_steps,
    takes one more step before its stop check, commits it and prunes the real checkpoints."""
    if spec.tune is not None:  # a sweep's trials keep their own state (results.csv)
        return None
    fs, root = st.pyarrow_filesystem(spec.storage)
    final = st.fs_join(root, spec.name, "final")
    try:
        res = st.read_json(fs, st.fs_join(final, "final_results.json"))
        state = st.read_json(fs, st.fs_join(final, "trainer_state.json")) or {}
    except (ValueError, OSError):  # not JSON, or storage unreachable: the preflight and training decide
        return None
    if not isinstance(res, dict) or not isinstance(res.get("steps"), int) or not isinstance(state, dict):
        return None
    steps = res["steps"]
    epoch = state.get("epoch") if isinstance(state.get("epoch"), (int, float)) else None
    uri = make_plan(spec).run_uri
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


STOP_MARKER = "rtf_stopped.json"


def mark_stopped(spec: JobSpec, reason: str) -> None:
    """Record in the run dir that the run ended without final/: ``rtf_stopped.json`` with the reason
    (``interrupted``: Ctrl-C; ``stopped``: SIGTERM, as `rtf stop` sends; ``failed: …``) and the last
    committed step, so `rtf runs` reports a stopped run from this record instead of guessing from file
    times. Best effort: a run dir that was never created stays absent, and storage errors are ignored
    (the run is stopping anyway)."""
    from raytune_ft import checkpoints as ck

    try:
        fs, root = st.pyarrow_filesystem(spec.storage)
        run_path = st.fs_join(root, spec.name)
        if not st.exists(fs, run_path):
            return
        last = None if spec.tune is not None else ck.latest_committed(fs, run_path)
        st.write_json(fs, st.fs_join(run_path, STOP_MARKER), {
            "reason": reason, "step": last.step if last else None,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    except (OSError, UserError):
        pass


def clear_stopped(fs: Any, run_path: str) -> None:
    """A resumed run is no longer stopped: its marker goes when it starts again."""
    st.delete_file(fs, st.fs_join(run_path, STOP_MARKER))


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
    text = " ".join(str(e) for e in chain)
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
        on_event: EventHandler | None = None) -> RunResult:
    """Run the spec on the Ray cluster this process is connected to (``ray.init`` already called).

    A failure is classified: a user error is raised as such; when storage dropped out, the run is
    started again (same name and storage, so it resumes from the last committed checkpoint) once
    storage answers, within ``fault_tolerance.max_failures`` and a bounded wait.

    A spec with a ``tune:`` section is a sweep: :func:`raytune_ft.sweep.run_sweep` runs it (one whole run
    of the spec per Ray Tune trial) and returns the best trial's result."""
    if spec.tune is not None:
        if resume_from:
            raise UserError("--resume-from names one run's checkpoint; a sweep resumes its own trials: "
                            "resubmit the same spec to continue it")
        from raytune_ft.sweep import run_sweep

        fs, root = st.pyarrow_filesystem(spec.storage)
        clear_stopped(fs, st.fs_join(root, spec.name))
        return run_sweep(spec, fresh=fresh, on_event=on_event)
    plan = make_plan(spec)
    emit = on_event or (lambda e: None)
    if not fresh and not resume_from:
        done = finished_run(spec)
        if done is not None:
            emit({"kind": "info", "message": done.message()})
            return RunResult(True, plan.run_uri, {"already_complete": done.message()})
    fs, root = st.pyarrow_filesystem(spec.storage)
    run_path = st.fs_join(root, spec.name)
    if fresh:
        aside = keep_aside(spec)
        if aside:
            emit({"kind": "info", "message": f"--fresh: the previous run was moved aside to {aside}"})
    st.write_bytes(fs, st.fs_join(run_path, "rtf_spec.yaml"), to_yaml(spec).encode())
    clear_stopped(fs, run_path)
    attempt = 0
    while True:
        attempt += 1
        outcome, summary = _fit_once(spec, fs, root, resume_from if attempt == 1 else None, emit)
        if "error" not in outcome:
            return RunResult(True, plan.run_uri, summary)
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
                emit({"kind": "info", "message": f"storage unreachable during training ({where}): {first}; "
                      f"waiting up to {STORAGE_WAIT_S:.0f}s for it (retry {attempt} of "
                      f"{spec.fault_tolerance.max_failures if spec.fault_tolerance.max_failures >= 0 else 'unlimited'})"})
                if wait_for_storage(spec.storage, STORAGE_WAIT_S):
                    emit({"kind": "info", "message": "storage is back: resuming from the last committed checkpoint"})
                    continue
            return RunResult(False, plan.run_uri, summary, error=(
                f"storage error: {where} became unreachable during training ({first}). Committed "
                f"checkpoints are intact; resubmit the same spec to resume from the latest one."))
        return RunResult(False, plan.run_uri, summary, error=f"{type(err).__name__}: {st.scrub(str(err), spec.storage)}")


def forget_train_snapshot(fs: Any, run_path: str) -> None:
    """rtf resumes from its own manifests (the recipe reads them). Ray Train's snapshot of the checkpoints
    it was told about still lists those rtf has pruned since (storage.keep_checkpoints), and Ray Train
    refuses to start a run whose snapshot names a checkpoint that is gone: so it goes before every fit."""
    try:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as name
    except ImportError:  # pragma: no cover - a Ray that moved it
        name = "checkpoint_manager_snapshot.json"
    st.delete_file(fs, st.fs_join(run_path, name))


def _fit_once(spec: JobSpec, fs: Any, root: str, resume_from: str | None,
              emit: EventHandler) -> tuple[dict[str, Any], dict[str, Any]]:
    """One TorchTrainer.fit(), with the progress board polled while it runs."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raytune_ft.train.entry import train_loop  # light: the driver does not import transformers

    plan = make_plan(spec)
    forget_train_snapshot(fs, st.fs_join(root, spec.name))
    board = make_board_class().options(name=board_name(spec.name), namespace=NAMESPACE,
                                       get_if_exists=True).remote()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": dump_spec(spec), "resume_from": resume_from, "progress": spec.name},
        scaling_config=scaling_config(spec),
        torch_config=TorchConfig(backend="nccl" if plan.use_gpu else "gloo"),
        run_config=RunConfig(
            name=spec.name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=spec.fault_tolerance.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="rtf-fit", daemon=True)
    thread.start()
    seen = 0
    summary: dict[str, Any] = {}
    try:
        while True:
            alive = thread.is_alive()
            try:
                events = ray.get(board.since.remote(seen), timeout=10)
            except Exception:
                events = []
            seen += len(events)
            for e in events:
                if e.get("kind") == "done":
                    summary = e.get("summary") or {}
                emit(e)
            if not alive:
                break
            time.sleep(0.5)
    finally:
        try:
            ray.kill(board)
        except Exception:
            pass
    return outcome, summary


def main(argv: list[str] | None = None) -> int:
    """Cluster entry point: ``python -m raytune_ft.launch.driver SPEC [--fresh] [--resume-from URI]``.

    With ``RTF_EVENTS=1`` (set by the Ray Jobs target) progress goes to stdout as ``RTF_EVENT {json}``
    lines, which ``rtf submit --follow`` and ``rtf logs`` render; otherwise as readable lines."""
    import argparse
    import json
    import signal

    import ray

    from raytune_ft.launch import check_data, check_resume_from, quiet_ray_console, secrets
    from raytune_ft.launch.progress import EVENT_PREFIX, Renderer
    from raytune_ft.spec import load_spec

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
        secrets.install_sealed()  # secrets forwarded by `rtf submit --address`, before anything reads them
        spec = load_spec(a.spec)
        done = None if (a.fresh or a.resume_from) else finished_run(spec)
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
        result = run(spec, fresh=a.fresh, resume_from=a.resume_from, on_event=on_event)
    except secrets.SealError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except UserError as e:
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
    print(f"done: outputs in {result.run_uri}/final", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
