"""raytune_ft.checkpoints on both backends: a local dir and moto's S3 server over HTTP."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from raytune_ft import checkpoints as ck
from raytune_ft import storage as st
from raytune_ft.errors import StorageError, UserError

pytest_plugins = ["tests.s3server"]  # fixtures: storage_root (local dir, then s3://<bucket>/root)


@pytest.fixture
def run(storage_root):
    """(fs, run_path) of an empty run dir on each backend."""
    uri, endpoint = storage_root
    fs, root = st.pyarrow_filesystem(st.StorageConfig(uri, endpoint_url=endpoint))
    return fs, st.fs_join(root, "my-run")


def make_local(tmp_path: Path, step: int, extra: bytes = b"") -> Path:
    """A local checkpoint dir like HF Trainer + peft write (nested files too)."""
    d = tmp_path / f"local-{step}-{len(extra)}"
    (d / "sub").mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(hashlib.sha256(str(step).encode()).digest() * 300 + extra)
    (d / "adapter_config.json").write_text(json.dumps({"r": 8, "step": step}))
    (d / "sub" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def save(fs, run_path, tmp_path, step, *, commit=True, metrics=None) -> str:
    """Upload a checkpoint for ``step``, then (commit) write its manifest: the trainer's order."""
    local = make_local(tmp_path, step)
    path = st.fs_join(run_path, ck.checkpoint_dir_name(step))
    st.upload_dir(str(local), fs, path)
    if commit:
        ck.write_manifest(fs, path, step=step, epoch=step / 100, files=ck.file_digests(str(local)),
                          spec_hash="deadbeef", metrics=metrics if metrics is not None else {"loss": 1.0})
    return path


