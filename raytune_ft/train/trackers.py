"""Experiment trackers (MLflow, W&B) through transformers' own callbacks, configured by env vars.

``monitoring.report_to`` names them; ``training_arguments`` passes them to HF's ``report_to``, so
``MLflowCallback`` / ``WandbCallback`` do the logging (params, metrics per logging step). What HF lacks,
and this module adds, on rank 0 before the Trainer is built:

- **identity**: the MLflow run is named after the rtf run and created here (experiment
  ``monitoring.experiment``, default the run name); its id is kept in ``{run}/trackers.json`` and
  handed to HF as ``MLFLOW_RUN_ID`` on every later attempt, so a resumed run continues the same
  MLflow run. The W&B run id is derived from the rtf run (storage path, name and how many times
  ``--fresh`` set an older run aside), with ``WANDB_RESUME=allow``, so a resumed run appends to it;
- **what HF does not log**: the rtf spec as ``spec.*`` params, and tags with the run's storage URI,
  its ``final/`` URI (where the artifacts land), the spec hash and the step a resumed attempt began at.

Connection settings and credentials come from the environment as everywhere in rtf: the spec names
``MLFLOW_TRACKING_URI`` (and ``MLFLOW_TRACKING_TOKEN``, ``WANDB_API_KEY``, ... as ``null`` to forward
them); nothing here writes a value read from the environment into storage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any

from raytune_ft import rundir as rd
from raytune_ft import storage as st

log = logging.getLogger("raytune_ft")
TRACKERS_FILE = rd.TRACKERS
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # trackers.json comes from storage: ids only, checked


def wandb_run_id(storage_path: str, name: str, generation: int = 0) -> str:
    """The W&B run id of an rtf run: the same for every attempt and resubmission of the run, a new one
    after each ``--fresh`` (which sets the old run dir aside as ``{name}.old-*``)."""
    key = f"{storage_path.rstrip('/')}/{name}" + (f"#{generation}" if generation else "")
    return "rtf-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def experiment_name(spec: Any, env_name: str) -> str:
    return spec.monitoring.experiment or os.environ.get(env_name) or spec.name


def setup_trackers(spec: Any, run: Any, *, resumed_from: int | None) -> dict[str, Any]:
    """Rank 0, before the Trainer is built: prepare the named trackers and set the env vars HF's
    callbacks read. Returns what was recorded in ``trackers.json`` (ids, experiment, project)."""
    wanted = [t for t in spec.monitoring.report_to if t in ("mlflow", "wandb")]
    if run.rank != 0 or not wanted:
        return {}
    path = st.fs_join(run.dir.path, TRACKERS_FILE)
    try:
        prior = st.read_json(run.dir.fs, path)
    except ValueError:
        prior = None
    prior = prior if isinstance(prior, dict) else {}
    state: dict[str, Any] = {}
    if "mlflow" in wanted:
        state["mlflow"] = _mlflow(spec, run, _section(prior, "mlflow"), resumed_from)
    if "wandb" in wanted:
        state["wandb"] = _wandb(spec, run, _section(prior, "wandb"))
    st.write_json(run.dir.fs, path, {**prior, **state})
    return state


def _section(prior: dict[str, Any], key: str) -> dict[str, Any]:
    """A tracker's section of a stored trackers.json, with its run id only if it is a plain id."""
    sec = prior.get(key)
    if not isinstance(sec, dict):
        return {}
    rid = sec.get("run_id")
    return sec if isinstance(rid, str) and _ID_RE.fullmatch(rid) else {}


# --------------------------------------------------------------------------- MLflow


