"""rtf plan's memory for the objectives: the head, the pairs, DPO's reference copy."""

from __future__ import annotations

import pytest

from raytune_ft.plan import LOGIT_BYTES, head_params, memory_estimate
from raytune_ft.spec import spec_from_dict
from tests.specs import base_doc


def spec(objective, fmt, method_type="lora", **method):
    doc = base_doc(model={"name_or_path": "meta-llama/Llama-3.1-8B"})
    doc["method"] = {"type": method_type, "objective": objective, **method}
    doc["data"]["train"]["format"] = fmt
    doc["training"]["precision"] = "bf16"
    return spec_from_dict(doc)


def test_regression_head_replaces_the_lm_head_logits():
    sft = memory_estimate(spec("sft", "alpaca"))
    reg = memory_estimate(spec("regression", "scored", head={"depth": 3, "width": 256}))
    n = 4096 * 256 + 256 + 256 * 256 + 256 + 256 + 1
    assert head_params(spec("regression", "scored", head={"depth": 3, "width": 256}), 4096) == n
    assert reg.trainable_params == sft.trainable_params + n
    tokens = 1 * 128  # batch 1 x max_seq_length 128
    assert reg.activations == pytest.approx(sft.activations - tokens * 128256 * LOGIT_BYTES)
    assert reg.weights < sft.weights  # the 128256 x 4096 LM head is gone, the head is small
    assert any("head instead of the LM head" in n for n in reg.notes)


def test_pairs_double_the_activations_and_full_dpo_counts_its_reference():
    sft_full = memory_estimate(spec("sft", "alpaca", "full"))
    dpo_full = memory_estimate(spec("dpo", "preference", "full"))
    assert dpo_full.activations == pytest.approx(2 * sft_full.activations)
    assert dpo_full.weights == pytest.approx(2 * sft_full.weights)  # the frozen reference copy
    dpo_lora = memory_estimate(spec("dpo", "preference"))
    assert dpo_lora.weights == pytest.approx(memory_estimate(spec("sft", "alpaca")).weights)  # adapter disabled
    assert any("adapter disabled" in n for n in dpo_lora.notes)
    reward = memory_estimate(spec("reward", "preference"))
    assert reward.trainable_params == memory_estimate(spec("sft", "alpaca")).trainable_params + 4096
