"""The released VisCPM-Chat (BEiT-3 + CPM-Bee, converted from ../shared/parity) gives one answer on every path.

`chat()` is the reference. `generate` with keyword arguments or with a `GenerationConfig` that names only some fields
(the folder's `cpmbee_decoding` and beams still apply), `pipeline("image-text-to-text")`, a `TextIteratorStreamer`,
a static cache and assisted decoding must give its tokens and its text, for greedy search, seeded sampling and the
folder's own beam decoding. Out-of-vocabulary strings of the question (ext ids) read as written wherever the prompt's
ext table travels, and with a warning (never a silent `<unk>`) where a stock path hands over ids alone.
"""

import json
import re
import shutil
import threading

import pytest
import torch
from parity import PARITY_DIR, json_file, require_parity
from PIL import Image
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TextIteratorStreamer,
    pipeline,
)

from viscpm_hf import (
    CpmBeeConfig,
    CpmBeeForCausalLM,
    VisCPMChatCpmBeeConfig,
    VisCPMChatCpmBeeForConditionalGeneration,
    VisCPMChatCpmBeeModel,
    VisCPMChatCpmBeeProcessor,
)
from viscpm_hf.convert.chat import convert_chat


MAX_NEW_TOKENS = 6
QUESTION = "What is in the image?"
DECODINGS = {
    "greedy": {"num_beams": 1, "do_sample": False},
    "sampling": {"num_beams": 1, "do_sample": True, "top_k": 50},
    "folder's beams": {},  # generation_config.json: 3 beams and the original's cpmbee_decoding
}
STREAM_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    require_parity()
    configs = json_file("configs.json")
    return convert_chat(
        PARITY_DIR / "viscpm_chat_tiny.safetensors",
        PARITY_DIR / "cpmbee_vocab.txt",
        tmp_path_factory.mktemp("release") / "viscpm-chat-tiny",
        llm_config=configs["cpmbee_tiny"],
        vision_config=configs["beit3_tiny"],
    )


@pytest.fixture(scope="module")
def model(release):
    return AutoModelForImageTextToText.from_pretrained(release).eval()


@pytest.fixture(scope="module")
def processor(release):
    return AutoProcessor.from_pretrained(release)


@pytest.fixture(scope="module")
def image():
    return Image.open(PARITY_DIR / "vision_image0.png").convert("RGB")


def conversation(image, question=QUESTION):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def encode(processor, messages, **kwargs):
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


class ForceTokens(LogitsProcessor):
    """Makes the answer start with `tokens` (ids of ext columns too), whatever the model prefers."""

    def __init__(self, prompt_length: int, tokens: list[int]):
        self.prompt_length, self.tokens = prompt_length, tokens

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.tokens):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.tokens[step]] = 0.0
            return forced
        return scores


def seeded(function, *args, **kwargs):
    torch.manual_seed(0)
    return function(*args, **kwargs)


# --- what the converter writes -----------------------------------------------------------------------------------


def test_the_converter_writes_the_released_models_own_classes(release, model, processor):
    config = json.loads((release / "config.json").read_text())
    assert config["model_type"] == "viscpm_chat_cpmbee"
    assert config["architectures"] == ["VisCPMChatCpmBeeForConditionalGeneration"]
    assert isinstance(model, VisCPMChatCpmBeeForConditionalGeneration)
    assert isinstance(processor, VisCPMChatCpmBeeProcessor)
    assert isinstance(AutoModel.from_pretrained(release), VisCPMChatCpmBeeModel)
    vocabulary = processor.tokenizer
    text = model.config.text_config
    assert (text.root_token_id, text.answer_token_id, text.unk_token_id) == tuple(
        vocabulary.convert_tokens_to_ids(["<root>", "<ans>", "<unk>"])
    )


def test_a_folder_converted_before_the_model_type_existed_loads_as_the_released_model(release, model, processor, image, tmp_path):
    old = shutil.copytree(release, tmp_path / "old")
    config = json.loads((old / "config.json").read_text())
    config.update(model_type="viscpm_chat", architectures=["VisCPMChatForConditionalGeneration"])
    (old / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForImageTextToText.from_pretrained(old).eval()
    assert isinstance(loaded, VisCPMChatCpmBeeForConditionalGeneration)
    assert isinstance(loaded.config, VisCPMChatCpmBeeConfig)
    inputs = encode(processor, conversation(image))
    torch.testing.assert_close(
        loaded.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS), model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS)
    )


