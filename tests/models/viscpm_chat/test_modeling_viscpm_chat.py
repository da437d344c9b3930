import re
import threading

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import NUM_QUERY_TOKENS, make_chat_config, make_chat_model, random_image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    DynamicCache,
    TextIteratorStreamer,
    pipeline,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from viscpm_hf import (
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    VisCPMChatModel,
    VisCPMChatProcessor,
)


def user_turn(question, num_images=1):
    return [
        {
            "role": "user",
            "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}],
        }
    ]


def prompt_inputs(processor, questions, images, padding_side="left"):
    texts = [processor.apply_chat_template(user_turn(q), add_generation_prompt=True) for q in questions]
    processor.tokenizer.padding_side = padding_side
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


@pytest.fixture
def inputs(processor, image):
    return prompt_inputs(processor, ["What is shown?"], [image])


# --- composition with any LLM and any vision tower ---------------------------------------------------------


@pytest.mark.parametrize(
    "text_model_type, vision_model_type",
    [("qwen2", "siglip_vision_model"), ("llama", "clip_vision_model"), ("gemma3_text", "siglip_vision_model")],
)
def test_forward_with_any_llm_and_vision_tower(tokenizer, inputs, text_model_type, vision_model_type):
    model = make_chat_model(tokenizer, text_model_type=text_model_type, vision_model_type=vision_model_type)
    outputs = model(**inputs)
    assert outputs.logits.shape == (*inputs["input_ids"].shape, len(tokenizer))
    assert outputs.image_hidden_states.shape == (1, NUM_QUERY_TOKENS, 32)
    assert torch.isfinite(outputs.logits).all()


def test_convolutional_tower_feature_maps_are_flattened(tokenizer, inputs):
    """CNN towers (ResNet here; timm models through TimmWrapper alike) return (images, channels, h, w) maps."""
    config = make_chat_config(tokenizer)
    config = VisCPMChatConfig(
        vision_config={"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1]},
        text_config=config.text_config,
        image_token_id=config.image_token_id,
        num_query_tokens=NUM_QUERY_TOKENS,
        vision_feature_dim=32,
        bridge_num_attention_heads=4,
    )
    model = VisCPMChatForConditionalGeneration(config).eval()
    feature_map = model.model.vision_tower(inputs["pixel_values"]).last_hidden_state
    assert feature_map.ndim == 4
    assert model.get_image_features(inputs["pixel_values"]).pooler_output.shape == (1, NUM_QUERY_TOKENS, 32)
    assert model.generate(**inputs, max_new_tokens=2).shape[1] == inputs["input_ids"].shape[1] + 2


def test_image_features_land_at_the_placeholders(chat_model, inputs):
    """The LLM sees text embeddings everywhere except at image tokens, where it sees the bridge outputs."""
    seen = {}
    chat_model.model.llm.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    outputs = chat_model(**inputs)
    mask = inputs["input_ids"] == chat_model.config.image_token_id
    text_embeds = chat_model.get_input_embeddings()(inputs["input_ids"])
    torch.testing.assert_close(seen["embeds"][~mask], text_embeds[~mask])
    torch.testing.assert_close(seen["embeds"][mask], outputs.image_hidden_states.reshape(-1, 32))


def test_query_resampler_returns_a_fixed_number_of_tokens_whatever_the_patch_count(tokenizer):
    model = make_chat_model(tokenizer)
    for num_patches in (3, 16, 50):
        features = torch.randn(2, num_patches, 32)
        assert model.model.bridge(features).shape == (2, NUM_QUERY_TOKENS, 32)


def test_in_tower_bridge_maps_only_and_checks_the_count(tokenizer):
    model = make_chat_model(tokenizer, bridge_type="in_tower")
    assert model.model.bridge.resampler is None
    assert model.model.bridge(torch.randn(1, NUM_QUERY_TOKENS, 32)).shape == (1, NUM_QUERY_TOKENS, 32)
    with pytest.raises(ValueError, match="in_tower"):
        model.model.bridge(torch.randn(1, 16, 32))


# --- Auto classes and save/load --------------------------------------------------------------------------


@pytest.fixture
def saved_dir(tmp_path, chat_model, processor):
    chat_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path


def test_auto_classes_resolve_without_remote_code(saved_dir):
    files = {path.name for path in saved_dir.iterdir()}
    assert {"model.safetensors", "config.json", "processor_config.json", "chat_template.jinja"} <= files
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    assert type(AutoConfig.from_pretrained(saved_dir)) is VisCPMChatConfig
    assert type(AutoModel.from_pretrained(saved_dir)) is VisCPMChatModel
    assert type(AutoModelForImageTextToText.from_pretrained(saved_dir)) is VisCPMChatForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(saved_dir)) is VisCPMChatProcessor


