"""Attention over packed rows on CPU: what does a packed batch cost with today's path and with per-example
attention? (issue 17, item 5: "packed rows cost what their examples cost").

Today (transformers' ``sdpa`` on rows from :func:`raytune_ft.data.packing.collate_packed`): no attention mask
is passed, transformers derives a block-diagonal causal mask ``[B, 1, L, L]`` from ``position_ids`` and SDPA
runs with that explicit mask, so every row costs ``L²`` whatever its examples, and the masked kernel is
slower per position than the ``is_causal`` one. Candidates, all exact (same logits and gradients):

  segments  split each row at its example boundaries; one ``is_causal`` SDPA call per example (the winner:
            rtf's ``rtf_packed_sdpa``, raytune_ft/train/attention.py, is what runs under this name)
  gather    gather all examples of the batch into one right-padded ``[n_examples, H, Lmax, d]`` batch, one
            ``is_causal`` SDPA call (padding after the end of an example is never seen by its real queries)
  buckets   gather, with examples grouped by length (one call per power-of-two length class), so a short
            example is not padded to the longest one
  padded    for scale only, not a candidate: the same examples unpacked, right-padded ``[n, longest]``
            batches of 8 with an attention mask (what a plain HF script computes)

Each case: forward + backward (full fine-tuning, ``loss.backward()``) of one packed batch of the bench's
model shape (bench/common.py: hidden 256, 4 layers, 4 heads, vocab 4096), one torch thread, median of
``--reps`` interleaved repetitions after a warm-up. Example lengths are drawn like the quickstart data's
(a log-normal around 150 tokens, clipped to [1, row length]), packed best-fit into rows of the shape's
length. Ratios are against ``today`` measured in the same run. Each candidate's loss and gradients are
checked against today's before timing.

    .venv/bin/python bench/packed_attention.py [--reps 7] [--shapes 256x8,1024x2,2048x1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import torch  # noqa: E402
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from raytune_ft.data.packing import PaddedCollator, collate_packed, pack_examples  # noqa: E402
from raytune_ft.train.attention import example_segments, packed_sdpa_mask, register  # noqa: E402


def _segments(position_ids: torch.Tensor, batch: int) -> list[tuple[int, int, int]]:
    """(row, start, length) of every example of every row, the pad tail included (its own example)."""
    return [(b, s, n) for b, row in enumerate(example_segments(position_ids, batch)) for s, n in row]


def _sdpa(module, q, k, v, dropout, scaling):
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                            is_causal=True, enable_gqa=gqa)


def _gather_call(module, query, key, value, segs, dropout, scaling):
    """One is_causal SDPA call over ``segs`` gathered into a right-padded batch; returns (flat positions, out)."""
    B, H, L, d = query.shape
    lmax = max(n for _, _, n in segs)
    ar = torch.arange(lmax)
    base = torch.tensor([b * L + s for b, s, _ in segs])
    lens = torch.tensor([n for _, _, n in segs])
    valid = ar[None, :] < lens[:, None]
    idx = torch.where(valid, base[:, None] + ar[None, :], base[:, None])  # pad slots read the example's first token

    def g(x):
        flat = x.transpose(1, 2).reshape(B * L, x.shape[1], d)
        return flat[idx].transpose(1, 2)  # [n, heads, lmax, d]

    out = _sdpa(module, g(query), g(key), g(value), dropout, scaling)  # [n, H, lmax, d]
    out = out.transpose(1, 2)[valid]  # [Σ n, H, d], in segment order
    return idx[valid], out


def gather_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kw):
    if attention_mask is not None or position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    B, H, L, d = query.shape
    _, out = _gather_call(module, query, key, value, _segments(position_ids, B), dropout, scaling)
    return out.reshape(B, L, H, d), None  # segments cover every position, in order


def bucket_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kw):
    if attention_mask is not None or position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    B, H, L, d = query.shape
    groups: dict[int, list] = {}
    for seg in _segments(position_ids, B):
        groups.setdefault(max(0, math.ceil(math.log2(seg[2]))), []).append(seg)
    if len(groups) == 1:
        _, out = _gather_call(module, query, key, value, next(iter(groups.values())), dropout, scaling)
        return out.reshape(B, L, H, d), None
    where, outs = zip(*(_gather_call(module, query, key, value, g, dropout, scaling) for g in groups.values()))
    out = torch.empty(B * L, H, d, dtype=query.dtype).index_copy(0, torch.cat(where), torch.cat(outs))
    return out.reshape(B, L, H, d), None


# segments is the product's path (raytune_ft.train.attention, the one this bench chose); the others are
# registered here with the product's mask builder (no dense mask when only example boundaries are to be said)
IMPLS = {"segments": register(), "gather": "bench_gather", "buckets": "bench_buckets"}
CANDIDATES = list(IMPLS)
for _name, _fn in (("gather", gather_attention), ("buckets", bucket_attention)):
    AttentionInterface.register(IMPLS[_name], _fn)
    AttentionMaskInterface.register(IMPLS[_name], packed_sdpa_mask)


def example_lengths(n: int, longest: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 0.6 + math.log(130))
    return [int(min(max(1, round(float(v))), longest)) for v in x]


def make_batch(L: int, rows: int, seed: int = 0) -> tuple[dict, list[dict], dict]:
    """A packed batch of ``rows`` rows of length ≤ L (the first rows packed from drawn examples), the
    examples in it, and stats."""
    g = torch.Generator().manual_seed(seed + L)
    lengths = example_lengths(rows * L // 100 + 20, L, seed)
    ex = [{"input_ids": torch.randint(1, C.VOCAB, (n,), generator=g).tolist()} for n in lengths]
    for e in ex:
        e["labels"] = list(e["input_ids"])
    packed = pack_examples(ex, L)
    packed.sort(key=lambda r: -len(r["input_ids"]))  # fullest rows first: a batch as the sampler might draw it
    chosen = packed[:rows]
    batch = collate_packed(chosen, pad_token_id=0)
    n_ex = sum(1 + int((torch.tensor(r["position_ids"][1:]) == 0).sum()) for r in chosen)
    # the examples in those rows, to time the unpacked layout of the same work
    mine = []
    for r in chosen:
        p = r["position_ids"]
        s = [i for i, x in enumerate(p) if x == 0] + [len(p)]
        mine += [{"input_ids": r["input_ids"][a:b], "labels": r["input_ids"][a:b]} for a, b in zip(s, s[1:])]
    real = sum(len(r["input_ids"]) for r in chosen)
    stats = {"rows": rows, "row_length": L, "examples": n_ex, "real_tokens": real,
             "slots": rows * batch["input_ids"].shape[1],
             "sum_sq_examples": sum(len(m["input_ids"]) ** 2 for m in mine)}
    return batch, mine, stats


def model_for(attn: str) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=C.VOCAB, pad_token_id=0, tie_word_embeddings=False,
                      **{**C.MODEL_SHAPE, "max_position_embeddings": 4096})
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def fwd_bwd(model, batches) -> float:
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        loss = model(**b, use_cache=False).loss
        loss.backward()
        total += float(loss.detach())
    return total


def check(model, ref_model, batch) -> float:
    """Largest difference in loss and gradients against today's path."""
    fwd_bwd(ref_model, [batch])
    fwd_bwd(model, [batch])
    worst = 0.0
    for (_, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters()):
        worst = max(worst, float((p.grad - q.grad).abs().max()))
    with torch.no_grad():
        a = model(**batch, use_cache=False).logits
        b = ref_model(**batch, use_cache=False).logits
    return max(worst, float((a - b).abs().max()))