def test_a_folder_missing_a_tensor_is_refused_with_its_name(release, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(release, tmp_path / "broken")
    shard = sorted(broken.glob("model*.safetensors"))[-1]
    weights = load_file(shard)
    missing = sorted(weights)[0]
    del weights[missing]
    save_file(weights, shard, metadata={"format": "pt"})
    for model_class in (AutoModelForImageTextToText, AutoModel):
        with pytest.raises(RuntimeError, match=rf"missing .*: (model\.)?{re.escape(missing.removeprefix('model.'))}\. "
                           r".*pass strict=False"):  # fmt: skip
            model_class.from_pretrained(broken)


# --- questions that cannot be asked ------------------------------------------------------------------------------


@pytest.mark.parametrize("question", ["\u200b\u200b", "\u200c\u200d", "\ufeff \u2060"])
def test_a_question_of_invisible_characters_is_refused_as_empty(model, processor, image, question):
    with pytest.raises(ValueError, match="question is empty"):
        model.chat(image, question, processor)
    with pytest.raises(ValueError, match=r"Message 0 \(user\) has no text"):
        encode(processor, conversation(image, question))


def test_a_question_that_is_not_valid_unicode_is_refused_naming_the_fix(model, processor, image):
    with pytest.raises(ValueError, match=r"The question is not valid Unicode text: .*U\+D800.*errors='replace'"):
        model.chat(image, "What\ud800?", processor)
    with pytest.raises(ValueError, match=r"Message 0 \(user\), item 1 is not valid Unicode text"):
        encode(processor, conversation(image, "What\ud800?"))
    with pytest.raises(ValueError, match=r"^text is not valid Unicode text"):
        processor(text="<image>What\ud800?", images=[image])


# --- one answer on every path ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(model, processor, image):
    """Per decoding: chat()'s answer, and generate's tokens with keyword arguments."""
    answers = {}
    messages = conversation(image)
    inputs = encode(processor, messages)
    length = inputs["input_ids"].shape[1]
    for name, decoding in DECODINGS.items():
        text, _ = seeded(model.chat, image, QUESTION, processor, max_new_tokens=MAX_NEW_TOKENS, **decoding)
        tokens = seeded(model.generate, **inputs, max_new_tokens=MAX_NEW_TOKENS, **decoding)[0, length:]
        assert processor.decode(tokens, skip_special_tokens=True).strip() == text
        answers[name] = (text, tokens)
    return answers


@pytest.mark.parametrize("decoding", DECODINGS)
def test_a_generation_config_naming_some_fields_keeps_the_folders_other_rules(model, processor, image, reference, decoding):
    inputs = encode(processor, conversation(image))
    config = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, **DECODINGS[decoding])
    tokens = seeded(model.generate, **inputs, generation_config=config)[0, inputs["input_ids"].shape[1] :]
    assert tokens.tolist() == reference[decoding][1].tolist()


def test_the_folders_decoding_is_not_plain_greedy(reference):
    """The rules above are really in force: without them the tiny model repeats itself (the original's penalty)."""
    assert len(set(reference["greedy"][1].tolist())) > 2


@pytest.mark.parametrize("decoding", DECODINGS)
def test_the_pipeline_answers_as_chat(model, processor, image, reference, decoding):
    answer_pipeline = pipeline("image-text-to-text", model=model, processor=processor)
    output = seeded(
        answer_pipeline, text=conversation(image), max_new_tokens=MAX_NEW_TOKENS, return_full_text=False,
        generate_kwargs=DECODINGS[decoding],
    )  # fmt: skip
    assert output[0]["generated_text"].strip() == reference[decoding][0]


def stream(model, inputs, streamer, **kwargs) -> str:
    worker = threading.Thread(target=seeded, args=(model.generate,), kwargs={**inputs, "streamer": streamer, **kwargs})
    worker.start()
    text = "".join(streamer)  # TextIteratorStreamer raises queue.Empty after its timeout: never hangs
    worker.join(STREAM_TIMEOUT_S)
    assert not worker.is_alive()
    return text


@pytest.mark.parametrize("decoding", DECODINGS)
def test_a_text_iterator_streamer_gets_the_answer_and_its_end(model, processor, image, reference, decoding):
    """With beams (the folder's decoding) the answer is known at the end: it is streamed then, and the stream ends."""
    inputs = encode(processor, conversation(image))
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_TIMEOUT_S)
    text = stream(model, inputs, streamer, max_new_tokens=MAX_NEW_TOKENS, **DECODINGS[decoding])
    assert text.strip() == reference[decoding][0]


def test_a_streamer_with_a_batch_is_refused_before_any_work(model, processor, image):
    inputs = encode(processor, [conversation(image), conversation(image, "Describe it.")], processor_kwargs={"padding": True})
    with pytest.raises(ValueError, match="stream one prompt at a time"):
        model.generate(**inputs, streamer=TextIteratorStreamer(processor.tokenizer), max_new_tokens=2)


