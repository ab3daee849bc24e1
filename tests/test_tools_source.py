"""SOURCE resolution: spec → run → final/ or latest committed checkpoint, plain dirs, refusals, s3://."""

from __future__ import annotations

import shutil

import pytest

from raytune_ft.errors import UserError
from raytune_ft.tools.source import resolve_source
from tests import test_tools_support as support
from tests.test_tools_support import copy_run, recommit_final

workspace = support.workspace  # fixtures shared by the tool tests
_tools_cache = support._tools_cache


def test_spec_resolves_to_run_final_adapter(workspace):
    src = resolve_source(str(workspace.lora_spec_path))
    assert src.kind == "adapter" and src.is_adapter
    assert src.path == str(workspace.lora_run / "final")
    assert src.run_dir == str(workspace.lora_run)
    assert src.base_model == str(workspace.base_dir)
    assert (src.data_format, src.method, src.step, src.quantized_base) == ("alpaca", "lora", None, False)
    assert src.tokenizer_path == src.path
    assert src.notes == []


def test_run_dir_and_final_dir_and_checkpoint(workspace):
    run = resolve_source(str(workspace.lora_run))
    final = resolve_source(str(workspace.lora_run / "final"))
    assert run.path == final.path == str(workspace.lora_run / "final")
    assert final.run_dir == str(workspace.lora_run)
    ck = resolve_source(str(workspace.lora_run / "checkpoint-00000005"))
    assert (ck.kind, ck.step, ck.data_format) == ("adapter", 5, "alpaca")  # spec found in the run dir


def test_run_without_final_uses_latest_committed_checkpoint(workspace, tmp_path):
    run = copy_run(workspace.lora_run, tmp_path / "lora-run")
    shutil.rmtree(run / "final")
    src = resolve_source(str(run))
    # checkpoint-00000010 has no manifest: skipped; 5 is the latest committed one
    assert src.path == str(run / "checkpoint-00000005") and src.step == 5
    assert len(src.notes) == 1 and "latest committed checkpoint checkpoint-00000005 (step 5)" in src.notes[0]


def test_incomplete_checkpoint_is_refused(workspace):
    with pytest.raises(UserError, match="incomplete checkpoint"):
        resolve_source(str(workspace.lora_run / "checkpoint-00000010"))


def test_run_with_nothing_committed(workspace, tmp_path):
    run = copy_run(workspace.lora_run, tmp_path / "r")
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoint-00000005")
    with pytest.raises(UserError, match=r"nothing loadable in this run dir \(no final/ and 1 incomplete checkpoint"):
        resolve_source(str(run))


def test_full_model_from_scratch(workspace):
    src = resolve_source(str(workspace.full_run))
    assert (src.kind, src.method, src.data_format) == ("model", "full", "text")
    assert src.from_scratch and src.base_model is None


def test_plain_dirs_and_errors(workspace, tmp_path):
    base = resolve_source(str(workspace.base_dir))
    assert (base.kind, base.spec, base.data_format) == ("model", None, None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"nothing loadable here \(notes.txt\)"):
        resolve_source(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such file or directory"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="sweep with 2 trials"):
        resolve_source(str(workspace.sweep))
    with pytest.raises(UserError, match="no run dir for spec"):
        spec = tmp_path / "other.yaml"
        spec.write_text(workspace.lora_spec_path.read_text().replace("name: lora-run", "name: never-ran"))
        resolve_source(str(spec))


def test_adapter_base_missing_falls_back_to_spec_model(workspace, tmp_path):
    run = copy_run(workspace.lora_run, tmp_path / "lora-run")
    cfg = run / "final" / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace(str(workspace.base_dir), "/nowhere/base"))
    recommit_final(run)
    src = resolve_source(str(run))
    assert src.base_model == str(workspace.base_dir)
    assert any("/nowhere/base is not on this machine" in n for n in src.notes)
