"""generate(): prompts formatted as training formatted them, completions equal to calling model.generate."""

from __future__ import annotations

import json

import pytest
import torch

from raytune_ft.data.formats import encode_prompt, format_prompt
from raytune_ft.errors import UserError
from raytune_ft.tools.generate import generate, read_prompts, render
from tests import test_tools_support as support
from tests.test_tools_support import copy_run, lora_doc, recommit_final, write_spec

workspace = support.workspace  # fixtures shared by the tool tests
_tools_cache = support._tools_cache

PROMPTS = ["Say hello.", "Add two numbers.", "Name a colour."]
N = 12


def _manual(model, tok, fmt, prompt, **kw):
    ids = torch.tensor([encode_prompt(fmt, tok, instruction=prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def manual(workspace):
    """The fine-tuned (base + adapter) and base models, loaded by hand."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(workspace.lora_run / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(workspace.base_dir), dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(workspace.base_dir), dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(base, str(workspace.lora_run / "final")).eval()
    return tok, tuned, plain


def test_greedy_equals_model_generate_and_base(workspace, manual):
    tok, tuned, plain = manual
    info = {}
    out = generate(str(workspace.lora_spec_path), PROMPTS, max_new_tokens=N, temperature=0, compare_base=True, info=info)
    assert [r["prompt"] for r in out] == PROMPTS
    for r, p in zip(out, PROMPTS, strict=True):
        assert r["formatted_prompt"] == format_prompt("alpaca", tok, instruction=p)
        assert r["formatted_prompt"].endswith("### Response:\n")
        assert r["completion"] == _manual(tuned, tok, "alpaca", p, do_sample=False)
        assert r["base_completion"] == _manual(plain, tok, "alpaca", p, do_sample=False)
        assert N >= r["new_tokens"] >= 1
    assert any(r["completion"] for r in out)
    assert any(r["completion"] != r["base_completion"] for r in out)  # the adapter changes the model
    assert info["format"] == "alpaca" and "LoRA adapter" in info["source"]
    again = generate(str(workspace.lora_run), PROMPTS, max_new_tokens=N, temperature=0)
    assert [r["completion"] for r in again] == [r["completion"] for r in out]
    text = render(out, info, width=40)
    assert "--- fine-tuned" in text and "--- base" in text and out[0]["completion"] in text


def test_sampling_is_seeded(workspace):
    a = generate(str(workspace.lora_run), PROMPTS, max_new_tokens=N, temperature=1.0, top_p=0.95, seed=3)
    b = generate(str(workspace.lora_run), list(reversed(PROMPTS)), max_new_tokens=N, temperature=1.0, top_p=0.95, seed=3)
    assert [r["completion"] for r in a] == [r["completion"] for r in reversed(b)]  # per prompt, any order


def test_chat_format_uses_the_chat_template(workspace, manual, tmp_path):
    tok, tuned, _ = manual
    run = copy_run(workspace.lora_run, tmp_path / "chat-run")
    write_spec(run / "rtf_spec.yaml", lora_doc("chat-run", str(workspace.base_dir), str(tmp_path), "t.jsonl", "e.jsonl", fmt="chat"))
    (run / "final" / "rtf_spec.yaml").unlink()
    recommit_final(run)
    out = generate(str(run), ["Say hello."], max_new_tokens=N, temperature=0)
    assert out[0]["formatted_prompt"] == format_prompt("chat", tok, instruction="Say hello.")
    assert out[0]["formatted_prompt"].endswith("<|assistant|>\n")
    assert out[0]["completion"] == _manual(tuned, tok, "chat", "Say hello.", do_sample=False)


def test_text_format_full_model_from_scratch(workspace):
    out = generate(str(workspace.full_run), ["the quick brown"], max_new_tokens=5, temperature=0, compare_base=True)
    assert out[0]["formatted_prompt"] == "the quick brown"
    assert out[0]["base_completion"] is None and "from scratch" in out[0]["base_note"]


def test_read_prompts_and_errors(tmp_path, workspace):
    lines = tmp_path / "p.txt"
    lines.write_text("first prompt\n\n  second prompt  \n")
    assert read_prompts(str(lines)) == ["first prompt", "second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"instruction": "Add", "input": "1 and 2"}) + "\n" + json.dumps("plain") + "\n")
    assert read_prompts(str(jl)) == [{"instruction": "Add", "input": "1 and 2"}, "plain"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(UserError, match=r"bad.jsonl:1: a prompt is"):
        read_prompts(str(bad))
    with pytest.raises(UserError, match="no prompts"):
        generate(str(workspace.lora_run), [])


def test_trust_remote_code_comes_only_from_the_command_line(workspace, tmp_path, capsys):
    """A stored spec saying trust_remote_code: true is storage deciding what code runs here: refused until
    the user passes --trust-remote-code."""
    import yaml

    from raytune_ft.cli import main

    run = copy_run(workspace.lora_run, tmp_path / "lora-run")
    for spec_file in (run / "rtf_spec.yaml", run / "final" / "rtf_spec.yaml"):
        doc = yaml.safe_load(spec_file.read_text())
        doc["model"]["trust_remote_code"] = True
        spec_file.write_text(yaml.safe_dump(doc))
    recommit_final(run)
    for cmd in (["generate", str(run), "--prompt", "Say hello.", "--max-new-tokens", "2"],
                ["merge", str(run), str(tmp_path / "merged")],
                ["eval", str(run), "--data", str(workspace.eval_path)]):
        with pytest.raises(SystemExit) as ei:
            main(cmd)
        err = capsys.readouterr().err
        assert ei.value.code == 2, (cmd, err)
        assert "model.trust_remote_code: true, which rtf does not take from storage" in err
        assert "--trust-remote-code" in err and "Traceback" not in err
    assert not (tmp_path / "merged").exists()
    with pytest.raises(SystemExit) as ei:
        main(["generate", str(run), "--prompt", "Say hello.", "--max-new-tokens", "2", "--temperature", "0",
              "--trust-remote-code"])
    assert ei.value.code in (0, None)
    assert "Say hello." in capsys.readouterr().out
