import base64

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import IMAGE_SIZE, NUM_QUERY_TOKENS, random_image
from transformers import AutoProcessor

from viscpm_hf import VisCPMChatProcessor, build_byte_level_tokenizer, paper_image_processor


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "And these?"}]},
]


def test_each_placeholder_expands_to_the_query_count(processor, image):
    inputs = processor(text="<image>Describe. <image>Compare.", images=[image, image], return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 2 * NUM_QUERY_TOKENS
    assert inputs["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_paper_preprocessing_is_bicubic_resize_without_crop_and_half_normalisation(processor):
    image = random_image(5, size=(50, 70))
    pixel_values = processor(text="<image>", images=[image], return_tensors="pt")["pixel_values"][0]
    resized = np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32) / 255
    expected = torch.from_numpy((resized - 0.5) / 0.5).permute(2, 0, 1)
    torch.testing.assert_close(pixel_values, expected, atol=1e-5, rtol=0)


def test_chat_template_renders_the_original_turn_format(processor):
    text = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert text == "Be brief.\nUser: <image>What is it?\nAI: A cat.</s>\nUser: <image><image>And these?\nAI:"


def test_chat_template_tokenizes_with_images_and_marks_assistant_tokens(processor):
    conversation = [dict(m) for m in CONVERSATION[:3]]
    conversation[1] = {"role": "user", "content": [{"type": "image", "image": random_image(1)}, {"type": "text", "text": "What is it?"}]}
    out = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids, mask = out["input_ids"][0], out["assistant_masks"][0].bool()
    assert (ids == processor.image_token_id).sum() == NUM_QUERY_TOKENS
    assert processor.decode(ids[mask]) == " A cat.</s>"  # the space after "AI:" is the answer's, as generated
    assert out["pixel_values"].shape[0] == 1


def test_save_and_load_round_trip(processor, tmp_path, image):
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, VisCPMChatProcessor)
    assert loaded.num_image_tokens == NUM_QUERY_TOKENS and loaded.image_token_id == processor.image_token_id
    for key, value in processor(text="<image>Hi", images=[image], return_tensors="pt").items():
        torch.testing.assert_close(loaded(text="<image>Hi", images=[image], return_tensors="pt")[key], value)


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "P", "I;16"])
def test_other_image_modes_are_converted(processor, mode):
    image = random_image(2).convert(mode)
    assert processor(text="<image>", images=[image], return_tensors="pt")["pixel_values"].shape[1] == 3


def test_transparent_pixels_become_white(processor):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    pixel_values = processor(text="<image>", images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, torch.ones_like(pixel_values))


def test_images_from_paths_arrays_and_tensors(processor, tmp_path, image):
    path = tmp_path / "image.png"
    image.save(path)
    array = np.array(image)
    reference = processor(text="<image>", images=[image], return_tensors="pt")["pixel_values"]
    for source in (str(path), path, array, torch.from_numpy(array)):
        torch.testing.assert_close(processor(text="<image>", images=[source], return_tensors="pt")["pixel_values"], reference)


def test_missing_image_file(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        processor(text="<image>", images=[str(tmp_path / "nope.png")])


def test_corrupt_image_file(processor, tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ValueError, match="corrupt or not an image"):
        processor(text="<image>", images=[str(path)])


def test_unsupported_image_type(processor):
    with pytest.raises(TypeError, match="Unsupported image type dict"):
        processor(text="<image>", images=[{"pixels": 1}])


def test_placeholder_and_image_counts_must_match(processor, image):
    with pytest.raises(ValueError, match="Found total 2 <image> tokens and 1 images"):
        processor(text="<image><image>", images=[image])
    with pytest.raises(ValueError, match="no images were passed"):
        processor(text="<image>What?")


def test_empty_text_is_refused(processor, image):
    with pytest.raises(ValueError, match="text is empty"):
        processor(text="   ", images=[image])


INVISIBLE = ["\u200b\u200b", "\u200c", "\u200d", "\ufeff", "\u2060", " \u200b\n\t"]  # ZWSP, ZWNJ, ZWJ, BOM, word joiner


@pytest.mark.parametrize("text", INVISIBLE)
def test_a_question_of_invisible_characters_is_refused_as_empty(processor, image, text):
    chat = user_says({"type": "image", "image": image}, {"type": "text", "text": text})
    for tokenize in (False, True):
        with pytest.raises(ValueError, match=r"Message 0 \(user\) has no text: add the question"):
            processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=tokenize)
    with pytest.raises(ValueError, match="text is empty"):
        processor(text=text)
    with pytest.raises(ValueError, match="text is empty"):
        processor(text=["<image>What?", text], images=[image])


def test_text_that_is_not_valid_unicode_is_refused_naming_where_and_the_fix(processor, image):
    chat = user_says({"type": "image", "image": image}, {"type": "text", "text": "What\ud800?"})
    for tokenize in (False, True):
        with pytest.raises(ValueError, match=r"Message 0 \(user\), item 1 is not valid Unicode text: it holds the lone "
                           r"surrogate U\+D800 at position 4\. Decode the text with errors='replace'"):  # fmt: skip
            processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=tokenize)
    with pytest.raises(ValueError, match=r"Message 1 \(assistant\) is not valid Unicode text"):
        processor.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\udcff"}])
    with pytest.raises(ValueError, match=r"^text is not valid Unicode text: .*U\+DFFF at position 11"):
        processor(text="<image>What\udfff?", images=[image])
    with pytest.raises(ValueError, match=r"^text\[1\] is not valid Unicode text"):
        processor(text=["<image>Fine.", "<image>\ud83d"], images=[image, image])


