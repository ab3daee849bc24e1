"""Plain-text preview of tokenized examples with the loss mask visible (no terminal codes needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from raytune_ft.data.formats import IGNORE_INDEX
from raytune_ft.data.packing import token_count, trained_token_count

OPEN, CLOSE = "[[", "]]"
LEGEND = f"text inside {OPEN} {CLOSE} is context only (no loss); everything else is trained"


def preview(
    examples: Sequence[Mapping[str, Sequence[int]]], tokenizer: Any, n: int = 3, stats: Any = None
) -> str:
    """The first ``n`` examples (or packed rows) decoded, masked spans in ``[[ ]]``, then the statistics.

    A token counts as trained when it is a loss target: its label is not -100 and it is not the first token
    of its sequence (causal LMs never predict a sequence's first token). ``stats`` is a
    :class:`~raytune_ft.data.pipeline.DataStats`; without it a short summary of ``examples`` is printed.
    """
    if examples and ("prompt" in examples[0] or not isinstance(examples[0].get("labels", []), list)):
        return _preview_whole(examples, tokenizer, n, stats)
    out = [LEGEND, ""]
    for i, row in enumerate(examples[:n]):
        ids, labels = list(row["input_ids"]), list(row["labels"])
        starts = _sequence_starts(row)
        trained = [lab != IGNORE_INDEX and j not in starts for j, lab in enumerate(labels)]
        head = f"--- example {i + 1} of {len(examples)}: {len(ids)} tokens, {sum(trained)} trained"
        out.append(
            head + (f", packed row of {len(starts)} examples" if "position_ids" in row else "") + " ---"
        )
        pieces = []
        for j, (a, b, is_trained) in enumerate(_runs(trained, starts)):
            if j and a in starts:
                pieces.append("\n~~~ next packed example ~~~\n")
            text = tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(text if is_trained else f"{OPEN}{text}{CLOSE}")
        out.append("".join(pieces))
        out.append("")
    out += stats.lines() if stats is not None else _summary(examples)
    return "\n".join(out)


def _preview_whole(examples: Sequence[Mapping[str, Any]], tokenizer: Any, n: int, stats: Any) -> str:
    """Preference pairs (prompt, chosen, rejected texts) and scored texts (with their labels): no loss mask."""
    out = []
    for i, row in enumerate(examples[:n]):
        if "prompt" in row:
            out += [f"--- pair {i + 1} of {len(examples)} ---", f"prompt:\n{row['prompt']}",
                    f"chosen:\n{row['chosen']}", f"rejected:\n{row['rejected']}", ""]
        else:
            text = tokenizer.decode(row["input_ids"], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            out += [f"--- example {i + 1} of {len(examples)}: {len(row['input_ids'])} tokens, "
                    f"label {row['labels']:.6g} ---", text, ""]
    out += stats.lines() if stats is not None else [f"examples: {len(examples)}"]
    return "\n".join(out)


def _sequence_starts(row: Mapping[str, Sequence[int]]) -> set[int]:
    positions = row.get("position_ids")
    if positions is None:
        return {0}
    return {j for j, p in enumerate(positions) if p == 0}


def _runs(trained: list[bool], starts: set[int]) -> list[tuple[int, int, bool]]:
    """Maximal spans ``(start, end, trained)``; a sequence start always begins a new span."""
    runs: list[tuple[int, int, bool]] = []
    start = 0
    for j in range(1, len(trained) + 1):
        if j == len(trained) or trained[j] != trained[start] or j in starts:
            runs.append((start, j, trained[start]))
            start = j
    return runs


def _summary(examples: Sequence[Mapping[str, Sequence[int]]]) -> list[str]:
    return [
        f"examples: {len(examples)}  tokens: {token_count(examples)} ({trained_token_count(examples)} trained)"
    ]


def preview_data(spec: Any, n: int = 3) -> str:
    """`rtf data preview SPEC`: tokenize the spec's data as a run would and render ``n`` examples and
    the statistics. A spec that trains its tokenizer gets one trained here the same way."""
    from raytune_ft.data.hub_tokenizer import load_tokenizer
    from raytune_ft.data.pipeline import build_datasets, training_texts
    from raytune_ft.data.tokenizer import train_tokenizer

    if spec.tokenizer.train is not None:
        tr = spec.tokenizer.train
        tok = train_tokenizer(training_texts(spec.data), tr.vocab_size, min_frequency=tr.min_frequency)
        where = f"BPE trained on the training data ({len(tok)} tokens)"
    else:
        src = spec.tokenizer.name_or_path or spec.model.name_or_path
        field = "tokenizer.name_or_path" if spec.tokenizer.name_or_path else "model.name_or_path"
        tok = load_tokenizer(src, field=field, trust_remote_code=spec.model.trust_remote_code)
        where = src
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    seed = spec.training.data_seed if spec.training.data_seed is not None else spec.training.seed
    train, _, stats = build_datasets(spec.data, tok, seed=seed, batch_size=spec.training.per_device_train_batch_size)
    return f"tokenizer: {where}\n" + preview(train, tok, n=n, stats=stats)
