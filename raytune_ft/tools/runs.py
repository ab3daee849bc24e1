"""``rtf runs [STORAGE]``: the runs under a storage path (a local dir or s3://bucket/prefix).

A run dir is a subdirectory holding any of ``rtf_spec.yaml``, ``metrics.jsonl``, ``final/`` or
``checkpoint-*``; a sweep dir holds ``trial-*`` run dirs, each listed as ``sweep/trial-<id>``.

Status, from what the run dir records (not from file times, except as the last resort below):

* ``completed``: ``final/final_results.json`` exists (its steps and losses are shown);
* ``stopped early``: a sweep trial the scheduler stopped (its row in the sweep's ``results.csv``);
* ``stopped``: the run (or, for a trial, its sweep) was stopped with Ctrl-C or `rtf stop`: its
  ``rtf_stopped.json`` says so (written by the local target and the cluster driver; removed when the run
  is resubmitted and starts again);
* ``failed``: ``rtf_stopped.json`` records a failure, or ``results.csv`` an error for the trial;
* ``running``: none of the above, and something in the run changed in the last :data:`RUNNING_WINDOW_S`
  seconds (metrics.jsonl or a checkpoint);
* ``incomplete``: none of the above (killed without a word, or not started).

``checkpoint`` is the latest committed step, the one a resubmission resumes from.
"""

from __future__ import annotations

import json
import math
import posixpath
import time
from typing import Any

from raytune_ft import rundir as rd
from raytune_ft import storage as st
from raytune_ft.errors import UserError

RUNNING_WINDOW_S = 15 * 60


def list_runs(storage_path: str = "./rtf_runs", *, endpoint_url: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
    """One dict per run: ``name``, ``path``, ``status``, ``steps``, ``checkpoint`` (latest committed step),
    ``train_loss``, ``eval_loss``, ``outputs`` (final/ or the latest committed checkpoint), ``updated``
    (unix time of the newest file seen), ``method``. Sorted by name."""
    storage_path = str(storage_path)
    cfg = st.config_for(storage_path, endpoint_url=endpoint_url)
    now = time.time() if now is None else now
    with st.storage_errors(cfg, "list"):
        fs, root = st.open(cfg)
        if not st.is_s3(storage_path):
            import os

            if not os.path.isdir(root):
                raise UserError(f"no such storage dir: {root}", hint="pass the storage.path of your specs (default ./rtf_runs)")
        remote = st.is_s3(storage_path)
        runs = []
        if _is_run(fs, root):  # pointed at one run dir
            return [_describe(fs, root, posixpath.basename(root.rstrip("/")), remote, now)]
        for name in st.list_dirs(fs, root):
            d = st.fs_join(root, name)
            if _is_run(fs, d):
                runs.append(_describe(fs, d, name, remote, now))
                continue
            trials = [t for t in st.list_dirs(fs, d) if t.startswith(rd.TRIAL_PREFIX) and _is_run(fs, st.fs_join(d, t))]
            if trials:
                recorded = _sweep_records(fs, d)
                for t in trials:
                    runs.append(_describe(fs, st.fs_join(d, t), f"{name}/{t}", remote, now,
                                          trial_status=recorded["trials"].get(t), stop=recorded["stop"]))
    return sorted(runs, key=lambda r: r["name"])


def _entries(fs, path: str):
    import pyarrow.fs as pafs

    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))


def _is_run(fs, path: str) -> bool:
    from raytune_ft import checkpoints as ck

    for info in _entries(fs, path):
        name = posixpath.basename(info.path.rstrip("/"))
        if name in (rd.SPEC, rd.METRICS, rd.FINAL) or ck.parse_step(name) is not None:
            return True
    return False


def _sweep_records(fs, sweep_path: str) -> dict[str, Any]:
    """What a sweep dir records about its trials: each trial's status in ``results.csv`` and the sweep's
    stop record."""
    import csv
    import io

    trials: dict[str, str] = {}
    text = _read_text(fs, st.fs_join(sweep_path, rd.RESULTS_CSV))
    if text:
        for rec in csv.DictReader(io.StringIO(text)):
            if rec.get("trial") and rec.get("status"):
                trials[rec["trial"]] = rec["status"].removesuffix(", diverged")
    stop = _read_json(fs, st.fs_join(sweep_path, rd.STOPPED))
    return {"trials": trials, "stop": stop if isinstance(stop, dict) else None}


def _recorded_status(final: bool, stop: dict[str, Any] | None, trial_status: str | None) -> str | None:
    """The status the run dir records, or None when it records none (still running, or killed)."""
    from raytune_ft.sweep.results import STATUS_ERROR, STATUS_STOPPED

    if final:
        return "completed"
    if trial_status == STATUS_STOPPED:
        return "stopped early"
    if trial_status == STATUS_ERROR:
        return "failed"
    if stop is not None:
        return "failed" if str(stop.get("reason", "")).startswith("failed") else "stopped"
    return None


