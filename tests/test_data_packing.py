"""Packing, collators, efficiency numbers, and the packed == unpacked loss equivalence on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from raytune_ft.data.formats import IGNORE_INDEX, normalize_row, tokenize_examples
from raytune_ft.data.packing import (
    PaddedCollator,
    collate_packed,
    pack_examples,
    packing_efficiency,
    padding_efficiency,
    trained_token_count,
)
from raytune_ft.data.tokenizer import train_tokenizer

CORPUS = [
    "### Instruction:\nName a colour.\n\n### Response:\nBlue is a colour of the sky.\n",
    "<|user|>\nWhat is two plus two?<|end|>\n<|assistant|>\nFour.<|end|>\n",
    "The cat sat on the mat. A dog ran in the park. Birds sing in the morning.",
] * 10


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def examples(tok):
    """Alpaca (masked prompt), chat (two assistant turns), text (all trained), of different lengths."""
    alpaca = [
        {"instruction": "Name a colour.", "output": "Blue."},
        {
            "instruction": "Name an animal that can fly.",
            "input": "Not a bird.",
            "output": "A bat can fly at night.",
        },
    ]
    chat = [
        {
            "messages": [
                {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "And three plus three?"},
                {"role": "assistant", "content": "Six."},
            ]
        }
    ]
    text = [{"text": "The cat sat on the mat."}, {"text": "Hi"}, {"text": "Birds sing in the morning. " * 2}]
    out = []
    for fmt, rows in (("alpaca", alpaca), ("chat", chat), ("text", text)):
        out += tokenize_examples(fmt, [normalize_row(fmt, r) for r in rows], tok)
    return out


def tiny_llama(tok, attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting labels[t+1] from position t (0 where ignored), shape [B, T-1]."""
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), targets.clamp(min=0), reduction="none"
    )
    return nll * (targets != IGNORE_INDEX)


@pytest.mark.parametrize("flatten", [False, True], ids=["rows", "flattened"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tok, examples, attn, flatten):
    model = tiny_llama(tok, attn)
    padded = PaddedCollator(tok.pad_token_id)(examples)
    rows = pack_examples(examples, max_seq_length=80)
    packed = collate_packed(rows, pad_token_id=tok.pad_token_id, flatten=flatten)
    assert len(examples) > len(rows) > 1  # several rows, some holding several examples
    assert packed["input_ids"].shape[0] == (1 if flatten else len(rows)) and "attention_mask" not in packed
    n = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert n == int((packed["labels"][:, 1:] != IGNORE_INDEX).sum()) == trained_token_count(examples)

    with torch.no_grad():
        out_u = model(**padded, use_cache=False, num_items_in_batch=n)
        out_p = model(**packed, use_cache=False, num_items_in_batch=n)
        leaky = model(
            input_ids=packed["input_ids"], labels=packed["labels"], use_cache=False, num_items_in_batch=n
        )

    # HF's loss with num_items_in_batch is the token-weighted mean; check it against our own reduction
    nll_u, nll_p = token_nll(out_u.logits, padded["labels"]), token_nll(out_p.logits, packed["labels"])
    assert out_u.loss.item() == pytest.approx(nll_u.sum().item() / n, abs=1e-5)
    assert out_p.loss.item() == pytest.approx(nll_p.sum().item() / n, abs=1e-5)
    assert abs(out_u.loss.item() - out_p.loss.item()) < 1e-4

    # stronger: every example's summed loss is the same packed and unpacked (pad tails match no example)
    unpacked = {tuple(ex["input_ids"]): nll_u[i].sum().item() for i, ex in enumerate(examples)}
    checked = 0
    for r in range(packed["input_ids"].shape[0]):
        flat_ids, positions = packed["input_ids"][r].tolist(), packed["position_ids"][r].tolist()
        starts = [j for j, p in enumerate(positions) if p == 0] + [len(positions)]
        nll_p_flat = torch.cat([nll_p[r], torch.zeros(1)])  # index t = loss of predicting token t+1
        for a, b in zip(starts, starts[1:], strict=False):
            key = tuple(flat_ids[a:b])
            if key in unpacked:
                assert nll_p_flat[a : b - 1].sum().item() == pytest.approx(unpacked[key], abs=1e-4)
                checked += 1
    assert checked == len(examples)

    # control: without position_ids the examples see each other and the loss changes
    assert abs(leaky.loss.item() - out_u.loss.item()) > 1e-3


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=40),
    max_len=st.integers(min_value=40, max_value=100),
)
def test_packing_keeps_every_example_once_and_marks_boundaries(lengths, max_len):
    examples = []
    for i, n in enumerate(lengths):
        ids = [1000 * i + j for j in range(n)]  # unique tokens: each example recognisable in the rows
        examples.append(
            {"input_ids": ids, "labels": [x if j % 3 else IGNORE_INDEX for j, x in enumerate(ids)]}
        )
    rows = pack_examples(examples, max_len)
    seen = []
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= max_len
        starts = [j for j, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:], strict=False):
            assert row["position_ids"][a:b] == list(range(b - a))
            i = row["input_ids"][a] // 1000
            assert row["input_ids"][a:b] == examples[i]["input_ids"]
            assert row["labels"][a:b] == [IGNORE_INDEX] + examples[i]["labels"][1:]
            seen.append(i)
    assert sorted(seen) == list(range(len(examples)))
    # any-fit property: no two rows are both at most half full (the later one would have fitted)
    assert sum(1 for r in rows if 2 * len(r["input_ids"]) <= max_len) <= 1
    assert pack_examples(examples, max_len) == rows  # deterministic


def test_best_fit_packs_tighter_than_sequential():
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (6, 6, 4, 4)]
    rows = pack_examples(examples, 10)
    assert [len(r["input_ids"]) for r in rows] == [10, 10]  # sequential greedy would need 3 rows
    assert packing_efficiency(rows, 10) == 1.0
    assert packing_efficiency(pack_examples(examples[:3], 10), 10) == pytest.approx(16 / 20)
    with pytest.raises(ValueError, match="more than max_seq_length"):
        pack_examples([{"input_ids": [1] * 11, "labels": [1] * 11}], 10)


def test_padded_collator_pads_right_and_masks_pads():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = PaddedCollator(pad_token_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert PaddedCollator(0, pad_to_multiple_of=4)(batch)["input_ids"].shape == (2, 4)


def test_packed_collator_flattens_rows_and_plain_examples():
    rows = pack_examples([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7], "labels": [7]}], 4)
    out = collate_packed(rows + [{"input_ids": [8, 9], "labels": [8, 9]}], flatten=True)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert out["labels"].tolist() == [[-100, 6, -100, -100, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 0, 0, 1]]


def test_packed_collator_keeps_rows_with_a_separate_pad_block():
    rows = pack_examples([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7], "labels": [7]}], 4)
    out = collate_packed(rows + [{"input_ids": [8, 9, 10, 11, 12], "labels": [8, 9, 10, 11, 12]}], pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert out["labels"].tolist() == [[-100, 6, -100, -100, -100], [-100, 9, 10, 11, 12]]
    assert out["position_ids"].tolist() == [[0, 1, 0, 0, 1], [0, 1, 2, 3, 4]]


def test_padding_efficiency_counts_per_batch_padding():
    assert padding_efficiency([4, 2, 3, 3], batch_size=2) == pytest.approx(12 / 14)
    assert padding_efficiency([4, 4], batch_size=2) == 1.0
