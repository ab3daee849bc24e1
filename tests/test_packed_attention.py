"""Packed rows cost what their examples cost (issue 17, item 5): ``rtf_packed_sdpa`` (raytune_ft.train.attention)
runs SDPA per example of a packed row on CPU. It must compute exactly what transformers' ``sdpa`` computes with
its block-diagonal mask: same logits, same gradients, same Trainer loss. No timing here
(bench/packed_attention.py measures it)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch

from raytune_ft.data.packing import PaddedCollator, collate_packed, pack_examples
from raytune_ft.train import attention
from raytune_ft.train.modeling import choose_attention

NAME = attention.register()
VOCAB = 97


def _model(arch: str = "llama", **extra):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    cfg_cls, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                    "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, **extra)
    cfg._attn_implementation = "sdpa"
    ref = cls(cfg)
    new = copy.deepcopy(ref)  # its own config too: the attention implementation lives on the config
    new.set_attn_implementation(NAME)
    assert (ref.config._attn_implementation, new.config._attn_implementation) == ("sdpa", NAME)
    return ref, new


def _examples(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def _packed_batch():
    """Rows of 24: several examples per row, examples of length 1, a row holding one example that fills it,
    and rows with a pad tail (rows are padded to the longest)."""
    rows = [pack_examples(_examples(ls, seed=i), 24)[0] for i, ls in enumerate(
        [(5, 1, 9, 1, 3), (24,), (7, 11), (1,), (2, 1, 1, 6, 4, 1)])]
    batch = collate_packed(rows, pad_token_id=0)
    pos = batch["position_ids"]
    assert pos.shape == (5, 24) and (pos[1] == torch.arange(24)).all()
    assert (pos[3, :2] == 0).all() and batch["labels"][2, -5:].eq(-100).all()  # 1-token example, pad tails
    return batch


def _fwd_bwd(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, use_cache=False)
    out.loss.backward()
    return out.logits.detach(), float(out.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same(ref, new, batch, tol=1e-5):
    logits_r, loss_r, grads_r = _fwd_bwd(ref, batch)
    logits_n, loss_n, grads_n = _fwd_bwd(new, batch)
    assert torch.allclose(logits_n, logits_r, atol=tol, rtol=0), float((logits_n - logits_r).abs().max())
    assert loss_n == pytest.approx(loss_r, abs=tol)
    for n, g in grads_r.items():
        assert torch.allclose(grads_n[n], g, atol=tol, rtol=0), (n, float((grads_n[n] - g).abs().max()))
    return loss_r


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_packed_rows_same_logits_and_gradients_as_sdpa(arch):
    ref, new = _model(arch)
    batch = _packed_batch()
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], attn_mask is None, kw.get("is_causal")))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    loss = _assert_same(ref, new, batch)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        _fwd_bwd(new, batch)
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    # per example, causal, never a mask: rows of 5+tail, 1, 2+tail, 1+tail, 6+tail segments = 19 calls per layer
    assert all(no_mask and (causal or n == 1) for n, no_mask, causal in calls) and len(calls) == 2 * 19
    assert sorted(n for n, _, _ in calls[:19]) == sorted([5, 1, 9, 1, 3, 5, 24, 7, 11, 6, 1, 23, 2, 1, 1, 6, 4, 1, 9])
    assert loss > 0


def test_the_examples_do_not_see_each_other():
    """Against the same examples run one by one, unpacked: their logits are the packed row's."""
    ref, new = _model()
    ex = _examples((5, 1, 9, 1, 3))
    row = collate_packed(pack_examples(ex, 24), pad_token_id=0)
    with torch.no_grad():
        packed = new(**row, use_cache=False).logits[0]
        alone = torch.cat([new(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in ex])
    assert torch.allclose(packed[:19], alone, atol=1e-5, rtol=0)


def test_one_flattened_row_same_as_sdpa():
    """collate_packed(flatten=True): the whole batch as one row [1, Σ] (flash-attention's layout)."""
    ref, new = _model()
    rows = pack_examples(_examples((5, 1, 9, 1, 3, 12, 7, 2, 1)), 16)
    _assert_same(ref, new, collate_packed(rows, pad_token_id=0, flatten=True))


def test_padded_and_plain_batches_go_to_sdpa_unchanged():
    """Unpacked batches (attention mask, or one example per row) are transformers' sdpa path as it is."""
    ref, new = _model()
    ex = _examples((6, 19, 3, 11))
    _assert_same(ref, new, PaddedCollator(0)(ex))
    _assert_same(ref, new, collate_packed([ex[1]], pad_token_id=0))
    _assert_same(ref, new, {"input_ids": torch.tensor([ex[1]["input_ids"]]), "labels": torch.tensor([ex[1]["labels"]])})


def test_sliding_window_shorter_than_the_row_falls_back_to_the_dense_mask():
    ref, new = _model("mistral", sliding_window=4)
    _assert_same(ref, new, _packed_batch())


def test_generation_with_a_cache_matches_sdpa():
    ref, new = _model()
    ids = torch.tensor([_examples((7,))[0]["input_ids"]])
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(input_ids=ids, **kw), new.generate(input_ids=ids, **kw))
    two = torch.tensor([[0, 0] + ids[0, :5].tolist(), ids[0].tolist()])  # left-padded: a 2-D mask
    mask = (two != 0).long()
    assert torch.equal(ref.generate(input_ids=two, attention_mask=mask, **kw),
                       new.generate(input_ids=two, attention_mask=mask, **kw))