@pytest.mark.parametrize("decoding", DECODINGS)
def test_a_static_cache_answers_as_the_dynamic_one(model, processor, image, reference, decoding):
    inputs = encode(processor, conversation(image))
    tokens = seeded(
        model.generate, **inputs, max_new_tokens=MAX_NEW_TOKENS, cache_implementation="static", **DECODINGS[decoding]
    )[0, inputs["input_ids"].shape[1] :]
    assert tokens.tolist() == reference[decoding][1].tolist()


def test_assisted_decoding_answers_as_greedy(model, processor, image, reference):
    inputs = encode(processor, conversation(image))
    tokens = model.generate(
        **inputs, max_new_tokens=MAX_NEW_TOKENS, assistant_model=model, **DECODINGS["greedy"]
    )[0, inputs["input_ids"].shape[1] :]
    assert tokens.tolist() == reference["greedy"][1].tolist()


PADDED_CHATS = ("这是什么？请详细地描述一下这张图片。", QUESTION)


def padded_batch(processor, image, padding_side):
    chats = [conversation(image, question) for question in PADDED_CHATS]
    batch = encode(processor, chats, processor_kwargs={"padding": True, "padding_side": padding_side})
    assert not batch["attention_mask"].all()
    return chats, batch


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_left_padded_batch_answers_as_each_prompt_alone(model, processor, image, use_cache):
    chats, batch = padded_batch(processor, image, "left")
    out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, use_cache=use_cache, **DECODINGS["greedy"])
    for row, messages in enumerate(chats):
        alone = encode(processor, messages)
        expected = model.generate(**alone, max_new_tokens=MAX_NEW_TOKENS, **DECODINGS["greedy"])
        assert out[row, batch["input_ids"].shape[1] :].tolist() == expected[0, alone["input_ids"].shape[1] :].tolist()


def test_right_padding_is_not_packing(model, processor, image):
    """Padding never starts a packed sequence: a right-padded prompt keeps its context whether the cache holds it or
    every step reads it again, and assisted decoding (which re-reads candidates) agrees."""
    _, batch = padded_batch(processor, image, "right")
    answers = [
        model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, use_cache=use_cache, **DECODINGS["greedy"])
        for use_cache in (True, False)
    ]
    assert answers[0].tolist() == answers[1].tolist()
    padded_row = {key: value[1:] for key, value in batch.items() if key != "pixel_values"}
    padded_row["pixel_values"] = batch["pixel_values"][1:]
    greedy = model.generate(**padded_row, max_new_tokens=MAX_NEW_TOKENS, **DECODINGS["greedy"])
    assisted = model.generate(**padded_row, max_new_tokens=MAX_NEW_TOKENS, assistant_model=model, **DECODINGS["greedy"])
    assert not padded_row["attention_mask"].all() and assisted.tolist() == greedy.tolist()


# --- out-of-vocabulary strings of the question, in the answer -----------------------------------------------------


@pytest.fixture(scope="module")
def oov(model, processor, image):
    """A question holding two strings outside the vocabulary, and an answer forced to copy them (ext ids)."""
    messages = conversation(image, "画一只🐉和🦄")
    table = processor.ext_tables(messages)[0]
    assert sorted(table.values()) == ["🐉", "🦄"]
    forced = sorted(table)  # <unk> (the first unknown string) and the ext column of the second
    length = encode(processor, messages)["input_ids"].shape[1]
    return messages, forced, LogitsProcessorList([ForceTokens(length, forced)])


def test_chat_reads_the_strings_of_the_question(model, processor, image, oov):
    _, _, force = oov
    answer, _ = model.chat(image, "画一只🐉和🦄", processor, max_new_tokens=3, logits_processor=force, **DECODINGS["greedy"])
    assert answer.startswith("🐉🦄")


def test_generate_with_the_processors_ext_table_reads_the_strings(model, processor, oov):
    messages, _, force = oov
    inputs = encode(processor, messages)
    out = model.generate(**inputs, max_new_tokens=3, logits_processor=force, **DECODINGS["greedy"])
    answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], ext_table=processor.ext_tables(messages)[0])
    assert answer.startswith("🐉🦄")


def test_a_streamer_given_the_ext_table_reads_the_strings(model, processor, oov):
    messages, _, force = oov
    inputs = encode(processor, messages)
    streamer = TextIteratorStreamer(
        processor.tokenizer, skip_prompt=True, timeout=STREAM_TIMEOUT_S, ext_table=processor.ext_tables(messages)[0]
    )
    text = stream(model, inputs, streamer, max_new_tokens=3, logits_processor=force, **DECODINGS["greedy"])
    assert text.startswith("🐉🦄")


def test_chat_gives_its_streamer_the_ext_table(model, processor, image, oov):
    _, _, force = oov
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, timeout=STREAM_TIMEOUT_S)
    result = {}
    worker = threading.Thread(target=lambda: result.update(answer=model.chat(
        image, "画一只🐉和🦄", processor, max_new_tokens=3, logits_processor=force, streamer=streamer,
        **DECODINGS["greedy"])[0]))  # fmt: skip
    worker.start()
    text = "".join(streamer)
    worker.join(STREAM_TIMEOUT_S)
    assert text.strip() == result["answer"] and text.startswith("🐉🦄")