def _describe(fs, path: str, name: str, remote: bool, now: float, *, trial_status: str | None = None,
              stop: dict[str, Any] | None = None) -> dict[str, Any]:
    from raytune_ft import checkpoints as ck

    def uri(p: str) -> str:
        return f"s3://{p}" if remote else p

    row: dict[str, Any] = {
        "name": name,
        "path": uri(path),
        "status": "incomplete",
        "steps": None,
        "checkpoint": None,
        "train_loss": None,
        "eval_loss": None,
        "outputs": None,
        "updated": None,
        "method": None,
        "reason": None,
    }
    mtimes = [i.mtime.timestamp() for i in _entries(fs, path) if i.mtime is not None]
    spec = _read_text(fs, st.fs_join(path, rd.SPEC))
    if spec:
        row["method"] = _method(spec)
    infos = ck.list_checkpoints(fs, path)
    committed = [i for i in infos if i.committed]
    if committed:
        row["checkpoint"] = committed[-1].step
        row["outputs"] = uri(committed[-1].path)
    mtimes += [i.time.timestamp() for i in infos if i.time is not None]
    metrics_path = st.fs_join(path, rd.METRICS)
    last = _last_metrics(fs, metrics_path)
    if last:
        row["steps"] = last.get("step")
        row["train_loss"] = last.get("loss")
        row["eval_loss"] = last.get("eval_loss")
    m_info = fs.get_file_info(metrics_path)
    if m_info.mtime is not None:
        mtimes.append(m_info.mtime.timestamp())

    results = _read_json(fs, st.fs_join(path, rd.FINAL, rd.FINAL_RESULTS))
    if isinstance(results, dict):
        row["outputs"] = uri(st.fs_join(path, rd.FINAL))
        row["steps"] = results.get("steps", row["steps"])
        row["train_loss"] = _num(results.get("train_loss"), row["train_loss"])
        row["eval_loss"] = _num(results.get("eval_loss"), row["eval_loss"])
    own = _read_json(fs, st.fs_join(path, rd.STOPPED))
    stop = own if isinstance(own, dict) else stop
    recorded = _recorded_status(isinstance(results, dict), stop, trial_status)
    if recorded is not None:
        row["status"] = recorded
        if recorded in ("stopped", "failed") and stop is not None and stop.get("reason"):
            row["reason"] = str(stop["reason"])
    elif mtimes and now - max(mtimes) < RUNNING_WINDOW_S:
        row["status"] = "running"
    if row["steps"] is None and row["checkpoint"] is not None:
        row["steps"] = row["checkpoint"]
    row["updated"] = max(mtimes) if mtimes else None
    return row


def _num(v: Any, default: Any) -> Any:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else default


def _read_text(fs, path: str) -> str | None:
    data = st.read_bytes(fs, path)
    return data.decode("utf-8", errors="replace") if data is not None else None


def _read_json(fs, path: str) -> Any:
    text = _read_text(fs, path)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _method(spec_text: str) -> str | None:
    import yaml

    try:
        doc = yaml.safe_load(spec_text)
    except yaml.YAMLError:
        return None
    if isinstance(doc, dict):
        method = doc.get("method") or {}
        return method.get("type", "lora") if isinstance(method, dict) else None
    return None


def _last_metrics(fs, path: str) -> dict[str, Any]:
    """The last step and the last value of loss and eval_loss in metrics.jsonl."""
    text = _read_text(fs, path)
    if not text:
        return {}
    out: dict[str, Any] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict):
            continue
        step = row.get("step")
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            out["step"] = max(int(step), out.get("step", 0))
        for k in ("loss", "eval_loss"):
            v = _num(row.get(k), None)
            if v is not None:
                out[k] = v
    return out


def render(runs: list[dict[str, Any]], storage_path: str = "") -> str:
    """The runs as a text table."""
    if not runs:
        return f"no runs under {storage_path}" if storage_path else "no runs"
    head = ("NAME", "STATUS", "METHOD", "STEPS", "CKPT", "TRAIN LOSS", "EVAL LOSS", "UPDATED", "OUTPUTS")
    rows = [head]
    for r in runs:
        rows.append(
            (
                r["name"],
                r["status"],
                r["method"] or "-",
                _s(r["steps"]),
                _s(r["checkpoint"]),
                _f(r["train_loss"]),
                _f(r["eval_loss"]),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(r["updated"])) if r["updated"] else "-",
                r["outputs"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in rows
    )


def _s(v: Any) -> str:
    return "-" if v is None else str(v)


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"