def overwrite(fs, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def remaining(fs, run_path) -> list[str]:
    return st.list_dirs(fs, run_path)


# ------------------------------------------------------------------------------------------------
# Manifests


def test_dir_names():
    assert ck.checkpoint_dir_name(100) == "checkpoint-00000100"
    assert ck.parse_step("s3b/run/checkpoint-00000100/") == 100
    assert ck.parse_step("checkpoint_000001") is None and ck.parse_step("checkpoint-") is None


def test_file_digests(tmp_path):
    d = make_local(tmp_path, 7)
    (d / ck.MANIFEST).write_text("{}")  # an earlier manifest is never listed
    digests = ck.file_digests(str(d))
    assert [e["path"] for e in digests] == ["adapter_config.json", "adapter_model.safetensors", "sub/trainer_state.json"]
    for e in digests:
        data = (d / e["path"]).read_bytes()
        assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()


def test_manifest_round_trip(run, tmp_path):
    fs, run_path = run
    local = make_local(tmp_path, 100)
    path = st.fs_join(run_path, ck.checkpoint_dir_name(100))
    st.upload_dir(str(local), fs, path)
    assert ck.read_manifest(fs, path) is None  # files there, not committed yet
    written = ck.write_manifest(fs, path, step=100, epoch=0.5, files=ck.file_digests(str(local)),
                                spec_hash="abc123", metrics={"loss": 0.25, "eval_loss": float("nan"), "n": 3})
    got = ck.read_manifest(fs, path)
    assert got == written
    assert (got.step, got.epoch, got.spec_hash) == (100, 0.5, "abc123")
    assert got.metrics == {"loss": 0.25, "eval_loss": None, "n": 3}  # NaN is not JSON: null
    assert got.files == tuple(ck.file_digests(str(local)))
    assert got.total_size == sum(p.stat().st_size for p in local.rglob("*") if p.is_file())
    raw = st.read_json(fs, st.fs_join(path, ck.MANIFEST))
    assert raw["format"] == "rtf-checkpoint" and raw["version"] == 1
    assert raw["created_at"].endswith("Z") and got.created.utcoffset().total_seconds() == 0
    assert ck.verify(fs, path, got) == [] and ck.verify(fs, path, got, deep=True) == []


def test_write_manifest_refuses_files_that_are_not_there(run, tmp_path):
    fs, run_path = run
    local = make_local(tmp_path, 5)
    path = st.fs_join(run_path, ck.checkpoint_dir_name(5))
    st.upload_dir(str(local), fs, path)
    st.delete_file(fs, st.fs_join(path, "sub", "trainer_state.json"))  # an upload that lost a file
    with pytest.raises(ck.ManifestError, match="sub/trainer_state.json is missing"):
        ck.write_manifest(fs, path, step=5, epoch=None, files=ck.file_digests(str(local)), spec_hash=None)
    assert ck.read_manifest(fs, path) is None


def test_read_manifest_rejects_garbage(run):
    fs, run_path = run
    path = st.fs_join(run_path, ck.checkpoint_dir_name(1))
    st.write_bytes(fs, st.fs_join(path, ck.MANIFEST), b"{not json")
    with pytest.raises(ck.ManifestError):
        ck.read_manifest(fs, path)
    bad = {"format": "rtf-checkpoint", "version": 1, "step": 1, "created_at": "2026-01-01T00:00:00Z",
           "files": [{"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}]}
    st.write_json(fs, st.fs_join(path, ck.MANIFEST), bad)
    with pytest.raises(ck.ManifestError, match="bad file path"):
        ck.read_manifest(fs, path)


# ------------------------------------------------------------------------------------------------
# Listing


def test_files_without_manifest_are_incomplete_and_skipped(run, tmp_path):
    fs, run_path = run
    save(fs, run_path, tmp_path, 100)
    save(fs, run_path, tmp_path, 200)
    save(fs, run_path, tmp_path, 300, commit=False)  # uploaded, never committed
    st.write_json(fs, st.fs_join(run_path, "not-a-checkpoint", "x.json"), {})  # ignored
    infos = ck.list_checkpoints(fs, run_path)
    assert [(i.name, i.status) for i in infos] == [
        ("checkpoint-00000100", "committed"),
        ("checkpoint-00000200", "committed"),
        ("checkpoint-00000300", "incomplete"),
    ]
    assert infos[2].reason.startswith("no manifest")
    assert infos[2].size > 0 and infos[2].n_files == 3 and infos[2].time is not None
    assert infos[0].metrics == {"loss": 1.0} and infos[0].n_files == 3
    assert infos[0].size == sum(s.size for s in st.list_files(fs, infos[0].path).values())
    latest = ck.latest_committed(fs, run_path)
    assert latest.step == 200 and latest.path == st.fs_join(run_path, "checkpoint-00000200")


def test_size_mismatch_is_incomplete(run, tmp_path):
    fs, run_path = run
    save(fs, run_path, tmp_path, 100)
    p200 = save(fs, run_path, tmp_path, 200)
    overwrite(fs, st.fs_join(p200, "adapter_config.json"), b"{}")  # truncated after commit
    infos = ck.list_checkpoints(fs, run_path)
    assert [i.committed for i in infos] == [True, False]
    assert infos[1].reason.startswith("adapter_config.json has 2 bytes, manifest says")
    assert ck.latest_committed(fs, run_path).step == 100


def test_deep_verify_catches_same_size_change(run, tmp_path):
    fs, run_path = run
    path = save(fs, run_path, tmp_path, 100)
    target = st.fs_join(path, "adapter_model.safetensors")
    data = st.read_bytes(fs, target)
    overwrite(fs, target, bytes([data[0] ^ 0xFF]) + data[1:])
    assert ck.list_checkpoints(fs, run_path)[0].committed  # sizes alone cannot tell
    deep = ck.list_checkpoints(fs, run_path, deep=True)[0]
    assert not deep.committed and "different sha256" in deep.reason


def test_manifest_of_another_step_or_unreadable_is_incomplete(run, tmp_path):
    fs, run_path = run
    p100 = save(fs, run_path, tmp_path, 100)
    p200 = save(fs, run_path, tmp_path, 200, commit=False)
    fs.copy_file(st.fs_join(p100, ck.MANIFEST), st.fs_join(p200, ck.MANIFEST))
    p300 = save(fs, run_path, tmp_path, 300, commit=False)
    st.write_bytes(fs, st.fs_join(p300, ck.MANIFEST), b"\x00garbage")
    infos = ck.list_checkpoints(fs, run_path)
    assert [i.committed for i in infos] == [True, False, False]
    assert infos[1].reason == "manifest is for step 100"
    assert infos[2].reason.startswith("bad manifest")


def test_best_flag(run, tmp_path):
    fs, run_path = run
    for step, loss in ((100, 0.9), (200, 0.3), (300, 0.5)):
        save(fs, run_path, tmp_path, step, metrics={"eval_loss": loss, "acc": 1 - loss})
    save(fs, run_path, tmp_path, 400, commit=False)
    infos = ck.list_checkpoints(fs, run_path, best_metric="eval_loss", mode="min")
    assert [i.step for i in infos if i.best] == [200]
    infos = ck.list_checkpoints(fs, run_path, best_metric="acc", mode="max")
    assert [i.step for i in infos if i.best] == [200]
    assert not any(i.best for i in ck.list_checkpoints(fs, run_path, best_metric="missing"))
    with pytest.raises(UserError):
        ck.list_checkpoints(fs, run_path, best_metric="acc", mode="maximum")


# ------------------------------------------------------------------------------------------------
# Pruning


def test_prune_keeps_last_n_plus_best_and_in_flight(run, tmp_path):
    fs, run_path = run
    save(fs, run_path, tmp_path, 50, commit=False)  # debris from an interrupted upload: deleted
    losses = {100: 0.9, 200: 0.1, 300: 0.5, 400: 0.6, 500: 0.7, 600: 0.8}
    for step, loss in losses.items():
        save(fs, run_path, tmp_path, step, metrics={"loss": loss})
    save(fs, run_path, tmp_path, 700, commit=False)  # newer than the newest committed: in flight, kept

    planned = ck.prune(fs, run_path, keep_last=2, best_metric="loss", mode="min", dry_run=True)
    assert [i.step for i in planned] == [50, 100, 300, 400]
    assert len(remaining(fs, run_path)) == 8  # dry run deleted nothing

    deleted = ck.prune(fs, run_path, keep_last=2, best_metric="loss", mode="min")
    assert [i.step for i in deleted] == [50, 100, 300, 400]
    assert remaining(fs, run_path) == [ck.checkpoint_dir_name(s) for s in (200, 500, 600, 700)]
    assert ck.latest_committed(fs, run_path).step == 600
    # nothing of a deleted checkpoint is left behind
    assert st.list_files(fs, st.fs_join(run_path, ck.checkpoint_dir_name(100))) == {}

    # without a metric only the last N committed (and the in-flight one) stay
    ck.prune(fs, run_path, keep_last=2)
    assert remaining(fs, run_path) == [ck.checkpoint_dir_name(s) for s in (500, 600, 700)]


def test_prune_requires_keep_last_of_two(run, tmp_path):
    fs, run_path = run
    for step in (1, 2, 3):
        save(fs, run_path, tmp_path, step)
    with pytest.raises(UserError, match=">= 2"):
        ck.prune(fs, run_path, keep_last=1)
    assert len(remaining(fs, run_path)) == 3


def _info(step, committed, loss=None):
    return ck.CheckpointInfo(name=ck.checkpoint_dir_name(step), path=str(step), step=step, committed=committed,
                             metrics={} if loss is None else {"loss": loss})


def test_plan_prune_rules():
    # no committed checkpoint: every incomplete one may still be uploading; nothing goes
    keep, delete = ck.plan_prune([_info(1, False), _info(2, False)], keep_last=2)
    assert delete == [] and [i.step for i in keep] == [1, 2]
    # fewer committed than keep_last: all kept
    keep, delete = ck.plan_prune([_info(1, True), _info(2, False)], keep_last=3)
    assert delete == []
    # older incomplete ones go once a newer checkpoint is committed; the best can be old
    infos = [_info(1, True, 0.1), _info(2, False), _info(3, True, 0.5), _info(4, True, 0.4), _info(5, True, 0.3),
             _info(6, False)]
    keep, delete = ck.plan_prune(infos, keep_last=2, best_metric="loss")
    assert [i.step for i in keep] == [1, 4, 5, 6] and [i.step for i in delete] == [2, 3]
    keep, delete = ck.plan_prune(infos, keep_last=2, best_metric="loss", mode="max")
    assert [i.step for i in keep] == [3, 4, 5, 6]


# ------------------------------------------------------------------------------------------------
# Pulling


def test_download_gives_identical_bytes(run, tmp_path):
    fs, run_path = run
    save(fs, run_path, tmp_path, 100)
    save(fs, run_path, tmp_path, 200)
    save(fs, run_path, tmp_path, 300, commit=False)
    src = ck.resolve(fs, run_path)  # a run dir means its latest committed checkpoint
    assert src.endswith("checkpoint-00000200")
    dest = tmp_path / "pulled"
    manifest = ck.download(fs, src, str(dest))
    local = make_local(tmp_path / "again", 200)
    got = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert got == sorted([e["path"] for e in ck.file_digests(str(local))] + [ck.MANIFEST])
    for e in manifest.files:
        assert (dest / e["path"]).read_bytes() == (local / e["path"]).read_bytes()
    # the local copy is itself a committed checkpoint
    import pyarrow.fs as pafs

    assert ck.verify(pafs.LocalFileSystem(), str(dest), ck.read_manifest(pafs.LocalFileSystem(), str(dest)), deep=True) == []
    with pytest.raises(UserError, match="not an empty directory"):
        ck.download(fs, src, str(dest))
    with pytest.raises(StorageError, match="not committed"):
        ck.download(fs, st.fs_join(run_path, "checkpoint-00000300"), str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()


def test_download_leaves_nothing_when_bytes_differ(run, tmp_path):
    fs, run_path = run
    path = save(fs, run_path, tmp_path, 100)
    target = st.fs_join(path, "adapter_model.safetensors")
    data = st.read_bytes(fs, target)
    overwrite(fs, target, data[:-1] + bytes([data[-1] ^ 1]))  # same size, other bytes
    dest = tmp_path / "out" / "ckpt"
    with pytest.raises(StorageError, match="does not match its manifest"):
        ck.download(fs, path, str(dest))
    assert not dest.exists() and os.listdir(tmp_path / "out") == []  # no partial dir left


def test_resolve_by_step(run, tmp_path):
    fs, run_path = run
    with pytest.raises(UserError, match="no committed checkpoint"):
        ck.resolve(fs, run_path)
    save(fs, run_path, tmp_path, 100)
    save(fs, run_path, tmp_path, 200)
    assert ck.resolve(fs, run_path, step=100).endswith("checkpoint-00000100")
    with pytest.raises(UserError, match="no checkpoint for step 150"):
        ck.resolve(fs, run_path, step=150)