def _mlflow(spec: Any, run: Any, prior: dict[str, Any], resumed_from: int | None) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    experiment = experiment_name(spec, "MLFLOW_EXPERIMENT_NAME")
    client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))
    run_id = prior.get("run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except Exception as e:  # another tracking server, or the run was deleted: start a new one
            log.warning("MLflow run %s of this rtf run is not in this tracking store (%s); starting a new one",
                        run_id, type(e).__name__)
            run_id = None
    fresh = run_id is None
    if fresh:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=spec.name).info.run_id
        params = [Param(k, v) for k, v in _spec_params(spec).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=params[i:i + 100])
    tags = {"rtf.run_name": spec.name, "rtf.run_uri": run.dir.uri, "rtf.final_uri": run.dir.final_uri,
            "rtf.spec_hash": _spec_hash(spec)}
    if resumed_from is not None:
        tags["rtf.resumed_from_step"] = str(resumed_from)
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    os.environ["MLFLOW_RUN_ID"] = run_id  # HF's MLflowCallback: start_run() reattaches to this run
    os.environ["MLFLOW_EXPERIMENT_NAME"] = experiment
    if not fresh:  # the TrainingArguments params were logged by the first attempt; MLflow refuses a
        os.environ.setdefault("MLFLOW_MAX_LOG_PARAMS", "0")  # changed value (output_dir, max_steps, ...)
    log.info("MLflow: run %s (%s) in experiment %s", run_id, "new" if fresh else "continued", experiment)
    return {"run_id": run_id, "experiment": experiment}


def _spec_params(spec: Any) -> dict[str, str]:
    """The spec as flat ``spec.a.b`` params (env names only: the spec never holds secret values)."""
    from raytune_ft.spec import dump_spec

    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}", x)
        else:
            out[prefix] = str(v)[:500]

    walk("spec", {k: v for k, v in dump_spec(spec).items() if k not in ("env", "name")})
    return out


def _spec_hash(spec: Any) -> str:
    from raytune_ft.spec import spec_hash

    return spec_hash(spec)


# --------------------------------------------------------------------------- W&B


def _wandb(spec: Any, run: Any, prior: dict[str, Any]) -> dict[str, Any]:
    run_id = prior.get("run_id") or wandb_run_id(spec.storage.path, spec.name, _fresh_generation(run, spec.name))
    project = experiment_name(spec, "WANDB_PROJECT")
    os.environ.update(WANDB_RUN_ID=run_id, WANDB_RESUME="allow", WANDB_NAME=spec.name, WANDB_PROJECT=project)
    if "WANDB_DIR" not in os.environ and st.is_local_fs(run.dir.fs):
        # offline runs must outlive the worker's scratch dir: keep them in the run dir (wandb/offline-run-*),
        # where `wandb sync` finds them
        os.makedirs(run.dir.path, exist_ok=True)
        os.environ["WANDB_DIR"] = run.dir.path
    log.info("W&B: run %s in project %s (%s)", run_id, project, os.environ.get("WANDB_MODE", "online"))
    return {"run_id": run_id, "project": project}


def _fresh_generation(run: Any, name: str) -> int:
    """How many older runs of this name ``--fresh`` has set aside (``{name}.old-*`` beside the run dir)."""
    parent = run.dir.path.rstrip("/").rsplit("/", 1)[0]
    try:
        return sum(d.startswith(f"{name}.old-") for d in st.list_dirs(run.dir.fs, parent))
    except OSError:
        return 0


def finish_trackers() -> None:
    """End this process's tracker runs, whether training ended or failed (call it in a ``finally``).

    Gap it fills: HF's WandbCallback never calls ``wandb.finish()`` (W&B relies on an atexit hook, which
    a Ray worker that is shut down does not run, so an offline run file stays empty), and a failure
    mid-training leaves MLflow's run RUNNING. A no-op when neither library was imported here."""
    import sys

    failed = sys.exc_info()[0] is not None
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=1 if failed else 0)
        except Exception as e:  # never mask the training outcome
            log.warning("W&B: finishing the run failed: %s", e)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and hasattr(mlflow, "active_run"):
        try:
            if mlflow.active_run() is not None:
                mlflow.end_run(status="FAILED" if failed else "FINISHED")
        except Exception as e:
            log.warning("MLflow: ending the run failed: %s", e)
