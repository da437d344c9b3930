"""Converting the original VisCPM-Chat checkpoint, and the converted model against the original's golden vectors."""

import json

import pytest
import torch
import torch.nn.functional as F
from parity import PARITY_DIR, json_file, require_parity, tensors
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from viscpm_hf import CpmBeeTokenizer, VisCPMChatForConditionalGeneration, VisCPMChatProcessor
from viscpm_hf.convert.chat import IMAGE_TOKEN_ID, chat_config_from_original, convert_chat, plan_conversion
from viscpm_hf.convert.cli import main
from viscpm_hf.models.cpmbee.prompt_cpmbee import collate_prompts, flatten_prompt
from viscpm_hf.models.cpmbee.markup_cpmbee import escape_markup


CASES = ["e1_img0_en", "e2_img1_zh", "e3_img0_zh_multiturn"]
PIXELS = {"vision_image0.png": "image0.pixel_values", "vision_image1.png": "image1.pixel_values"}


def tiny_configs() -> dict:
    configs = json_file("configs.json")
    return {"llm_config": configs["cpmbee_tiny"], "vision_config": configs["beit3_tiny"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    require_parity()
    output = tmp_path_factory.mktemp("converted") / "viscpm-chat-tiny"
    convert_chat(
        PARITY_DIR / "viscpm_chat_tiny.safetensors",
        PARITY_DIR / "cpmbee_vocab.txt",
        output,
        max_shard_size="8MB",
        **tiny_configs(),
    )
    return output


@pytest.fixture(scope="module")
def model(converted):
    return AutoModelForImageTextToText.from_pretrained(converted).eval()


@pytest.fixture(scope="module")
def processor(converted):
    return AutoProcessor.from_pretrained(converted)


def case_messages(case: dict) -> list[dict]:
    """The chat of a golden case in the transformers format (its context string split back into turns)."""
    messages, image = [], {"type": "image", "image": str(PARITY_DIR / case["image"])}
    for line in filter(None, case["context"].split("\n")):
        role, text = line.split(": ", 1)
        messages.append({"role": "user" if role == "User" else "assistant", "content": [{"type": "text", "text": text}]})
    messages.append({"role": "user", "content": [{"type": "text", "text": case["question"]}]})
    messages[0]["content"].insert(0, image)
    return messages


def case_inputs(processor, name: str) -> dict:
    case = json_file("chat_e2e.json")[name]
    inputs = processor.apply_chat_template(
        case_messages(case), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    # The stored pixels were resized by Pillow 9.5; feed them so the test does not depend on the Pillow in use.
    inputs["pixel_values"] = tensors("vision.safetensors")[PIXELS[case["image"]]]
    return dict(inputs)


# --- the converted folder -----------------------------------------------------------------------------------


def test_folder_is_complete_and_sharded(converted):
    names = {path.name for path in converted.iterdir()}
    assert {"config.json", "generation_config.json", "processor_config.json", "chat_template.jinja", "vocab.txt"} <= names
    assert "README.md" in names and "model.safetensors.index.json" in names
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= names
    assert not any(name.endswith((".bin", ".pt")) for name in names)
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no partial folder left
    card = (converted / "README.md").read_text()
    assert 'from_pretrained("viscpm-chat-tiny")' in card and ".partial" not in card


def test_weights_are_the_original_tensors_renamed(converted):
    original = load_file(PARITY_DIR / "viscpm_chat_tiny.safetensors")
    model = VisCPMChatForConditionalGeneration.from_pretrained(converted)
    state = model.state_dict()
    assert torch.equal(state["model.vision_tower.embeddings.query_tokens"], original["query"])
    assert torch.equal(state["model.bridge.mapping.linear_2.weight"], original["mapping.2.weight"])
    assert torch.equal(state["model.llm.model.layers.1.mlp.down_proj.weight"], original["llm.encoder.layers.1.ffn.ffn.w_out.weight"])
    assert torch.equal(state["model.llm.lm_head.weight"], original["llm.input_embedding.weight"])  # tied


def test_generation_config_has_the_papers_decoding(model):
    config = model.generation_config
    assert (config.num_beams, config.length_penalty, config.max_new_tokens) == (3, 3.0, 514)
    assert config.cpmbee_decoding == {"temperature": 0.7, "repetition_penalty": 1.1}
    assert config.suppress_tokens == [IMAGE_TOKEN_ID]


def test_loads_in_bfloat16_with_device_map(converted):
    model = AutoModelForImageTextToText.from_pretrained(converted, dtype=torch.bfloat16, device_map="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- parity with the original ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_processor_builds_the_original_prompt(processor, name):
    case = json_file("chat_e2e.json")[name]
    inputs = case_inputs(processor, name)
    original = case["inference_inputs"]
    ids = inputs["input_ids"][:, :-1].clone()  # the last token is the answer's <s>: the original feeds it first
    assert (ids == IMAGE_TOKEN_ID).sum() == 64
    ids[ids == IMAGE_TOKEN_ID] = 1  # the original's image placeholder is <unk>
    assert ids.tolist() == original["input_ids"]
    assert inputs["segment_ids"][:, :-1].tolist() == original["segment_ids"]
    assert inputs["segment_rel"].tolist() == original["segment_rel"]
    assert inputs["input_id_subs"][:, :-1].tolist() == original["input_id_subs"]
    assert inputs["segment_ids"][0, -1] == case["other_info"]["predict_segments"][0][0]


@pytest.mark.parametrize("name", CASES)
def test_image_features_match_the_original(model, processor, name):
    inputs = case_inputs(processor, name)
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"]).pooler_output
    expected = tensors("chat_e2e.safetensors")[f"{name}.vision_hidden_states"]
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", CASES)
def test_first_decoding_logits_match_the_original(model, processor, name):
    inputs = case_inputs(processor, name)
    greedy = {k.split(".", 2)[2]: v for k, v in tensors("chat_e2e.safetensors").items() if k.startswith(f"{name}.greedy.")}
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    scale = greedy["prefill_logits_last"].abs().max().item()
    torch.testing.assert_close(logits[-2], greedy["prefill_logits_last"][0], rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(logits[-1], greedy["step_logits_full_first2"][0], rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", CASES)
def test_greedy_generation_matches_the_original(model, processor, name):
    inputs = case_inputs(processor, name)
    expected = json_file("chat_e2e.json")[name]["greedy16"]["chosen_ids"]
    output = model.generate(
        **inputs, do_sample=False, num_beams=1, max_new_tokens=16, cpmbee_decoding={"temperature": 1.0, "repetition_penalty": 1.0}
    )
    assert output[0, inputs["input_ids"].shape[1] :].tolist() == expected


def test_training_forward_and_loss_match_the_original(model):
    flatten = json_file("flatten_cases.json")["train_batch"]
    tokenizer = CpmBeeTokenizer(vocab_file=str(PARITY_DIR / "cpmbee_vocab.txt"))
    data = json_file("chat_e2e.json")["train_batch"]
    prompts = [flatten_prompt(tokenizer, case["input_dict"]) for case in flatten["cases"]]
    batch = collate_prompts(tokenizer, prompts, flatten["collater_max_len"])
    inputs = batch.model_inputs()
    for row, bounds in enumerate(batch.image_bound):
        for start, end in bounds:
            inputs["input_ids"][row, start:end] = IMAGE_TOKEN_ID
    stored = tensors("chat_e2e.safetensors")
    with torch.no_grad():
        out = model(**inputs, pixel_values=stored["train_batch.pixel_values"], output_hidden_states=True)
    torch.testing.assert_close(out.image_hidden_states, stored["train_batch.vision_hidden_states"], rtol=1e-5, atol=2e-3)
    torch.testing.assert_close(out.hidden_states[-1], stored["train_batch.hidden_states"], rtol=1e-5, atol=1e-4)
    assert torch.equal(batch.target, stored["train_batch.target"].long())
    loss = F.cross_entropy(out.logits.flatten(0, 1), batch.target.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, stored["train_batch.loss"][0], rtol=1e-5, atol=1e-5)
    assert data["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_chat_api_over_two_turns_matches_the_original(model, processor):
    """The original `chat()` with all its defaults (3 beams, max_length 512), then a second turn on cached features."""
    case = json_file("chat_e2e.json")["chat_api_two_turns_max512"]
    answer, history = model.chat(str(PARITY_DIR / case["image"]), case["turn1"]["question"], processor)
    assert answer == case["turn1"]["answer"]
    second, history = model.chat(None, case["turn2"]["question"], processor, history=history)
    assert second == case["turn2"]["answer"]
    context = json.loads(processor.apply_chat_template(history.messages[:-1], add_generation_prompt=True))["context"]
    assert context == case["turn2"]["context_in"]


def test_processor_pixels_equal_the_originals_for_an_image_pillow_resizes_alike(processor):
    """image0 (300x200) resizes identically in Pillow 9.5 and 13 (README section 10)."""
    pixels = processor(images=[str(PARITY_DIR / "vision_image0.png")], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, tensors("vision.safetensors")["image0.pixel_values"], rtol=0, atol=1e-6)


class RealKeyLayout:
    """The released checkpoint's names and shapes (no tensors), as `OriginalCheckpoint` exposes them."""

    path = PARITY_DIR / "real_checkpoint_keys.json"

    def __init__(self):
        self.shapes = {key: tuple(shape) for key, (shape, _) in json_file("real_checkpoint_keys.json")["chat_checkpoint"].items()}

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]


def test_the_released_checkpoint_layout_converts_completely():
    """All released variants (balance, zhplus, v1, v1.1) share this layout; every tensor lands or is dropped on purpose."""
    layout = RealKeyLayout()
    with torch.device("meta"):
        model = VisCPMChatForConditionalGeneration(chat_config_from_original())
    plan = plan_conversion(layout, model)
    dropped = set(layout.keys()) - {key for key, _ in plan}
    assert dropped == {"vpm.mim_head.weight", "vpm.mim_head.bias", "vpm.beit3.text_embed.weight", "vpm.beit3.vision_embed.mask_token"}
    converted_params = sum(torch.Size(layout.shape(key)).numel() for key, _ in plan)
    assert converted_params == model.num_parameters()
    assert json_file("real_checkpoint_keys.json")["chat_num_params"] - converted_params == sum(
        torch.Size(layout.shape(key)).numel() for key in dropped
    )


# --- bad input ---------------------------------------------------------------------------------------------


def test_a_file_that_is_not_a_checkpoint(tmp_path, originals):
    require_parity()
    bogus = originals / "model.pt"
    bogus.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        convert_chat(bogus, PARITY_DIR / "cpmbee_vocab.txt", tmp_path / "out", **tiny_configs())
    assert not (tmp_path / "out").exists()


def test_missing_files(tmp_path, originals):
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        convert_chat(originals / "nope.pt", PARITY_DIR / "cpmbee_vocab.txt", tmp_path / "out", **tiny_configs())
    with pytest.raises(FileNotFoundError, match="Vocabulary not found"):
        convert_chat(PARITY_DIR / "viscpm_chat_tiny.safetensors", tmp_path / "bee.txt", tmp_path / "out")


@pytest.fixture(scope="module")
def original_weights():
    return load_file(require_parity() / "viscpm_chat_tiny.safetensors")


def test_missing_unexpected_and_misshapen_keys_are_all_reported(tmp_path, originals, original_weights):
    broken = dict(original_weights)
    del broken["mapping.0.bias"]
    broken["llm.extra.weight"] = torch.zeros(1)
    broken["mapping.2.weight"] = torch.zeros(3, 3)
    path = originals / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(ValueError) as error:
        convert_chat(path, PARITY_DIR / "cpmbee_vocab.txt", tmp_path / "out", **tiny_configs())
    message = str(error.value)
    assert "model.bridge.mapping.linear_1.bias" in message and "llm.extra.weight" in message
    assert "mapping.2.weight: (3, 3)" in message
    assert not (tmp_path / "out").exists()


def test_pickled_checkpoints_load_safely_and_convert_alike(tmp_path, originals, original_weights, converted):
    path = originals / "viscpm_chat_balance_checkpoint.pt"
    torch.save({**original_weights, "vpm.mim_head.weight": torch.zeros(8, 48)}, path)  # the unused head is dropped
    output = tmp_path / "from-pt"
    assert main(["chat", "--checkpoint", str(path), "--vocab", str(PARITY_DIR / "cpmbee_vocab.txt"), "--output",
                 str(output), "--llm-config", str(_write_json(originals, "llm.json", tiny_configs()["llm_config"])),
                 "--vision-config", str(_write_json(originals, "vision.json", tiny_configs()["vision_config"]))]) == 0
    assert (output / "model.safetensors").is_file()
    a = VisCPMChatForConditionalGeneration.from_pretrained(output).state_dict()
    b = VisCPMChatForConditionalGeneration.from_pretrained(converted).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_existing_output_is_kept_unless_overwrite(tmp_path, converted):
    output = tmp_path / "existing"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    args = ["chat", "--checkpoint", str(PARITY_DIR / "viscpm_chat_tiny.safetensors"), "--vocab",
            str(PARITY_DIR / "cpmbee_vocab.txt"), "--output", str(output)]
    assert main(args) == 1
    assert (output / "keep.txt").read_text() == "user data"


def _write_json(folder, name, data):
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def test_processor_type(processor):
    assert isinstance(processor, VisCPMChatProcessor)
    assert processor.tokenizer.prompt_format == "structured" and processor.image_token_id == IMAGE_TOKEN_ID


@pytest.mark.parametrize("setting", ["beam_max16", "beam_max16_lp1"])
@pytest.mark.parametrize("name", CASES)
def test_beam_search_matches_the_original(model, processor, name, setting):
    """The paper's decoding (3 beams, temperature 0.7, repetition penalty 1.1, length penalty 3) through generate."""
    case = json_file("chat_e2e.json")[name][setting]
    settings = case["settings"]
    inputs = case_inputs(processor, name)
    output = model.generate(
        **inputs,
        num_beams=settings["beam_size"],
        length_penalty=settings["length_penalty"],
        max_new_tokens=settings["max_length"] + 2,  # the original allows max_length + 1 tokens, then </s>
        cpmbee_decoding={"temperature": settings["temperature"], "repetition_penalty": settings["repetition_penalty"]},
    )
    assert processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True) == case["answer"]
    assert not model._forward_hooks  # the raw-logit hook of beam search is gone once generate returns


@pytest.mark.parametrize("setting", ["beam_max16", "beam_max16_lp1"])
@pytest.mark.parametrize("name", CASES)
def test_beam_search_offers_the_originals_hypotheses_and_stops_at_its_step(model, processor, name, setting, monkeypatch):
    """Every finished hypothesis the original offered (tokens, summed log-prob, score), in order, and its number of
    model calls: the stopping rule (checked before a step's candidates are used) decides the latter."""
    from viscpm_hf.models.cpmbee import generation_cpmbee

    case = json_file("chat_e2e.json")[name][setting]
    settings = case["settings"]
    offered, calls = [], []
    original_offer = generation_cpmbee.FinishedHypotheses.offer

    def record(self, tokens, sum_logprob):
        offered.append((tokens, sum_logprob, sum_logprob / len(tokens) ** self.length_penalty))
        original_offer(self, tokens, sum_logprob)

    monkeypatch.setattr(generation_cpmbee.FinishedHypotheses, "offer", record)
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.generate(
            **case_inputs(processor, name),
            num_beams=settings["beam_size"],
            length_penalty=settings["length_penalty"],
            max_new_tokens=settings["max_length"] + 2,
            cpmbee_decoding={"temperature": settings["temperature"], "repetition_penalty": settings["repetition_penalty"]},
        )
    finally:
        handle.remove()
    expected = case["hypotheses_added"]
    assert [tokens for tokens, _, _ in offered] == [[output_id for output_id, _ in h["hyp"]] for h in expected]
    torch.testing.assert_close([s for _, s, _ in offered], [h["sum_logprobs"] for h in expected], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close([s for _, _, s in offered], [h["score"] for h in expected], atol=1e-3, rtol=1e-4)
    # The original feeds the prompt, then the answer's <s> in a call of its own (here <s> ends the prompt), and
    # after deciding to stop early it runs one more call before leaving its loop.
    stopped_early = max(len(h["hyp"]) for h in expected) < settings["max_length"] + 2
    assert len(calls) == case["n_inference_calls"] - 1 - stopped_early


@pytest.mark.parametrize("decoding", [{"num_beams": 1}, {}])  # greedy, and the converted folder's own defaults
def test_image_text_to_text_pipeline_answers_as_generate(model, processor, decoding):
    from transformers import pipeline

    image = str(PARITY_DIR / "vision_image0.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=6, **decoding)
    expected = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    answer = pipeline("image-text-to-text", model=model, processor=processor)(
        text=messages, generate_kwargs={"max_new_tokens": 6, **decoding}, return_full_text=False
    )
    assert expected and answer[0]["generated_text"] == expected


# --- user text stays text ------------------------------------------------------------------------------------


def question_chat(question: str) -> list[dict]:
    image = {"type": "image", "image": str(PARITY_DIR / "vision_image0.png")}
    return [{"role": "user", "content": [image, {"type": "text", "text": question}]}]


def test_markup_in_a_question_reaches_the_model_as_text(processor):
    """`<mask>` is also the image placeholder: escaped user text must neither count nor expand as one."""
    question = "Is <mask> or <<ans>> a tag?"
    chat = question_chat(question)
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    ids, segments = inputs["input_ids"][0], inputs["segment_ids"][0]
    assert (ids == IMAGE_TOKEN_ID).sum() == 64
    # Segments: root, then key/value pairs image, context, question, <ans>; the question's value is the third from last.
    value = ids[segments == segments[-1] - 2]
    assert value[0] == 6 and value[-1] == 7  # <s> ... </s>
    assert processor.tokenizer.decode(value[1:-1]) == question
    assert json.loads(processor.apply_chat_template(chat, add_generation_prompt=True))["question"] == escape_markup(question)


def test_chat_with_markup_in_the_question_answers_and_keeps_it_in_the_context(model, processor):
    answer, history = model.chat(str(PARITY_DIR / "vision_image0.png"), "What is <mask>?", processor, num_beams=1, max_new_tokens=4)
    assert isinstance(answer, str)
    prompt = json.loads(processor.apply_chat_template([*history.messages, {"role": "user", "content": "More?"}], add_generation_prompt=True))
    assert prompt["context"] == f"User: What is <<mask>?\nAI: {escape_markup(answer)}\n"


@pytest.mark.parametrize(
    "conversation, error, message",
    [
        (question_chat(None), ValueError, r"Message 0 \(user\), item 1 has text None"),
        ([{"role": "user", "content": [{"type": "image"}]}], ValueError, r"Message 0 \(user\) has no text"),
        ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}], ValueError, r"Message 1 has role 'bot'"),
        ([], ValueError, r"conversation is \[\]"),
        ([{"role": "user", "content": 5}], TypeError, r"Message 0 \(user\) has content of type int"),
    ],
    ids=["text None", "no text", "unknown role", "empty", "content int"],
)
def test_malformed_conversations_are_refused(processor, conversation, error, message):
    with pytest.raises(error, match=message):
        processor.apply_chat_template(conversation, add_generation_prompt=True)


def test_two_threads_sharing_the_model_and_processor_get_the_sequential_answers(model, processor):
    """Beam search with the folder's cpmbee_decoding and per-prompt ext tables: nothing per request lives on the
    shared model or processor, so concurrent requests answer as they do one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    image = str(PARITY_DIR / "vision_image0.png")
    questions = ["What is it?", "图中是什么？", "Describe the ☃ in it.", "它是什么颜色？", "Is there a 𝔸?", "Why?"]
    decoding = {"num_beams": 3, "max_new_tokens": 6}
    sequential = [model.chat(image, question, processor, **decoding)[0] for question in questions]
    assert len(set(sequential)) > 1
    requests = questions * 3
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(model.chat, image, question, processor, **decoding) for question in requests]
        answers = [future.result(timeout=120)[0] for future in futures]
    assert answers == sequential * 3


def test_the_converted_model_carries_the_originals_context_and_refuses_longer_before_allocating(model, processor):
    """The original read prompts of at most 3000 tokens and wrote at most 514; a 20,000-character question is
    refused with that limit, before the prefix-LM attention (20,000^2 biases per head) is built."""
    import tracemalloc

    assert model.config.text_config.max_position_embeddings == 3514
    image = str(PARITY_DIR / "vision_image0.png")
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="at most 3514"):
            model.chat(image, "天" * 20000, processor, num_beams=1, max_new_tokens=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20, f"{peak / 2**20:.0f} MiB traced before the refusal"
