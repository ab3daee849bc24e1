"""The Ray Jobs target: run the driver on an existing Ray cluster through its Jobs API.

``rtf submit SPEC --address http://HEAD:8265`` (or ``$RAY_ADDRESS``, or ``cluster.address``) sends
``python -m raytune_ft.launch.driver rtf_spec.yaml`` to the cluster with :class:`JobSubmissionClient` (the
connection, its time limits and its one-line errors: :mod:`raytune_ft.launch.jobs_api`).

* **Authentication.** Ray's token auth (Ray >= 2.52): the token comes from ``$RAY_AUTH_TOKEN``, else
  the file ``$RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token`` (Ray's own lookup order and default
  path), and is sent as ``Authorization: Bearer``. A missing token is a one-line error (exit 2) before
  anything is sent; ``RTF_ALLOW_NO_AUTH=1`` talks to a cluster without auth (no secrets then). A token
  the cluster refuses is a one-line error too. The token is never printed. A cluster that answers a
  request *without* a token (token auth off, or Ray < 2.52) gets a warning, and no secrets.
* **What is shipped** (``runtime_env``): ``working_dir`` is a small bundle made for this job: the
  resolved spec (``rtf_spec.yaml``: local paths made absolute, secrets as names only) and, when the
  spec forwards secrets, ``rtf_secrets.sealed`` (see :mod:`raytune_ft.train.env`). It is *not*
  the user's directory (which may hold data and checkpoints). ``py_modules`` carries this
  ``raytune_ft`` package, so the cluster runs the submitter's version of rtf; the cluster's Python
  must have rtf's dependencies (torch, transformers, peft, Ray Train). With ``cluster.image`` set, the
  image is taken to have raytune_ft installed and nothing is shipped but the bundle.
  ``cluster.pip`` becomes ``runtime_env.pip``. Literal ``env`` values go to ``runtime_env.env_vars``
  (visible on the dashboard: the spec refuses literal values for secret-looking names).
* **Identity.** The job's submission id is ``rtf-{name}-{UTC time}-{random}``; its metadata holds the
  run name, storage location and spec hash, so ``rtf status|logs|stop`` accept the id or the run
  name (its newest job). A second job for a run that is still running on the cluster is refused (two
  drivers would write one run directory).
* **Progress.** The driver prints ``RTF_EVENT {json}`` lines (``RTF_EVENTS=1``); ``--follow`` and
  ``rtf logs`` turn them back into the same progress bar and messages as local mode. Ctrl-C detaches.
"""

from __future__ import annotations

import io
import json
import os
import secrets as _random
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from typing import Any

from raytune_ft import rundir as rd
from raytune_ft.errors import UserError
from raytune_ft.launch import secrets as sec
from raytune_ft.launch.jobs_api import (  # noqa: F401  (the connection's names, also used from here)
    DEFAULT_DASHBOARD_PORT,
    Cluster,
    DashboardError,
    Token,
    checks_tokens,
    cluster_address,
    connect,
    dashboard_url,
    default_token_path,
    find_token,
)
from raytune_ft.launch.progress import EVENT_PREFIX, Renderer, print_summary
from raytune_ft.train.env import SEALED_FILE, seal

BUNDLE_SPEC = rd.SPEC  # the resolved spec, under the name it has in a run dir
# The driver's interpreter. Ray's job supervisor runs the entrypoint with /bin/sh, so `python` is the one on
# the PATH of whoever ran `ray start`; a head started as `.venv/bin/ray start` without the venv activated
# finds a `python` without Ray (or none). So: `python` when it has Ray (the usual case, and the one Ray's
# pip/conda runtime environments arrange), else the Python the node's raylet starts its workers with (the
# supervisor's parent; its --python_worker_command, read from /proc on Linux), else `python` anyway, and a
# failure is explained by driver_python_hint().
PICK_PYTHON = ("PY=python; python -c 'import importlib.util as u, sys; sys.exit(u.find_spec(\"ray\") is None)' "
               "2>/dev/null || { R=$(awk '/^PPid:/{print $2}' /proc/$PPID/status 2>/dev/null); "
               "W=$(tr '\\0' '\\n' </proc/$R/cmdline 2>/dev/null "
               "| sed -n 's/^--python_worker_command=\\([^ ]*\\).*/\\1/p'); "
               "[ -x \"$W\" ] && PY=$W; }; ")
