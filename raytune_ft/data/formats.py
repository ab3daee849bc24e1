"""Row formats (alpaca, chat, text): validation, prompt rendering and tokenization with a loss mask.

A row is first *normalized* into its canonical fields (``fields`` maps a canonical name to the file's
column), then *rendered* into segments ``(text, trained)``, then tokenized segment by segment. Tokenizing
segments separately (as torchtune does per message) means the prompt's tokens are exactly the ones
:func:`encode_prompt` produces at generation time.

Special tokens: a BOS is prepended when the tokenizer has one distinct from its EOS and the rendered text
does not already start with it; an EOS is appended to every example (trained, so the model learns to stop).

Alpaca template (the prompt is everything up to and including ``### Response:\\n``)::

    {system}\\n\\n                   (only when a system field is given)
    ### Instruction:\\n{instruction}\\n\\n
    ### Input:\\n{input}\\n\\n         (only when input is non-empty)
    ### Response:\\n{output}<eos>

Chat: the tokenizer's chat template when it has one, else :data:`CHAT_TEMPLATE`
(``<|role|>\\n{content}<|end|>\\n`` per message, ``<|assistant|>\\n`` as the generation prompt). Only
assistant turns are trained: the text a template adds for an assistant message (its content, end marker
and anything up to the next message) is found by rendering growing prefixes of the conversation.

Text: the whole text is trained.

Two formats feed the other objectives (``method.objective``), not next-token training:

- ``preference`` ``{prompt, chosen, rejected}`` (reward, dpo, orpo): each a string, or a list of chat messages
  (the prompt's turns; the completions' assistant turns). A string beside a list is taken as one user
  (prompt) or assistant (completion) turn. :func:`preference_texts` renders a pair to the texts the trainers
  read: the prompt (chat: with the generation prompt) and each completion as the text that follows it.
- ``scored`` ``{text | messages | instruction/input/output, label}`` (regression): one text and a float
  label; :func:`tokenize_scored` gives ``input_ids`` (BOS, no EOS: the head reads the last text token) and
  the float ``labels``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from raytune_ft.errors import UserError

FORMATS = ("alpaca", "chat", "text", "preference", "scored")
OBJECTIVE_FORMATS = ("preference", "scored")  # not next-token data: the pipeline keeps them whole
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100

CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

Segment = tuple[str, bool]  # (text, trained)
Example = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]}


class RowError(ValueError):
    """A row is unusable; the message says what is wrong but not where (the caller adds file:line)."""


# --------------------------------------------------------------------------- validation


def normalize_row(
    fmt: str, row: Mapping[str, Any], fields: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The canonical fields of one row for ``fmt``; raises :class:`RowError` saying what is wrong."""
    get = _FieldGetter(row, fields or {})
    if fmt == "alpaca":
        return {
            "instruction": get.text("instruction"),
            "input": get.text("input", required=False),
            "output": get.text("output"),
            "system": get.text("system", required=False),
        }
    if fmt == "chat":
        messages = _messages(get)
        system = get.text("system", required=False)
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return {"messages": messages}
    if fmt == "text":
        return {"text": get.text("text")}
    if fmt == "preference":
        return _preference(get)
    if fmt == "scored":
        return _scored(get)
    raise UserError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _preference(get: _FieldGetter) -> dict[str, Any]:
    parts = {k: get.raw(k) for k in ("prompt", "chosen", "rejected")}
    for k, v in parts.items():
        if not isinstance(v, list):
            parts[k] = get.text(k)  # a string (or says what is missing/wrong)
    if not any(isinstance(v, list) for v in parts.values()):
        if parts["chosen"] == parts["rejected"]:
            raise RowError(f"fields {get.name('chosen')} and {get.name('rejected')} are the same text")
        return parts
    turns = {}
    for k, v in parts.items():
        if isinstance(v, str):
            turns[k] = [{"role": "user" if k == "prompt" else "assistant", "content": v}]
        else:
            turns[k] = _message_list(get, k, v, require_assistant=False)
            if k != "prompt" and any(m["role"] != "assistant" for m in turns[k]):
                raise RowError(f"field {get.name(k)} must hold assistant messages only (the completion)")
    if turns["prompt"][-1]["role"] == "assistant":
        raise RowError(f"field {get.name('prompt')} ends with an assistant message; a prompt ends with a user turn")
    if turns["chosen"] == turns["rejected"]:
        raise RowError(f"fields {get.name('chosen')} and {get.name('rejected')} are the same conversation")
    return turns


