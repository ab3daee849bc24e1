"""Asynchronous checkpoint upload (storage.upload: auto is async to an object store), on a real object store
(SeaweedFS, tests/seaweed.py) behind a slow link (tests/throttle.py): training goes on while a checkpoint
uploads, one upload at a time, the manifest still written last; a run killed mid-upload leaves that
checkpoint uncommitted (listed as uploading) and the previous one intact, and the resubmission resumes from
the previous one."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from raytune_ft import checkpoints as ck
from raytune_ft import rundir as rd
from raytune_ft.cli import main
from raytune_ft.spec import spec_from_dict
from raytune_ft.storage import pyarrow_filesystem
from tests.s3server import apply_env
from tests.test_resume import Proc
from tests.throttle import Throttle
from tests.tiny import spec_doc, write_spec

pytestmark = pytest.mark.ray

UPLOAD_S = 6.0  # what one checkpoint's upload takes over the slow link


def records(fs, run: str) -> list[dict]:
    data = fs.open_input_stream(f"{run}/metrics.jsonl").read().decode()
    return [json.loads(x) for x in data.splitlines() if x.strip()]


def exists(fs, path: str) -> bool:
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError:
        return False


def test_training_goes_on_while_a_checkpoint_uploads_and_a_kill_mid_upload_resumes_from_the_previous(
        seaweed_server, tiny, tmp_path, monkeypatch, capsys):
    apply_env(monkeypatch, seaweed_server)
    monkeypatch.setenv("RTF_IN_PROCESS", "0")  # a worker group: Ray Train's asynchronous upload
    bucket = seaweed_server.create_bucket()
    train, _, model_dir = tiny
    weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    with Throttle(seaweed_server.ports["s3"]) as link:
        doc = spec_doc("async", model_dir, train, None, f"s3://{bucket}/runs", method={"type": "full"},
                       compute={"num_workers": 1, "cpus_per_worker": 1},
                       training={"max_steps": 12, "save_steps": 4, "logging_steps": 1, "learning_rate": 1e-3,
                                 "per_device_train_batch_size": 4},
                       fault_tolerance={"max_failures": 0})
        doc["storage"]["endpoint_url"] = link.endpoint_url
        spec_path = write_spec(tmp_path / "async.yaml", doc)
        spec = spec_from_dict(doc)
        assert spec.storage.upload == "auto" and spec.storage.async_upload
        fs, root = pyarrow_filesystem(spec.storage)
        run = f"{root}/async"
        marker8 = f"{run}/{ck.checkpoint_dir_name(8)}/{rd.UPLOADING}"

        # a checkpoint is the weights and AdamW's two moments: about 3x the model's file, UPLOAD_S on this link
        link.rate = 3 * weights / UPLOAD_S
        proc = Proc(spec_path)
        proc.wait_for(lambda: exists(fs, marker8), timeout=300)  # checkpoint 8's upload has begun ...
        os.kill(proc.p.pid, signal.SIGINT)  # ... and the run is stopped under it
        code = proc.finish(timeout=180)
        assert code == 130, proc.text
        link.rate = None

        infos = {i.step: i for i in ck.list_checkpoints(fs, run)}
        assert sorted(infos) == [4, 8], infos
        four, eight = infos[4], infos[8]
        assert four.committed and ck.verify(fs, four.path, four.manifest, deep=True) == []
        assert not any(f["path"].startswith(".rtf-") for f in four.manifest.files)
        assert not exists(fs, f"{four.path}/{rd.UPLOADING}")  # the commit removed its marker
        assert not eight.committed and eight.status == "uploading", eight
        assert "asynchronous upload in flight" in eight.reason and "0 of 1 rank(s) done" in eight.reason

        # steps 5-8 trained while checkpoint 4 uploaded: metrics.jsonl, synced at its commit, logged 5-7 before it
        # (step 8 saves: at its end it waits for that upload, before HF saves and logs it)
        committed_at = four.manifest.created.timestamp()
        during = sorted(r["step"] for r in records(fs, run) if "loss" in r and 4 < r["step"] and r["time"] < committed_at)
        assert during == [5, 6, 7], during
        # back-pressure: checkpoint 8's upload began only once checkpoint 4 was committed
        started = json.loads(fs.open_input_stream(marker8).read())["started"]
        assert started >= committed_at

        with pytest.raises(SystemExit) as ei:
            main(["checkpoints", "list", f"s3://{bucket}/runs/async", "--endpoint-url", link.endpoint_url, "--json"])
        listed = {r["step"]: r for r in json.loads(capsys.readouterr().out)}
        assert ei.value.code == 0
        assert (listed[4]["status"], listed[8]["status"]) == ("committed", "uploading")

        # resubmitted: it resumes from checkpoint 4 (the last committed), not from the half-uploaded 8; in rtf's
        # own process this time (no Ray to start), whose uploads run in a thread of rtf's own
        monkeypatch.delenv("RTF_IN_PROCESS")
        proc = Proc(spec_path)
        assert proc.finish(timeout=300) == 0, proc.text
    final = json.loads(fs.open_input_stream(f"{run}/final/final_results.json").read())
    assert final["resumed_from_step"] == 4 and final["steps"] == 12
    assert [r["step"] for r in records(fs, run) if "loss" in r] == list(range(1, 13))  # each step once
    infos = {i.step: i for i in ck.list_checkpoints(fs, run)}
    assert all(infos[s].committed for s in (8, 12)), infos
    for s in (8, 12):
        assert not exists(fs, f"{infos[s].path}/{rd.UPLOADING}")
        assert not exists(fs, f"{infos[s].path}/{rd.RANK_DIGESTS.format(rank=0)}")