def test_save_load_round_trip_gives_identical_logits(saved_dir, chat_model, inputs):
    loaded = AutoModelForImageTextToText.from_pretrained(saved_dir)
    torch.testing.assert_close(loaded(**inputs).logits, chat_model(**inputs).logits, rtol=0, atol=0)
    assert loaded.generation_config.num_beams == 3
    assert loaded.generation_config.suppress_tokens == [chat_model.config.image_token_id]


def test_bare_model_loads_every_weight_and_matches_the_head_model(saved_dir, chat_model, inputs):
    bare, info = AutoModel.from_pretrained(saved_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hidden = bare(**inputs, output_hidden_states=True).last_hidden_state
    reference = chat_model(**inputs, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, reference)


def test_image_text_to_text_pipeline(saved_dir, image):
    generator = pipeline("image-text-to-text", model=str(saved_dir))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi?"}]}]
    result = generator(text=messages, max_new_tokens=3, num_beams=1)
    assert result[0]["generated_text"][-1]["role"] == "assistant"


def test_loads_in_bfloat16_with_device_map(saved_dir, inputs):
    model = AutoModelForImageTextToText.from_pretrained(saved_dir, dtype=torch.bfloat16, device_map="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("scheme", ["bnb-int8", "quanto-int8"])
def test_quantization_keeps_the_tower_the_bridge_and_the_head_in_full_precision(saved_dir, inputs, scheme):
    """A quantization config that names nothing to skip quantizes the LLM's decoder only (the convention for VLMs);
    one that names its own modules is followed as given."""
    from transformers import BitsAndBytesConfig, QuantoConfig

    pytest.importorskip({"bnb": "bitsandbytes", "quanto": "optimum.quanto"}[scheme.split("-")[0]])
    config = {"bnb-int8": BitsAndBytesConfig(load_in_8bit=True), "quanto-int8": QuantoConfig(weights="int8")}[scheme]
    model = AutoModelForImageTextToText.from_pretrained(saved_dir, quantization_config=config, device_map="cpu")
    linears = {name: type(module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    quantized = {name for name, kind in linears.items() if kind is not torch.nn.Linear}
    assert quantized and all(name.startswith("model.llm.model.layers.") for name in quantized)
    assert {name for name in linears if name.startswith("model.llm.model.layers.")} == quantized
    assert linears["model.llm.lm_head"] is torch.nn.Linear
    assert model(**inputs).logits.isfinite().all()
    field = {"bnb-int8": "llm_int8_skip_modules", "quanto-int8": "modules_to_not_convert"}[scheme]
    assert getattr(config, field) is None  # the caller's config is left as it was
    setattr(config, field, ["model.llm.lm_head"])  # named by the caller: the tower is quantized too
    model = AutoModelForImageTextToText.from_pretrained(saved_dir, quantization_config=config, device_map="cpu")
    assert any(
        name.startswith("model.vision_tower.") and type(module) is not torch.nn.Linear
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )


def test_no_split_modules_cover_every_sub_model(chat_model):
    assert {"VisCPMChatBridge", "Qwen2DecoderLayer", "SiglipEncoderLayer"} <= set(chat_model._no_split_modules)


# --- loss ------------------------------------------------------------------------------------------------


def test_loss_ignores_image_and_padding_tokens(chat_model, processor, image):
    inputs = prompt_inputs(processor, ["What?", "A much longer question?"], [image, image], padding_side="right")
    ignored = (inputs["input_ids"] == chat_model.config.image_token_id) | (inputs["attention_mask"] == 0)
    assert ignored.any() and (inputs["attention_mask"] == 0).any()

    labels = inputs["input_ids"].clone()
    outputs = chat_model(**inputs, labels=labels)
    shifted_logits, shifted_labels = outputs.logits[:, :-1], labels[:, 1:].masked_fill(ignored[:, 1:], -100)
    expected = F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1))
    torch.testing.assert_close(outputs.loss, expected)

    scrambled = labels.masked_fill(ignored, 7)
    torch.testing.assert_close(chat_model(**inputs, labels=scrambled).loss, outputs.loss)


# --- generation ------------------------------------------------------------------------------------------


def test_left_padded_batch_generates_the_same_tokens_as_one_by_one(chat_model, processor):
    questions = ["What is it?", "Describe the picture in detail, please."]
    images = [random_image(1), random_image(2)]
    batch = prompt_inputs(processor, questions, images)
    batch_out = chat_model.generate(**batch, max_new_tokens=6, num_beams=1)
    for row, (question, image) in enumerate(zip(questions, images)):
        single = prompt_inputs(processor, [question], [image])
        single_out = chat_model.generate(**single, max_new_tokens=6, num_beams=1)
        new_tokens = single_out[0, single["input_ids"].shape[1] :]
        torch.testing.assert_close(batch_out[row, batch["input_ids"].shape[1] :], new_tokens)


def test_beam_search_equals_the_llms_beam_search_on_merged_embeddings(chat_model, inputs):
    """The paper's 3-beam default runs, and wiring adds nothing: same beams as the bare LLM fed the merged inputs."""
    assert chat_model.generation_config.num_beams == 3
    output = chat_model.generate(**inputs, max_new_tokens=5)
    llm_inputs, _, _ = chat_model.model.prepare_llm_inputs(inputs["input_ids"], None, inputs["pixel_values"])
    reference = chat_model.model.llm.generate(
        inputs_embeds=llm_inputs["inputs_embeds"],
        attention_mask=inputs["attention_mask"],
        generation_config=chat_model.generation_config,
        max_new_tokens=5,
    )
    torch.testing.assert_close(output[0, inputs["input_ids"].shape[1] :], reference[0])


def test_sampling_is_reproducible_with_a_seed(chat_model, inputs):
    torch.manual_seed(3)
    first = chat_model.generate(**inputs, do_sample=True, num_beams=1, max_new_tokens=5)
    torch.manual_seed(3)
    second = chat_model.generate(**inputs, do_sample=True, num_beams=1, max_new_tokens=5)
    torch.testing.assert_close(first, second)


def test_streaming_yields_the_greedy_answer(chat_model, processor, inputs):
    # Both waits are bounded, and an error in the generate thread is reported instead of a streamer that waits.
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    errors = []

    def generate():
        try:
            chat_model.generate(**inputs, max_new_tokens=6, num_beams=1, streamer=streamer)
        except Exception as error:  # re-raised below, in the test's thread
            errors.append(error)
            streamer.end()

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    streamed = "".join(streamer)
    thread.join(timeout=60)
    assert not thread.is_alive(), "generate did not finish within 60 s"
    if errors:
        raise errors[0]
    greedy = chat_model.generate(**inputs, max_new_tokens=6, num_beams=1)
    expected = processor.decode(greedy[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert streamed == expected


def test_image_placeholder_is_never_generated(chat_model, inputs):
    image_token_id = chat_model.config.image_token_id
    with torch.no_grad():  # make the image token the LLM's favourite
        chat_model.model.llm.lm_head.weight[image_token_id] = 10 * chat_model.model.llm.lm_head.weight.abs().max()
    plain = chat_model.model.llm.generate(
        input_ids=inputs["input_ids"][:, -3:], max_new_tokens=4, num_beams=1, do_sample=False
    )
    assert (plain[0, 3:] == image_token_id).any()
    for kwargs in ({"num_beams": 1}, {"num_beams": 3}, {"num_beams": 1, "do_sample": True}):
        output = chat_model.generate(**inputs, max_new_tokens=4, **kwargs)
        assert not (output[0, inputs["input_ids"].shape[1] :] == image_token_id).any()


def test_sdpa_and_eager_agree(saved_dir, inputs):
    sdpa = AutoModelForImageTextToText.from_pretrained(saved_dir, attn_implementation="sdpa")
    eager = AutoModelForImageTextToText.from_pretrained(saved_dir, attn_implementation="eager")
    assert eager.model.bridge.resampler.attention.config._attn_implementation == "eager"
    torch.testing.assert_close(sdpa(**inputs).logits, eager(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, inputs):
    grads = []
    for checkpointing in (False, True):
        model = make_chat_model(tokenizer).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.model.llm.model.gradient_checkpointing
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads.append(model.model.bridge.resampler.queries.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# --- reusing image features ------------------------------------------------------------------------------


def test_precomputed_image_features_equal_pixel_values(chat_model, inputs):
    features = chat_model.get_image_features(inputs["pixel_values"])
    assert isinstance(features, BaseModelOutputWithPooling)
    text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}
    reused = chat_model(**text_only, mm_encoder_outputs={"image": features})
    torch.testing.assert_close(reused.logits, chat_model(**inputs).logits)
    generated = chat_model.generate(**text_only, mm_encoder_outputs={"image": features}, max_new_tokens=4)
    torch.testing.assert_close(generated, chat_model.generate(**inputs, max_new_tokens=4))


def test_several_images_per_sample_and_uneven_batches(chat_model, processor):
    texts = [
        processor.apply_chat_template(user_turn("Compare them.", num_images=2), add_generation_prompt=True),
        processor.apply_chat_template(user_turn("And this?"), add_generation_prompt=True),
    ]
    images = [[random_image(1), random_image(2)], [random_image(3)]]
    processor.tokenizer.padding_side = "left"
    batch = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert batch["pixel_values"].shape[0] == 3
    out = chat_model(**batch)
    assert out.image_hidden_states.shape[0] == 3
    generated = chat_model.generate(**batch, max_new_tokens=3)  # beam search expands two-image groups in order
    first = processor(text=texts[:1], images=images[:1], return_tensors="pt")
    alone = chat_model.generate(**first, max_new_tokens=3)
    torch.testing.assert_close(generated[0, batch["input_ids"].shape[1] :], alone[0, first["input_ids"].shape[1] :])


# --- bad input -------------------------------------------------------------------------------------------


def test_image_token_and_feature_mismatch_names_both_counts(chat_model, inputs):
    two_images = torch.cat([inputs["pixel_values"]] * 2)
    with pytest.raises(ValueError, match=r"4 image tokens but 2 image\(s\) give 2 x 4 = 8 features; .*places for 1 "):
        chat_model(input_ids=inputs["input_ids"], pixel_values=two_images)


def test_image_tokens_that_are_not_whole_images_are_said_to_be_cut_or_from_another_processor(chat_model, inputs):
    ids = inputs["input_ids"]
    first = int((ids[0] == chat_model.config.image_token_id).nonzero()[0])
    cut = torch.cat([ids[:, :first], ids[:, first + 1 :]], dim=1)
    message = (
        r"3 image tokens .* 1 x 4 = 4 features; 3 is not a whole number of images of 4 tokens: the prompt was "
        r"truncated, or made by a processor whose num_image_tokens"
    )
    with pytest.raises(ValueError, match=message):
        chat_model(input_ids=cut, pixel_values=inputs["pixel_values"])


@pytest.mark.parametrize("shape", [(1, NUM_QUERY_TOKENS, 64), (1, 2 * NUM_QUERY_TOKENS, 32), (NUM_QUERY_TOKENS, 32)])
def test_image_features_of_another_models_shape_are_refused(chat_model, inputs, shape):
    """(1, 4, 64) has as many features as the prompt has image tokens: it would be cut to fit, silently."""
    features = BaseModelOutputWithPooling(pooler_output=torch.randn(shape))
    with pytest.raises(ValueError, match=rf"shape {re.escape(str(shape))}, but this model's bridge makes \(num_images, "
                       r"4, 32\).*another model"):  # fmt: skip
        chat_model(input_ids=inputs["input_ids"], mm_encoder_outputs={"image": features})


def test_image_tokens_without_images_raise(chat_model, inputs):
    with pytest.raises(ValueError, match="no pixel_values"):
        chat_model(input_ids=inputs["input_ids"])


def test_pixel_values_of_the_wrong_shape_raise(chat_model, inputs):
    with pytest.raises(ValueError, match=r"\(num_images, channels, height, width\)"):
        chat_model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][0])


def test_pixel_values_and_precomputed_features_together_raise(chat_model, inputs):
    features = chat_model.get_image_features(inputs["pixel_values"])
    with pytest.raises(ValueError, match="not both"):
        chat_model(**inputs, mm_encoder_outputs={"image": features})


def test_prompt_longer_than_the_llm_allows_raises(tokenizer, processor, image):
    model = make_chat_model(tokenizer)
    inputs = prompt_inputs(processor, ["x" * 300], [image])
    with pytest.raises(ValueError, match="at most 256"):
        model(**inputs)


def test_unset_image_token_id_is_reported(tokenizer, inputs):
    config = make_chat_config(tokenizer)
    config.image_token_id = None
    model = VisCPMChatForConditionalGeneration(config)
    with pytest.raises(ValueError, match="image_token_id"):
        model(**inputs)


def test_prompt_lookup_decoding_gives_the_greedy_tokens(chat_model, inputs):
    greedy = chat_model.generate(**inputs, max_new_tokens=6, num_beams=1)
    assisted = chat_model.generate(**inputs, max_new_tokens=6, num_beams=1, prompt_lookup_num_tokens=3)
    assert torch.equal(assisted, greedy)


# --- the common-model contracts of transformers -------------------------------------------------------------


def test_return_dict_false_gives_tuples(chat_model, inputs):
    outputs = chat_model(**inputs)
    as_tuple = chat_model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], outputs.logits)
    features = chat_model.get_image_features(inputs["pixel_values"], return_dict=False)
    assert isinstance(features, tuple)
    torch.testing.assert_close(features[0], chat_model.get_image_features(inputs["pixel_values"]).last_hidden_state)
    bare = chat_model.model(**inputs, return_dict=False)
    assert isinstance(bare, tuple) and bare[0].shape[:2] == inputs["input_ids"].shape


def test_the_length_limit_follows_the_llms_rope_scaling(tokenizer, processor, image):
    scaled = make_chat_model(
        tokenizer, text_model_type="llama", text_config_overrides={"rope_parameters": {"rope_type": "linear", "factor": 4.0}}
    )
    assert scaled.config.text_config.max_position_embeddings == 256
    model_inputs = prompt_inputs(processor, ["x" * 600], [image])
    assert 256 < model_inputs["input_ids"].shape[1] <= 1024
    assert torch.isfinite(scaled(**model_inputs).logits).all()  # within 4 x 256
    with pytest.raises(ValueError, match="at most 1024"):
        scaled(**prompt_inputs(processor, ["x" * 1100], [image]))


def test_a_fullgraph_compiled_forward_gives_the_eager_logits(chat_model, inputs):
    compiled = torch.compile(chat_model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(**inputs).logits, chat_model(**inputs).logits)


def test_an_offloaded_vision_tower_answers_as_one_in_memory(saved_dir, chat_model, inputs, tmp_path):
    offloaded = AutoModelForImageTextToText.from_pretrained(
        saved_dir, device_map={"model.vision_tower": "disk", "model.bridge": "cpu", "model.llm": "cpu"},
        offload_folder=tmp_path / "offload",
    )  # fmt: skip
    assert offloaded.model.vision_tower.device.type == "meta"
    greedy = dict(max_new_tokens=5, num_beams=1, do_sample=False)
    assert torch.equal(offloaded.generate(**inputs, **greedy), chat_model.generate(**inputs, **greedy))


def test_a_viscpm_chat_assistant_gives_the_greedy_tokens(tokenizer, chat_model, inputs):
    assistant = make_chat_model(tokenizer, seed=3)
    greedy = dict(max_new_tokens=6, num_beams=1, do_sample=False)
    assert torch.equal(chat_model.generate(**inputs, **greedy, assistant_model=assistant), chat_model.generate(**inputs, **greedy))


def test_weights_missing_from_a_checkpoint_are_initialised_as_in_a_fresh_build(saved_dir, chat_model):
    """Each missing tensor gets its sub-model's own initialisation (SigLIP: xavier for the MLP), the same
    distribution as a fresh build, and is reported; loaded tensors are untouched."""
    weights = load_file(saved_dir / "model.safetensors")
    dropped = [k for k in weights if k.startswith("model.vision_tower.") and k.endswith("fc1.weight")]
    dropped += ["model.bridge.mapping.linear_1.weight"]
    save_file({k: v for k, v in weights.items() if k not in dropped}, saved_dir / "model.safetensors", metadata={"format": "pt"})
    loaded, info = AutoModelForImageTextToText.from_pretrained(saved_dir, strict=False, output_loading_info=True)
    assert set(info["missing_keys"]) == set(dropped)
    state, fresh = loaded.state_dict(), chat_model.state_dict()
    for key in dropped:
        value, reference = state[key].float(), fresh[key].float()
        assert torch.isfinite(value).all() and not torch.equal(value, reference), key
        assert float(value.std()) == pytest.approx(float(reference.std()), rel=0.15), key
    kept = "model.vision_tower.encoder.layers.0.mlp.fc2.weight"
    torch.testing.assert_close(state[kept], fresh[kept], rtol=0, atol=0)


def test_a_folder_missing_a_tensor_or_holding_an_unknown_one_is_refused_with_their_names(saved_dir):
    weights = load_file(saved_dir / "model.safetensors")
    del weights["model.bridge.mapping.linear_1.weight"]
    weights["model.bridge.extra.weight"] = torch.zeros(2)
    save_file(weights, saved_dir / "model.safetensors", metadata={"format": "pt"})
    for model_class in (AutoModelForImageTextToText, VisCPMChatForConditionalGeneration):
        with pytest.raises(RuntimeError, match=r"missing \(they would be initialised at random\): "
                           r"model\.bridge\.mapping\.linear_1\.weight; unexpected .*bridge\.extra\.weight\. .*"
                           r"pass strict=False"):  # fmt: skip
            model_class.from_pretrained(saved_dir)
    # The bare model leaves out what it lacks of the head class's folder, as transformers does; nothing missing.
    with pytest.raises(RuntimeError, match=r"^VisCPMChatModel.* missing .*: bridge\.mapping\.linear_1\.weight\. "):
        AutoModel.from_pretrained(saved_dir)
    AutoModelForImageTextToText.from_pretrained(saved_dir, strict=False)  # partial weights, on purpose


def test_the_head_class_loads_a_bare_models_folder_strictly(saved_dir, chat_model, inputs, tmp_path):
    AutoModel.from_pretrained(saved_dir).save_pretrained(tmp_path / "bare")
    loaded = VisCPMChatForConditionalGeneration.from_pretrained(tmp_path / "bare")
    torch.testing.assert_close(loaded(**inputs).logits, chat_model(**inputs).logits, rtol=0, atol=0)


def test_a_peft_adapter_folder_loads_onto_its_base_strictly(saved_dir, inputs, tmp_path):
    """transformers loads the base named in adapter_config.json, then the adapter, whose report is checked."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=2, target_modules=r".*\.llm\..*\.(q_proj|v_proj)", init_lora_weights=False)
    adapted = get_peft_model(AutoModelForImageTextToText.from_pretrained(saved_dir), config).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "adapter")
    torch.testing.assert_close(loaded(**inputs).logits, adapted(**inputs).logits)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_continues_under_the_current_name_and_the_deprecated_one(chat_model, processor, name):
    content = [{"type": "image", "image": random_image()}, {"type": "text", "text": "What is it?"}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
    )  # fmt: skip
    step = torch.tensor([[processor.tokenizer.convert_tokens_to_ids("a")]])
    with torch.no_grad():
        first = chat_model(**inputs, **{name: DynamicCache(config=chat_model.config.text_config)})
        assert first.cache.get_seq_length() == inputs["input_ids"].shape[1]
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
        continued = chat_model(input_ids=step, attention_mask=mask, **{name: first.cache}).logits[:, -1]
        full_inputs = {**inputs, "input_ids": torch.cat([inputs["input_ids"], step], 1), "attention_mask": mask}
        full = chat_model(**full_inputs, use_cache=False).logits[:, -1]
    torch.testing.assert_close(continued, full, atol=1e-5, rtol=1e-5)
