"""Training the byte-level BPE tokenizer: deterministic, lossless, special tokens, save/load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from raytune_ft.data.formats import CHAT_MARKERS, CHAT_TEMPLATE
from raytune_ft.data.tokenizer import SPECIAL_TOKENS, train_tokenizer
from raytune_ft.errors import UserError

CORPUS = [
    f"def function_{i}(x, y):\n    '''Return x plus {i} times y.'''\n    return x + {i} * y\n"
    for i in range(50)
] + ["Les élèves lisent: «naïve café» — 東京 🚀\ttabs and  double  spaces.\n"] * 10

HARD_TEXTS = [
    "def function_7(x, y):\n    return x + 7 * y\n",
    "unseen wörds, ümlauts & emoji 🙂 and 中文 text\r\n\twith odd   whitespace ",
    "<|user|>\nhi<|end|>\n",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=600)


def test_training_is_deterministic_across_processes(tok, tmp_path):
    """Rust hash maps are seeded per process: train again in a fresh interpreter and compare."""
    (tmp_path / "corpus.json").write_text(json.dumps(CORPUS))
    code = (
        "import json, sys; from raytune_ft.data.tokenizer import train_tokenizer;"
        "print(train_tokenizer(json.load(open(sys.argv[1])), vocab_size=600).backend_tokenizer.to_str())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "corpus.json")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert other == tok.backend_tokenizer.to_str()
    assert train_tokenizer(CORPUS, vocab_size=600).backend_tokenizer.to_str() == other
    assert (
        train_tokenizer(CORPUS, vocab_size=350).backend_tokenizer.to_str() != other
    )  # the comparison can fail


def test_round_trips_any_text(tok):
    for text in HARD_TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # learned merges make seen text shorter than its bytes
    seen = CORPUS[3]
    assert len(tok(seen, add_special_tokens=False)["input_ids"]) < len(seen.encode()) / 2


def test_special_tokens_and_chat_template(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len(tok) <= 600
    for marker in CHAT_MARKERS:  # each marker is one token, never split
        assert tok(marker, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(marker)]
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # tokenizer(text) adds BOS like Llama's
    assert tok.chat_template == CHAT_TEMPLATE


def test_save_and_load_keeps_everything(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in HARD_TEXTS:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    messages = [{"role": "user", "content": "hi"}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|user|>\nhi<|end|>\n<|assistant|>\n"
    )


def test_vocab_size_too_small_is_a_user_error():
    with pytest.raises(UserError, match="at least 264"):
        train_tokenizer(CORPUS, vocab_size=100)
