"""Train a small byte-level BPE tokenizer on the training texts (for models built from scratch).

The result is a ``transformers`` fast tokenizer with ``<pad>``, ``<s>`` (BOS, added by ``tokenizer(text)``),
``</s>`` (EOS), ``<unk>`` and the chat markers of :data:`~raytune_ft.data.formats.CHAT_TEMPLATE` as special
tokens, the built-in chat template attached, and ``save_pretrained`` support. Training is deterministic for
the same texts and settings.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from raytune_ft.data.formats import CHAT_MARKERS, CHAT_TEMPLATE
from raytune_ft.errors import UserError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *CHAT_MARKERS)  # ids 0..7, in this order


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``vocab_size`` entries at most, trained on ``texts``."""
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor:
        raise UserError(
            f"tokenizer vocab_size {vocab_size} is too small; byte-level BPE needs at least {floor}"
        )
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(CHAT_MARKERS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
