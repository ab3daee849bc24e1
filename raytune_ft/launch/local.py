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
    if owned:
        quiet_ray_console(out)
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=bool(os.environ.get("RTF_WORKER_LOGS")),
                 configure_logging=False, namespace="rtf")
    print(f"ray: {'started' if owned else 'reusing the running Ray'} in {time.time() - t0:.1f}s with "
          f"{ray.cluster_resources().get('CPU', 0):g} CPU(s); {plan.num_workers} worker(s) "
          f"× {plan.resources_per_worker}", file=out)
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