def run_shape(L: int, rows: int, reps: int, log=print) -> dict:
    batch, examples, stats = make_batch(L, rows)
    padded = [PaddedCollator(0)(examples[i:i + 8]) for i in range(0, len(examples), 8)]
    models = {"today": model_for("sdpa"), **{k: model_for(IMPLS[k]) for k in CANDIDATES},
              "padded": model_for("sdpa")}
    ref = models["today"]
    diffs = {k: check(m, ref, batch) for k, m in models.items() if k in CANDIDATES}
    inputs = {k: ([batch] if k != "padded" else padded) for k in models}
    times: dict[str, list[float]] = {k: [] for k in models}
    for k, m in models.items():  # warm-up
        fwd_bwd(m, inputs[k])
    for _ in range(reps):
        for k, m in models.items():
            t = time.perf_counter()
            fwd_bwd(m, inputs[k])
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    stats["padded_slots"] = sum(b["input_ids"].numel() for b in padded)
    out = {**stats, "ms": med, "vs_today": {k: med["today"] / v for k, v in med.items()},
           "max_abs_diff": diffs, "reps": reps}
    log(f"  {L}x{rows}: {stats['examples']} examples, {stats['real_tokens']} tokens in {stats['slots']} slots; "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in med.items()))
    return out


def table(res: dict) -> str:
    lines = ["| shape (row × rows) | examples | today ms | segments ms | gather ms | buckets ms | segments vs today | "
             "padded (same examples) ms | padded ÷ today / ÷ segments | padded slots ÷ packed slots | max diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["shapes"]:
        ms = r["ms"]
        lines.append(f"| {r['row_length']} × {r['rows']} | {r['examples']} | {ms['today']:.0f} | {ms['segments']:.0f} | "
                     f"{ms['gather']:.0f} | {ms['buckets']:.0f} | **{r['vs_today']['segments']:.2f}×** | "
                     f"{ms['padded']:.0f} | {ms['padded'] / ms['today']:.2f} / {ms['padded'] / ms['segments']:.2f} | "
                     f"{r['padded_slots'] / r['slots']:.2f} | {max(r['max_abs_diff'].values()):.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--shapes", default="256x8,1024x2,2048x1", help="row length x rows per batch, comma-separated")
    ap.add_argument("--threads", type=int, default=C.THREADS)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = {"threads": a.threads, "torch": torch.__version__, "shapes": []}
    for s in a.shapes.split(","):
        L, rows = (int(x) for x in s.split("x"))
        res["shapes"].append(run_shape(L, rows, a.reps))
    print(table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
