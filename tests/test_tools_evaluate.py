"""evaluate(): token-weighted cross-entropy on the run's eval data, equal to a hand computation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from raytune_ft.data.formats import normalize_row, tokenize_examples
from raytune_ft.data.split import split_indices
from raytune_ft.errors import UserError
from raytune_ft.tools.evaluate import evaluate, render
from tests import test_tools_support as support
from tests.test_tools_support import EVAL_ROWS, TRAIN_ROWS, copy_run, lora_doc, recommit_final, write_spec

workspace = support.workspace  # fixtures shared by the tool tests
_tools_cache = support._tools_cache


def _truncated(examples, max_len=64):
    """data.max_seq_length of the runs (64): training keeps each example's first 64 tokens."""
    return [{k: v[:max_len] for k, v in ex.items()} for ex in examples]


def _hand_loss(model, examples) -> tuple[float, int]:
    """Sum over examples and positions t >= 1 with labels[t] != -100 of -log p(labels[t] | tokens < t)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in _truncated(examples):
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(1, len(ex["labels"])):
                if ex["labels"][t] != -100:
                    total -= float(logp[t - 1, ex["labels"][t]])
                    count += 1
    return total, count


@pytest.fixture(scope="module")
def models(workspace):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(workspace.lora_run / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(workspace.base_dir), dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(workspace.base_dir), dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(base, str(workspace.lora_run / "final")).eval()
    full = AutoModelForCausalLM.from_pretrained(str(workspace.full_run / "final"), dtype=torch.float32).eval()
    return tok, tuned, plain, full


def test_loss_equals_hand_computed_cross_entropy(workspace, models, tmp_path):
    tok, tuned, plain, _ = models
    run = copy_run(workspace.lora_run, tmp_path / "lora-run")
    result = evaluate(str(run), batch_size=2, include_base=True)  # 3 rows: a padded batch of 2, then 1
    examples = _truncated(tokenize_examples("alpaca", [normalize_row("alpaca", r) for r in EVAL_ROWS], tok))
    assert max(len(e["input_ids"]) for e in examples) == 64  # one row is truncated, as in training
    total, count = _hand_loss(tuned, examples)
    assert result["examples"] == 3 and result["tokens"] == count
    # only the responses (and EOS) are scored, as in training
    assert count == sum(sum(1 for x in ex["labels"][1:] if x != -100) for ex in examples) < sum(len(e["input_ids"]) for e in examples) - 3
    assert result["loss"] == pytest.approx(total / count, abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    b_total, b_count = _hand_loss(plain, examples)
    assert result["base"]["loss"] == pytest.approx(b_total / b_count, abs=1e-5)
    assert abs(result["base"]["loss"] - result["loss"]) > 1e-3
    # beside the committed final/, not inside it (final/ is unchanged)
    written = json.loads((run / "eval" / "final" / "eval_results.json").read_text())
    assert result["written"] == str(run / "eval" / "final" / "eval_results.json")
    assert not (run / "final" / "eval_results.json").exists()
    assert written["loss"] == pytest.approx(result["loss"]) and written["tokens"] == count
    text = render(result)
    assert "fine-tuned" in text and f"{result['loss']:.4f}" in text and "base" in text
    assert text.splitlines()[-1] == (f"wrote {run / 'eval' / 'final' / 'eval_results.json'} "
                                     "(beside the run's committed outputs, which are unchanged)")


def test_eval_split_scores_exactly_the_held_out_rows(workspace, models, tmp_path):
    tok, _, _, full = models
    out = tmp_path / "res.json"
    result = evaluate(str(workspace.full_run), batch_size=8, include_base=True, out=str(out))
    held = split_indices(len(TRAIN_ROWS), 0.5, [42, 0])[1]  # training.seed 42, first train source
    rows = [normalize_row("text", TRAIN_ROWS[i], {"text": "output"}) for i in held]
    total, count = _hand_loss(full, tokenize_examples("text", rows, tok))
    assert result["examples"] == len(held) == 3 and result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, abs=1e-5)
    assert "from scratch" in result["base"]["error"]
    assert json.loads(out.read_text())["loss"] == pytest.approx(result["loss"])


def test_given_data_file(workspace, models, tmp_path):
    tok, tuned, _, _ = models
    result = evaluate(str(workspace.lora_run / "checkpoint-00000005"), str(workspace.train_path), batch_size=4, write=False)
    total, count = _hand_loss(tuned, tokenize_examples("alpaca", [normalize_row("alpaca", r) for r in TRAIN_ROWS], tok))
    assert (result["examples"], result["tokens"]) == (6, count)
    assert result["loss"] == pytest.approx(total / count, abs=1e-5)
    assert "written" not in result


def test_no_eval_data(workspace, tmp_path):
    run = copy_run(workspace.lora_run, tmp_path / "r")
    doc = lora_doc("r", str(workspace.base_dir), str(tmp_path), "t.jsonl", "e.jsonl")
    del doc["data"]["eval"]
    write_spec(run / "final" / "rtf_spec.yaml", doc)
    recommit_final(run)
    with pytest.raises(UserError, match="has no eval data") as e:
        evaluate(str(run))
    assert "--data FILE" in str(e.value)


def test_qlora_base_is_loaded_quantized_as_in_training(workspace, tmp_path):
    from raytune_ft.tools.loading import load_model
    from raytune_ft.tools.source import resolve_source

    run = copy_run(workspace.lora_run, tmp_path / "q")
    write_spec(run / "rtf_spec.yaml", lora_doc("q", str(workspace.base_dir), str(tmp_path), str(workspace.train_path),
                                              str(workspace.eval_path), method="qlora"))
    (run / "final" / "rtf_spec.yaml").unlink()
    recommit_final(run)
    src = resolve_source(str(run))
    assert src.method == "qlora" and src.quantized_base
    loaded = load_model(src)
    assert loaded.quantized and any(type(m).__name__ == "Linear4bit" for m in loaded.model.modules())
    assert not any(type(m).__name__ == "Linear4bit" for m in load_model(src, quantize=False).model.modules())
    q = evaluate(src, write=False)
    plain = evaluate(str(workspace.lora_run), write=False)
    assert q["tokens"] == plain["tokens"] and 0 < abs(q["loss"] - plain["loss"]) < 0.1  # 4-bit rounding only
    assert any("quantized (4-bit)" in n for n in q["notes"])


def test_default_results_path_is_beside_committed_outputs(workspace):
    from raytune_ft.tools.evaluate import results_path
    from raytune_ft.tools.source import resolve_source

    run = workspace.lora_run
    assert results_path(resolve_source(str(run))) == str(run / "eval" / "final" / "eval_results.json")
    ckpt = resolve_source(str(run / "checkpoint-00000005"))  # each checkpoint its own, none overwritten
    assert results_path(ckpt) == str(run / "eval" / "checkpoint-00000005" / "eval_results.json")
    assert results_path(resolve_source(str(workspace.base_dir))) == str(workspace.base_dir / "eval_results.json")
