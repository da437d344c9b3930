import re

import pytest
import torch
from tiny_models import IMAGE_SIZE, NUM_QUERY_TOKENS, make_chat_config, random_image

from viscpm_hf import (
    VisCPMChatForConditionalGeneration,
    VisCPMChatHistory,
    VisCPMChatProcessor,
    paper_image_processor,
)


GREEDY = {"num_beams": 1, "max_new_tokens": 5}


def count_vision_calls(model):
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_first_turn_returns_the_answer_and_a_history(chat_model, processor, image):
    answer, history = chat_model.chat(image, "What is shown?", processor, **GREEDY)
    assert isinstance(answer, str)
    assert [m["role"] for m in history.messages] == ["user", "assistant"]
    assert history.messages[1]["content"][0]["text"] == answer
    assert history.image_features.shape == (1, 4, 32)


def test_answer_equals_plain_generate(chat_model, processor, image):
    answer, _ = chat_model.chat(image, "What is shown?", processor, **GREEDY)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is shown?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    output = chat_model.generate(**inputs, **GREEDY)
    assert answer == processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_second_turn_reuses_the_image_features_and_equals_recomputation(chat_model, processor, image):
    _, history = chat_model.chat(image, "What is shown?", processor, **GREEDY)
    calls = count_vision_calls(chat_model)
    answer, history = chat_model.chat(None, "Tell me more.", processor, history=history, **GREEDY)
    assert calls == []

    inputs = processor.apply_chat_template(
        history.messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    recomputed = chat_model.generate(**inputs, **GREEDY)
    assert len(calls) == 1
    assert answer == processor.decode(recomputed[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_new_image_in_a_later_turn_runs_the_tower_on_it_only(chat_model, processor, image):
    _, history = chat_model.chat(image, "What is shown?", processor, **GREEDY)
    calls = count_vision_calls(chat_model)
    second = random_image(9)
    _, history = chat_model.chat(second, "And this one?", processor, history=history, **GREEDY)
    assert len(calls) == 1
    assert history.image_features.shape[0] == 2
    fresh = chat_model.get_image_features(processor(text="<image>", images=[second], return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(history.image_features[1], fresh.pooler_output[0])


@pytest.mark.parametrize(
    "question", ["", "   ", None, "\u200b\u200b", "\u200c\u200d", "\ufeff", " \u2060\n\u200b"]
)  # zero-width space, ZWNJ + ZWJ, BOM, word joiner among whitespace
def test_empty_question_is_refused(chat_model, processor, image, question):
    calls = count_vision_calls(chat_model)
    with pytest.raises(ValueError, match="question is empty"):
        chat_model.chat(image, question, processor)
    assert calls == []


def test_a_question_that_is_not_valid_unicode_is_refused_before_any_work(chat_model, processor, image):
    calls = count_vision_calls(chat_model)
    with pytest.raises(ValueError, match=r"The question is not valid Unicode text: it holds the lone surrogate U\+D800 "
                       r"at position 4\. Decode the text with errors='replace'"):  # fmt: skip
        chat_model.chat(image, "What\ud800?", processor, **GREEDY)
    assert calls == []


def test_a_history_message_that_is_not_valid_unicode_is_refused(chat_model, processor, image):
    _, history = chat_model.chat(image, "What is shown?", processor, **GREEDY)
    history.messages[1]["content"][0]["text"] += "\udcff"
    with pytest.raises(ValueError, match=r"Message 1 \(assistant\), item 0 is not valid Unicode text"):
        chat_model.chat(None, "Tell me more.", processor, history=history, **GREEDY)


def other_model(tokenizer, **changes):
    """A tiny chat model made as `chat_model` but with another number of query tokens or LLM width, and its
    processor."""
    config = make_chat_config(tokenizer)
    config.num_query_tokens = changes.get("num_query_tokens", NUM_QUERY_TOKENS)
    config.text_config.hidden_size = changes.get("hidden_size", config.text_config.hidden_size)
    processor = VisCPMChatProcessor(
        image_processor=paper_image_processor(IMAGE_SIZE), tokenizer=tokenizer, num_image_tokens=config.num_query_tokens
    )
    return VisCPMChatForConditionalGeneration(config).eval(), processor


@pytest.mark.parametrize(
    "changes, shape",
    [
        ({"num_query_tokens": 2 * NUM_QUERY_TOKENS}, (1, 8, 32)),  # the history's features would count as 2 images
        ({"hidden_size": 64}, (1, 4, 64)),  # ... or be cut to fit, silently
    ],
    ids=["more query tokens", "wider"],
)
def test_a_history_from_another_model_is_refused_with_how_to_go_on(
    chat_model, processor, image, tokenizer, changes, shape
):
    other, other_processor = other_model(tokenizer, **changes)
    _, history = other.chat(image, "What is shown?", other_processor, **GREEDY)
    message = (
        rf"history's image features have shape {re.escape(str(shape))}, but this model's bridge makes \(num_images, 4, "
        r"32\): .*The history comes from another model: start a new conversation"
    )
    with pytest.raises(ValueError, match=message):
        chat_model.chat(None, "Tell me more.", processor, history=history, **GREEDY)


def test_a_history_with_fewer_query_tokens_is_refused_the_same_way(chat_model, processor, image, tokenizer):
    """The user's case: 4 features per image where the model makes 8 ("the images give 0 x 8 = 4")."""
    other, other_processor = other_model(tokenizer, num_query_tokens=2 * NUM_QUERY_TOKENS)
    _, history = chat_model.chat(image, "What is shown?", processor, **GREEDY)
    with pytest.raises(ValueError, match=r"shape \(1, 4, 32\), but this model's bridge makes \(num_images, 8, 32\).*another"):
        other.chat(None, "Tell me more.", other_processor, history=history, **GREEDY)


def test_a_history_whose_images_and_features_disagree_is_refused(chat_model, processor, image):
    _, history = chat_model.chat(image, "What is shown?", processor, **GREEDY)
    history.image_features = torch.cat([history.image_features] * 2)
    with pytest.raises(ValueError, match="history's messages hold 1 images but its image_features 2"):
        chat_model.chat(None, "Tell me more.", processor, history=history, **GREEDY)


def test_history_defaults_to_an_empty_conversation():
    history = VisCPMChatHistory()
    assert history.messages == [] and history.image_features is None


@pytest.mark.parametrize("num_beams", [0, -1, 1.5])
def test_num_beams_below_one_is_refused_before_generating(chat_model, processor, image, num_beams, monkeypatch):
    with pytest.raises(ValueError, match=f"num_beams must be a positive integer.*got {num_beams}"):
        chat_model.chat(image, "What is shown?", processor, num_beams=num_beams, max_new_tokens=2)
    monkeypatch.setattr(chat_model.generation_config, "num_beams", num_beams)  # the default, when the call does not say
    with pytest.raises(ValueError, match="num_beams must be a positive integer"):
        chat_model.chat(image, "What is shown?", processor, max_new_tokens=2)


def test_a_question_writing_the_image_placeholder_is_refused(chat_model, processor, image):
    with pytest.raises(ValueError, match="Message 0's text contains '<image>'"):
        chat_model.chat(image, "What does <image> mean?", processor, **GREEDY)


def test_a_history_with_an_unknown_role_is_refused(chat_model, processor, image):
    _, history = chat_model.chat(image, "What is shown?", processor, **GREEDY)
    history.messages[1]["role"] = "bot"
    with pytest.raises(ValueError, match="Message 1 has role 'bot'"):
        chat_model.chat(None, "Tell me more.", processor, history=history, **GREEDY)


def test_generate_refuses_num_beams_below_one(chat_model, processor, image):
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )  # fmt: skip
    with pytest.raises(ValueError, match="num_beams must be a positive integer"):
        chat_model.generate(**inputs, num_beams=0, max_new_tokens=2)