DRIVER = 'exec "$PY" -u -m raytune_ft.launch.driver'
NO_RAY_SIGNS = ("No module named 'ray'", "No module named ray", "python: not found", "python: command not found")
SETUP_HOOK = "raytune_ft.launch.secrets.setup_hook"
EXCLUDES = ["__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DASHBOARD_RETRY_S = 60.0  # --follow keeps asking this long while the dashboard answers with server errors
ACTIVE = ("PENDING", "RUNNING")
# in --follow, driver lines shown besides the progress events (all lines with RTF_WORKER_LOGS=1)
DRIVER_MESSAGES = ("error:", "hint:", "warning:", "rtf:", "stopped:", "interrupted")


# --------------------------------------------------------------------------- the submission


def package_dir() -> str:
    import raytune_ft

    return os.path.dirname(os.path.abspath(raytune_ft.__file__))


def submission_id(spec: Any) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"rtf-{spec.name}-{stamp}-{_random.token_hex(2)}"


def job_payload(spec: Any, bundle: str, *, fresh: bool = False, resume_from: str | None = None,
                forwarded: list[str] | None = None) -> dict[str, Any]:
    """Everything ``submit_job`` receives. Secret values are never in it (names only)."""
    from raytune_ft.plan import make_plan
    from raytune_ft.spec import spec_hash

    args = [BUNDLE_SPEC] + (["--fresh"] if fresh else []) + (["--resume-from", resume_from] if resume_from else [])
    env_vars = {k: v for k, v in spec.env.items() if v is not None}
    env_vars["RTF_EVENTS"] = "1"
    env_vars.setdefault("PYTHONUNBUFFERED", "1")
    runtime_env: dict[str, Any] = {"working_dir": bundle, "env_vars": env_vars}
    if not spec.cluster.image:
        runtime_env["py_modules"] = [package_dir()]
        runtime_env["excludes"] = list(EXCLUDES)
    if spec.cluster.pip:
        runtime_env["pip"] = list(spec.cluster.pip)
    if forwarded:
        runtime_env["worker_process_setup_hook"] = SETUP_HOOK
    metadata = {"rtf_name": spec.name, "rtf_run": make_plan(spec).run_uri, "rtf_spec_hash": spec_hash(spec)}
    if forwarded:
        metadata["rtf_forwarded_env"] = ",".join(forwarded)
    return {"entrypoint": f"{PICK_PYTHON}{DRIVER} {' '.join(shlex.quote(a) for a in args)}", "runtime_env": runtime_env,
            "metadata": metadata, "submission_id": submission_id(spec)}


def write_bundle(spec: Any, bundle: str, values: dict[str, str], token: str | None) -> None:
    from raytune_ft.spec import to_yaml

    with open(os.path.join(bundle, BUNDLE_SPEC), "w") as f:
        f.write(to_yaml(spec))
    if values:
        assert token, "secrets are sealed with the cluster's token"
        with open(os.path.join(bundle, SEALED_FILE), "wb") as f:
            f.write(seal(values, token))


def submit_cluster(spec: Any, address: str, why: str, *, fresh: bool = False, resume_from: str | None = None,
                   follow: bool = True, out=None, allow_plain_http: bool = False) -> int:
    """Submit ``spec`` (already absolutized) as a Ray job; follow it when asked. Returns an exit code."""
    from raytune_ft.plan import make_plan

    plan = make_plan(spec)
    sec.check_names(spec)
    values = sec.collect(spec)  # an unset secret fails here, before anything is sent
    out = sec.Masked(out or sys.stderr, values)
    warning = sec.check_transport(dashboard_url(address), values, allow_plain_http=allow_plain_http)
    if warning:  # before the token is first sent
        print(warning, file=out)
    cluster = connect(address)
    if values and not cluster.token.value:
        raise UserError(f"env forwards {', '.join(values)}, which needs Ray token authentication (the "
                        "secrets are sealed with the cluster's token); unset RTF_ALLOW_NO_AUTH and give the token")
    open_cluster = checks_tokens(cluster.url) is False
    if values and open_cluster:
        raise UserError(f"the Ray cluster at {cluster.url} answers without a token (its token authentication is "
                        f"off), so the secrets the spec forwards ({', '.join(values)}) cannot be sealed for it: "
                        "start it with RAY_AUTH_MODE=token and a RAY_AUTH_TOKEN")
    print(f"mode: Ray cluster, Jobs API at {cluster.url} ({why})", file=out)
    if open_cluster:
        print("warning: this cluster does not check Ray auth tokens: anyone who reaches it can run code on it",
              file=out)
    running = [j for j in _rtf_jobs(cluster) if (j.metadata or {}).get("rtf_name") == spec.name
               and str(j.status) in ACTIVE]
    if running:
        jid = running[0].submission_id
        raise UserError(f"run {spec.name} is already {running[0].status} on this cluster as job {jid} "
                        f"(two drivers would write one run directory): `rtf logs {jid} --follow` or `rtf stop {jid}`")
    resume = resume_from if (not resume_from or "://" in resume_from) else os.path.abspath(resume_from)
    with tempfile.TemporaryDirectory(prefix="rtf-job-") as bundle:
        write_bundle(spec, bundle, values, cluster.token.value)
        payload = job_payload(spec, bundle, fresh=fresh, resume_from=resume, forwarded=sorted(values))
        with cluster.calls("submitting the job"):
            job_id = cluster.client.submit_job(**payload)
    print(f"job: {job_id} submitted (run {spec.name}, {plan.num_workers} worker(s) × {plan.resources_per_worker})",
          file=out)
    print(f"storage: {plan.run_uri}", file=out)
    if values:
        print(f"secrets: {', '.join(sorted(values))} forwarded sealed (names only in the job's payload)", file=out)
    if not spec.storage.is_s3 and plan.num_workers > 1:
        print("note: storage is a local directory: every node of the cluster must see it (a shared filesystem)",
              file=out)
    if not follow:
        print(f"follow: rtf logs {job_id} --follow   status: rtf status {job_id}   stop: rtf stop {job_id}",
              file=out)
        return 0
    return follow_job(cluster, job_id, out=out, run_uri=plan.run_uri, hide=values)


# --------------------------------------------------------------------------- logs and progress


def parse_event(line: str) -> dict[str, Any] | None:
    """The event on an ``RTF_EVENT {json}`` line (Ray may prefix a worker's lines: found anywhere)."""
    i = line.find(EVENT_PREFIX)
    if i < 0:
        return None
    try:
        e = json.loads(line[i + len(EVENT_PREFIX):])
    except ValueError:
        return None
    return e if isinstance(e, dict) else None


def last_progress(text: str) -> dict[str, Any] | None:
    """``{"step", "max_steps", "kind"}`` from the last progress event in a job's log."""
    for line in reversed(text.splitlines()):
        e = parse_event(line)
        if not e:
            continue
        if e.get("kind") == "done":
            s = e.get("summary") or {}
            return {"kind": "done", "step": s.get("steps"), "max_steps": s.get("max_steps")}
        if e.get("kind") in ("log", "checkpoint", "eval") and e.get("step") is not None:
            return {"kind": e["kind"], "step": e.get("step"), "max_steps": e.get("max_steps")}
    return None


def render_log(text: str, hide: dict[str, str] | None = None) -> str:
    """A job's log for people: event lines become the lines local mode prints; the rest as is."""
    buf = io.StringIO()
    renderer = Renderer(buf)  # not a TTY: one line per event
    for line in text.splitlines():
        e = parse_event(line)
        if e is None:
            buf.write(line + "\n")
        elif e.get("kind") == "done":
            s = e.get("summary") or {}
            buf.write(f"done: {s.get('steps')} steps, train loss {s.get('train_loss')}, outputs in {e.get('final')}\n")
        else:
            renderer.handle(e)
    return sec.mask(buf.getvalue(), hide or {})


class _Follower:
    def __init__(self, out, verbose: bool) -> None:
        self.out, self.verbose = out, verbose  # out: a sec.Masked stream
        self.renderer = Renderer(out)
        self.partial = ""
        self.lines = 0  # complete lines seen (to skip them when the stream reconnects)
        self.skip = 0
        self.summary: dict[str, Any] | None = None
        self.shown_error = False

    def feed(self, chunk: str) -> None:
        data = self.partial + chunk
        *complete, self.partial = data.split("\n")
        for line in complete:
            self.lines += 1
            if self.skip:
                self.skip -= 1
                continue
            self.line(line)

    def line(self, line: str) -> None:
        e = parse_event(line)
        if e is not None:
            if e.get("kind") == "done":
                self.summary = e.get("summary") or {}
                return
            self.renderer.handle(e)
            return
        text = line.rstrip("\r")
        if self.verbose or text.lstrip().startswith(DRIVER_MESSAGES):
            self.shown_error |= text.lstrip().startswith("error:")
            self.renderer.handle({"kind": "info", "message": text})

    def reconnect(self) -> None:
        self.skip, self.lines, self.partial = self.lines, 0, ""


def driver_python_hint(text: str) -> str | None:
    """What to do when the cluster ran the driver with a Python that has no Ray (seen in its log)."""
    if not any(sign in (text or "") for sign in NO_RAY_SIGNS):
        return None
    return ("the cluster ran the driver with a `python` that has no Ray (the one on the PATH of whoever ran "
            "`ray start`): start Ray with its environment active, e.g. `source .venv/bin/activate && ray start "
            "--head ...`, or with that environment's bin/ first on PATH")


def follow_job(cluster: Cluster, job_id: str, *, out=None, run_uri: str | None = None,
               hide: dict[str, str] | None = None) -> int:
    """Stream a job's progress until it ends (exit code from its outcome). Ctrl-C detaches."""
    import asyncio

    out = sec.Masked(out or sys.stderr, hide or {})  # everything shown below goes through it
    f = _Follower(out, bool(os.environ.get("RTF_WORKER_LOGS")))

    async def tail() -> bool:
        """Feed the log stream; True when it ended, False when it stayed quiet past the limit (then the
        job's state is asked over HTTP, which has a time limit, and the stream opened again). A timer, not
        asyncio.wait_for, which on Python < 3.12 can swallow the cancellation Ctrl-C sends."""
        task, loop = asyncio.current_task(), asyncio.get_running_loop()
        quiet = False

        def on_quiet() -> None:
            nonlocal quiet
            quiet = True
            task.cancel()

        timer = loop.call_later(cluster.stream_idle_s, on_quiet)
        try:
            async for chunk in cluster.client.tail_job_logs(job_id):
                timer.cancel()
                timer = loop.call_later(cluster.stream_idle_s, on_quiet)
                f.feed(chunk)
            return True
        except asyncio.CancelledError:
            if quiet and getattr(task, "cancelling", lambda: 1)() <= 1:  # only our timer's, not Ctrl-C's
                getattr(task, "uncancel", lambda: 0)()
                return False
            raise
        finally:
            timer.cancel()

    try:
        while True:
            with cluster.calls(f"job {job_id}"):
                ended = asyncio.run(tail())
            info = job_info(cluster, job_id, retry_s=DASHBOARD_RETRY_S)
            if ended and str(info.status) in TERMINAL:
                break
            if ended:
                time.sleep(1.0)  # the stream ended early (a network blip): reconnect, skip what was shown
            f.reconnect()  # (a quiet stream of a job that has ended: read it to its end once more)
        # The stream can end before the last lines reached it (seen when a node of the job went away mid-run:
        # everything after that point was missing, the summary too). The job has ended, so its whole log is
        # final: read it once more and show what the stream did not.
        with cluster.calls(f"job {job_id}"):
            whole = cluster.client.get_job_logs(job_id)
        f.reconnect()
        f.feed(whole)
        if f.partial:
            f.feed("\n")
    except KeyboardInterrupt:
        f.renderer.close()
        print(f"\ndetached: job {job_id} keeps running on the cluster.\n"
              f"  reattach: rtf logs {job_id} --follow\n"
              f"  status:   rtf status {job_id}\n"
              f"  stop:     rtf stop {job_id}", file=out)
        return 130
    f.renderer.close()
    status = str(info.status)
    if status == "SUCCEEDED":
        if f.summary is not None:
            print_summary(f.summary, run_uri or (info.metadata or {}).get("rtf_run", "?"), out)
        print(f"job {job_id} SUCCEEDED", file=out)
        return 0
    code = info.driver_exit_code
    msg = (info.message or "").strip()
    hint = driver_python_hint(msg) if status == "FAILED" else None
    if hint:
        print(f"error: {hint}", file=out)
    elif status == "FAILED" and not f.shown_error and msg:
        lines = msg.splitlines()
        tail_lines = "\n".join("  " + ln for ln in lines[-15:]) if len(lines) > 1 else ""
        print(f"error: {lines[0]}" + (f"\n{tail_lines}" if tail_lines else ""), file=out)
    print(f"job {job_id} {status}" + (f" (driver exit code {code})" if code is not None else "")
          + f"; full log: rtf logs {job_id}", file=out)
    if status == "STOPPED":
        return 1
    return 2 if hint else code if code in (1, 2) else 1


# --------------------------------------------------------------------------- status, logs, stop, jobs


def job_info(cluster: Cluster, job_id: str, *, retry_s: float = 0.0) -> Any:
    """The job's info; ``retry_s``: how long to keep asking while the dashboard answers with a server error
    (seen for a few seconds after a node of the job went away)."""
    end = time.monotonic() + retry_s
    while True:
        try:
            with cluster.calls(f"job {job_id}"):
                return cluster.client.get_job_info(job_id)
        except DashboardError:
            if time.monotonic() >= end:
                raise
            time.sleep(2.0)


def _rtf_jobs(cluster: Cluster) -> list[Any]:
    with cluster.calls("listing jobs"):
        return list(cluster.client.list_jobs())


def resolve(cluster: Cluster, job: str) -> Any:
    """A job by submission id, or the newest job of the run named ``job``."""
    jobs = _rtf_jobs(cluster)
    for j in jobs:
        if job in (j.submission_id, j.job_id):
            return j
    mine = [j for j in jobs if (j.metadata or {}).get("rtf_name") == job]
    if mine:
        return max(mine, key=lambda j: j.start_time or 0)
    raise UserError(f"no job {job!r} on the cluster at {cluster.url} (neither a job id nor a run name); "
                    "`rtf jobs` lists them")


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _progress(cluster: Cluster, job: Any) -> dict[str, Any] | None:
    if not (job.metadata or {}).get("rtf_name"):
        return None
    try:
        return last_progress(cluster.client.get_job_logs(job.submission_id))
    except UserError:  # the cluster stopped answering (time limit, unreachable): one line, not a wait per job
        raise
    except Exception:  # noqa: BLE001 - progress is a nicety; the listing must not fail on a job's log
        return None


def _steps(p: dict[str, Any] | None) -> str:
    if not p or p.get("step") is None:
        return "-"
    return f"{p['step']}/{p.get('max_steps') or '?'}"


def job_record(cluster: Cluster, job: Any, progress: bool = True) -> dict[str, Any]:
    meta = job.metadata or {}
    p = _progress(cluster, job) if progress else None
    hide = sec.local_values(meta.get("rtf_forwarded_env"))
    return {"job": job.submission_id or job.job_id, "run": meta.get("rtf_name"), "status": str(job.status),
            "start_time": job.start_time, "end_time": job.end_time, "driver_exit_code": job.driver_exit_code,
            "step": (p or {}).get("step"), "max_steps": (p or {}).get("max_steps"), "storage": meta.get("rtf_run"),
            "message": job.message and sec.mask(job.message, hide),
            "entrypoint": job.entrypoint and sec.mask(job.entrypoint, hide)}


def status(address: str | None, job: str) -> dict[str, Any]:
    """The record of a job (by id, or a run's newest job): state, times, step/total, storage."""
    cluster = connect(cluster_address(address))
    return job_record(cluster, resolve(cluster, job))


def render_status(rec: dict[str, Any]) -> str:
    rows = [("job", rec["job"]), ("run", rec["run"] or "-"), ("status", rec["status"] + (
        f" (driver exit code {rec['driver_exit_code']})" if rec["driver_exit_code"] is not None else "")),
            ("started", _when(rec["start_time"])), ("ended", _when(rec["end_time"])),
            ("progress", _steps(rec)), ("storage", rec["storage"] or "-")]
    if rec["message"] and rec["status"] != "RUNNING":
        rows.append(("message", rec["message"].strip().splitlines()[0][:200]))
        hint = driver_python_hint(rec["message"]) if rec["status"] == "FAILED" else None
        if hint:
            rows.append(("hint", hint))
    return "\n".join(f"{k + ':':<10}{v}" for k, v in rows)


def logs(address: str | None, job: str) -> str:
    """A job's log for people (see :func:`render_log`)."""
    cluster = connect(cluster_address(address))
    j = resolve(cluster, job)
    jid = j.submission_id or j.job_id
    with cluster.calls(f"job {jid}"):
        text = cluster.client.get_job_logs(jid)
    return render_log(text, sec.local_values((j.metadata or {}).get("rtf_forwarded_env")))


def follow(address: str | None, job: str, *, out=None) -> int:
    """Stream a job's progress until it ends (see :func:`follow_job`); its exit code."""
    cluster = connect(cluster_address(address))
    j = resolve(cluster, job)
    return follow_job(cluster, j.submission_id or j.job_id, out=out or sys.stderr,
                      run_uri=(j.metadata or {}).get("rtf_run"),
                      hide=sec.local_values((j.metadata or {}).get("rtf_forwarded_env")))


def stop(address: str | None, job: str, *, wait_s: float = 60.0) -> tuple[int, str]:
    """Stop a job and wait up to ``wait_s`` for it to end: (exit code, what happened)."""
    cluster = connect(cluster_address(address))
    j = resolve(cluster, job)
    jid = j.submission_id or j.job_id
    if str(j.status) in TERMINAL:
        return 0, f"job {jid} already {j.status}; nothing to stop"
    with cluster.calls(f"job {jid}"):
        cluster.client.stop_job(jid)
    deadline = time.time() + wait_s
    state = str(j.status)
    while time.time() < deadline:
        state = str(job_info(cluster, jid).status)
        if state in TERMINAL:
            break
        time.sleep(1.0)
    run = (j.metadata or {}).get("rtf_run")
    if state in TERMINAL:
        return 0, f"job {jid} {state}." + (f" Committed checkpoints in {run} are intact; submit the same spec to "
                                          "resume from the latest one." if run else "")
    return 1, f"job {jid} asked to stop; still {state} after {wait_s:.0f}s (`rtf status {jid}`)"


def list_jobs(address: str | None, *, limit: int = 20) -> tuple[str, list[dict[str, Any]]]:
    """(the cluster's Jobs API URL, the records of its newest ``limit`` jobs, newest first)."""
    cluster = connect(cluster_address(address))
    jobs = sorted(_rtf_jobs(cluster), key=lambda j: j.start_time or 0, reverse=True)[:limit]
    return cluster.url, [job_record(cluster, j) for j in jobs]


def render_jobs(url: str, recs: list[dict[str, Any]]) -> str:
    if not recs:
        return f"no jobs on the cluster at {url}"
    rows = [("JOB", "RUN", "STATUS", "STARTED", "STEP")] + [
        (r["job"], r["run"] or "(not rtf) " + (r["entrypoint"] or "")[:30], r["status"], _when(r["start_time"]),
         _steps(r)) for r in recs]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
