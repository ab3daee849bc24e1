"""The recipe's model/method/arguments code, run in-process with HF Trainer on a tiny model:
the loss falls on a repeated batch, and exactly the intended parameters change."""

from __future__ import annotations

import json

import pytest
import torch

from raytune_ft.spec import spec_from_dict
from raytune_ft.train.modeling import apply_method, build_model, choose_attention, count_parameters
from raytune_ft.train.recipe import training_arguments
from tests.tiny import spec_doc


def repeated_batch(tmp_path, train_file, n=4):
    rows = [json.loads(x) for x in train_file.read_text().splitlines()[:n]]
    p = tmp_path / "repeat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows * 8))
    return p


def same_bits(a, b) -> bool:
    """Bitwise equality (packed 4-bit weights stored in float tensors may hold NaN bit patterns)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def train_inprocess(tmp_path, spec, steps):
    from transformers import AutoTokenizer, Trainer

    from raytune_ft.data.packing import PaddedCollator, collate_packed
    from raytune_ft.data.pipeline import build_datasets

    tok = AutoTokenizer.from_pretrained(spec.model.name_or_path)
    train, _, _ = build_datasets(spec.data, tok, seed=0)
    model, _ = build_model(spec, tok, device=torch.device("cpu"), seed=0)
    model = apply_method(model, spec)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_arguments(spec, str(tmp_path / "out"), None, use_cpu=True)
    args.save_strategy = "no"
    collator = collate_packed if spec.data.packing else PaddedCollator(tok.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator)

    def data_loss() -> float:
        """The loss over the whole (tiny) training set: per-step losses depend on which rows the shuffled
        batch drew, so 8 noisy steps can hide what training did."""
        was_training = model.training
        model.eval()
        with torch.no_grad():
            batch = {k: v.to(model.device) for k, v in collator(list(train)).items()}
            loss = float(model(**batch).loss)
        model.train(was_training)
        return loss

    start = data_loss()
    trainer.train()
    losses = [start, data_loss()]  # before and after, on the same rows
    after = dict(model.named_parameters())
    changed = {n for n, p in after.items() if not same_bits(before[n], p.detach())}
    return losses, changed, model


def make_spec(tiny, tmp_path, method, **training):
    train, _, model_dir = tiny
    data = repeated_batch(tmp_path, train)
    training = {"max_steps": 8, "learning_rate": 1e-2, "save_steps": 100, "per_device_train_batch_size": 4,
                **training}
    doc = spec_doc("m", model_dir, data, None, tmp_path / "runs", method=method, training=training)
    doc["training"].pop("eval_strategy", None)
    doc["training"].pop("eval_steps", None)
    return spec_from_dict(doc)


def test_full_finetuning_changes_every_weight(tiny, tmp_path):
    spec = make_spec(tiny, tmp_path, {"type": "full"})
    losses, changed, model = train_inprocess(tmp_path, spec, 8)
    assert losses[-1] < losses[0] - 0.5, losses
    assert changed == {n for n, _ in model.named_parameters()}


def test_lora_changes_only_the_adapters(tiny, tmp_path):
    spec = make_spec(tiny, tmp_path, {"type": "lora", "lora": {"r": 4, "alpha": 16, "dropout": 0.0,
                                                               "target_modules": ["q_proj", "v_proj"]}},
                     learning_rate=5e-2)
    losses, changed, model = train_inprocess(tmp_path, spec, 8)
    assert losses[-1] < losses[0] - 0.1, losses
    assert changed and all("lora_" in n for n in changed), changed
    # every adapter on q_proj/v_proj of both layers trained, nothing else did
    assert {n.split(".lora_")[0].split(".")[-1] for n in changed} == {"q_proj", "v_proj"}
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def test_lora_options_are_honoured(tiny, tmp_path):
    spec = make_spec(tiny, tmp_path, {"type": "lora", "lora": {
        "r": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["q_proj", "down_proj"], "bias": "lora_only",
        "layers_to_transform": [1], "modules_to_save": ["lm_head"]}})
    train, _, model_dir = tiny
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = apply_method(build_model(spec, tok, device=torch.device("cpu"), seed=0)[0], spec)
    cfg = model.peft_config["default"]
    assert cfg.r == 2 and cfg.lora_alpha == 4 and cfg.lora_dropout == 0.1 and cfg.bias == "lora_only"
    names = [n for n, _ in model.named_parameters() if "lora_A" in n]
    assert names and all(".layers.1." in n for n in names)  # layers_to_transform
    assert any("lm_head.modules_to_save" in n for n, _ in model.named_parameters())


def test_qlora_trains_adapters_over_a_frozen_4bit_base(tiny, tmp_path):
    spec = make_spec(tiny, tmp_path, {"type": "qlora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                                      "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                                       "compute_dtype": "float32"}}, learning_rate=5e-2)
    losses, changed, model = train_inprocess(tmp_path, spec, 8)
    assert losses[-1] < losses[0] - 0.1, losses
    assert changed and all("lora_" in n for n in changed), changed
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear4bit" in kinds  # the base really is quantized


def test_gradient_checkpointing_gives_the_same_loss(tiny, tmp_path):
    method = {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    off, _, _ = train_inprocess(tmp_path / "a", make_spec(tiny, tmp_path, method, gradient_checkpointing=False,
                                                          max_steps=3), 3)
    on, _, _ = train_inprocess(tmp_path / "b", make_spec(tiny, tmp_path, method, gradient_checkpointing=True,
                                                         max_steps=3), 3)
    assert on == pytest.approx(off, abs=1e-5)


def test_attention_choice_says_why():
    assert choose_attention("auto", cuda=False) == ("sdpa", "auto: no GPU, PyTorch SDPA is available")
    impl, why = choose_attention("eager", cuda=False)
    assert impl == "eager" and "asked for" in why
    from raytune_ft.errors import UserError

    with pytest.raises(UserError, match="needs a CUDA GPU"):
        choose_attention("flash_attention_2", cuda=False)


def test_a_lora_adapter_starts_from_the_runs_seed_whatever_drew_from_torch_before(tiny, tmp_path):
    """LoRA's A matrices are random: they come from training.seed, not from the state torch's generator was left
    in (which differed between processes, so the same spec trained to different losses)."""
    from transformers import AutoModelForCausalLM

    train, _, model_dir = tiny
    spec = spec_from_dict(spec_doc("seeded", model_dir, train, None, tmp_path / "runs"))
    adapters = []
    for draws in (0, 3):
        torch.rand(draws, 1000)  # what happened to consume randomness before differs
        model = apply_method(AutoModelForCausalLM.from_pretrained(str(model_dir)), spec)
        adapters.append({k: v.clone() for k, v in model.state_dict().items() if "lora_A" in k})
    assert adapters[0] and adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert any(v.abs().sum() > 0 for v in adapters[0].values())
