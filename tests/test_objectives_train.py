"""The non-SFT objectives trained in-process on a tiny model through the recipe's own pieces (the objective's
datasets, model class and head, TrainingArguments and trainer): the loss falls and the objective's metrics
reach what a learnable synthetic set allows; what is saved reloads to the same scores."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raytune_ft import rundir as rd
from raytune_ft.spec import spec_from_dict
from raytune_ft.train import objectives as ob
from raytune_ft.train.modeling import apply_method, build_model
from raytune_ft.train.recipe import training_arguments
from tests.objective_data import preference_rows, scored_rows, write_jsonl
from tests.tiny import spec_doc


def objective_spec(tiny, tmp_path, objective, fmt, rows, eval_rows, method=None, **training):
    _, _, model_dir = tiny
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    evals = write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    doc = spec_doc("obj", model_dir, train, evals, tmp_path / "runs",
                   method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, **(method or {}),
                           "objective": objective},
                   training={"learning_rate": 1e-2, "save_steps": 1000, "per_device_train_batch_size": 16,
                             "eval_steps": 10, **training})
    doc["data"]["train"]["format"] = doc["data"]["eval"]["format"] = fmt
    return spec_from_dict(doc)


def train_inprocess(tmp_path, spec):
    """What recipe._run does between the data and trainer.train(), without Ray."""
    from transformers import AutoTokenizer

    from raytune_ft.data.pipeline import build_datasets

    tok = AutoTokenizer.from_pretrained(spec.model.name_or_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    train, evals, _ = build_datasets(spec.data, tok, seed=0)
    train, evals, scale = ob.prepare_datasets(spec, tok, train, evals)
    model, _ = build_model(spec, tok, device=torch.device("cpu"), seed=0)
    model = ob.attach_head(model, spec)
    model = apply_method(model, spec, wrap=not ob.wraps_adapter_itself(spec))
    cls, extra = ob.argument_class(spec)
    args = training_arguments(spec, str(tmp_path / "out"), None, use_cpu=True, cls=cls, **extra)
    args.save_strategy = "no"
    trainer = ob.make_trainer(spec, model=model, args=args, train_ds=train, eval_ds=evals, tokenizer=tok,
                              callbacks=[], scale=scale)
    trainer.train()
    return trainer, tok, scale, evals


def history(trainer, key):
    return [r[key] for r in trainer.state.log_history if key in r]


def eval_saved(trainer, spec, tmp_path, name="final"):
    """`rtf eval` on what the trainer saves (the adapter or model and the run's spec) against the eval file."""
    from raytune_ft.spec import to_yaml
    from raytune_ft.tools.evaluate import evaluate, render

    out = tmp_path / name
    trainer.save_model(str(out))
    (out / rd.SPEC).write_text(to_yaml(spec))
    result = evaluate(str(out), str(tmp_path / "eval.jsonl"), write=False)
    return result, render(result)


def test_regression_head_learns_and_reloads(tiny, tmp_path):
    spec = objective_spec(tiny, tmp_path, "regression", "scored", scored_rows(96, seed=1), scored_rows(24, seed=2),
                          method={"head": {"depth": 2, "width": 32, "dropout": 0.0}}, max_steps=16, eval_steps=8)
    trainer, tok, scale, evals = train_inprocess(tmp_path, spec)
    r2, mse = history(trainer, "eval_r2"), history(trainer, "eval_mse")
    losses = history(trainer, "loss")
    assert len(r2) == 2 and r2[-1] > 0.8 and r2[-1] > r2[0], r2
    assert mse[-1] < mse[0], mse
    # the training loss falls well below where it started (by how much depends on the head's and the adapter's
    # random start: 2.8x from the seeded adapter, 4x from the unseeded one it had before)
    assert sum(losses[-3:]) < sum(losses[:3]) / 2, losses
    assert history(trainer, "eval_mae")[-1] < 0.5
    assert abs(scale.mean - 1.5) < 0.3 and abs(scale.std - 1.1) < 0.2  # labels 0..3, standardised

    out = tmp_path / "final"
    trainer.save_model(str(out))
    ob.save_head(trainer.model, spec, str(out), scale)
    cfg = json.loads((out / rd.HEAD_CONFIG).read_text())
    assert cfg == {"objective": "regression", "module": "score", "hidden_size": 64, "kind": "mlp", "depth": 2,
                   "width": 32, "dropout": 0.0, "loss": "mse", "label_mean": scale.mean, "label_std": scale.std,
                   "normalize_labels": True}
    assert os.path.getsize(out / rd.HEAD_WEIGHTS) > 0 and (out / "adapter_model.safetensors").exists()

    from raytune_ft.tools.scoring import load_scorer, score_texts

    texts = [r["text"] for r in scored_rows(8, seed=3)]
    from raytune_ft.data.formats import tokenize_scored

    trainer.model.eval()
    with torch.no_grad():
        batch = ob.ScoredCollator(tok.pad_token_id)(tokenize_scored([{"text": t, "label": 0.0} for t in texts], tok))
        batch.pop("labels")
        raw = trainer.model(**batch).logits.squeeze(-1).double()
    in_memory = (raw * scale.std + scale.mean).tolist()
    scorer = load_scorer(str(out))
    again = score_texts(scorer, texts)
    assert max(abs(a - b) for a, b in zip(in_memory, again, strict=True)) < 1e-5, (in_memory, again)

    # rtf eval on the saved run: the objective's metrics, as training's evaluation computed them
    from raytune_ft.spec import to_yaml
    from raytune_ft.tools.evaluate import evaluate

    (out / rd.SPEC).write_text(to_yaml(spec))
    result = evaluate(str(out), str(tmp_path / "eval.jsonl"), write=False)
    assert result["objective"] == "regression" and result["examples"] == 24
    assert result["r2"] == pytest.approx(r2[-1], abs=1e-4) and result["mse"] == pytest.approx(mse[-1], rel=1e-3)

    # rtf merge keeps the head beside the merged model, which scores as the adapter did
    from raytune_ft.tools.merge import merge

    merge(str(out), str(tmp_path / "merged"))
    assert (tmp_path / "merged" / rd.HEAD_WEIGHTS).is_file() and (tmp_path / "merged" / "config.json").is_file()
    merged = score_texts(load_scorer(str(tmp_path / "merged")), texts)
    assert max(abs(a - b) for a, b in zip(in_memory, merged, strict=True)) < 1e-4, (in_memory, merged)


def test_reward_model_separates_pairs_and_its_head_reloads(tiny, tmp_path):
    spec = objective_spec(tiny, tmp_path, "reward", "preference", preference_rows(64, seed=1),
                          preference_rows(16, seed=2), max_steps=8, eval_steps=4)
    trainer, tok, scale, evals = train_inprocess(tmp_path, spec)
    acc, margin = history(trainer, "eval_accuracy"), history(trainer, "eval_margin")
    assert len(acc) == 2 and acc[-1] > 0.9, acc
    assert margin[-1] > margin[0] and margin[-1] > 0, margin
    losses = history(trainer, "loss")
    assert losses[-1] < losses[0], losses

    out = tmp_path / "final"
    trainer.save_model(str(out))
    ob.save_head(trainer.model, spec, str(out), scale)
    assert json.loads((out / rd.HEAD_CONFIG).read_text())["kind"] == "linear"

    from raytune_ft.data.formats import preference_texts, tokenize_preference
    from raytune_ft.tools.scoring import load_scorer, score_texts

    pair = preference_rows(1, seed=5)[0]
    texts = preference_texts(pair, tok)
    ids = tokenize_preference([texts], tok)[0]
    trainer.model.eval()
    with torch.no_grad():
        in_memory = [float(trainer.model(input_ids=torch.tensor([ids[k]])).logits[0, 0])
                     for k in ("chosen_ids", "rejected_ids")]
    assert in_memory[0] > in_memory[1]
    scorer = load_scorer(str(out))
    # the scorer tokenizes a text as scored rows are (BOS, no EOS); the pair's ids end with EOS, so score ids
    again = [float(scorer.loaded.model(input_ids=torch.tensor([ids[k]])).logits[0, 0])
             for k in ("chosen_ids", "rejected_ids")]
    assert max(abs(a - b) for a, b in zip(in_memory, again, strict=True)) < 1e-5
    by_text = score_texts(scorer, [texts["prompt"] + texts["chosen"], texts["prompt"] + texts["rejected"]])
    assert by_text[0] > by_text[1]

    from raytune_ft.spec import to_yaml
    from raytune_ft.tools.evaluate import evaluate

    (out / rd.SPEC).write_text(to_yaml(spec))
    result = evaluate(str(out), str(tmp_path / "eval.jsonl"), write=False)
    assert result["accuracy"] == pytest.approx(acc[-1]) and result["margin"] == pytest.approx(margin[-1], rel=1e-3)


def test_dpo_under_lora_raises_the_margin_against_the_base_as_reference(tiny, tmp_path):
    spec = objective_spec(tiny, tmp_path, "dpo", "preference", preference_rows(64, seed=1),
                          preference_rows(16, seed=2), method={"dpo": {"beta": 0.5}}, max_steps=8, eval_steps=4,
                          learning_rate=5e-3)
    trainer, tok, _, _ = train_inprocess(tmp_path, spec)
    margin = history(trainer, "eval_rewards/margins")
    assert len(margin) == 2 and margin[-1] > margin[0] > 0, margin
    assert history(trainer, "eval_rewards/accuracies")[-1] > 0.9
    chosen = history(trainer, "logps/chosen")
    assert chosen[-1] > chosen[0], chosen  # the chosen completion became likelier
    # the reference is the base with the adapter disabled: no second model, no "ref" adapter
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(spec.model.name_or_path).eval()
    ids = torch.tensor([tok("Is the value fine?\nyes it is")["input_ids"]])
    trainer.model.eval()
    with torch.no_grad(), trainer.model.disable_adapter():
        ref = trainer.model(input_ids=ids).logits
    with torch.no_grad():
        tuned = trainer.model(input_ids=ids).logits
    assert torch.allclose(ref, base(input_ids=ids).logits, atol=1e-6)
    assert not torch.allclose(tuned, ref, atol=1e-3)

    # rtf eval on the saved adapter: TRL's evaluation against the same reference, as the last one in training
    result, text = eval_saved(trainer, spec, tmp_path)
    assert result["objective"] == "dpo" and result["examples"] == 16
    assert result["rewards/margins"] == pytest.approx(margin[-1], rel=1e-4, abs=1e-6)
    assert result["rewards/accuracies"] == pytest.approx(history(trainer, "eval_rewards/accuracies")[-1])
    assert f"rewards/margins: {result['rewards/margins']:.6g}" in text and "perplexity" not in text
    # rtf generate on it: the prompt as training formatted preference prompts, the adapter's and the base's answers
    from raytune_ft.tools.generate import generate

    info: dict = {}
    gen = generate(str(tmp_path / "final"), ["Is the value fine?"], max_new_tokens=6, temperature=0,
                   compare_base=True, info=info)
    assert info["format"] == "preference" and gen[0]["new_tokens"] >= 1, (info, gen)
    assert gen[0]["formatted_prompt"].startswith("Is the value fine?") and gen[0]["base_completion"] is not None
    print(f"dpo (LoRA): eval_rewards/margins {margin}, accuracies {history(trainer, 'eval_rewards/accuracies')}, "
          f"logps/chosen {chosen[0]:.3f} -> {chosen[-1]:.3f}")


def test_orpo_raises_the_margin(tiny, tmp_path):
    spec = objective_spec(tiny, tmp_path, "orpo", "preference", preference_rows(64, seed=1),
                          preference_rows(16, seed=2), method={"dpo": {"beta": 0.5}}, max_steps=8, eval_steps=4,
                          learning_rate=5e-3)
    trainer, _, _, _ = train_inprocess(tmp_path, spec)
    margin = history(trainer, "eval_rewards/margins")
    assert len(margin) == 2 and margin[-1] > margin[0], margin
    assert history(trainer, "eval_rewards/accuracies")[-1] > 0.9
    losses = history(trainer, "loss")
    assert losses[-1] < losses[0], losses
    result, _ = eval_saved(trainer, spec, tmp_path)
    assert result["objective"] == "orpo" and result["rewards/margins"] == pytest.approx(margin[-1], rel=1e-4, abs=1e-6)
    print(f"orpo (LoRA): eval_rewards/margins {margin}, accuracies {history(trainer, 'eval_rewards/accuracies')}, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def test_dpo_full_finetuning_keeps_a_frozen_reference_copy(tiny, tmp_path):
    spec = objective_spec(tiny, tmp_path, "dpo", "preference", preference_rows(32, seed=1),
                          preference_rows(8, seed=2), method={"type": "full", "lora": None}, max_steps=4,
                          eval_steps=4, learning_rate=1e-3, per_device_train_batch_size=8)
    trainer, _, _, _ = train_inprocess(tmp_path, spec)
    from transformers import AutoModelForCausalLM

    start = AutoModelForCausalLM.from_pretrained(spec.model.name_or_path).state_dict()
    ref = trainer.ref_model
    assert ref is not None and ref is not trainer.model and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(v, start[k]) for k, v in ref.state_dict().items())  # the reference never moved
    assert not torch.equal(trainer.model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           start["model.layers.0.self_attn.q_proj.weight"])
    assert history(trainer, "eval_rewards/margins")[-1] > 0
    # rtf eval on the saved full model measures it against the model it started from (the reference training used)
    result, _ = eval_saved(trainer, spec, tmp_path)
    assert result["rewards/margins"] == pytest.approx(history(trainer, "eval_rewards/margins")[-1], rel=1e-4, abs=1e-6)
