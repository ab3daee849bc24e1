"""The driver: runs next to the Ray head (or in-process for local mode) and builds the TorchTrainer.

Every target runs this same code with the same spec. ``python -m raytune_ft.launch.driver SPEC``
is the entry point on clusters (Ray Jobs, KubeRay, RunPod); local mode calls :func:`run` directly.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

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


def _user_error_in(exc: BaseException) -> UserError | None:
    """Find a UserError raised inside a worker (Ray wraps it in its own errors)."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        todo += [getattr(e, "__cause__", None), getattr(e, "__context__", None), getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())
        for attr in ("error", "_error", "training_failed_error"):
            todo.append(getattr(e, attr, None))
    return None


def run(spec: JobSpec, *, fresh: bool = False, resume_from: str | None = None,
        on_event: EventHandler | None = None) -> RunResult:
    """Run the spec on the Ray cluster this process is connected to (``ray.init`` already called)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raytune_ft.train.recipe import train_loop

    plan = make_plan(spec)
    emit = on_event or (lambda e: None)
    fs, root = st.pyarrow_filesystem(spec.storage)
    run_path = st.fs_join(root, spec.name)
    if fresh:
        aside = keep_aside(spec)
        if aside:
            emit({"kind": "info", "message": f"--fresh: the previous run was moved aside to {aside}"})
    st.write_bytes(fs, st.fs_join(run_path, "rtf_spec.yaml"), to_yaml(spec).encode())

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
    uri = plan.run_uri
    if "error" in outcome:
        err = outcome["error"]
        user = _user_error_in(err)
        if user is not None:
            raise user
        return RunResult(False, uri, summary, error=f"{type(err).__name__}: {err}")
    return RunResult(True, uri, summary)


def main(argv: list[str] | None = None) -> int:
    """Cluster entry point: ``python -m raytune_ft.launch.driver SPEC [--fresh] [--resume-from URI]``."""
    import argparse

    import ray

    from raytune_ft.launch.progress import Renderer
    from raytune_ft.spec import load_spec

    ap = argparse.ArgumentParser(prog="raytune_ft.launch.driver")
    ap.add_argument("spec")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--resume-from")
    a = ap.parse_args(argv)
    try:
        spec = load_spec(a.spec)
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
        renderer = Renderer(sys.stdout)
        result = run(spec, fresh=a.fresh, resume_from=a.resume_from, on_event=renderer.handle)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if not result.ok:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"done: outputs in {result.run_uri}/final")
    return 0


if __name__ == "__main__":
    sys.exit(main())
