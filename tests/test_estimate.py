"""`rtf plan`'s time, cost and fit: the arithmetic checked against cases computed by hand."""

from __future__ import annotations

import json

import pytest
import yaml

from raytune_ft import estimate as E
from raytune_ft.cli import main
from raytune_ft.plan import memory_estimate
from raytune_ft.spec import load_spec, spec_from_dict
from tests.specs import base_doc

# Llama-3.1-8B by hand: decoder linears per layer q,o 4096², k,v 4096·1024, gate,up 4096·14336, down 14336·4096
L8_LINEAR = 32 * (2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
L8_N = L8_LINEAR + 128256 * 4096  # + the LM head
L8_LORA16 = 32 * 16 * (2 * 8192 + 2 * 5120 + 2 * 18432 + 18432)  # r·(in+out) summed over the 7 linears
L1_LINEAR = 16 * (2 * 2048**2 + 2 * 2048 * 512 + 3 * 2048 * 8192)
L1_N = L1_LINEAR + 128256 * 2048


def spec(model="meta-llama/Llama-3.1-8B", method=None, **over):
    doc = base_doc(model={"name_or_path": model}, method=method or {"type": "lora", "lora": {"r": 16}})
    doc["data"]["max_seq_length"] = 2048
    doc["data"]["packing"] = True
    doc["training"] = {"max_steps": 1000, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4,
                       "learning_rate": 1e-4, "precision": "bf16"}
    doc["compute"] = {"num_workers": 4, "gpus_per_worker": 1, "accelerator_type": "A100-80G"}
    for k, v in over.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return spec_from_dict(doc)


def hours(tokens, flops_per_token, gpus, peak_tflops, mfu):
    return tokens * flops_per_token / (gpus * peak_tflops * 1e12 * mfu) / 3600


def test_lora_8b_by_hand():
    s = spec()
    e = E.estimate(s, tokens=E.Tokens(None, None, None, "unknown: test"))
    assert memory_estimate(s).trainable_params == L8_LORA16 == 41_943_040
    f = 4 * L8_N + 6 * L8_LORA16 + 12 * 32 * 4096 * 2048
    assert e.flops_per_token == f
    tokens = 1000 * 4 * 4 * 4 * 2048  # max_steps × global batch × packed row
    assert e.train_tokens == tokens and e.steps == 1000
    assert e.hours == pytest.approx(hours(tokens, f, 4, 312, 0.35))
    assert e.cost == pytest.approx(e.hours * 4 * 1.89)
    assert "assumed for lora" in e.mfu_source


def test_cpu_time_needs_peak_tflops_and_then_is_by_hand():
    cpu = {"num_workers": 2, "gpus_per_worker": 0, "accelerator_type": None, "assumed_mfu": 0.2}
    s = spec("meta-llama/Llama-3.2-1B", compute=cpu)
    e = E.estimate(s, tokens=E.Tokens(None, None, None, "unknown"))
    assert e.hours is None and any("set compute.peak_tflops" in n for n in e.notes)
    s = spec("meta-llama/Llama-3.2-1B", compute={**cpu, "peak_tflops": 0.5})
    e = E.estimate(s, tokens=E.Tokens(None, None, None, "unknown"))
    tokens = 1000 * 4 * 4 * 2 * 2048
    assert e.train_tokens == tokens
    assert e.hours == pytest.approx(hours(tokens, e.flops_per_token, 2, 0.5, 0.2))  # 2 workers, 1 device each
    assert e.cost is None and e.gpus == 0
    text = "\n".join(E.render(e))
    assert "CPU × 0.5 TFLOP/s peak (compute.peak_tflops) × MFU 20% (compute.assumed_mfu)" in text
    assert "of training on CPU" in text


def test_padded_batches_count_their_padding_in_the_time():
    lengths = (100, 100, 100, 500)  # one long example in four: most batches of 4 pad to 500
    cpu = {"num_workers": 1, "gpus_per_worker": 1, "accelerator_type": "H100", "assumed_mfu": 0.5}
    packed = spec("meta-llama/Llama-3.2-1B", compute=cpu)
    padded = spec("meta-llama/Llama-3.2-1B", compute=cpu, data={"packing": False})
    tokens = E.Tokens(2_000_000, 10_000, 200.0, "counted", lengths)
    p, u = E.estimate(packed, tokens=tokens), E.estimate(padded, tokens=tokens)
    assert p.compute_tokens == p.train_tokens  # packed rows are full: nothing padded
    assert u.train_tokens == 1000 * 4 * 4 * 200  # useful tokens: steps × global batch × mean length
    expect = E.padded_length(lengths, 4)
    assert abs(expect - (0.75**4 * 100 + (1 - 0.75**4) * 500)) < 25  # = 373.4 in expectation
    assert u.compute_tokens == int(u.train_tokens * expect / 200)
    assert u.hours == pytest.approx(hours(u.compute_tokens, u.flops_per_token, 1, 989, 0.5))
    assert any(n.startswith(f"padded batches: rows of ≈{expect:.0f} tokens for examples of 200") for n in u.notes)
    assert "lengths" not in u.to_dict()["tokens"]


def test_lora_1b_with_checkpointing_and_price_by_hand():
    s = spec("meta-llama/Llama-3.2-1B", training={"gradient_checkpointing": True},
             compute={"num_workers": 1, "accelerator_type": "H100", "price_per_hour": 2.0, "assumed_mfu": 0.5})
    e = E.estimate(s, tokens=E.Tokens(None, None, None, "unknown"))
    trainable = 16 * 16 * (2 * 4096 + 2 * 2560 + 2 * 10240 + 10240)
    attn = 12 * 16 * 2048 * 2048
    f = 4 * L1_N + 6 * trainable + attn + 2 * L1_N + attn / 3
    assert e.flops_per_token == pytest.approx(f)
    assert (e.mfu, e.mfu_source, e.price_per_gpu_hour) == (0.5, "compute.assumed_mfu", 2.0)
    assert e.hours == pytest.approx(hours(1000 * 16 * 2048, f, 1, 989, 0.5))


def test_full_8b_zero3_and_qlora_8b_by_hand():
    full = spec(method={"type": "full"}, deepspeed={"stage": 3}, compute={"num_workers": 8, "accelerator_type": "H100"})
    e = E.estimate(full, tokens=E.Tokens(10_000_000, None, None, "given"))
    f = 6 * L8_N + 12 * 32 * 4096 * 2048
    assert e.flops_per_token == f and e.train_tokens == min(1000 * 8 * 16 * 2048, 10_000_000 * 10**9)
    assert e.hours == pytest.approx(hours(e.train_tokens, f, 8, 989, 0.40))
    q = spec(method={"type": "qlora", "lora": {"r": 16}, "quantization": {"bits": 4}},
             compute={"num_workers": 1, "accelerator_type": "RTX4090"})
    eq = E.estimate(q, tokens=E.Tokens(None, None, None, "unknown"))
    assert eq.flops_per_token == 4 * L8_N + 6 * L8_LORA16 + 12 * 32 * 4096 * 2048
    assert eq.mfu == 0.22 and eq.peak_tflops == 165


def test_epochs_use_the_counted_tokens():
    s = spec(training={"max_steps": None, "num_epochs": 2})
    e = E.estimate(s, tokens=E.Tokens(5_000_000, 10_000, 500.0, "counted"))
    assert e.train_tokens == 10_000_000
    assert e.steps == -(-10_000_000 // (64 * 2048))  # packed rows of 2048, 64 per step


def test_sweep_is_sized_at_its_costliest_point():
    s = spec(tune={"space": {"method.lora.r": {"choice": [8, 64]}, "training.learning_rate": {"loguniform": [1e-5, 1e-3]}},
                   "num_samples": 6, "max_concurrent_trials": 2, "metric": "loss"})
    e = E.estimate(s, tokens=E.Tokens(None, None, None, "unknown"))
    sw = e.sweep
    assert sw["costliest_point"] == {"method.lora.r": 64} and sw["trials"] == 6 and sw["concurrent"] == 2
    r64 = 4 * L8_N + 6 * (L8_LORA16 * 4) + 12 * 32 * 4096 * 2048
    trial = hours(e.train_tokens, r64, 4, 312, 0.35)
    assert sw["trial_hours"] == pytest.approx(trial)
    assert sw["wall_hours"] == pytest.approx(3 * trial) and sw["gpu_hours"] == pytest.approx(6 * 4 * trial)


def test_tokens_counted_with_the_models_tokenizer(tiny):
    from tokenizers import Tokenizer

    train, _, model_dir = tiny
    s = spec_from_dict(base_doc(model={"name_or_path": str(model_dir)},
                                data={"train": {"path": str(train), "format": "alpaca"}, "max_seq_length": 128}))
    t = E.count_tokens(s)
    assert t.how.startswith("counted: every row") and t.examples == 64
    tk = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    want = sum(min(len(tk.encode("\n".join(v for v in (r["instruction"], r["output"]))).ids) + 2, 128) for r in rows)
    assert t.per_epoch == want
    sampled = E.count_tokens(s, sample_rows=16)
    assert sampled.how.startswith("sampled") and sampled.examples == 64
    assert 0.5 * want < sampled.per_epoch < 2 * want


def test_fit_proposals_replan_to_fit():
    big = spec(training={"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1},
               data={"max_seq_length": 8192})
    sets, summary = E.fit(big)
    assert summary.startswith("does not fit") and sets
    fixed = E._apply(big, {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in sets)})
    assert memory_estimate(fixed).total / 1024**3 <= 80
    # the global batch is kept
    t0, t1 = big.training, fixed.training
    assert t0.per_device_train_batch_size * t0.gradient_accumulation_steps == \
        t1.per_device_train_batch_size * t1.gradient_accumulation_steps
    # checkpointing is proposed only when it is off, QLoRA only for LoRA
    assert all("gradient_checkpointing" not in x for x in E.fit(spec(training={"gradient_checkpointing": True}))[0])
    small = spec(training={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 16})
    sets, summary = E.fit(small)
    assert summary.startswith("fits") and "training.gradient_accumulation_steps=" in " ".join(sets)


def test_rtf_plan_prints_time_cost_and_fit(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["plan", "jobspecs/a100.yaml", "--offline", "--tokens", "50000000", "--fit"])
    out = capsys.readouterr().out
    assert ei.value.code in (0, None), out
    assert "data:         50,000,000 tokens per epoch; given with --tokens" in out
    assert "training:     150,000,000 tokens in 1,145 optimizer steps" in out
    assert "time:         ≈ 4.7 h of training (18.9 GPU-hours); cost ≈ $35.75" in out
    assert "fit:          fits: 32.3 of 80 GiB" in out
    with pytest.raises(SystemExit):
        main(["plan", "jobspecs/a100.yaml", "--offline", "--json", "--tokens", "50000000"])
    d = json.loads(capsys.readouterr().out)
    assert d["estimate"]["train_tokens"] == 150_000_000 and d["estimate"]["gpus"] == 4
    assert load_spec("jobspecs/a100.yaml").compute.accelerator_type == "A100-80G"


def test_any_hub_model_is_sized_from_the_local_cache(tmp_path, monkeypatch):
    """A hub id outside the built-in table: its config.json read from the HF cache layout, no network."""
    from raytune_ft.plan import resolve_arch

    repo = tmp_path / "hub" / "models--acme--Tiny-7B"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({
        "hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
        "intermediate_size": 4096, "vocab_size": 50000, "tie_word_embeddings": True}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    a = resolve_arch(spec("acme/Tiny-7B"))
    assert (a.hidden, a.layers, a.kv, a.vocab, a.tied) == (1024, 8, 4, 50000, True)
    assert str(snap / "config.json") == a.source
    est = memory_estimate(spec("acme/Other-1B"))
    assert not est.known and "not in the Hugging Face cache" in est.notes[0]


def test_measured_mfu_replaces_the_assumed_one():
    """bench/mfu.json holds what make gpu-check measured; the plan uses it for that accelerator."""
    m, src = E.measured_mfu("H200", "lora")
    assert m == pytest.approx(0.152) and "gpu-check" in src
    e = E.estimate(spec(compute={"accelerator_type": "H200"}), tokens=E.Tokens(None, None, None, "unknown"))
    assert e.mfu == pytest.approx(0.152) and e.mfu_source.startswith("measured by this project")
    assert E.measured_mfu("A100-80G", "lora") == (None, "")


def test_liger_kernel_is_passed_to_hf_and_planned_without_full_logits():
    from raytune_ft.train.recipe import training_arguments

    on = spec("meta-llama/Llama-3.2-1B", training={"liger_kernel": True})
    off = spec("meta-llama/Llama-3.2-1B")
    tokens = 4 * 2048
    assert memory_estimate(off).activations - memory_estimate(on).activations == tokens * 128256 * 12
    assert "Liger kernels: no full logits at the loss" in memory_estimate(on).notes
    args = training_arguments(on, "/tmp/rtf-test-liger", None, use_cpu=True)
    assert args.use_liger_kernel is True
    assert training_arguments(off, "/tmp/rtf-test-liger", None, use_cpu=True).use_liger_kernel is False
    with pytest.raises(Exception, match="liger_kernel runs Triton GPU kernels"):
        spec(training={"liger_kernel": True}, compute={"gpus_per_worker": 0})
