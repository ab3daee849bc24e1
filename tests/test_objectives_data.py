"""The preference and scored formats: validation with file:line, skipping, weights, splits, preview."""

from __future__ import annotations

import json

import pytest

from raytune_ft.data.formats import RowError, normalize_row, preference_texts, tokenize_preference
from raytune_ft.data.pipeline import build_datasets
from raytune_ft.data.preview import preview
from raytune_ft.data.tokenizer import train_tokenizer
from raytune_ft.errors import DataError, UserError
from tests.objective_data import preference_rows, scored_rows, write_jsonl


@pytest.fixture(scope="module")
def tok():
    texts = [r["text"] for r in scored_rows(200)] + [r["prompt"] + r["chosen"] + r["rejected"]
                                                     for r in preference_rows(50)]
    return train_tokenizer(texts, vocab_size=300)


def data(path, fmt, **over):
    return {"train": [{"path": str(path), "format": fmt}], "on_bad_row": "error", **over}


BAD_SCORED = [
    (b'{"text": "a b"}', "field 'label' is missing"),
    (b'{"text": "a b", "label": "high"}', "field 'label' must be a number, got the text 'high'"),
    (b'{"text": "a b", "label": true}', "field 'label' must be a number, got boolean"),
    (b'{"text": "a b", "label": NaN}', "field 'label' must be a finite number"),
    (b'{"label": 1.0}', "needs a text: field 'text', 'messages' or 'instruction'"),
    (b'{"messages": [{"role": "robot", "content": "x"}], "label": 1}', "field 'messages[0].role' is 'robot'"),
]
BAD_PREFERENCE = [
    (b'{"prompt": "q", "chosen": "a"}', "field 'rejected' is missing"),
    (b'{"prompt": "q", "chosen": "a", "rejected": "a"}', "fields 'chosen' and 'rejected' are the same text"),
    (b'{"prompt": "q", "chosen": 3, "rejected": "a"}', "field 'chosen' must be a string, got number"),
    (b'{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], '
     b'"rejected": "b"}', "field 'chosen' must hold assistant messages only"),
    (b'{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "x", '
     b'"rejected": "y"}', "field 'prompt' ends with an assistant message"),
]


@pytest.mark.parametrize(("fmt", "bad", "problem"), [("scored", b, p) for b, p in BAD_SCORED]
                         + [("preference", b, p) for b, p in BAD_PREFERENCE])
def test_bad_rows_are_named_by_file_and_line(tmp_path, tok, fmt, bad, problem):
    good = scored_rows(2) if fmt == "scored" else preference_rows(2)
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in good) + bad + b"\n")
    with pytest.raises(DataError) as err:
        build_datasets(data(path, fmt), tok, seed=0)
    assert err.value.message.startswith(f"{path}:3: {problem}"), err.value.message
    assert err.value.message.endswith(f"(format {fmt})")
    assert err.value.exit_code == 2


def test_scored_rows_weights_split_and_label_summary(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", scored_rows(20, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", scored_rows(10, seed=2))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(a.read_text() + '{"text": "x"}\n')
    spec = {"train": [{"path": str(bad), "format": "scored", "weight": 2.0},
                      {"path": str(b), "format": "scored", "weight": 0.5}],
            "eval_split": 0.25, "on_bad_row": "skip", "max_seq_length": 4}
    train, evals, stats = build_datasets(spec, tok, seed=3)
    assert stats.skipped == {str(bad): 1}
    assert (len(evals), len(train)) == (5 + 2, 2 * 15 + round(0.5 * 8))  # split before weighting
    assert all(isinstance(ex["labels"], float) and len(ex["input_ids"]) <= 4 for ex in train + evals)
    assert stats.truncated > 0
    assert {json.dumps(ex, sort_keys=True) for ex in evals}.isdisjoint(json.dumps(ex, sort_keys=True) for ex in train)
    labels = [ex["labels"] for ex in train]
    line = next(x for x in stats.lines() if x.startswith("labels:"))
    assert f"n {len(labels)}" in line and f"mean {sum(labels) / len(labels):.4g}" in line
    again, _, _ = build_datasets(spec, tok, seed=3)
    assert again == train
    text = preview(train, tok, n=2, stats=stats)
    assert f"label {train[0]['labels']:.6g}" in text and "labels: n" in text


def test_scored_text_forms(tok):
    alpaca = normalize_row("scored", {"instruction": "Rate", "output": "ok", "label": "0.5"})
    assert alpaca["label"] == 0.5 and alpaca["instruction"] == "Rate"
    chat = normalize_row("scored", {"messages": [{"role": "user", "content": "hi"}], "label": 2})
    assert chat == {"messages": [{"role": "user", "content": "hi"}], "label": 2.0}  # no assistant needed
    with pytest.raises(RowError, match="'score' \\(the label field\\) is missing"):
        normalize_row("scored", {"text": "a"}, {"label": "score"})


def test_preference_strings_and_chat(tmp_path, tok):
    plain = write_jsonl(tmp_path / "p.jsonl", preference_rows(10))
    chat = write_jsonl(tmp_path / "c.jsonl", preference_rows(10, chat=True))
    train, evals, stats = build_datasets(data(plain, "preference", eval={"path": str(chat), "format": "preference"}),
                                         tok, seed=0)
    assert len(train) == len(evals) == 10
    assert train[0].keys() == {"prompt", "chosen", "rejected"}
    assert evals[0]["prompt"].startswith("<|user|>\n") and evals[0]["prompt"].endswith("<|assistant|>\n")
    assert evals[0]["chosen"] == "yes it is<|end|>\n" and evals[0]["rejected"] == "no it is not<|end|>\n"
    assert stats.train_tokens > 0
    # a string beside lists is one turn of the right role
    mixed = normalize_row("preference", {"prompt": "q?", "chosen": [{"role": "assistant", "content": "a"}],
                                         "rejected": "b"})
    assert mixed["prompt"] == [{"role": "user", "content": "q?"}]
    assert mixed["rejected"] == [{"role": "assistant", "content": "b"}]
    ids = tokenize_preference([preference_texts(mixed, tok)], tok, max_len=12)[0]
    assert len(ids["chosen_ids"]) <= 12 and ids["chosen_ids"] != ids["rejected_ids"]
    text = preview(train, tok, n=1, stats=stats)
    assert "--- pair 1 of 10 ---" in text and "chosen:\nyes it is" in text


def test_mixed_objective_and_sft_formats_are_refused(tmp_path, tok):
    s = write_jsonl(tmp_path / "s.jsonl", scored_rows(4))
    p = write_jsonl(tmp_path / "p.jsonl", preference_rows(4))
    spec = {"train": [{"path": str(s), "format": "scored"}, {"path": str(p), "format": "preference"}]}
    with pytest.raises(UserError, match="mix the formats preference, scored"):
        build_datasets(spec, tok, seed=0)
