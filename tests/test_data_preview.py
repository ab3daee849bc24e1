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


# ---- issue 12 item 24: a hub id with no network fails in seconds with one line (it retried ~50 s, then a
# 123-line traceback). A subprocess per case: the Hub client reads HF_HUB_OFFLINE / HF_ENDPOINT at import.


def _preview(tmp_path, env_extra: dict, model: str = "someorg/not-a-cached-model"):
    import os
    import subprocess
    import sys
    import time

    import yaml

    (tmp_path / "train.jsonl").write_text('{"instruction": "Say hi.", "output": "Hi there."}\n')
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "prev", "model": {"name_or_path": model},
                                    "data": {"train": {"path": str(tmp_path / "train.jsonl")}, "max_seq_length": 64},
                                    "training": {"max_steps": 1}}))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env.update({"HF_HUB_CACHE": str(tmp_path / "hf_cache"), **env_extra})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "raytune_ft", "data", "preview", str(spec), "-n", "1"],
                       capture_output=True, text=True, env={**env, "PYTHONPATH": root}, timeout=120)
    return p.returncode, p.stdout + p.stderr, time.time() - t0


def _one_line(out: str) -> str:
    lines = [x for x in out.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


def test_offline_and_uncached_hub_id_is_one_line(tmp_path):
    code, out, took = _preview(tmp_path, {"HF_HUB_OFFLINE": "1"})
    line = _one_line(out)
    assert code == 2
    assert line.startswith("error: model.name_or_path someorg/not-a-cached-model: not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE" in line and "local directory" in line
    assert took < 30  # a hang guard (it took ~50 s of retries before); the check itself is instant


def test_unreachable_hub_endpoint_is_one_line(tmp_path):
    from tests.s3server import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    code, out, took = _preview(tmp_path, {"HF_ENDPOINT": endpoint})
    line = _one_line(out)
    assert code == 2
    assert f"the Hugging Face Hub at {endpoint} is unreachable (connection refused)" in line
    assert "not in the local cache" in line and "HF_HUB_OFFLINE=1" in line and "HF_ENDPOINT" in line
    assert took < 30


def test_unreachable_hub_uses_a_cached_tokenizer(tmp_path, tok):
    """Cached (here: laid out in the Hub cache format by hand), the preview works with the Hub down, at once."""
    from tests.s3server import free_port

    snap = tmp_path / "hf_cache" / "models--someorg--cached-tok" / "snapshots" / ("0" * 40)
    tok.save_pretrained(str(snap))
    (snap / "config.json").write_text('{"model_type": "llama"}')  # a Hub repo's model config: AutoTokenizer reads it
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    code, out, _ = _preview(tmp_path, {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}, model="someorg/cached-tok")
    assert code == 0, out
    assert "tokenizer: someorg/cached-tok" in out and "Hi there." in out
