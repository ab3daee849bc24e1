"""`rtf checkpoints` (the Typer sub-app) on a local run dir and on moto's S3 server over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from raytune_ft import checkpoints as ck
from raytune_ft import storage as st
from raytune_ft.cli.checkpoints import app
from raytune_ft.errors import StorageError, UserError
from tests.s3server import FAKE_ACCESS_KEY, FAKE_SECRET_KEY, free_port

pytest_plugins = ["tests.s3server"]

WIDE = {"COLUMNS": "220"}  # rich wraps at the terminal width; keep the rows on one line


def invoke(*args: str, env: dict | None = None):
    result = CliRunner().invoke(app, list(args), env={**WIDE, **(env or {})})
    for secret in (FAKE_ACCESS_KEY, FAKE_SECRET_KEY):
        assert secret not in result.output
        assert secret not in str(result.exception or "") + repr(getattr(result.exception, "hint", ""))
    return result


def populate(fs, run_path, tmp_path) -> None:
    """Committed 100 (loss .1, best), 200 (loss .5), 300 (loss .4); 400 uploaded, no manifest."""
    for step, loss in ((100, 0.1), (200, 0.5), (300, 0.4), (400, None)):
        local = tmp_path / f"l{step}"
        local.mkdir()
        (local / "adapter_model.safetensors").write_bytes(bytes([step % 251]) * (1000 + step))
        (local / "adapter_config.json").write_text('{"r": 8}')
        path = st.fs_join(run_path, ck.checkpoint_dir_name(step))
        st.upload_dir(str(local), fs, path)
        if loss is not None:
            ck.write_manifest(fs, path, step=step, epoch=1.0, files=ck.file_digests(str(local)),
                              spec_hash="h", metrics={"loss": loss, "learning_rate": 1e-4})


@pytest.fixture
def run_uri(storage_root, tmp_path):
    """A populated run on each backend: (uri, extra CLI args)."""
    uri, endpoint = storage_root
    run = st.join(uri, "run-a")
    fs, path = st.pyarrow_filesystem(st.StorageConfig(run, endpoint_url=endpoint))
    populate(fs, path, tmp_path)
    return run, (["--endpoint-url", endpoint] if endpoint else [])


def test_list_table_shows_committed_incomplete_and_best(run_uri):
    uri, extra = run_uri
    result = invoke("list", uri, "--metric", "loss", *extra)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 6}
    assert set(rows) == {"100", "200", "300", "400"}
    for step in ("100", "200", "300"):
        assert "committed" in rows[step] and "incomplete" not in rows[step]
    assert "incomplete: no manifest" in rows["400"]
    assert [s for s in ("100", "200", "300", "400") if "best" in rows[s].split("│")[6]] == ["100"]
    assert "loss=0.1 " in rows["100"] and "KiB" in rows["100"]
    assert "3 committed, 1 incomplete" in result.output


def test_list_json_via_aws_endpoint_url_env(s3_env, s3_bucket, tmp_path):
    run = f"s3://{s3_bucket}/runs/run-b"
    fs, path = st.pyarrow_filesystem(st.StorageConfig(run, endpoint_url=s3_env.endpoint_url))
    populate(fs, path, tmp_path)
    # no --endpoint-url: the standard AWS_ENDPOINT_URL variable
    result = invoke("list", run, "--json", env={"AWS_ENDPOINT_URL": s3_env.endpoint_url})
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    got = [(r["step"], r["status"]) for r in rows]
    assert got == [(100, "committed"), (200, "committed"), (300, "committed"), (400, "incomplete")]
    assert rows[0]["uri"] == f"{run}/checkpoint-00000100" and rows[0]["metrics"]["loss"] == 0.1


def test_list_empty_and_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("list", str(tmp_path / "empty"))
    assert result.exit_code == 0 and "no checkpoints under" in result.output
    result = invoke("list", str(tmp_path / "nope"))
    assert isinstance(result.exception, UserError) and "no such run directory" in str(result.exception)


def test_pull_latest_committed(run_uri, tmp_path):
    uri, extra = run_uri
    dest = tmp_path / "model"
    result = invoke("pull", uri, str(dest), *extra)
    assert result.exit_code == 0, result.output
    assert "pulled checkpoint-00000300 (step 300, 2 files" in result.output
    assert (dest / "adapter_model.safetensors").read_bytes() == (tmp_path / "l300" / "adapter_model.safetensors").read_bytes()
    assert (dest / "adapter_config.json").read_text() == '{"r": 8}'
    # an explicit step, and an explicit checkpoint URI
    result = invoke("pull", uri, str(tmp_path / "m100"), "--step", "100", *extra)
    assert result.exit_code == 0 and (tmp_path / "m100" / ck.MANIFEST).exists()
    result = invoke("pull", st.join(uri, "checkpoint-00000400"), str(tmp_path / "m400"), *extra)
    assert isinstance(result.exception, StorageError) and "not committed" in str(result.exception)
    assert not (tmp_path / "m400").exists()


def test_prune(run_uri):
    uri, extra = run_uri
    result = invoke("prune", uri, "--keep", "2", "--dry-run", *extra)
    assert result.exit_code == 0 and "would delete checkpoint-00000100 (committed" in result.output
    result = invoke("prune", uri, "--keep", "2", "--metric", "loss", *extra)
    assert result.exit_code == 0 and "nothing to prune" in result.output  # 100 is the best by loss
    result = invoke("prune", uri, "--keep", "2", *extra)
    assert result.exit_code == 0 and "deleted 1 checkpoint(s)" in result.output
    listed = json.loads(invoke("list", uri, "--json", *extra).output)
    assert [(r["step"], r["status"]) for r in listed] == [(200, "committed"), (300, "committed"), (400, "incomplete")]


def test_prune_keep_one_is_a_user_error(run_uri):
    uri, extra = run_uri
    result = invoke("prune", uri, "--keep", "1", *extra)
    assert isinstance(result.exception, UserError) and result.exception.exit_code == 2
    assert ">= 2" in str(result.exception)
    assert len(json.loads(invoke("list", uri, "--json", *extra).output)) == 4


def test_unreachable_endpoint_is_a_storage_error(s3_env):
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = invoke("list", "s3://bkt/run", "--endpoint-url", endpoint)
    assert isinstance(result.exception, StorageError) and result.exception.exit_code == 2
    assert str(result.exception).startswith(f"cannot reach S3 endpoint {endpoint}: connection refused")


def test_bad_secret_is_classified_and_never_printed(s3_env, s3_bucket, monkeypatch):
    key, _ = s3_env.create_iam_user()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)  # real key id, wrong (fake) secret
    with s3_env.iam_auth():
        result = invoke("list", f"s3://{s3_bucket}/run", "--endpoint-url", s3_env.endpoint_url)
    assert isinstance(result.exception, StorageError)
    assert "SignatureDoesNotMatch" in str(result.exception) and "$AWS_SECRET_ACCESS_KEY" in str(result.exception)
    assert key not in str(result.exception)


def test_importing_the_cli_stays_light():
    code = (
        "import sys, raytune_ft.cli.checkpoints; "
        "print(sorted(m for m in ('torch', 'transformers', 'ray', 'pyarrow', 'boto3', 'botocore') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_list_escapes_text_from_storage(tmp_path):
    """Names and metric keys read from storage are shown, not parsed as rich markup (a MarkupError before)."""
    import pyarrow.fs as pafs

    fs, run = pafs.LocalFileSystem(), tmp_path / "run"
    for step, name in ((1, "[/x]"), (2, "[bold]w.bin")):
        d = run / ck.checkpoint_dir_name(step)
        (d / name).parent.mkdir(parents=True, exist_ok=True)  # "[/x]" is a dir "[" holding "x]"
        (d / name).write_bytes(b"w" * 10)
        ck.write_manifest(fs, str(d), step=step, epoch=None, files=ck.file_digests(str(d)), spec_hash=None,
                          metrics={"[/loss]": 0.5, "loss": 0.25})
    (run / ck.checkpoint_dir_name(2) / "[bold]w.bin").write_bytes(b"x" * 3)  # now incomplete, naming it
    result = invoke("list", str(run))
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "[/loss]" in result.output and "[bold]w.bin" in result.output
    assert "1 committed, 1 incomplete" in result.output


def test_list_takes_a_spec(tmp_path, monkeypatch):
    """Like every other command, `checkpoints list` takes SPEC|RUN|URI: the spec names storage and run."""
    import pyarrow.fs as pafs
    import yaml

    from tests.specs import base_doc

    populate(pafs.LocalFileSystem(), str(tmp_path / "runs" / "unit"), tmp_path)
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(base_doc(storage={"path": "runs"})))
    monkeypatch.chdir(tmp_path)  # a relative storage.path, as in a user's spec
    result = invoke("list", "job.yaml")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "3 committed, 1 incomplete" in result.output and "unit" in result.output
