"""The local target: an embedded Ray in this process (no address given), the driver run in-process, its
progress rendered live."""

from __future__ import annotations

import os
import sys
import time

from raytune_ft import storage as st
from raytune_ft.data.pipeline import check_data
from raytune_ft.launch.driver import before_start, mark_stopped, quiet_ray_console, run
from raytune_ft.launch.progress import Renderer, print_summary
from raytune_ft.plan import make_plan
from raytune_ft.spec.models import JobSpec


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

    c = spec.compute
    need = c.num_workers * c.cpus_per_worker
    cpus = max(os.cpu_count() or 1, int(need + 0.999))
    t0 = time.time()
    owned = not ray.is_initialized()  # a caller (a notebook, a test session) may have started Ray already
    other = recorded_head() if owned else None
    if owned:
        quiet_ray_console(out)
        # address="local": always a new Ray of our own. Without it ray.init joins the head recorded in Ray's
        # address file, even a dead one's leftover, and refuses num_cpus there.
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 log_to_driver=bool(os.environ.get("RTF_WORKER_LOGS")), configure_logging=False, namespace="rtf")
    what = "started a new embedded Ray" if owned else "reusing the Ray this process already runs"
    print(f"ray: {what} in {time.time() - t0:.1f}s with {ray.cluster_resources().get('CPU', 0):g} CPU(s); "
          f"{plan.num_workers} worker(s) × {plan.resources_per_worker}", file=out)
    if other:
        print(f"ray: not the Ray head at {other[0]} recorded in {other[1]} (running or stale); to run on a "
              "running head, submit to its dashboard: --address http://HEAD:8265", file=out)
    if ray.cluster_resources().get("GPU") and not spec.compute.use_gpu:
        print("note: this machine has a GPU but compute.gpus_per_worker is 0, so training runs on CPU; "
              "set compute.gpus_per_worker: 1 to use it", file=out)
    renderer = Renderer(out)
    try:
        result = run(spec, fresh=fresh, resume_from=resume_from, on_event=renderer.handle, plan=plan, settled=True)
    except KeyboardInterrupt:
        renderer.close()
        mark_stopped(spec, "interrupted")
        print("\ninterrupted: training stopped. Committed checkpoints are intact; "
              "run the same command again to resume from the latest one.", file=out)
        return 130
    finally:
        renderer.close()
        if owned:
            ray.shutdown()
    if not result.ok:
        mark_stopped(spec, f"failed: {result.error}")
        print(f"error: training failed: {result.error}", file=out)
        return 1
    print_summary(result.summary, result.run_uri, out)
    return 0
