"""The cache keyword across transformers releases: `cache` since 5.24, `past_key_values` before (the minimum)."""

import pytest
import torch
import transformers
from packaging.version import Version
from tiny_models import make_cpmbee, random_image
from transformers import DynamicCache

from viscpm_hf.cache_names import CACHE_NAME, take_cache


def test_the_name_is_the_installed_releases():
    renamed = Version(transformers.__version__).release >= (5, 24)
    assert CACHE_NAME == ("cache" if renamed else "past_key_values")


def test_take_cache_accepts_either_name_once():
    cache = DynamicCache()
    assert take_cache(cache, {}) is cache
    kwargs = {"past_key_values": cache, "other": 1}
    assert take_cache(None, kwargs) is cache and kwargs == {"other": 1}
    with pytest.raises(ValueError, match="as both"):
        take_cache(DynamicCache(), {"past_key_values": cache})


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_cpmbee_continues_a_cache_passed_under_either_name(name):
    model = make_cpmbee()
    prompt, step = torch.tensor([[5, 9, 11, 3]]), torch.tensor([[7]])
    with torch.no_grad():
        first = model(input_ids=prompt, **{name: DynamicCache(config=model.config)})
        cache = getattr(first, CACHE_NAME)
        assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 4
        continued = model(input_ids=step, **{name: cache}).logits[:, -1]
        full = model(input_ids=torch.cat([prompt, step], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(continued, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_chat_model_continues_a_cache_passed_under_either_name(chat_model, processor, name):
    content = [{"type": "image", "image": random_image()}, {"type": "text", "text": "What is it?"}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )  # fmt: skip
    step = torch.tensor([[processor.tokenizer.convert_tokens_to_ids("a")]])
    with torch.no_grad():
        first = chat_model(**inputs, **{name: DynamicCache(config=chat_model.config.text_config)})
        cache = getattr(first, CACHE_NAME)
        assert cache.get_seq_length() == inputs["input_ids"].shape[1]
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
        continued = chat_model(input_ids=step, attention_mask=mask, **{name: cache}).logits[:, -1]
        full_inputs = {**inputs, "input_ids": torch.cat([inputs["input_ids"], step], 1), "attention_mask": mask}
        full = chat_model(**full_inputs, use_cache=False).logits[:, -1]
    torch.testing.assert_close(continued, full, atol=1e-5, rtol=1e-5)


def test_generate_hands_back_the_cache_under_the_installed_name():
    model = make_cpmbee()
    out = model.generate(
        torch.tensor([[5, 9, 11, 3]]), max_new_tokens=3, num_beams=1, do_sample=False, return_dict_in_generate=True
    )
    cache = getattr(out, CACHE_NAME)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == out.sequences.shape[1] - 1
