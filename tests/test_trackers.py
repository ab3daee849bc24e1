"""Experiment trackers for real: MLflow against a real sqlite tracking store, W&B in offline mode,
both read back with their own clients/protobufs; a resubmitted run continues the same tracker runs."""

from __future__ import annotations

import json
import os
import struct

import pyarrow.fs as pafs
import pytest

from raytune_ft.errors import SpecError
from raytune_ft.spec import spec_from_dict
from raytune_ft.train.recipe import RunContext
from raytune_ft.train.trackers import TRACKERS_FILE, setup_trackers, wandb_run_id
from tests.tiny import spec_doc, write_spec


def wandb_records(path):
    """The records of an offline W&B run file (``run-ID.wandb``), decoded with wandb's own protobufs.
    The file is W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each
    ``crc32(4) length(2) type(1) data`` (type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def wandb_offline_runs(wandb_dir):
    """[(run record, [history rows as {key: value}])] for each offline run dir, oldest first."""
    out = []
    for f in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        run, rows = None, []
        for rec in wandb_records(f):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run = rec.run
            elif kind == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        out.append((run, rows))
    return out


# --------------------------------------------------------------------------- without Ray


@pytest.fixture
def clean_env():
    """setup_trackers sets env vars in this process (as in a worker): restore the environment after."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _spec(tmp_path, **over):
    doc = spec_doc("trk", tmp_path / "model", tmp_path / "t.jsonl", None, tmp_path / "runs", **over)
    return spec_from_dict(doc)


def _run_ctx(spec, rank=0):
    root = str(spec.storage.path)
    from raytune_ft.rundir import RunDir

    return RunContext(spec, rank, 1, 0, RunDir(pafs.LocalFileSystem(), f"{root}/{spec.name}", f"{root}/{spec.name}"))


def test_wandb_run_id_is_derived_from_the_run():
    a = wandb_run_id("/data/runs", "r1")
    assert a == wandb_run_id("/data/runs/", "r1") and a.startswith("rtf-") and len(a) == 20
    assert len({a, wandb_run_id("/data/runs", "r2"), wandb_run_id("s3://b/runs", "r1"),
                wandb_run_id("/data/runs", "r1", generation=1)}) == 4


def test_mlflow_needs_a_tracking_uri_and_experiment_names_are_checked(tmp_path):
    with pytest.raises(SpecError, match="report_to mlflow needs the tracking store: set env.MLFLOW_TRACKING_URI"):
        _spec(tmp_path, monitoring={"report_to": ["mlflow"]})
    _spec(tmp_path, monitoring={"report_to": ["mlflow"]}, env={"MLFLOW_TRACKING_URI": None})
    with pytest.raises(SpecError, match="monitoring.experiment"):
        _spec(tmp_path, monitoring={"report_to": ["wandb"], "experiment": "a/b"})


