"""Packed rows and the attention kernels (issue 14, item 4): flex_attention for packed rows when the spec asks
for it on a GPU (``auto`` keeps SDPA: measured faster in a real run, see modeling.choose_attention), and every
backend sees the same example boundaries. On CPU (no flex backward) auto runs SDPA per example
(rtf_packed_sdpa, tests/test_packed_attention.py); what can be shown here is that the masks/positions each
backend is given are the same: packed = unpacked loss under sdpa, eager, flex_attention and rtf_packed_sdpa
alike, and a row without boundaries differs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from raytune_ft.data.packing import PaddedCollator, collate_packed, pack_examples
from raytune_ft.train import modeling
from raytune_ft.train.modeling import choose_attention


@pytest.fixture
def no_flash(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))


def test_flex_for_packed_rows_when_asked_and_auto_keeps_sdpa(no_flash):
    from transformers import LlamaForCausalLM

    from raytune_ft.errors import UserError

    impl, why = choose_attention("flex_attention", cuda=True, packed=True, model_class=LlamaForCausalLM)
    assert impl == "flex_attention" and "BlockMask" in why
    # auto: SDPA on packed rows too (1.8x flex_attention's tokens/s in the H200 run of rtf's LoRA)
    assert choose_attention("auto", cuda=True, packed=True, model_class=LlamaForCausalLM) == \
        ("sdpa", "auto: flash-attn is not installed, PyTorch SDPA is available")
    assert choose_attention("auto", cuda=False, packed=True) == ("sdpa", "auto: no GPU, PyTorch SDPA is available")
    assert choose_attention("sdpa", cuda=True, packed=True) == ("sdpa", "asked for in the spec")
    with pytest.raises(UserError, match="flex_attention needs a CUDA GPU"):
        choose_attention("flex_attention", cuda=False, packed=True)

    class NoFlex:
        _supports_sdpa = True
        _supports_flex_attn = False

    with pytest.raises(UserError, match="supports it"):
        choose_attention("flex_attention", cuda=True, packed=True, model_class=NoFlex)


def test_flash_still_wins_when_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert choose_attention("auto", cuda=True, packed=True)[0] == "flash_attention_2"


def test_no_flex_in_torch_is_refused_when_asked(no_flash, monkeypatch):
    from raytune_ft.errors import UserError

    monkeypatch.setattr(modeling, "flex_available", lambda: False)
    with pytest.raises(UserError, match="torch >= 2.5"):
        choose_attention("flex_attention", cuda=True, packed=True)


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def _examples():
    g = torch.Generator().manual_seed(5)
    out = []
    for n in (6, 19, 3, 11, 25, 8, 14, 2):
        ids = torch.randint(1, 97, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def _total_loss(model, batches):
    total = n = 0.0
    with torch.no_grad():
        for b in batches:
            k = int((b["labels"][:, 1:] != -100).sum())
            total += float(model(**b, use_cache=False).loss) * k
            n += k
    return total / n, n


@pytest.fixture
def eager_compile(monkeypatch):
    """transformers wraps flex_attention and its BlockMask builder in torch.compile; on CPU that is minutes of
    C++ builds per shape for a tiny model. Here the same functions run uncompiled: same masks, same math."""
    import transformers.integrations.flex_attention as tfa
    import transformers.masking_utils as tmu
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    monkeypatch.setattr(tfa.WrappedFlexAttention, "__call__", lambda self: flex_attention)
    monkeypatch.setattr(tmu, "create_block_mask", lambda *a, **k: create_block_mask(*a, **{**k, "_compile": False}))


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flex_attention", "rtf_packed_sdpa"])
def test_packed_rows_equal_unpacked_under_each_backend(impl, eager_compile):
    """The collator's position_ids are the whole story: each backend derives the same block-diagonal causal
    mask from them (SDPA/eager a dense mask, flex a BlockMask), so packed = unpacked."""
    from raytune_ft.train.attention import register

    register()
    model = _model()
    ex = _examples()
    padded = [PaddedCollator(0)(ex[i:i + 3]) for i in range(0, len(ex), 3)]
    rows = pack_examples(ex, 32)
    packed = [collate_packed(rows[i:i + 2], pad_token_id=0) for i in range(0, len(rows), 2)]
    model.set_attn_implementation(impl)
    ref, n_ref = _total_loss(model, padded)
    got, n_got = _total_loss(model, packed)
    assert n_got == n_ref
    assert got == pytest.approx(ref, rel=1e-5)
    # the boundaries matter: the same rows with positions running on across examples attend across them
    joined = [{**b, "position_ids": torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"])} for b in packed]
    wrong, _ = _total_loss(model, joined)
    assert abs(wrong - ref) > 1e-4


def test_build_model_on_cpu_runs_packed_rows_per_example(tmp_path, no_flash):
    """auto on CPU with packing: rtf_packed_sdpa (SDPA per example, tests/test_packed_attention.py), and the
    line rtf submit prints says so."""
    from transformers import PreTrainedTokenizerFast

    from raytune_ft.data.quickstart import build_quickstart_data  # noqa: F401  (the module is importable)
    from raytune_ft.spec import spec_from_dict

    model = _model()
    model.save_pretrained(tmp_path / "m")
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "a": 1}, unk_token="<pad>")),
                                  pad_token="<pad>", eos_token="<pad>")
    spec = spec_from_dict({
        "name": "t", "model": {"name_or_path": str(tmp_path / "m")}, "method": {"type": "full"},
        "data": {"train": {"path": "x.jsonl"}, "max_seq_length": 32, "packing": True},
        "training": {"max_steps": 1, "precision": "fp32"}, "storage": {"path": str(tmp_path / "runs")},
    })
    model, chosen = modeling.build_model(spec, tok, device=torch.device("cpu"), seed=0)
    assert chosen["attention"] == "rtf_packed_sdpa (auto: no GPU, packed rows: PyTorch SDPA run per example, " \
                                  "not over a masked row)"
    assert model.config._attn_implementation == "rtf_packed_sdpa"
    unpacked = spec.model_copy(update={"data": spec.data.model_copy(update={"packing": False})})
    _, chosen = modeling.build_model(unpacked, tok, device=torch.device("cpu"), seed=0)
    assert chosen["attention"].startswith("sdpa (auto: no GPU")
