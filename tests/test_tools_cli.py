"""The tools' Typer commands (their own app, which the main CLI merges into its own)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from raytune_ft.cli.tools import COMMANDS
from raytune_ft.cli.tools import app as tools_app
from raytune_ft.errors import UserError
from raytune_ft.tools.generate import generate
from tests import test_tools_support as support

workspace = support.workspace  # fixtures shared by the tool tests
_tools_cache = support._tools_cache


@pytest.fixture(scope="module")
def app():
    return tools_app


def _run(app, *args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_commands_registered(app):
    names = {c.name for c in app.registered_commands}
    assert names == set(COMMANDS)


def test_generate_prints_completions_with_headers(app, workspace, tmp_path):
    r = _run(app, "generate", workspace.lora_run, "--prompt", "Say hello.", "--prompt", "Name a colour.",
             "--temperature", "0", "--max-new-tokens", "8", "--compare-base")
    assert r.exit_code == 0, r.output
    expected = generate(str(workspace.lora_run), ["Say hello.", "Name a colour."], max_new_tokens=8, temperature=0, compare_base=True)
    assert r.output.count("--- fine-tuned") == 2 and r.output.count("--- base") == 2
    assert "[1] Say hello." in r.output and "[2] Name a colour." in r.output
    for e in expected:
        assert e["completion"] in r.output and e["base_completion"] in r.output
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"instruction": "Say hello."}) + "\n")
    r = _run(app, "generate", workspace.lora_run, "--file", prompts, "--temperature", "0", "--max-new-tokens", "8", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["results"][0]["completion"] == expected[0]["completion"] and data["info"]["format"] == "alpaca"


def test_user_errors_propagate(app, workspace, tmp_path):
    r = _run(app, "generate", workspace.lora_run, "--prompt", "x", "--file", tmp_path / "p.txt")
    assert isinstance(r.exception, UserError) and "not both" in str(r.exception)
    r = _run(app, "merge", workspace.full_run, tmp_path / "m")
    assert isinstance(r.exception, UserError) and "nothing to merge" in str(r.exception)


def test_eval_plot_runs_merge(app, workspace, tmp_path):
    out = tmp_path / "res.json"
    r = _run(app, "eval", workspace.lora_run, "--batch-size", "2", "--out", out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["loss"] == pytest.approx(json.loads(out.read_text())["loss"])
    r = _run(app, "plot", workspace.lora_run, "--out", tmp_path / "l.png", "--log")
    assert r.exit_code == 0 and "train_loss: 10, eval_loss: 2, learning_rate: 10" in r.output
    assert "skipped 1 unreadable line" in r.output
    r = _run(app, "runs", workspace.storage)
    assert r.exit_code == 0 and r.output.splitlines()[0].startswith("NAME") and "lora-run" in r.output
    r = _run(app, "merge", workspace.lora_run, tmp_path / "merged", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    # says what was written where, and that the base was not changed
    assert f"merged LoRA adapter at {workspace.lora_run / 'final'}" in r.output
    assert (f"+ base {workspace.base_dir} (float32) → {tmp_path / 'merged'} "
            "(a new model dir; the base model and the adapter are unchanged)") in r.output


def test_cli_module_is_import_light():
    code = "import sys, raytune_ft.cli.tools; print(sorted(m for m in ('torch', 'transformers', 'peft', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
