"""merge(): merged weights give the same logits as base + adapter; QLoRA merges into the unquantized base."""

from __future__ import annotations

import json

import pytest
import torch

from raytune_ft.errors import UserError
from raytune_ft.tools.merge import merge
from raytune_ft.tools.source import resolve_source
from tests import test_tools_support as support
from tests.test_tools_support import copy_run, lora_doc, recommit_final, write_spec

workspace = support.workspace  # fixtures shared by the tool tests
_tools_cache = support._tools_cache


def _adapter_logits(workspace, adapter_dir, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(workspace.base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, 290, (2, 24), generator=g)


def _merged_logits(out, ids, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval()
    with torch.no_grad():
        return model, model(input_ids=ids).logits


def test_merged_logits_equal_base_plus_adapter(workspace, tmp_path):
    out = tmp_path / "merged"
    result = merge(str(workspace.lora_run), str(out))
    assert result["dequantized"] is False and result["base"] == str(workspace.base_dir)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "rtf_spec.yaml", "rtf_merge.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    ids = _ids()
    expected = _adapter_logits(workspace, workspace.lora_run / "final", ids)
    model, got = _merged_logits(out, ids)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
    # the adapter is not a no-op: the merged model differs from the base
    _, base_logits = _merged_logits(workspace.base_dir, ids)
    assert (base_logits - got).abs().max() > 1e-2
    # the merged dir is a source of its own: a full model that formats prompts as the run did
    src = resolve_source(str(out))
    assert (src.kind, src.data_format, src.base_model) == ("model", "alpaca", str(workspace.base_dir))
    assert json.loads((out / "rtf_merge.json").read_text())["dtype"] == "float32"


def test_qlora_merges_into_the_unquantized_base(workspace, tmp_path):
    run = copy_run(workspace.lora_run, tmp_path / "qlora-run")
    write_spec(run / "rtf_spec.yaml", lora_doc("qlora-run", str(workspace.base_dir), str(tmp_path), "t.jsonl", "e.jsonl", method="qlora"))
    (run / "final" / "rtf_spec.yaml").unlink()
    recommit_final(run)
    out = tmp_path / "merged"
    result = merge(str(run), str(out))
    assert result["dequantized"] is True
    assert any("unquantized in float32 (dequantized)" in m for m in result["messages"])
    ids = _ids()
    _, got = _merged_logits(out, ids)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert torch.allclose(got, _adapter_logits(workspace, run / "final", ids), atol=1e-4, rtol=0)


def test_bfloat16_merge(workspace, tmp_path):
    out = tmp_path / "bf16"
    merge(str(workspace.lora_run / "checkpoint-00000005"), str(out), dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_nothing_to_merge_and_bad_targets(workspace, tmp_path):
    with pytest.raises(UserError, match="full model .*nothing to merge"):
        merge(str(workspace.full_run), str(tmp_path / "x"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty"):
        merge(str(workspace.lora_run), str(busy))
    with pytest.raises(UserError, match="dtype must be one of"):
        merge(str(workspace.lora_run), str(tmp_path / "y"), dtype="int8")
    assert (busy / "f").read_text() == "x" and not (tmp_path / "x").exists()
