"""The local target: an embedded Ray in this process (no address given), the driver run in-process, its
progress rendered live."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from raytune_ft import storage as st
from raytune_ft.data.pipeline import check_data
from raytune_ft.launch.driver import before_start, mark_stopped, quiet_ray_console, run
from raytune_ft.launch.progress import Renderer, print_summary
from raytune_ft.plan import make_plan
from raytune_ft.spec.models import JobSpec
from raytune_ft.train.config import SAVE_AND_STOP, StopRequested


def recorded_head() -> tuple[str, str] | None:
    """(address, file): the Ray head that ``ray start`` recorded in Ray's address file on this machine
    (``$RAY_TMPDIR``/``/tmp`` + ``ray/ray_current_cluster``), which a plain ``ray.init()`` would join."""
    try:
        from ray._common.utils import get_ray_address_file

        path = get_ray_address_file(None)
        with open(path) as f:
            address = f.read().strip()
    except (ImportError, OSError):
        return None
    return (address, path) if address else None


# The embedded Ray, started for one run on this machine rather than as a shared service (each kept when the
# environment sets it):
LOCAL_RAY_ENV = {
    # Ray runs its worker processes at nice 15, a background priority: here they are the run itself, and
    # anything else on the machine (an IDE, a browser) would take the CPU from them
    "RAY_worker_niceness": "0",
    # no usage report from a one-run Ray (there is no dashboard either)
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray Train's controller polls its workers every 2 s and learns that training ended only then: measured
    # (bench/RESULTS.md §2), the end of fit() came 5.5-7 s after the last step, and 0.7-1.8 s with polls every
    # 0.2 s. The polls cost nothing measurable next to a training step.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


def start_env() -> dict[str, str]:
    """Set :data:`LOCAL_RAY_ENV` for the Ray this process is about to start (its processes inherit it);
    returns what it set."""
    added = {k: v for k, v in LOCAL_RAY_ENV.items() if k not in os.environ}
    os.environ.update(added)
    return added


TRAINED_HERE = False  # a run trained in this process and this process's Ray was shut down after it

IN_PROCESS_ENV = "RTF_IN_PROCESS"  # 0: always a worker group; 1: in process whenever there is one worker


def choose_in_process(spec: JobSpec, owned: bool) -> tuple[bool, str]:
    """Whether a local run trains in this process (Ray Train's local mode), and the reason said with it.

    Yes for one worker when this command would start a Ray of its own (a fresh ``rtf submit``): a worker group
    costs seconds to start (and a Ray to run it), and for one worker it buys only Ray Train's restart after a
    crash of that worker (``fault_tolerance.max_failures``; a storage outage still gets the driver's retry).
    No for several workers, a sweep (Tune runs its trials' workers), DeepSpeed (it needs the process group Ray
    Train sets up for a worker), and a Ray this process already runs (a notebook, a test session: long-lived,
    where a worker's failure must not be the process's). ``RTF_IN_PROCESS=0`` keeps the worker group; ``=1``
    uses this process on an existing Ray too."""
    if spec.tune is not None or not _may_train_in_process(spec):
        return False, ""
    if os.environ.get(IN_PROCESS_ENV, "").strip() == "1":
        return True, f"{IN_PROCESS_ENV}=1"
    if owned:
        return True, f"{IN_PROCESS_ENV}=0 starts one"
    return False, ""


def trials_in_process(spec: JobSpec) -> tuple[bool, str]:
    """Whether a local sweep's trials each train in their Tune trial actor (Ray Train's local mode there) rather
    than in a worker group of their own, and the reason said with it. Yes for one worker without DeepSpeed, on
    a Ray of our own or the one this process runs (a trial's failure is its actor's, never this process's).
    Tune reuses its trial actors, so the training stack is imported once per concurrent trial, and no Train
    controller, helper actors or worker group start per trial. What it gives up: Ray Train's restart of a
    failed trial (``fault_tolerance.max_failures``); resubmitting the sweep resumes such a trial from its last
    checkpoint. ``RTF_IN_PROCESS=0`` keeps a worker group per trial."""
    if spec.tune is None or not _may_train_in_process(spec):
        return False, ""
    return True, f"{IN_PROCESS_ENV}=0 starts a worker group per trial"


def _may_train_in_process(spec: JobSpec) -> bool:
    """One worker, no DeepSpeed (it wants the process group Ray Train sets up for a worker), and not
    ``RTF_IN_PROCESS=0``: what a run and a sweep's trials both need to train without a worker group."""
    return (spec.compute.num_workers == 1 and spec.deepspeed is None
            and os.environ.get(IN_PROCESS_ENV, "").strip() != "0")


@contextlib.contextmanager
def training_output(spec: JobSpec) -> Iterator[str]:
    """For a run in this process: what a worker process would write to its log (library warnings, progress
    bars, the recipe's log lines) goes to a file, and the console keeps rtf's own lines. Yields the path.

    ``sys.stdout``/``sys.stderr`` are swapped for the run (the console renderer holds the real stream);
    handlers a library creates meanwhile keep the file, so it stays open until the process ends."""
    import logging

    if os.environ.get("RTF_WORKER_LOGS"):  # asked to see the workers' output on the console
        yield ""
        return
    folder = os.path.join(tempfile.gettempdir(), "rtf-logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    f = open(path, "a", buffering=1)  # noqa: SIM115 - kept open: see above
    handler = logging.StreamHandler(f)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    # handlers that libraries set up at import (Ray's, on its "ray" logger) hold the console stream itself
    consoles = {id(sys.stdout), id(sys.stderr), id(sys.__stdout__), id(sys.__stderr__)}
    moved: list[tuple[logging.StreamHandler, Any]] = []
    for logger in [root, *(x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger))]:
        for h in logger.handlers:
            dynamic = isinstance(getattr(type(h), "stream", None), property)  # reads sys.stderr when it writes
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and not dynamic \
                    and id(getattr(h, "stream", None)) in consoles:
                moved.append((h, h.setStream(f)))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for h, stream in moved:
            h.setStream(stream)


def _has_gpu(in_process: bool) -> bool:
    if not in_process:
        import ray

        return bool(ray.cluster_resources().get("GPU"))
    import torch  # the run imports it next anyway

    return torch.cuda.is_available()


def run_local(spec: JobSpec, *, fresh: bool = False, resume_from: str | None = None, out=None) -> int:
    out = out or sys.stderr
    plan = make_plan(spec)
    done = before_start(spec, fresh=fresh, resume_from=resume_from, emit=lambda e: print(e["message"], file=out))
    if done is not None:  # before the preflight's marker and before Ray: nothing starts, nothing is written
        print(done.message(), file=out)
        return 0
    print(f"storage: {st.preflight(spec.storage)}", file=out)
    skipped = check_data(spec)
    if skipped:
        print(f"data: {skipped} bad row(s) will be skipped (data.on_bad_row: skip)", file=out)
    import ray

    cpus = max(os.cpu_count() or 1, int(spec.compute.num_workers * spec.compute.cpus_per_worker + 0.999))
    t0 = time.time()
    running = ray.is_initialized()  # a caller (a notebook, a test session) may have started Ray already
    in_process, why = choose_in_process(spec, owned=not running)
    owned = not running and not in_process  # a Ray of our own, for a worker group (an in-process run needs none)
    trials, trials_why = trials_in_process(spec)  # a sweep: Ray runs Tune, and each trial trains in its actor
    other = recorded_head() if not running else None
    added: dict[str, str] = {}
    if owned:
        quiet_ray_console(out)
        added = start_env()
        # address="local": always a new Ray of our own. Without it ray.init joins the head recorded in Ray's
        # address file, even a dead one's leftover, and refuses num_cpus there.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 log_to_driver=bool(os.environ.get("RTF_WORKER_LOGS")), configure_logging=False, namespace="rtf")
    if in_process:
        print(f"ray: 1 worker, trained in this process (Ray Train's local mode: no Ray cluster or worker group "
              f"to start; {why})", file=out)
    else:
        what = "started a new embedded Ray" if owned else "reusing the Ray this process already runs"
        print(f"ray: {what} in {time.time() - t0:.1f}s with {ray.cluster_resources().get('CPU', 0):g} CPU(s); "
              f"{plan.num_workers} worker(s) × {plan.resources_per_worker}"
              + (" per trial, trained in the trial's own process (Ray Train's local mode: no worker group per "
                 f"trial; {trials_why})" if trials else ""), file=out)
    if other:
        print(f"ray: not the Ray head at {other[0]} recorded in {other[1]} (running or stale); to run on a "
              "running head, submit to its dashboard: --address http://HEAD:8265", file=out)
    if not spec.compute.use_gpu and _has_gpu(in_process):
        print("note: this machine has a GPU but compute.gpus_per_worker is 0, so training runs on CPU; "
              "set compute.gpus_per_worker: 1 to use it", file=out)
    renderer = Renderer(out)
    SAVE_AND_STOP.clear()
    on_term = None
    if in_process and threading.current_thread() is threading.main_thread():
        # SIGTERM (a pod's eviction, a RunPod stop, `kill`): commit a checkpoint at the next step, then stop.
        # (A worker group's workers are Ray's processes: Ray Train handles their signals.)
        on_term = signal.signal(signal.SIGTERM, lambda signum, frame: SAVE_AND_STOP.set())
    try:
        with training_output(spec) if in_process else contextlib.nullcontext("") as log_path:
            if log_path:
                print(f"training output (library warnings and logs): {log_path}", file=out)
            result = run(spec, fresh=fresh, resume_from=resume_from, on_event=renderer.handle, plan=plan,
                         settled=True, in_process=in_process or trials)
    except KeyboardInterrupt as e:
        renderer.close()
        if SAVE_AND_STOP.is_set() and isinstance(e, StopRequested):
            mark_stopped(spec, "terminated (SIGTERM)")
            print(f"\nstopped on SIGTERM: {str(e).removeprefix('SIGTERM: ')}. Run the same command again to "
                  "resume from it.", file=out)
            return 143
        mark_stopped(spec, "interrupted")
        print("\ninterrupted: training stopped. Committed checkpoints are intact; "
              "run the same command again to resume from the latest one.", file=out)
        return 130
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
        renderer.close()
        if owned:
            ray.shutdown()
        for k in added:  # for this Ray only (a later one in this process, a test session's, starts as it would)
            os.environ.pop(k, None)
        if in_process and not running:
            global TRAINED_HERE
            TRAINED_HERE = True
    if not result.ok:
        mark_stopped(spec, f"failed: {result.error}")
        print(f"error: training failed: {result.error}", file=out)
        return 1
    print_summary(result.summary, result.run_uri, out)
    return 0
