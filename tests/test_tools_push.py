"""`rtf push`: the files it uploads and the model card it writes, checked with --dry-run (no network).
The upload itself cannot be tested here (no network, no Hub-compatible server): only its refusal
paths run, with the real huggingface_hub in offline mode."""

from __future__ import annotations

import json

import pytest
import yaml

from raytune_ft.cli import main
from raytune_ft.tools.card import render_card
from raytune_ft.tools.push import push
from tests import test_tools_support as support

workspace = support.workspace
_tools_cache = support._tools_cache
SENTINEL = "hf_SENTINELtokenvalue0123456789abcdef"


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out = capsys.readouterr()
    return ei.value.code, out.out + out.err


def test_dry_run_lists_final_card_and_plot_and_prints_the_card(workspace, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    code, out = run_cli(["push", str(workspace.lora_spec_path), "--repo-id", "me/tiny-lora", "--dry-run"], capsys)
    assert code == 0, out
    assert SENTINEL not in out
    final = workspace.lora_run / "final"
    expected = {p.relative_to(final).as_posix() for p in final.rglob("*")
                if p.is_file() and p.name != "rtf_checkpoint.json"} | {"README.md", "loss.png"}  # rtf's manifest stays
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "final_results.json",
            "rtf_spec.yaml"} <= expected
    listed = {line.split()[0] for line in out.split("--- README.md ---")[0].splitlines()[1:] if line.strip()}
    assert listed == expected
    assert out.startswith(f"would upload {len(expected)} files") and "https://huggingface.co/me/tiny-lora" in out
    card = out.split("--- README.md ---\n", 1)[1]
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "peft" and "raytune_ft" in meta["tags"] and "lora" in meta["tags"]
    assert "base_model" not in meta  # a local base path means nothing on the Hub
    assert "| train loss (last logged) | 2.25 |" in card and "| eval loss | 2.5 |" in card
    assert "| tokens trained on | 1,234 |" in card
    assert f"| train | `{workspace.train_path}` | alpaca | 1 |" in card
    assert f"| eval | `{workspace.eval_path}` | alpaca | 1 |" in card
    assert "![train and eval loss, learning rate](loss.png)" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/tiny-lora")' in card
    spec_block = card.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(spec_block) == yaml.safe_load((final / "rtf_spec.yaml").read_text())


def test_push_result_as_data_and_the_plot_is_a_png(workspace, tmp_path):
    res = push(str(workspace.full_run), "org/full", dry_run=True, private=True)
    sizes = {f["path"]: f["size"] for f in res["files"]}
    assert {"model.safetensors", "config.json", "README.md", "loss.png", "final_results.json"} <= set(sizes)
    assert sizes["model.safetensors"] == (workspace.full_run / "final" / "model.safetensors").stat().st_size
    assert sizes["loss.png"] > 1000 and res["private"] is True
    meta = yaml.safe_load(res["card"].split("---\n")[1])
    assert meta["library_name"] == "transformers" and "full" in meta["tags"]
    assert "a model built from scratch (`model.init`)" in res["card"]
    assert 'AutoModelForCausalLM.from_pretrained("org/full")' in res["card"]


def test_refusals_are_one_line_exit_2_and_never_show_the_token(workspace, capsys, monkeypatch):
    spec = str(workspace.lora_spec_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, out = run_cli(["push", spec, "--repo-id", "me/tiny"], capsys)
    assert code == 2 and "$HF_TOKEN is not set" in out and "Traceback" not in out
    for bad in ("tiny", "me/../x", "me/tiny/extra", "-me/x"):
        code, out = run_cli(["push", spec, "--repo-id", bad, "--dry-run"], capsys)
        assert code == 2 and "is not a Hub repo id" in out, bad
    code, out = run_cli(["push", str(workspace.sweep / "trial-1"), "--repo-id", "me/t", "--dry-run"], capsys)
    assert code == 2 and "is not a finished run's final/" in out  # only a checkpoint there
    # the real client, offline (tests never reach the network): the upload is refused in one line
    monkeypatch.setenv("HF_TOKEN", SENTINEL)
    code, out = run_cli(["push", spec, "--repo-id", "me/tiny"], capsys)
    assert code == 2 and "cannot reach the Hub to upload me/tiny" in out, out
    assert SENTINEL not in out and "Traceback" not in out


def test_card_escapes_stored_text_and_fences_the_spec():
    spec_doc = {"name": "r", "description": "<script>alert(1)</script> | [x](javascript:y)",
                "model": {"name_or_path": "meta-llama/Llama-3.2-1B"}, "method": {"type": "qlora"},
                "data": {"train": [{"path": "hf://datasets/org/set@main", "format": "chat"},
                                   {"path": "/d/a|b.jsonl", "weight": 2.0}]}}
    spec_yaml = "name: r\ndescription: '```\n# injected'\n"
    card = render_card(repo_id="o/r", spec_doc=spec_doc, results={"train_loss": 1.5}, kind="adapter",
                       has_plot=False, spec_yaml=spec_yaml)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B" and meta["datasets"] == ["org/set"]
    assert meta["tags"] == ["raytune_ft", "qlora", "lora"]
    assert "<script>" not in card and "&lt;script&gt;" in card and "](javascript" not in card
    assert "`/d/a&#124;b.jsonl`" in card  # a pipe in a path cannot break the table
    assert "\n````yaml\n" + spec_yaml.rstrip() + "\n````" in card  # a longer fence than the ``` inside
    assert "loss.png" not in card
    json.dumps(meta)  # plain data
