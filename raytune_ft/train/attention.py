"""Per-example attention for packed rows on CPU: the ``rtf_packed_sdpa`` attention implementation.

The gap it fills (DESIGN principle 9): for packed rows (``position_ids`` restarting at 0 per example, no
attention mask: :func:`raytune_ft.data.packing.collate_packed`) transformers' ``sdpa`` builds a dense
block-diagonal causal mask ``[B, 1, L, L]`` and PyTorch runs the masked SDPA kernel over the whole row, so a
packed row costs ``L²`` whatever its examples, and on CPU the masked kernel costs up to 2x the ``is_causal``
one per position (bench/packed_attention.py). flash-attention's varlen kernel computes each example on its
own, but only on a GPU; flex_attention's BlockMask has no CPU backward. Nothing in transformers or PyTorch
runs block-diagonal causal attention on CPU at the cost of its blocks, so this module does, in the plainest
way that measured best: one ``is_causal`` SDPA call per example (bench/RESULTS.md §1, "Per-example
attention"). It is exact: same logits and gradients as ``sdpa`` (tests/test_packed_attention.py).

It is registered in transformers' ``AttentionInterface`` (the attention) and ``AttentionMaskInterface`` (a mask
builder that skips the dense mask when there is nothing but causality and example boundaries to express, as
transformers' flash-attention mask builder does); every other case (padding masks, caches with offsets,
sliding windows that bind, custom mask functions) goes to transformers' own SDPA mask and attention unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

NAME = "rtf_packed_sdpa"

# model types whose attention receives ``position_ids`` (their decoder layers pass it on, checked for the
# installed transformers): without it a packed row could not be split, so auto selects this path only for them
MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

_last: list[Any] = [None, -1, 0, None]  # position_ids, its _version, batch size, segments: one forward's layers


def example_segments(position_ids: torch.Tensor, batch: int) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, length)`` of each example: a new example starts wherever a position is not the
    previous one plus 1 (transformers' ``find_packed_sequence_indices`` rule); the pad tail of a row is an
    example of its own, as it is for transformers. Cached for the layers of one forward (same tensor)."""
    if _last[0] is position_ids and _last[1] == position_ids._version and _last[2] == batch:
        return _last[3]
    pos = position_ids.expand(batch, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    length = pos.shape[1]
    rows: list[list[int]] = [[] for _ in range(batch)]
    for b, t in torch.nonzero(starts).tolist():
        rows[b].append(t)
    segs = [[(s, e - s) for s, e in zip(r, r[1:] + [length])] for r in rows]
    _last[:] = [position_ids, position_ids._version, batch, segs]
    return segs


def packed_sdpa_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                  scaling: float | None = None, position_ids: torch.Tensor | None = None,
                                  **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (``query`` ``[B, heads, L, d]``; returns ``[B, L, heads, d]``).
    Without a mask (see :func:`packed_sdpa_mask`) the attention is causal within each example of each row: one
    ``is_causal`` SDPA call per example; with a mask, transformers' ``sdpa`` as it is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    plain = (attention_mask is not None or length == 1 or key.shape[2] != length
             or not getattr(module, "is_causal", True) or kwargs.get("position_bias") is not None)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if position_ids is None or position_ids.dim() != 2:
        # the mask builder left the boundaries to this function, and it cannot see them: refuse, never guess
        raise RuntimeError(f"attention {NAME} needs 2-D position_ids passed to the attention of "
                           f"{type(module).__name__}; use model.attn_implementation: sdpa")
    segs = example_segments(position_ids, batch)
    if all(len(r) == 1 for r in segs):  # one example per row: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for b, row in enumerate(segs):
        q, k, v = query[b:b + 1], key[b:b + 1], value[b:b + 1]
        parts = [sdpa(q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n], dropout_p=dropout, scale=scaling,
                      is_causal=n > 1, enable_gqa=gqa) for s, n in row]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    out = rows[0] if batch == 1 else torch.cat(rows, dim=0)
    return out.transpose(1, 2).contiguous(), None


def packed_sdpa_mask(*args: Any, attention_mask: torch.Tensor | None = None, q_length: int | None = None,
                     kv_length: int | None = None, q_offset: Any = 0, kv_offset: Any = 0,
                     local_size: int | None = None, use_vmap: bool = False, config: Any = None,
                     **kwargs: Any) -> torch.Tensor | None:
    """The mask builder of :data:`NAME`: ``None`` (no ``[B, 1, L, L]`` mask; the attention reads the examples'
    boundaries from ``position_ids``) when the mask would say nothing but "causal within each example": no
    padding mask, no cache offset, no custom mask function, a causal model, no sliding window shorter than the
    row. Otherwise transformers' SDPA mask, built as for ``sdpa``."""
    from transformers.masking_utils import sdpa_mask

    causal_only = (attention_mask is None and isinstance(q_offset, int) and isinstance(kv_offset, int)
                   and q_offset == 0 and kv_offset == 0 and q_length == kv_length and not use_vmap
                   and (local_size is None or (kv_length or 0) <= local_size)
                   and "allow_is_bidirectional_skip" not in kwargs and getattr(config, "is_causal", True))
    if causal_only:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, local_size=local_size, use_vmap=use_vmap,
                     config=config, **kwargs)


def register() -> str:
    """Register :data:`NAME` with transformers (idempotent); returns the name for ``attn_implementation``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, packed_sdpa_mask)
    return NAME
