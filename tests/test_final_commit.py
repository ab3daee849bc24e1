"""A run's final/ is committed like a checkpoint (issue 12 item 13): a manifest written last lists every file
with its sha256; `rtf checkpoints pull RUN/final` (or `RUN --final`) and the tools check it; a file changed in
storage is refused with one line. On moto's S3 server over HTTP (a fault is injected: a tampered object)."""

from __future__ import annotations

import hashlib
import json

import pytest

from raytune_ft import checkpoints as ck
from raytune_ft import storage as st
from raytune_ft.cli import main
from raytune_ft.errors import UserError
from raytune_ft.tools.source import resolve_source

pytest_plugins = ["tests.s3server"]

FILES = {
    "adapter_model.safetensors": bytes(range(256)) * 40,
    "adapter_config.json": json.dumps({"base_model_name_or_path": "org/base", "r": 4}).encode(),
    "tokenizer.json": b'{"model": {}}',
    "sub/extra.bin": b"\x01" * 300,
}


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    cap = capsys.readouterr()
    return ei.value.code, cap.out + cap.err


@pytest.fixture
def s3_run(s3_env, s3_bucket, tmp_path, monkeypatch):
    """(run URI, fs, native run path, local copy of final/) with final/ uploaded and committed by ck.commit_dir,
    the function the training recipe commits final/ with."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)
    monkeypatch.setenv("RTF_CACHE_DIR", str(tmp_path / "cache"))
    local = tmp_path / "final"
    for rel, data in FILES.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    run = f"s3://{s3_bucket}/runs/r"
    fs, path = st.pyarrow_filesystem(st.StorageConfig(run, endpoint_url=s3_env.endpoint_url))
    return run, fs, path, local


def test_final_manifest_lists_every_file_and_pull_verifies(s3_run, s3_env, s3_bucket, tmp_path, capsys):
    run, fs, path, local = s3_run
    ck.commit_dir(str(local), fs, f"{path}/final", step=10, epoch=1.0, spec_hash="h", metrics={"train_loss": 1.5})
    body = s3_env.client().get_object(Bucket=s3_bucket, Key=f"runs/r/final/{ck.MANIFEST}")["Body"].read()
    manifest = json.loads(body)
    assert manifest["step"] == 10 and manifest["metrics"] == {"train_loss": 1.5}
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        rel: (len(data), hashlib.sha256(data).hexdigest()) for rel, data in FILES.items()}

    for i, argv in enumerate(([f"{run}/final"], [run, "--final"])):  # RUN/final, and RUN with --final
        dest = tmp_path / f"pulled{i}"
        code, out = run_cli(["checkpoints", "pull", *argv, str(dest)], capsys)
        assert code == 0, out
        assert f"pulled final/ (step 10, {len(FILES)} files" in out
        assert {rel: (dest / rel).read_bytes() for rel in FILES} == FILES
    code, out = run_cli(["checkpoints", "pull", run, str(tmp_path / "x"), "--final", "--step", "3"], capsys)
    assert code == 2 and "--final and --step exclude each other" in out

    src = resolve_source(run)  # the tools: final/ verified (sha256 while downloading), no note
    assert src.notes == [] and src.remote == f"{run}/final"
    assert open(f"{src.path}/adapter_model.safetensors", "rb").read() == FILES["adapter_model.safetensors"]


def test_tampered_final_is_refused_with_one_line(s3_run, s3_env, s3_bucket, tmp_path, capsys):
    run, fs, path, local = s3_run
    ck.commit_dir(str(local), fs, f"{path}/final", step=10, epoch=None, spec_hash=None)
    data = bytearray(FILES["adapter_model.safetensors"])
    data[100] ^= 0xFF  # same size, other bytes: only the sha256 tells
    s3_env.client().put_object(Bucket=s3_bucket, Key="runs/r/final/adapter_model.safetensors", Body=bytes(data))

    dest = tmp_path / "pulled"
    code, out = run_cli(["checkpoints", "pull", f"{run}/final", str(dest)], capsys)
    assert code == 2 and "Traceback" not in out
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == 1, out
    assert "adapter_model.safetensors" in lines[0] and "does not match its manifest" in lines[0]
    assert "sha256 differs" in lines[0]
    assert not dest.exists() and list(tmp_path.glob(".pulled*")) == []  # nothing partial left behind

    with pytest.raises(UserError, match="adapter_model.safetensors .*does not match its manifest"):
        resolve_source(run)  # generate / eval / merge / push load through here


def test_final_without_manifest(s3_run, tmp_path, capsys):
    """An older run's final/ (or one whose upload stopped): the tools read it with a one-line note; pull, whose
    promise is verified files, refuses it."""
    run, fs, path, local = s3_run
    st.upload_dir(str(local), fs, f"{path}/final")
    src = resolve_source(run)
    assert len(src.notes) == 1 and f"has no {ck.MANIFEST}" in src.notes[0] and "not verified" in src.notes[0]
    code, out = run_cli(["checkpoints", "pull", f"{run}/final", str(tmp_path / "p")], capsys)
    assert code == 2 and len([x for x in out.splitlines() if x.strip()]) == 1
    assert f"has no {ck.MANIFEST}" in out and "refusing to pull unverified files" in out


def test_pull_final_of_a_spec(tmp_path, capsys, monkeypatch):
    """SPEC --final: the spec names storage and run (here a relative local storage.path, as users write it)."""
    import pyarrow.fs as pafs
    import yaml

    from tests.specs import base_doc

    local = tmp_path / "built"
    for rel, data in FILES.items():
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(base_doc(storage={"path": "runs"})))
    ck.commit_dir(str(local), pafs.LocalFileSystem(), str(tmp_path / "runs" / "unit" / "final"), step=4,
                  epoch=None, spec_hash=None)
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(["checkpoints", "pull", "job.yaml", "out", "--final"], capsys)
    assert code == 0 and "pulled final/ (step 4" in out, out
    assert {rel: (tmp_path / "out" / rel).read_bytes() for rel in FILES} == FILES