def test_the_pipeline_warns_where_it_cannot_carry_the_strings(model, processor, oov):
    """transformers' pipeline hands the processor's post-processing the ids alone: the strings read <unk>, and a
    warning names the paths that keep them."""
    messages, _, force = oov
    answer_pipeline = pipeline("image-text-to-text", model=model, processor=processor)
    with pytest.warns(UserWarning, match="model.chat\\(\\) keeps them"):
        output = answer_pipeline(
            text=messages, max_new_tokens=3, return_full_text=False,
            generate_kwargs={"logits_processor": force, **DECODINGS["greedy"]},
        )  # fmt: skip
    assert output[0]["generated_text"].startswith("<unk>")


# --- the rules are CPM-Bee's, read from its config ----------------------------------------------------------------


def test_root_is_read_from_the_config_not_assumed():
    """A vocabulary whose <root> is not id 8: an id 8 in plain input is an ordinary token, not a prompt to refuse."""
    config = CpmBeeConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8, intermediate_size=32,
        root_token_id=30,
    )  # fmt: skip
    model = CpmBeeForCausalLM(config).eval()
    assert model(input_ids=torch.tensor([[6, 8, 7, 5]])).logits.shape == (1, 4, 40)
    with pytest.raises(ValueError, match="<root>"):
        model(input_ids=torch.tensor([[6, 30, 7, 5]]))


# --- training: the right objective, or a refusal that names it ----------------------------------------------------


def test_labels_on_the_bidirectional_prompt_are_refused(model, processor, image):
    inputs = encode(processor, conversation(image))
    labels = inputs["input_ids"].clone()  # what a generic collator does: learn every token
    with pytest.raises(ValueError, match="CpmBeeChatCollator"):
        model(**inputs, labels=labels)


def test_the_backbone_refuses_to_train_from_its_hidden_states(model, processor, image):
    """TRL's SFTTrainer scores the backbone's hidden states with lm_head.weight alone."""
    inputs = encode(processor, conversation(image))
    backbone = model.model
    backbone.train()
    try:
        with pytest.raises(ValueError, match="ModelLossSFTTrainer"):
            backbone(**inputs)
    finally:
        backbone.eval()
    with torch.no_grad():
        assert backbone(**inputs).last_hidden_state.shape[1] == inputs["input_ids"].shape[1]


# --- any vision tower over CPM-Bee, with structural inputs written by hand ------------------------------------


def test_structural_inputs_reach_the_llm_in_forward_and_generate(tokenizer):
    from tiny_models import NUM_QUERY_TOKENS, make_chat_config

    llm_config = CpmBeeConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=8, intermediate_size=64
    )
    config = make_chat_config(tokenizer)
    config = VisCPMChatCpmBeeConfig(
        vision_config=config.vision_config, text_config=llm_config, image_token_id=2, num_query_tokens=NUM_QUERY_TOKENS,
        bridge_type="query_resampler",
    )
    torch.manual_seed(0)
    model = VisCPMChatCpmBeeForConditionalGeneration(config).eval()
    segments = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 3])  # root, image, question, answer start
    inputs = {
        "input_ids": torch.tensor([[6, 8, 6, 2, 2, 2, 2, 7, 6, 50, 7, 6]]),
        "pixel_values": torch.randn(1, 3, 32, 32),
        "context": (segments < 3).long()[None],
        "segment_ids": segments[None],
        "num_segments": torch.full((1, 12), 4),
        "segment_rel_offset": torch.zeros(1, 12, dtype=torch.long),
        "segment_rel": torch.tensor([[0, 2, 2, 2, 9, 0, 10, 10, 9, 10, 0, 10, 9, 10, 10, 0]]),
        "ext_table_ids": torch.tensor([[1]]),
        "ext_table_sub": torch.tensor([[1]]),
    }
    out = model(**inputs)
    assert out.logits.shape == (1, 12, 121)  # vocabulary + one ext column
    for kwargs in ({"num_beams": 1}, {"num_beams": 3}):
        generated = model.generate(**inputs, max_new_tokens=5, **kwargs)
        llm_inputs, _, _ = model.model.prepare_llm_inputs(inputs["input_ids"], None, inputs["pixel_values"])
        structure = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values")}
        reference = model.model.llm.generate(
            inputs_embeds=llm_inputs["inputs_embeds"],
            generation_config=model.generation_config,
            max_new_tokens=5,
            **structure,
            **kwargs,
        )
        torch.testing.assert_close(generated[0, 12:], reference[0])
        assert not (generated[0, 12:] == 2).any()