def test_truncation_that_cuts_image_tokens_is_refused(processor, image):
    with pytest.raises(ValueError, match="truncation"):
        processor(text="Question first <image>", images=[image], truncation=True, max_length=10)


def test_tokenizer_without_image_token_is_refused():
    tokenizer = build_byte_level_tokenizer(special_tokens=("<pad>", "<s>", "</s>"))
    with pytest.raises(ValueError, match="has no '<image>' token"):
        VisCPMChatProcessor(image_processor=paper_image_processor(), tokenizer=tokenizer)


def test_deep_and_float_images_give_the_pixels_of_their_8_bit_equivalent(processor):
    gray = random_image(3).convert("L")
    reference = processor(text="<image>", images=[gray], return_tensors="pt")["pixel_values"]
    deep = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)  # I;16, as a 16-bit PNG opens
    unit = np.stack([np.asarray(gray) / 255] * 3, -1)  # float in [0, 1]: must not be divided by 255 again
    for source in (deep, unit, torch.from_numpy(unit).permute(2, 0, 1)):
        pixel_values = processor(text="<image>", images=[source], return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pixel_values, reference)


def test_chat_image_items_take_urls_and_base64(processor, image, tmp_path):
    path = tmp_path / "image.png"
    image.save(path)
    encoded = base64.b64encode(path.read_bytes()).decode()
    reference = processor(text="<image>", images=[image], return_tensors="pt")["pixel_values"]
    for item in ({"url": path.as_uri()}, {"url": f"data:image/png;base64,{encoded}"}, {"base64": encoded}):
        chat = [{"role": "user", "content": [{"type": "image", **item}, {"type": "text", "text": "What?"}]}]
        out = processor.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        torch.testing.assert_close(out["pixel_values"], reference)


def user_says(*items):
    return [{"role": "user", "content": list(items)}]


def test_image_placeholder_written_in_message_text_is_refused_or_read_as_text(processor, image):
    chat = user_says({"type": "image", "image": image}, {"type": "text", "text": "Is <image> HTML?"})
    for tokenize in (False, True):
        with pytest.raises(ValueError, match="Message 0's text contains '<image>'.*sanitize_control_tokens=True"):
            processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=tokenize)
    out = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, sanitize_control_tokens=True
    )
    ids = out["input_ids"][0]
    assert ids.count(processor.image_token_id) == NUM_QUERY_TOKENS  # the text's '<image>' is no image
    assert processor.decode(ids).endswith("Is <image> HTML?\nAI:")


BAD_CONVERSATIONS = {  # conversation, error type, what the message says
    "text None": (
        user_says({"type": "image"}, {"type": "text", "text": None}), ValueError, r"Message 0 \(user\), item 1 has text None"
    ),
    "text not str": (user_says({"type": "text", "text": 5}), TypeError, r"item 0 has text 5; give the text as a string"),
    "no text": (user_says({"type": "image"}), ValueError, r"Message 0 \(user\) has no text: add the question"),
    "blank text": ([{"role": "user", "content": "  "}], ValueError, r"Message 0 \(user\) has no text"),
    "unknown role": (
        [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}],
        ValueError,
        r"Message 1 has role 'bot'.*'assistant'",
    ),
    "no content": ([{"role": "user"}], ValueError, r"Message 0 \(user\) has no 'content'"),
    "content int": ([{"role": "user", "content": 5}], TypeError, r"Message 0 \(user\) has content of type int"),
    "unknown item": (
        user_says({"type": "video"}, {"type": "text", "text": "Hi"}), ValueError, r"item 0 is \{'type': 'video'\}"
    ),
    "message str": (["Hi"], TypeError, r"Message 0 is a str"),
    "empty": ([], ValueError, r"conversation is \[\]: pass a non-empty list"),
    "batch": (
        [[{"role": "user", "content": "Hi"}], []], ValueError, r"Conversation 1 of the batch: The conversation is \[\]"
    ),
}


@pytest.mark.parametrize("case", BAD_CONVERSATIONS.values(), ids=BAD_CONVERSATIONS.keys())
@pytest.mark.parametrize("tokenize", [False, True])
def test_malformed_conversations_are_refused_with_the_message_named(processor, case, tokenize):
    conversation, error, message = case
    with pytest.raises(error, match=message):
        processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=tokenize)


def test_empty_assistant_answers_and_openai_image_items_are_accepted(processor, image, tmp_path):
    path = tmp_path / "image.png"
    image.save(path)
    chat = [
        *user_says({"type": "image_url", "image_url": {"url": path.as_uri()}}, {"type": "text", "text": "Hi"}),
        {"role": "assistant", "content": [{"type": "text", "text": ""}]},
        {"role": "user", "content": "Again?"},
    ]
    out = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["input_ids"][0].count(processor.image_token_id) == NUM_QUERY_TOKENS
