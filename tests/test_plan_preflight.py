"""`rtf plan` on every preset ends in the plan plus one line of storage preflight (ok, skipped or failed),
never a traceback; a preset's placeholders are reported as placeholders, not contacted. Exit 0 once the
plan is printed; exit 2 is for spec errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytune_ft import storage as st
from raytune_ft.cli import main
from raytune_ft.errors import StorageError
from raytune_ft.plan import placeholders
from raytune_ft.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "jobspecs").glob("*.yaml"))


@pytest.fixture
def no_aws(monkeypatch, tmp_path):
    """No S3 credentials anywhere (env, files, instance metadata), and ./rtf_runs under tmp_path."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.chdir(tmp_path)


def plan(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["plan", *argv])
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_plan_on_every_preset_prints_the_plan_then_one_preflight_line(path, no_aws, capsys):
    code, out, err = plan([str(path)], capsys)
    assert code == 0, out + err
    assert "Traceback" not in out + err and err == ""
    assert "global batch:" in out  # the plan itself
    last = out.rstrip("\n").splitlines()[-1]
    assert last.startswith("storage preflight: ")
    if path.stem in ("k8s", "sweep"):
        assert last == "storage preflight: skipped: storage.path s3://my-bucket/rtf: a placeholder, set your own storage"
        assert "placeholders: storage.path s3://my-bucket/rtf" in out
    elif path.stem == "runpod":  # was: ValueError: Invalid endpoint: https://ACCOUNT_ID.r2.cloudflarestorage.com
        assert last == ("storage preflight: skipped: storage.endpoint_url https://ACCOUNT_ID.r2.cloudflarestorage.com: "
                        "a placeholder, set your own storage")
    else:
        assert last.endswith("writable and deletable")


def test_plan_reports_a_failed_or_skipped_preflight_after_the_plan(no_aws, capsys):
    runpod = str(ROOT / "jobspecs" / "runpod.yaml")
    code, out, _ = plan([runpod, "--set", "storage.endpoint_url=https://bad_host.example.com"], capsys)
    assert code == 0 and "global batch:" in out
    assert out.rstrip().splitlines()[-1] == ("storage preflight: failed: S3 endpoint 'https://bad_host.example.com': "
                                             "'bad_host.example.com' is not a valid host name "
                                             "(letters, digits, '-' and '.' only)")
    code, out, _ = plan([str(ROOT / "jobspecs" / "k8s.yaml"), "--set", "storage.path=s3://team-ckpts/rtf"], capsys)
    assert code == 0
    assert out.rstrip().splitlines()[-1].startswith(
        "storage preflight: skipped: no S3 credentials for s3://team-ckpts/rtf at AWS S3: $AWS_ACCESS_KEY_ID/")
    assert "placeholders: data.train.path s3://my-bucket/data/train.jsonl" in out  # the data path still is one
    code, out, _ = plan([runpod, "--json"], capsys)
    d = json.loads(out)
    assert d["placeholders"] == ["storage.endpoint_url https://ACCOUNT_ID.r2.cloudflarestorage.com"]
    assert d["preflight"]["status"] == "skipped"
    code, out, _ = plan([runpod, "--offline"], capsys)  # unchanged: no preflight line
    assert code == 0 and "storage preflight" not in out
    code, _, err = plan([runpod, "--set", "training.learning_rate=-1"], capsys)
    assert code == 2 and "Traceback" not in err  # a spec error is still exit 2


def test_placeholders_and_endpoint_host_names():
    spec = load_spec(ROOT / "jobspecs" / "quickstart.yaml")
    assert placeholders(spec) == []
    spec = load_spec(ROOT / "jobspecs" / "runpod.yaml", ["storage.endpoint_url=https://YOUR_ACCOUNT.r2.cloudflarestorage.com"])
    assert placeholders(spec) == ["storage.endpoint_url https://YOUR_ACCOUNT.r2.cloudflarestorage.com"]
    with pytest.raises(StorageError, match="not a valid host name"):
        st.endpoint_url(st.StorageConfig("s3://b/p", endpoint_url="https://ACCOUNT_ID.r2.cloudflarestorage.com"))
    for ok in ("http://127.0.0.1:9000", "https://abc123.r2.cloudflarestorage.com", "http://[::1]:9000", "http://minio"):
        assert st.endpoint_url(st.StorageConfig("s3://b/p", endpoint_url=ok)) == ok
