import pytest
import torch
from tiny_models import random_image

from viscpm_hf import VisCPMChatHistory


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


@pytest.mark.parametrize("question", ["", "   ", None])
def test_empty_question_is_refused(chat_model, processor, image, question):
    with pytest.raises(ValueError, match="question is empty"):
        chat_model.chat(image, question, processor)


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