def test_missing_position_ids_is_refused_not_guessed():
    from transformers.models.llama.modeling_llama import LlamaAttention

    ref, _ = _model()
    module = next(m for m in ref.modules() if isinstance(m, LlamaAttention))
    q = torch.randn(1, 4, 6, 8)
    kv = torch.randn(1, 2, 6, 8)
    with pytest.raises(RuntimeError, match="position_ids"):
        attention.packed_sdpa_attention_forward(module, q, kv, kv, None)


def test_segments():
    pos = torch.tensor([[0, 1, 2, 0, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]])
    assert attention.example_segments(pos, 2) == [[(0, 3), (3, 1), (4, 2), (6, 4)], [(0, 10)]]
    assert attention.example_segments(pos[:1], 1) == [[(0, 3), (3, 1), (4, 2), (6, 4)]]
    assert attention.example_segments(torch.arange(4)[None], 3) == [[(0, 4)]] * 3  # unsqueezed, not expanded


def test_auto_picks_it_for_packed_rows_on_cpu_only():
    from transformers import GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM

    why = "auto: no GPU, packed rows: PyTorch SDPA run per example, not over a masked row"
    assert choose_attention("auto", cuda=False, packed=True, model_class=LlamaForCausalLM) == (NAME, why)
    assert choose_attention("auto", cuda=False, packed=True, model_class=Qwen2ForCausalLM)[0] == NAME
    assert choose_attention("auto", cuda=False, packed=False, model_class=LlamaForCausalLM)[0] == "sdpa"
    assert choose_attention("sdpa", cuda=False, packed=True, model_class=LlamaForCausalLM)[0] == "sdpa"
    # a model class not known to pass position_ids to its attention keeps sdpa; so does an unknown class
    assert choose_attention("auto", cuda=False, packed=True, model_class=GPT2LMHeadModel)[0] == "sdpa"
    assert choose_attention("auto", cuda=False, packed=True)[0] == "sdpa"


def test_trainer_step_same_loss_and_weights(tmp_path):
    """Two real HF Trainer steps on packed rows, as rtf's recipe collates them: rows under sdpa, the batch flattened
    into one row under rtf_packed_sdpa (no padding left). The same losses and the same updated weights."""
    from transformers import Trainer, TrainingArguments

    ex = _examples((5, 1, 9, 1, 3, 24, 7, 11, 1, 2, 1, 1, 6, 4, 1), seed=3)
    rows = pack_examples(ex, 24)
    results = []
    for model in _model():
        args = TrainingArguments(output_dir=str(tmp_path / model.config._attn_implementation), max_steps=2,
                                 per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True, report_to="none",
                                 logging_steps=1, save_strategy="no", remove_unused_columns=False,
                                 disable_tqdm=True, seed=1)
        tr = Trainer(model=model, args=args, train_dataset=rows,
                     data_collator=partial(collate_packed, pad_token_id=0,
                                           flatten=model.config._attn_implementation == NAME))
        tr.train()
        losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
        results.append((losses, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_r, w_r), (loss_n, w_n) = results
    assert len(loss_r) == 2 and loss_n == pytest.approx(loss_r, abs=1e-5)
    assert all(torch.allclose(w_n[n], w, atol=1e-5, rtol=0) for n, w in w_r.items())
