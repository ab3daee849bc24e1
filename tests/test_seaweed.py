"""Preflight against a real object store that is not moto: SeaweedFS's S3 gateway on 127.0.0.1 (its own
identities file, its own error responses). Each failure is classified and worded as on moto (and AWS), in one
line, without the keys. The end-to-end run against SeaweedFS is tests/test_s3_run.py; every checkpoint test
also runs on it (the ``storage_root`` fixture)."""

from __future__ import annotations

import pytest

from raytune_ft import storage as st
from raytune_ft.errors import StorageError
from tests.s3server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY


def preflight_error(storage) -> StorageError:
    with pytest.raises(StorageError) as e:
        st.preflight(storage, max_attempts=1)
    text = str(e.value) + repr(e.value) + repr(getattr(e.value, "hint", ""))
    assert FAKE_ACCESS_KEY not in text and FAKE_SECRET_KEY not in text
    assert "\n" not in e.value.message
    return e.value


def test_preflight_passes_and_leaves_nothing(seaweed_server, monkeypatch):
    for k, v in seaweed_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = seaweed_server.create_bucket()
    storage = st.StorageConfig(path=f"s3://{bucket}/runs", endpoint_url=seaweed_server.endpoint_url)
    msg = st.preflight(storage)
    assert "writable" in msg and seaweed_server.endpoint_url in msg
    fs, root = st.pyarrow_filesystem(storage)
    assert st.list_files(fs, root) == {}
    # (SeaweedFS keeps the empty "runs" directory its filer made for the marker object: no object is left)


def test_preflight_failures_are_classified(seaweed_server, monkeypatch):
    for k, v in seaweed_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = seaweed_server.create_bucket()
    endpoint = seaweed_server.endpoint_url

    err = preflight_error(st.StorageConfig(path="s3://rtf-no-such-bucket/p", endpoint_url=endpoint))
    assert err.kind == "no_bucket"
    assert err.message == f"bucket 'rtf-no-such-bucket' does not exist at {endpoint}"

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIARTFUNKNOWNKEY999")
    err = preflight_error(st.StorageConfig(path=f"s3://{bucket}/p", endpoint_url=endpoint))
    assert err.kind == "bad_key"
    assert "does not recognise the access key in $AWS_ACCESS_KEY_ID" in err.message

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    err = preflight_error(st.StorageConfig(path=f"s3://{bucket}/p", endpoint_url=endpoint))
    assert err.kind == "bad_secret"
    assert "secret key in $AWS_SECRET_ACCESS_KEY does not match" in err.message


def test_a_deleted_checkpoint_uploaded_with_markers_leaves_no_directory(seaweed_server, monkeypatch, tmp_path):
    """Ray Train uploads checkpoints with pyarrow's copy_files, which writes a `dir/` marker object per
    level. SeaweedFS keeps such a directory when its marker is deleted before its files (pyarrow's own
    delete_dir order), so pruned checkpoints stayed listed; st.delete_dir deletes files, then markers."""
    import pyarrow.fs as pafs

    for k, v in seaweed_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = seaweed_server.create_bucket()
    fs, root = st.pyarrow_filesystem(st.StorageConfig(path=f"s3://{bucket}/runs",
                                                      endpoint_url=seaweed_server.endpoint_url))
    src = tmp_path / "ckpt"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(b"w" * 1000)
    (src / "sub" / "deeper" / "state.json").write_text("{}")
    for step in (1, 2):
        pafs.copy_files(str(src), f"{root}/run/checkpoint-0000000{step}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
    assert st.list_dirs(fs, f"{root}/run") == ["checkpoint-00000001", "checkpoint-00000002"]
    st.delete_dir(fs, f"{root}/run/checkpoint-00000001")
    assert st.list_dirs(fs, f"{root}/run") == ["checkpoint-00000002"]
    assert set(st.list_files(fs, f"{root}/run/checkpoint-00000002")) == {"model.safetensors",
                                                                         "sub/deeper/state.json"}
