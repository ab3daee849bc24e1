"""The plain-text preview shows what is trained and what is only context."""

from __future__ import annotations

import pytest

from raytune_ft.data.formats import normalize_row, tokenize_examples
from raytune_ft.data.packing import pack_examples
from raytune_ft.data.pipeline import DataStats
from raytune_ft.data.preview import preview
from raytune_ft.data.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["### Instruction:\nSay hi.\n\n### Response:\nHi there.\n"] * 20, vocab_size=300)


@pytest.fixture(scope="module")
def examples(tok):
    rows = [
        {"instruction": "Say hi.", "output": "Hi there."},
        {"instruction": "Say bye.", "output": "Bye now."},
    ]
    return tokenize_examples("alpaca", [normalize_row("alpaca", r) for r in rows], tok)


def test_masked_prompt_is_bracketed_and_answer_plain(tok, examples):
    text = preview(examples, tok, n=1)
    assert "[[<s>### Instruction:\nSay hi.\n\n### Response:\n]]Hi there.</s>" in text
    assert "--- example 1 of 2: " in text and "Say bye." not in text
    assert "\x1b[" not in text  # no terminal escape codes
    trained = len(tok("Hi there.", add_special_tokens=False)["input_ids"]) + 1
    assert f"{len(examples[0]['input_ids'])} tokens, {trained} trained" in text
    tokens = sum(len(e["input_ids"]) for e in examples)
    trained_both = sum(1 for e in examples for label in e["labels"][1:] if label != -100)
    assert text.splitlines()[-1] == f"examples: 2  tokens: {tokens} ({trained_both} trained)"


def test_packed_rows_show_each_example_and_stats_lines(tok, examples):
    rows = pack_examples(examples, 200)
    stats = DataStats(train_examples=2, train_tokens=50, truncated=1, max_seq_length=200, packed_rows=1,
                      packing_efficiency=0.25)  # fmt: skip
    text = preview(rows, tok, stats=stats)
    assert "packed row of 2 examples" in text
    assert "]]Hi there.</s>\n~~~ next packed example ~~~\n[[<s>### Instruction:\nSay bye." in text
    assert "truncated to max_seq_length 200: 1" in text
    assert "packed rows: 1  packing efficiency: 25.0%" in text
