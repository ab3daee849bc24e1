"""Row validation, loss masks and generation prompts for the alpaca, chat and text formats."""

from __future__ import annotations

import copy

import pytest

from raytune_ft.data.formats import (
    IGNORE_INDEX,
    RowError,
    encode_prompt,
    format_prompt,
    normalize_row,
    render_chat,
    tokenize_example,
    tokenize_examples,
)
from raytune_ft.data.tokenizer import train_tokenizer

CORPUS = [
    "### Instruction:\nWrite a function that adds two numbers.\n\n### Response:\ndef add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Hello there, how are you today?",
    "<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\nParis.<|end|>\n",
] * 20

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


def spans(tok, ex):
    """Decoded maximal runs of (trained?, text)."""
    out: list[tuple[bool, str]] = []
    ids, labels = ex["input_ids"], ex["labels"]
    start = 0
    for j in range(1, len(ids) + 1):
        if j == len(ids) or (labels[j] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            out.append((labels[start] != IGNORE_INDEX, tok.decode(ids[start:j], skip_special_tokens=False)))
            start = j
    return out


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("fmt", "row", "fields", "message"),
    [
        ("alpaca", {"instruction": "x"}, None, "field 'output' is missing"),
        ("alpaca", {"instruction": "x", "output": None}, None, "field 'output' is null"),
        ("alpaca", {"instruction": "x", "output": 3}, None, "field 'output' must be a string, got number"),
        ("alpaca", {"instruction": "  \n", "output": "y"}, None, "field 'instruction' is empty"),
        (
            "alpaca",
            {"instruction": "x", "input": ["a"], "output": "y"},
            None,
            "field 'input' must be a string, got list",
        ),
        (
            "alpaca",
            {"prompt": "x"},
            {"instruction": "prompt", "output": "response"},
            "field 'response' (the output field) is missing",
        ),
        ("text", {"text": ""}, None, "field 'text' is empty"),
        ("text", {"content": "hi"}, None, "field 'text' is missing"),
        ("chat", {"messages": "not json"}, None, "field 'messages' is a string that is not a JSON list"),
        (
            "chat",
            {"messages": {"role": "user"}},
            None,
            "field 'messages' must be a list of messages, got object",
        ),
        ("chat", {"messages": []}, None, "field 'messages' is empty"),
        (
            "chat",
            {"messages": [{"role": "tool", "content": "x"}]},
            None,
            "field 'messages[0].role' is 'tool'; expected one of system/user/assistant",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": 5}]},
            None,
            "field 'messages[0].content' must be a string, got number",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
            None,
            "field 'messages[1].content' is missing",
        ),
        ("chat", {"messages": [{"role": "user", "content": "hi"}]}, None, "has no assistant message"),
        (
            "chat",
            {"conversation": [{"role": "user", "content": "hi"}]},
            {"messages": "conversation"},
            "field 'conversation' (the messages field) has no assistant message",
        ),
    ],
)
def test_bad_rows_say_what_is_wrong(fmt, row, fields, message):
    with pytest.raises(RowError) as err:
        normalize_row(fmt, row, fields)
    assert message in str(err.value)


def test_normalize_maps_fields_and_accepts_json_text_messages():
    row = {"prompt": "Add", "ctx": "", "response": "3", "extra": 1}
    fields = {"instruction": "prompt", "input": "ctx", "output": "response"}
    assert normalize_row("alpaca", row, fields) == {
        "instruction": "Add",
        "input": None,
        "output": "3",
        "system": None,
    }
    csv_row = {
        "messages": '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "x": 1}]',
        "system": "Be nice.",
    }
    assert normalize_row("chat", csv_row)["messages"] == [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]


# --------------------------------------------------------------------------- loss masks


