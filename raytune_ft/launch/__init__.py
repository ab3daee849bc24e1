"""Targets: where the driver runs and how it gets there. ``submit`` picks one and says why."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from raytune_ft.errors import UserError
from raytune_ft.spec.models import JobSpec


def choose_target(spec: JobSpec, address: str | None) -> tuple[str, str | None, str]:
    """(mode, address, why). An address from --address, RAY_ADDRESS or cluster.address means a
    cluster; none of them means an embedded Ray in this process."""
    if address:
        return "cluster", address, "--address was given"
    if os.environ.get("RAY_ADDRESS"):
        return "cluster", os.environ["RAY_ADDRESS"], "RAY_ADDRESS is set"
    if spec.cluster.address:
        return "cluster", spec.cluster.address, "cluster.address is set in the spec"
    return "local", None, "no --address, no RAY_ADDRESS and no cluster.address"


def check_data(spec: JobSpec) -> int:
    """Read every data row once before anything starts, so a bad row fails in seconds with its
    file and line, not after Ray and the model are up. Returns the number of rows skipped."""
    from raytune_ft import storage as st
    from raytune_ft.data.pipeline import read_source

    skipped = 0
    for src in [*spec.data.train_sources, *spec.data.eval_sources]:
        if "://" not in src.path and not os.path.exists(src.path):
            raise UserError(f"data source not found: {src.path}",
                            hint="paths are relative to the directory you run rtf from")
        _, n = read_source(src, on_bad_row=spec.data.on_bad_row, filesystem_for=st.s3_resolver(spec.storage))
        skipped += n
    return skipped


def absolutize(spec: JobSpec, base: str | None = None) -> JobSpec:
    """Local paths in the spec made absolute (Ray workers run in their own working directory)."""
    from raytune_ft.spec import dump_spec, spec_from_dict

    base = base or os.getcwd()

    def fix(p: str | None, must_exist: bool = False) -> str | None:
        if p is None or "://" in p or os.path.isabs(p):
            return p
        full = os.path.normpath(os.path.join(base, os.path.expanduser(p)))
        return full if (os.path.exists(full) or not must_exist) else p

    d = dump_spec(spec)
    for key in ("train", "eval"):
        for src in d["data"].get(key) or []:
            src["path"] = fix(src["path"])
    d["model"]["name_or_path"] = fix(d["model"].get("name_or_path"), must_exist=True)
    if d.get("tokenizer", {}).get("name_or_path"):
        d["tokenizer"]["name_or_path"] = fix(d["tokenizer"]["name_or_path"], must_exist=True)
    if (d.get("deepspeed") or {}).get("config"):
        d["deepspeed"]["config"] = fix(d["deepspeed"]["config"])
    d["storage"]["path"] = fix(d["storage"]["path"])
    d = {k: v for k, v in d.items() if v is not None}
    d["model"] = {k: v for k, v in d["model"].items() if v is not None}
    return spec_from_dict(d)


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


def check_resume_from(spec: JobSpec, uri: str, base: str | None = None) -> str:
    """``--resume-from`` as the worker will read it: a local path made absolute against the directory rtf
    was run from (Ray workers run in their own working directory), and checked to be a committed
    checkpoint before anything starts, so a wrong path fails in a second with one line instead of after
    Ray's retries, and leaves no run directory behind. Returns the path to pass on."""
    import pyarrow.fs as pafs

    from raytune_ft import checkpoints as ck
    from raytune_ft import storage as st

    if spec.tune is not None:
        raise UserError("--resume-from names one run's checkpoint; a sweep resumes its own trials: "
                        "resubmit the same spec to continue it")
    if st.is_s3(uri):
        fs, _ = st.pyarrow_filesystem(spec.storage)
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


def submit(spec: JobSpec, *, address: str | None = None, fresh: bool = False, resume_from: str | None = None,
           follow: bool = True, out=None) -> int:
    out = out or sys.stderr
    mode, addr, why = choose_target(spec, address)
    if mode == "cluster":
        from raytune_ft.launch.ray_jobs import submit_cluster

        return submit_cluster(absolutize(spec), addr, why, fresh=fresh, resume_from=resume_from,
                              follow=follow, out=out)
    if resume_from:
        resume_from = check_resume_from(spec, resume_from)
    print(f"mode: local embedded Ray ({why})", file=out)
    return run_local(absolutize(spec), fresh=fresh, resume_from=resume_from, out=out)


def run_local(spec: JobSpec, *, fresh: bool = False, resume_from: str | None = None, out=None) -> int:
    from raytune_ft import storage as st
    from raytune_ft.launch.driver import finished_run
    from raytune_ft.plan import make_plan

    out = out or sys.stderr
    plan = make_plan(spec)
    done = None if (fresh or resume_from) else finished_run(spec)
    if done is not None:  # before the preflight's marker and before Ray: nothing starts, nothing is written
        print(done.message(), file=out)
        return 0
    print(f"storage: {st.preflight(spec.storage)}", file=out)
    skipped = check_data(spec)
    if skipped:
        print(f"data: {skipped} bad row(s) will be skipped (data.on_bad_row: skip)", file=out)
    import ray

    from raytune_ft.launch.driver import mark_stopped, run
    from raytune_ft.launch.progress import Renderer

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
        result = run(spec, fresh=fresh, resume_from=resume_from, on_event=renderer.handle)
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


def print_summary(summary: dict[str, Any], run_uri: str, out) -> None:
    def f(v: Any, fmt: str = "{:.4f}") -> str:
        return "-" if v is None else fmt.format(v)

    rows = [
        ("steps", f"{summary.get('steps', '-')}"),
        ("final train loss", f(summary.get("train_loss"))),
        ("eval loss", f(summary.get("eval_loss"))),
        ("perplexity", f(summary.get("perplexity"), "{:.2f}")),
        ("tokens", f(summary.get("tokens"), "{:,}")),
        *([("tokens since resume", f(summary["attempt_tokens"], "{:,}"))]  # what runtime and tokens/s cover
          if summary.get("resumed_from_step") is not None and summary.get("attempt_tokens") is not None else []),
        ("runtime", f(summary.get("runtime_s"), "{:.1f}s")),
        ("tokens/s", f(summary.get("tokens_per_s"), "{:,.0f}")),
    ]
    if summary.get("resumed_from_step") is not None:
        rows.append(("resumed from step", str(summary["resumed_from_step"])))
    skipped = (summary.get("data") or {}).get("skipped_bad_rows") or {}
    if skipped:
        rows.append(("skipped bad rows", ", ".join(f"{k}: {v}" for k, v in skipped.items())))
    width = max(len(k) for k, _ in rows)
    print("", file=out)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)
    sep = "/" if run_uri.startswith("s3://") else os.sep
    print(f"\noutputs: {run_uri}{sep}final", file=out)
