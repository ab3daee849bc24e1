"""The tools on an s3:// run dir, served by a real S3-compatible HTTP endpoint (moto) on 127.0.0.1."""

from __future__ import annotations

import json
import os

import pytest

from raytune_ft.errors import UserError
from raytune_ft.tools.evaluate import evaluate
from raytune_ft.tools.generate import generate
from raytune_ft.tools.plot import plot
from raytune_ft.tools.runs import list_runs
from raytune_ft.tools.source import resolve_source
from tests import test_tools_support as support
from tests.test_tools_support import N_EVAL_POINTS, N_TRAIN_POINTS

workspace = support.workspace  # fixtures shared by the tool tests
_tools_cache = support._tools_cache

try:
    from tests import s3server
except ImportError:  # no S3 test server module: these tests skip
    s3server = None

if s3server is not None:
    s3_server, s3_env, s3_bucket = s3server.s3_server, s3server.s3_env, s3server.s3_bucket
else:

    @pytest.fixture
    def s3_env():
        pytest.skip("tests/s3server.py (the moto S3 test server) is not available")

    @pytest.fixture
    def s3_bucket(s3_env):
        return None


@pytest.fixture
def s3_storage(workspace, s3_bucket, s3_env, monkeypatch):
    """The workspace's storage dir uploaded to s3://bucket/runs; AWS_ENDPOINT_URL points at the server."""
    import pyarrow.fs as pafs

    from raytune_ft import storage as st

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)
    fs, path = st.pyarrow_filesystem(st.StorageConfig.from_uri(f"s3://{s3_bucket}/runs"))
    pafs.copy_files(str(workspace.storage), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return f"s3://{s3_bucket}/runs"


def test_s3_run_is_downloaded_and_cached(s3_storage, workspace, tmp_path):
    run = f"{s3_storage}/lora-run"
    src = resolve_source(run)
    assert src.remote == f"{run}/final" and src.run_dir == run
    assert src.path.startswith(str(tmp_path / "rtf_cache"))
    with open(os.path.join(src.path, "adapter_model.safetensors"), "rb") as a:
        assert a.read() == (workspace.lora_run / "final" / "adapter_model.safetensors").read_bytes()
    assert (src.data_format, src.base_model) == ("alpaca", str(workspace.base_dir))
    mtime = os.path.getmtime(os.path.join(src.path, "adapter_config.json"))
    again = resolve_source(run)
    assert again.path == src.path and os.path.getmtime(os.path.join(src.path, "adapter_config.json")) == mtime
    ck = resolve_source(f"{run}/checkpoint-00000005")  # pulled through its manifest
    assert ck.step == 5 and os.path.isfile(os.path.join(ck.path, "rtf_checkpoint.json"))
    with pytest.raises(UserError, match="incomplete checkpoint"):
        resolve_source(f"{run}/checkpoint-00000010")
    with pytest.raises(UserError, match="nothing there"):
        resolve_source(f"{s3_storage}/no-such-run")


def test_s3_generate_evaluate_plot_runs(s3_storage, workspace, tmp_path, s3_env):
    run = f"{s3_storage}/lora-run"
    prompts = ["Say hello.", "Count to three."]
    remote = generate(run, prompts, max_new_tokens=8, temperature=0)
    local = generate(str(workspace.lora_run), prompts, max_new_tokens=8, temperature=0)
    assert [r["completion"] for r in remote] == [r["completion"] for r in local]

    result = evaluate(run, batch_size=4)
    assert result["written"] == f"{run}/eval/final/eval_results.json"  # beside the committed final/
    bucket = s3_storage.split("/")[2]
    body = s3_env.client().get_object(Bucket=bucket, Key="runs/lora-run/eval/final/eval_results.json")["Body"].read()
    assert "Contents" not in s3_env.client().list_objects_v2(Bucket=bucket, Prefix="runs/lora-run/final/eval_results")
    assert json.loads(body)["loss"] == pytest.approx(result["loss"])

    p = plot(run, str(tmp_path / "s3.png"))
    assert p["series"] == {"train_loss": N_TRAIN_POINTS, "eval_loss": N_EVAL_POINTS, "learning_rate": N_TRAIN_POINTS}

    runs = {r["name"]: r for r in list_runs(s3_storage)}
    assert sorted(runs) == ["full-run", "lora-run", "sweep1/trial-0", "sweep1/trial-1"]
    assert runs["lora-run"]["status"] == "completed" and runs["lora-run"]["outputs"] == f"{run}/final"
    assert runs["sweep1/trial-1"]["checkpoint"] == 4


def test_s3_spec_source_uses_the_specs_storage(s3_storage, workspace, tmp_path, s3_env, monkeypatch):
    """A spec whose storage.path is s3:// names its endpoint itself (no AWS_ENDPOINT_URL needed)."""
    import yaml

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    doc = yaml.safe_load(workspace.lora_spec_path.read_text())
    doc["storage"] = {"path": s3_storage, "endpoint_url": s3_env.endpoint_url}
    spec = tmp_path / "s3spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    src = resolve_source(str(spec))
    assert src.remote == f"{s3_storage}/lora-run/final" and src.kind == "adapter"
    assert plot(str(spec), str(tmp_path / "p.png"))["series"]["train_loss"] == N_TRAIN_POINTS