def _scored(get: _FieldGetter) -> dict[str, Any]:
    value = get.raw("label")
    if value is None:
        raise RowError(f"field {get.name('label')} is {'null' if get.present('label') else 'missing'}")
    if isinstance(value, str):  # CSV cells
        try:
            value = float(value)
        except ValueError:
            raise RowError(f"field {get.name('label')} must be a number, got the text {value[:40]!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(f"field {get.name('label')} must be a number, got {_type_name(value)}")
    if value != value or value in (float("inf"), float("-inf")):
        raise RowError(f"field {get.name('label')} must be a finite number, got {value}")
    if get.present("text"):
        return {"text": get.text("text"), "label": float(value)}
    if get.present("messages"):
        return {"messages": _messages(get, require_assistant=False), "label": float(value)}
    if get.present("instruction"):
        return {"instruction": get.text("instruction"), "input": get.text("input", required=False),
                "output": get.text("output", required=False), "system": get.text("system", required=False),
                "label": float(value)}
    raise RowError(f"needs a text: field {get.name('text')}, {get.name('messages')} or {get.name('instruction')}")


class _FieldGetter:
    def __init__(self, row: Mapping[str, Any], fields: Mapping[str, str]):
        self.row, self.fields = row, fields

    def column(self, canonical: str) -> str:
        return self.fields.get(canonical, canonical)

    def name(self, canonical: str) -> str:
        column = self.column(canonical)
        return f"'{column}'" if column == canonical else f"'{column}' (the {canonical} field)"

    def raw(self, canonical: str) -> Any:
        return self.row.get(self.fields.get(canonical, canonical))

    def present(self, canonical: str) -> bool:
        return self.fields.get(canonical, canonical) in self.row

    def text(self, canonical: str, *, required: bool = True) -> str | None:
        value = self.raw(canonical)
        if value is None:
            if required:
                what = "is null" if self.present(canonical) else "is missing"
                raise RowError(f"field {self.name(canonical)} {what}")
            return None
        if not isinstance(value, str):
            raise RowError(f"field {self.name(canonical)} must be a string, got {_type_name(value)}")
        if not value.strip():
            if required:
                raise RowError(f"field {self.name(canonical)} is empty")
            return None
        return value


def _messages(get: _FieldGetter, *, require_assistant: bool = True) -> list[dict[str, str]]:
    field = get.name("messages")
    value = get.raw("messages")
    if value is None:
        raise RowError(f"field {field} is {'null' if get.present('messages') else 'missing'}")
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"field {field} is a string that is not a JSON list of messages")
    return _message_list(get, "messages", value, require_assistant=require_assistant)


def _message_list(get: _FieldGetter, canonical: str, value: Any, *, require_assistant: bool) -> list[dict[str, str]]:
    field = get.name(canonical)
    if not isinstance(value, list):
        raise RowError(f"field {field} must be a list of messages, got {_type_name(value)}")
    if not value:
        raise RowError(f"field {field} is empty")
    messages = []
    for i, m in enumerate(value):
        where = f"field '{get.column(canonical)}[{i}]"
        if not isinstance(m, dict):
            raise RowError(f"{where}' must be an object with role and content, got {_type_name(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            got = "missing" if role is None else repr(role)
            raise RowError(f"{where}.role' is {got}; expected one of {'/'.join(ROLES)}")
        if content is None:
            raise RowError(f"{where}.content' is missing")
        if not isinstance(content, str):
            raise RowError(f"{where}.content' must be a string, got {_type_name(content)}")
        if not content.strip():
            raise RowError(f"{where}.content' is empty")
        messages.append({"role": role, "content": content})
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise RowError(f"field {field} has no assistant message (nothing to train on)")
    return messages


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "list", bool: "boolean", int: "number", float: "number", bytes: "bytes"}
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------- rendering


