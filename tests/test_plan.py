"""The plan: DeepSpeed dicts, scaling, memory arithmetic."""

from __future__ import annotations

import os

import pytest

from raytune_ft.plan import GIB, Arch, deepspeed_config, make_plan, memory_estimate
from raytune_ft.spec import spec_from_dict
from tests.specs import base_doc

LLAMA8B = {"name_or_path": "meta-llama/Llama-3.1-8B"}


def spec(**over):
    doc = base_doc(model=LLAMA8B)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k].update(v)
        else:
            doc[k] = v
    return spec_from_dict(doc)


def test_known_arch_param_count_matches_llama_8b():
    p = make_plan(spec())
    assert 8.0e9 < p.memory.total_params < 8.1e9  # Llama-3.1-8B has 8.03B parameters


def test_lora_trainable_count_is_exact_for_all_linear():
    s = spec(method={"type": "lora", "lora": {"r": 16}})
    est = memory_estimate(s)
    # per layer: r·(in+out) summed over q,k,v,o,gate,up,down; 32 layers
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + (4096 + 14336) * 2 + (14336 + 4096))
    assert est.trainable_params == per_layer * 32  # 41.9M: the figure PEFT prints for this config


def test_zero_stages_shard_what_they_should():
    doc = base_doc(model=LLAMA8B)
    doc["method"] = {"type": "full"}
    doc["compute"] = {"num_workers": 8, "gpus_per_worker": 1}
    doc["training"]["precision"] = "bf16"
    e0 = memory_estimate(spec_from_dict({**doc, "deepspeed": {"stage": 0}}))
    e1 = memory_estimate(spec_from_dict({**doc, "deepspeed": {"stage": 1}}))
    e2 = memory_estimate(spec_from_dict({**doc, "deepspeed": {"stage": 2}}))
    e3 = memory_estimate(spec_from_dict({**doc, "deepspeed": {"stage": 3}}))
    assert e1.optimizer == pytest.approx(e0.optimizer / 8)
    assert e2.gradients == pytest.approx(e0.gradients / 8) and e1.gradients == e0.gradients
    assert e3.weights == pytest.approx(e0.weights / 8) and e2.weights == e0.weights
    off = memory_estimate(spec_from_dict({**doc, "deepspeed": {"stage": 3, "offload_optimizer": True,
                                                                "offload_params": True}}))
    assert off.optimizer == 0 and off.weights == 0


def test_qlora_weights_are_a_quarter_of_bf16():
    lora = memory_estimate(spec(method={"type": "lora"}, training={"precision": "bf16"}))
    q = memory_estimate(spec(method={"type": "qlora", "quantization": {"bits": 4}}, training={"precision": "bf16"}))
    assert q.weights < 0.45 * lora.weights


def test_gradient_checkpointing_cuts_activations():
    on = memory_estimate(spec(training={"gradient_checkpointing": True}))
    off = memory_estimate(spec(training={"gradient_checkpointing": False}))
    assert on.activations < off.activations / 3


def test_warns_when_over_the_gpu():
    s = spec(method={"type": "full", "lora": None}, compute={"num_workers": 1, "gpus_per_worker": 1, "accelerator_type": "RTX4090"},
             training={"precision": "bf16"})
    p = make_plan(s)
    assert p.memory.total / GIB > 24
    assert any("exceeds the 24 GiB of a RTX4090" in w for w in p.warnings)


def test_deepspeed_config_is_consistent_with_training():
    s = spec(deepspeed={"stage": 3, "offload_optimizer": True}, training={"precision": "bf16"})
    ds = deepspeed_config(s)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["train_micro_batch_size_per_gpu"] == "auto"  # HF fills it from TrainingArguments
    assert deepspeed_config(spec()) is None


def test_local_config_json_is_read(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,'
        ' "vocab_size": 100, "tie_word_embeddings": false}'
    )
    s = spec(model={"name_or_path": str(tmp_path)})
    est = memory_estimate(s)
    a = Arch(64, 2, 4, 4, 128, 100, False, "")
    assert est.total_params == a.params == 2 * (4 * 64 * 64 + 3 * 64 * 128) + 2 * 100 * 64 + 2 * 2 * 64 + 64


def test_unknown_model_is_reported_not_guessed():
    p = make_plan(spec(model={"name_or_path": "someone/mystery-model"}))  # tests run with HF_HUB_OFFLINE=1
    assert not p.memory.known
    assert p.memory.notes[0].startswith("architecture of someone/mystery-model unknown: not a local dir, not in "
                                        "the Hugging Face cache, not a known hub id, and offline mode is on")
    assert "hf download someone/mystery-model config.json" in p.memory.notes[0]


def test_an_unreachable_hub_is_tried_once_briefly_and_named(tmp_path):
    """Not offline, the Hub at a closed port on 127.0.0.1 (a real refused connection): one try, no retries,
    and the note names the endpoint; the table of known shapes is still used first, without any request."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        "from raytune_ft.plan import make_plan, resolve_arch\n"
        "from tests.test_plan import spec\n"
        "p = make_plan(spec(model={'name_or_path': 'someone/mystery-model'}))\n"
        "print(p.memory.known, p.memory.notes[0])\n"
        "print(resolve_arch(spec(model={'name_or_path': 'meta-llama/Llama-3.1-8B'})).source)\n"
    )
    # not offline: huggingface_hub also takes TRANSFORMERS_OFFLINE (which other test modules set) as offline
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path), PYTHONPATH=os.getcwd())
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.splitlines()[:2]
    assert first.startswith("False architecture of someone/mystery-model unknown")
    assert f"the Hub at http://127.0.0.1:{port} did not give its config.json" in first
    assert second == "known shape of llama-3.1-8b"
    assert "Retrying" not in r.stderr