def test_alpaca_masks_the_prompt(tok):
    row = normalize_row(
        "alpaca", {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."}
    )
    ex = tokenize_example("alpaca", row, tok)
    prompt = encode_prompt("alpaca", tok, instruction="Add the numbers.", input="2 and 3")
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert ex["input_ids"][: len(prompt)] == prompt
    assert ex["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert ex["labels"][len(prompt) :] == ex["input_ids"][len(prompt) :]
    assert spans(tok, ex) == [
        (False, "<s>### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"),
        (True, "The sum is 5.</s>"),
    ]
    full = tokenize_example("alpaca", row, tok, train_on_prompt=True)
    assert full["input_ids"] == ex["input_ids"] and full["labels"] == full["input_ids"]


def test_alpaca_without_input_and_with_system(tok):
    row = normalize_row(
        "alpaca", {"instruction": "Greet.", "input": "", "output": "Hello.", "system": "You are kind."}
    )
    assert spans(tok, tokenize_example("alpaca", row, tok)) == [
        (False, "<s>You are kind.\n\n### Instruction:\nGreet.\n\n### Response:\n"),
        (True, "Hello.</s>"),
    ]


def test_chat_trains_only_assistant_turns_with_builtin_template(tok):
    ex = tokenize_example("chat", normalize_row("chat", {"messages": CONVERSATION}), tok)
    assert spans(tok, ex) == [
        (False, "<s><|system|>\nBe brief.<|end|>\n<|user|>\nCapital of France?<|end|>\n<|assistant|>\n"),
        (True, "Paris.<|end|>\n"),
        (False, "<|user|>\nAnd of Italy?<|end|>\n<|assistant|>\n"),
        (True, "Rome.<|end|>\n</s>"),
    ]
    full = tokenize_example(
        "chat", normalize_row("chat", {"messages": CONVERSATION}), tok, train_on_prompt=True
    )
    assert full["labels"] == full["input_ids"] == ex["input_ids"]


def test_chat_uses_the_tokenizers_own_template(tok):
    chatml = copy.deepcopy(tok)
    chatml.chat_template = CHATML
    ex = tokenize_example("chat", normalize_row("chat", {"messages": CONVERSATION}), chatml)
    trained = [text for is_trained, text in spans(chatml, ex) if is_trained]
    assert trained == ["Paris.<|im_end|>\n", "Rome.<|im_end|>\n</s>"]
    assert "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n" in spans(chatml, ex)[2][1]


def test_builtin_python_render_matches_the_attached_jinja_template(tok):
    for messages in (CONVERSATION, CONVERSATION[1:3], CONVERSATION[:2]):
        for gen in (False, True):
            assert render_chat(None, messages, add_generation_prompt=gen) == render_chat(
                tok, messages, add_generation_prompt=gen
            )
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    row = normalize_row("chat", {"messages": CONVERSATION})
    assert tokenize_example("chat", row, no_template) == tokenize_example("chat", row, tok)


def test_text_is_all_trained(tok):
    ex = tokenize_example("text", {"text": "The quick brown fox."}, tok)
    assert ex["labels"] == ex["input_ids"]
    assert tok.decode(ex["input_ids"], skip_special_tokens=False) == "<s>The quick brown fox.</s>"


def test_eos_is_not_doubled_and_bos_only_when_distinct(tok):
    ex = tokenize_example("text", {"text": "Hello</s>"}, tok)
    assert ex["input_ids"][-1] == tok.eos_token_id and ex["input_ids"][-2] != tok.eos_token_id
    gpt2_style = copy.deepcopy(tok)
    gpt2_style.bos_token = gpt2_style.eos_token  # GPT-2 convention: no separate BOS
    ex = tokenize_example("text", {"text": "Hello"}, gpt2_style)
    assert ex["input_ids"][0] != gpt2_style.eos_token_id
    assert gpt2_style.decode(ex["input_ids"], skip_special_tokens=False) == "Hello</s>"


def test_batched_tokenization_equals_one_by_one(tok):
    rows = [normalize_row("alpaca", {"instruction": f"Task {i}", "output": "x" * i}) for i in range(1, 6)]
    assert tokenize_examples("alpaca", rows, tok) == [tokenize_example("alpaca", r, tok) for r in rows]


# --------------------------------------------------------------------------- generation prompts


def test_generation_prompt_is_the_training_prefix(tok):
    # alpaca
    text = format_prompt("alpaca", tok, instruction="Greet.")
    assert text == "### Instruction:\nGreet.\n\n### Response:\n"
    ids = encode_prompt("alpaca", tok, instruction="Greet.")
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    # chat: the history up to the last user turn, plus the generation prompt, tokenized as in training
    ex = tokenize_example("chat", normalize_row("chat", {"messages": CONVERSATION}), tok)
    ids = encode_prompt("chat", tok, messages=CONVERSATION[:4])
    assert ex["input_ids"][: len(ids)] == ids
    assert ex["labels"][len(ids) - 1] == IGNORE_INDEX and ex["labels"][len(ids)] != IGNORE_INDEX
    assert format_prompt("chat", tok, messages=CONVERSATION[:4]).endswith(
        "And of Italy?<|end|>\n<|assistant|>\n"
    )
    # chat from a bare instruction, and text as plain continuation
    assert format_prompt("chat", tok, instruction="Hi", system="Be brief.") == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
    )
    assert format_prompt("text", tok, instruction="Once upon") == "Once upon"