def alpaca_prompt(instruction: str, input: str | None = None, system: str | None = None) -> str:
    """The alpaca prompt text (see the module docstring); the response follows it directly."""
    parts = [f"{system}\n\n"] if system else []
    parts.append(f"### Instruction:\n{instruction}\n\n")
    if input:
        parts.append(f"### Input:\n{input}\n\n")
    parts.append("### Response:\n")
    return "".join(parts)


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool) -> str:
    """A conversation rendered with the tokenizer's chat template, or :data:`CHAT_TEMPLATE` without one."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # jinja2 raise_exception(...) from templates that reject a conversation
            raise RowError(f"the tokenizer's chat template rejects this conversation: {e}")
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def render_segments(
    fmt: str, example: Mapping[str, Any], tokenizer: Any, *, add_generation_prompt: bool = False
) -> list[Segment]:
    """The text of a normalized example split into ``(text, trained)`` segments."""
    if fmt == "alpaca":
        prompt = alpaca_prompt(example["instruction"], example.get("input"), example.get("system"))
        return [(prompt, False)] + ([(example["output"], True)] if example.get("output") else [])
    if fmt == "text":
        return [(example["text"], True)]
    if fmt == "chat":
        return _chat_segments(tokenizer, example["messages"], add_generation_prompt)
    raise UserError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _chat_segments(
    tokenizer: Any, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool
) -> list[Segment]:
    segments: list[Segment] = []
    done = ""  # the rendered text covered by `segments` so far
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        full = render_chat(tokenizer, messages[: i + 1], add_generation_prompt=False)
        _check_prefix(done, prompt)
        _check_prefix(prompt, full)
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    rest = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    _check_prefix(done, rest)
    segments.append((rest[len(done) :], False))
    return [s for s in segments if s[0]]


def _check_prefix(prefix: str, text: str) -> None:
    if not text.startswith(prefix):
        raise UserError(
            "the tokenizer's chat template renders a conversation differently from its own beginning, "
            "so the assistant turns cannot be located for the loss mask",
            hint="use a tokenizer whose chat template only appends per message, or format: text",
        )


# --------------------------------------------------------------------------- tokenization


def tokenize_examples(
    fmt: str, examples: Sequence[Mapping[str, Any]], tokenizer: Any, *, train_on_prompt: bool = False
) -> list[Example]:
    """Tokenize normalized examples into ``input_ids`` and ``labels`` (-100 where no loss is taken)."""
    eos = _eos_id(tokenizer)
    all_segments = [render_segments(fmt, ex, tokenizer) for ex in examples]
    flat = [text for segs in all_segments for text, _ in segs]
    encoded = iter(_encode(tokenizer, flat))
    out = []
    for segs in all_segments:
        input_ids: list[int] = []
        labels: list[int] = []
        for n, (_, trained) in enumerate(segs):
            ids = next(encoded)
            if n == 0:
                ids = _with_bos(tokenizer, ids)
            input_ids += ids
            labels += ids if (trained or train_on_prompt) else [IGNORE_INDEX] * len(ids)
        if not input_ids or input_ids[-1] != eos:
            input_ids.append(eos)
            labels.append(eos)
        out.append({"input_ids": input_ids, "labels": labels})
    return out


def tokenize_example(
    fmt: str, example: Mapping[str, Any], tokenizer: Any, *, train_on_prompt: bool = False
) -> Example:
    """:func:`tokenize_examples` for one example."""
    return tokenize_examples(fmt, [example], tokenizer, train_on_prompt=train_on_prompt)[0]


def _encode(tokenizer: Any, texts: list[str], chunk: int = 4096) -> list[list[int]]:
    out: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        out += tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]
    return out


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos == getattr(tokenizer, "eos_token_id", None) or (ids and ids[0] == bos):
        return ids
    return [bos] + ids


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UserError(
            "the tokenizer has no eos_token; every example ends with one", hint="set tokenizer.eos_token"
        )
    return eos


def scored_text(example: Mapping[str, Any], tokenizer: Any) -> str:
    """The text a ``scored`` example is scored on (chat: the whole conversation in the chat template)."""
    if "text" in example:
        return example["text"]
    if "messages" in example:
        return render_chat(tokenizer, example["messages"], add_generation_prompt=False)
    return alpaca_prompt(example["instruction"], example.get("input"), example.get("system")) + (
        example.get("output") or "")


def tokenize_scored(examples: Sequence[Mapping[str, Any]], tokenizer: Any) -> list[dict[str, Any]]:
    """``{input_ids, labels}`` per scored example: BOS + the text's tokens (no EOS: the head reads the last
    token of the text, which must not be a pad token), ``labels`` the float label."""
    encoded = _encode(tokenizer, [scored_text(ex, tokenizer) for ex in examples])
    return [{"input_ids": _with_bos(tokenizer, ids), "labels": float(ex["label"])}
            for ids, ex in zip(encoded, examples, strict=True)]


def preference_texts(example: Mapping[str, Any], tokenizer: Any) -> dict[str, str]:
    """A ``preference`` pair as the texts TRL's trainers read: ``prompt`` (chat: rendered with the generation
    prompt) and ``chosen``/``rejected``, each the text that follows the prompt (EOS added by the trainers)."""
    if isinstance(example["prompt"], str):
        return {k: example[k] for k in ("prompt", "chosen", "rejected")}
    prompt = render_chat(tokenizer, example["prompt"], add_generation_prompt=True)
    out = {"prompt": prompt}
    for k in ("chosen", "rejected"):
        full = render_chat(tokenizer, [*example["prompt"], *example[k]], add_generation_prompt=False)
        _check_prefix(prompt, full)
        out[k] = full[len(prompt):]
    return out


def tokenize_preference(texts: Sequence[Mapping[str, str]], tokenizer: Any,
                        max_len: int | None = None) -> list[dict[str, list[int]]]:
    """``{chosen_ids, rejected_ids}`` (prompt + completion + EOS, BOS first; TRL's reward-model columns),
    truncated to ``max_len`` keeping the beginning."""
    eos = _eos_id(tokenizer)
    out = []
    for t in texts:
        row = {}
        for k in ("chosen", "rejected"):
            prompt, completion = _encode(tokenizer, [t["prompt"], t[k]])
            ids = _with_bos(tokenizer, prompt) + completion + [eos]
            row[f"{k}_ids"] = ids[:max_len] if max_len else ids
        out.append(row)
    return out


# --------------------------------------------------------------------------- generation prompts


def format_prompt(
    fmt: str,
    tokenizer: Any,
    *,
    instruction: str | None = None,
    input: str | None = None,
    system: str | None = None,
    messages: Iterable[Mapping[str, str]] | None = None,
) -> str:
    """The prompt text for generation, formatted as training formatted it (without BOS).

    alpaca: ``instruction`` (+ ``input``, ``system``); chat: ``messages`` (history ending with a user turn),
    rendered with the generation prompt; text: ``instruction`` as is (plain continuation).
    """
    return "".join(text for text, _ in _prompt_segments(fmt, tokenizer, instruction, input, system, messages))


def encode_prompt(
    fmt: str,
    tokenizer: Any,
    *,
    instruction: str | None = None,
    input: str | None = None,
    system: str | None = None,
    messages: Iterable[Mapping[str, str]] | None = None,
) -> list[int]:
    """The prompt's token ids exactly as training produced them (BOS included); feed these to ``generate``."""
    segments = _prompt_segments(fmt, tokenizer, instruction, input, system, messages)
    encoded = _encode(tokenizer, [text for text, _ in segments])
    ids: list[int] = []
    for n, part in enumerate(encoded):
        ids += _with_bos(tokenizer, part) if n == 0 else part
    return ids or _with_bos(tokenizer, [])


def _prompt_segments(
    fmt: str,
    tokenizer: Any,
    instruction: str | None,
    input: str | None,
    system: str | None,
    messages: Iterable[Mapping[str, str]] | None,
) -> list[Segment]:
    if fmt == "alpaca":
        if instruction is None:
            raise UserError("an alpaca prompt needs an instruction")
        return [(alpaca_prompt(instruction, input, system), False)]
    if fmt in ("text", "preference"):  # a DPO/ORPO run on string prompts: the prompt as it is (--format chat else)
        return [(instruction or "", False)]
    if fmt == "scored":
        raise UserError("a regression run scores texts, it does not generate: use rtf score SOURCE --file TEXTS")
    if fmt == "chat":
        msgs = [{"role": m["role"], "content": m["content"]} for m in (messages or [])]
        if not msgs and instruction is not None:
            msgs = [{"role": "user", "content": instruction}]
        if system and (not msgs or msgs[0]["role"] != "system"):
            msgs.insert(0, {"role": "system", "content": system})
        return _chat_segments(tokenizer, msgs, add_generation_prompt=True)
    raise UserError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