def test_setup_trackers_creates_then_reuses_the_mlflow_run(tmp_path, clean_env):
    """Rank 0 creates the MLflow run (named after the rtf run, with the spec as params and the final/ URI
    as a tag) and records it in trackers.json; a later attempt reads it back and reattaches."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_MAX_LOG_PARAMS", "WANDB_RUN_ID", "WANDB_RESUME",
              "WANDB_NAME", "WANDB_PROJECT", "WANDB_DIR"):
        os.environ.pop(k, None)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    spec = _spec(tmp_path, monitoring={"report_to": ["tensorboard", "mlflow", "wandb"], "experiment": "exp1"},
                 env={"MLFLOW_TRACKING_URI": uri})
    assert setup_trackers(spec, _run_ctx(spec, rank=1), resumed_from=None) == {}  # rank 0 only
    first = setup_trackers(spec, _run_ctx(spec), resumed_from=None)
    run_dir = tmp_path / "runs" / "trk"
    assert json.loads((run_dir / TRACKERS_FILE).read_text()) == first
    rid = first["mlflow"]["run_id"]
    assert first["mlflow"]["experiment"] == "exp1" and first["wandb"] == {
        "run_id": wandb_run_id(str(tmp_path / "runs"), "trk"), "project": "exp1"}
    assert os.environ["MLFLOW_RUN_ID"] == rid and "MLFLOW_MAX_LOG_PARAMS" not in os.environ
    assert os.environ["WANDB_RUN_ID"] == first["wandb"]["run_id"] and os.environ["WANDB_RESUME"] == "allow"
    assert os.environ["WANDB_NAME"] == "trk" and os.environ["WANDB_DIR"] == str(run_dir)
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(rid)
    assert r.info.run_name == "trk"
    assert client.get_experiment(r.info.experiment_id).name == "exp1"
    assert r.data.params["spec.method.lora.r"] == "4" and r.data.params["spec.training.max_steps"] == "6"
    assert r.data.tags["rtf.final_uri"] == str(run_dir / "final")

    del os.environ["MLFLOW_RUN_ID"]
    again = setup_trackers(spec, _run_ctx(spec), resumed_from=3)
    assert again == first and os.environ["MLFLOW_RUN_ID"] == rid
    assert os.environ["MLFLOW_MAX_LOG_PARAMS"] == "0"  # HF's params were logged once; MLflow refuses changes
    assert client.get_run(rid).data.tags["rtf.resumed_from_step"] == "3"
    assert len(client.search_runs([r.info.experiment_id])) == 1

    # trackers.json is read from storage: a planted id that is not a plain id is ignored
    (run_dir / TRACKERS_FILE).write_text(json.dumps({"mlflow": {"run_id": "../../x; rm"}}))
    third = setup_trackers(spec, _run_ctx(spec), resumed_from=None)
    assert third["mlflow"]["run_id"] not in (rid, "../../x; rm")


# --------------------------------------------------------------------------- a real run on Ray


@pytest.mark.ray
def test_mlflow_and_wandb_follow_a_run_and_its_resumption(ray_local, tiny, tmp_path, capsys):
    from mlflow import MlflowClient

    from raytune_ft.cli import main

    train, evals, model_dir = tiny
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    doc = spec_doc("tracked", model_dir, train, evals, tmp_path / "runs",
                   training={"max_steps": 4, "save_steps": 2, "eval_steps": 2})
    doc["monitoring"] = {"report_to": ["tensorboard", "mlflow", "wandb"]}
    doc["env"] = {"MLFLOW_TRACKING_URI": uri, "WANDB_MODE": "offline", "WANDB_API_KEY": None}
    spec_path = write_spec(tmp_path / "tracked.yaml", doc)

    def submit(*extra):
        with pytest.raises(SystemExit) as ei:
            main(["submit", str(spec_path), *extra])
        out = capsys.readouterr()
        return ei.value.code, out.out + out.err

    code, out = submit()
    assert code == 0, out
    run_dir = tmp_path / "runs" / "tracked"
    ids = json.loads((run_dir / TRACKERS_FILE).read_text())
    rid = ids["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(rid)
    assert r.info.run_name == "tracked" and r.info.status == "FINISHED"
    assert client.get_experiment(r.info.experiment_id).name == "tracked"  # default: the run name
    assert r.data.params["max_steps"] == "4" and r.data.params["learning_rate"] == "0.005"  # HF's TrainingArguments
    assert r.data.params["spec.method.type"] == "lora"  # rtf's spec
    assert r.data.tags["rtf.final_uri"] == str(run_dir / "final")
    local = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {m.step: m.value for m in client.get_metric_history(rid, "loss")}
    assert losses == pytest.approx({x["step"]: x["loss"] for x in local if "loss" in x})
    assert sorted(losses) == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(rid, "eval_loss")] == [2, 4]

    # W&B offline: one run, id derived from the rtf run, named after it, history per step
    runs = wandb_offline_runs(run_dir / "wandb")
    assert len(runs) == 1
    wrun, rows = runs[0]
    assert wrun.run_id == wandb_run_id(str(tmp_path / "runs"), "tracked") == ids["wandb"]["run_id"]
    assert wrun.display_name == "tracked" and wrun.project == "tracked"
    steps = [row["train/global_step"] for row in rows if "train/loss" in row]
    assert steps == [1, 2, 3, 4]
    assert [row["train/loss"] for row in rows if "train/loss" in row] == pytest.approx(
        [x["loss"] for x in local if "loss" in x])

    # resubmitted longer: resumes from step 4 and continues the same MLflow run and W&B run id
    code, out = submit("--set", "training.max_steps=6")
    assert code == 0, out
    assert "at step 4" in out
    assert json.loads((run_dir / TRACKERS_FILE).read_text()) == ids
    exp_runs = client.search_runs([r.info.experiment_id])
    assert [x.info.run_id for x in exp_runs] == [rid]
    assert sorted(m.step for m in client.get_metric_history(rid, "loss")) == [1, 2, 3, 4, 5, 6]
    assert client.get_run(rid).data.tags["rtf.resumed_from_step"] == "4"
    runs = wandb_offline_runs(run_dir / "wandb")
    assert len(runs) == 2 and runs[1][0].run_id == ids["wandb"]["run_id"]
    assert [row["train/global_step"] for row in runs[1][1] if "train/loss" in row] == [5, 6]
