"""A byte-level tokenizer that needs no download: 256 byte tokens plus special tokens, no merges.

It encodes any Unicode text and decodes it back exactly, which makes it the tokenizer of the tiny models
built in tests, examples and benchmarks.
"""

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


DEFAULT_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>")


def build_byte_level_tokenizer(
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, add_bos_token: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: 256 byte tokens after the special tokens, no merges, no download.

    Args:
        special_tokens: the special tokens; they take the first ids, in the order given. The first three are pad,
            bos and eos; the rest (by default `<image>`) become additional special tokens.
        add_bos_token: start every encoded text with bos, so that even an empty text has a token (text encoders).

    Returns:
        `PreTrainedTokenizerFast`: encodes any Unicode text and decodes it back exactly.
    """
    pad, bos, eos = special_tokens[:3]
    byte_tokens = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate([*special_tokens, *byte_tokens])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if add_bos_token:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, bos_token=bos, eos_token=eos)
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens[3:])})
    return tokenizer
