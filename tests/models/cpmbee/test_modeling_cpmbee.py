import pytest
import torch
from parity import PARITY_DIR, json_file, tensors
from tiny_models import make_cpmbee as tiny_model
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

from viscpm_hf import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeModel
from viscpm_hf.models.cpmbee.convert_cpmbee import convert_cpmbee_key, cpmbee_config_from_original
from viscpm_hf.models.cpmbee.modeling_cpmbee import relative_position_bucket


STRUCTURE = ("input_id_subs", "context", "segment_ids", "segment_rel_offset", "num_segments", "segment_rel")
PARITY_INPUT_NAMES = {
    "input_sub": "input_id_subs",
    "context": "context",
    "segment": "segment_ids",
    "segment_rel_offset": "segment_rel_offset",
    "num_segments": "num_segments",
    "segment_rel": "segment_rel",
}
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def parity_model():
    model = CpmBeeForCausalLM(cpmbee_config_from_original(json_file("configs.json")["cpmbee_tiny"])).eval()
    weights = tensors("viscpm_chat_tiny.safetensors")
    state = {f"model.{convert_cpmbee_key(k)}": v for k, v in weights.items() if k.startswith("llm.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def parity_inputs(case: str) -> dict:
    data = tensors("llm_forward.safetensors")
    inputs = {ours: data[f"{case}.in.{theirs}"] for theirs, ours in PARITY_INPUT_NAMES.items()}
    input_ids = data[f"{case}.in.input"].long()
    batch, length = input_ids.shape
    inputs["input_ids"] = input_ids
    inputs["attention_mask"] = torch.arange(length)[None] < data[f"{case}.in.length"][:, None]
    for name in ("ext_table_ids", "ext_table_sub"):  # one table per batch in the original, one per row here
        inputs[name] = data[f"{case}.in.{name}"].long()[None].expand(batch, -1)
    return inputs


FORWARD_CASES = sorted({key.split(".")[0] for key in json_file("llm_cases.json")["forward_cases"]})


def test_same_segment_buckets_match_the_original_table():
    table = json_file("llm_cases.json")["same_segment_bucket_table"]
    relative = torch.tensor(table["relative_position_key_minus_query"])
    expected = torch.tensor(table["bucket"])
    assert torch.equal(relative_position_bucket(relative, table["num_buckets"], table["max_distance"]), expected)


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_full_forward_matches_the_original(parity_model, case):
    data = tensors("llm_forward.safetensors")
    with torch.no_grad():
        out = parity_model(**parity_inputs(case), use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[0], data[f"{case}.input_embeds"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.hidden_states[-1], data[f"{case}.hidden_states"], atol=ATOL, rtol=RTOL)
    columns = data[f"{case}.logits_cols_index"]
    torch.testing.assert_close(out.logits[..., columns], data[f"{case}.logits_cols"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.logits.logsumexp(-1), data[f"{case}.logits_logsumexp"], atol=ATOL, rtol=RTOL)
    assert torch.equal(out.logits.argmax(-1), data[f"{case}.logits_argmax"])
    rows = torch.arange(out.logits.shape[0])
    last = out.logits[rows, data[f"{case}.logits_last_index"]]
    torch.testing.assert_close(last, data[f"{case}.logits_last"], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("case", ["chat_en_empty", "chat_zh_multiturn", "chat_ext_oov"])
def test_cached_decoding_matches_the_original(parity_model, case):
    """Prefill the prompt plus the answer's <s>, then feed the original's tokens one at a time."""
    steps = tensors("llm_incremental.safetensors")
    fed = json_file("llm_cases.json")["incremental_cases"][case]["fed_tokens"]
    inputs = parity_inputs(case)
    prompt_ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    answer_start = {"input_id_subs": 0, "context": 0, "segment_ids": fed[0]["segment"]}
    for name in ("input_id_subs", "context", "segment_ids", "segment_rel_offset", "num_segments"):
        value = answer_start.get(name, int(inputs[name][0, -1]))
        inputs[name] = torch.cat([inputs[name], torch.tensor([[value]], dtype=inputs[name].dtype)], dim=1)

    cache = DynamicCache(config=parity_model.config)
    columns = steps[f"{case}.step_logits_cols_index"]
    with torch.no_grad():
        prefill = parity_model(input_ids=prompt_ids, cache=cache, **inputs)
        torch.testing.assert_close(prefill.logits[0, -1], steps[f"{case}.prefill_logits_last"][0], atol=ATOL, rtol=RTOL)
        for step, token in enumerate(fed):
            input_id = torch.tensor([[token["input"]]])
            logits = parity_model(input_ids=input_id, cache=cache, **inputs).logits[0, -1]
            torch.testing.assert_close(logits[columns], steps[f"{case}.step_logits_cols"][step], atol=ATOL, rtol=RTOL)
            torch.testing.assert_close(logits.logsumexp(-1), steps[f"{case}.step_logits_logsumexp"][step], atol=ATOL, rtol=RTOL)
            if step < 2:
                torch.testing.assert_close(logits, steps[f"{case}.step_logits_full_first2"][step], atol=ATOL, rtol=RTOL)


# --- behaviour on a tiny random model ---------------------------------------------------------------------


def structured_prompt(length=12, batch=1):
    """Three segments: root (context), question (context), answer start (not context)."""
    segment_ids = torch.tensor([0] * 3 + [1] * (length - 4) + [2])
    return dict(
        input_ids=torch.randint(11, 120, (batch, length)),
        context=(segment_ids < 2).long()[None].expand(batch, -1),
        segment_ids=segment_ids[None].expand(batch, -1),
        num_segments=torch.full((batch, length), 3),
        segment_rel_offset=torch.zeros(batch, length, dtype=torch.long),
        segment_rel=torch.tensor([0, 2, 2, 9, 0, 10, 9, 10, 0])[None].expand(batch, -1),
        input_id_subs=torch.zeros(batch, length, dtype=torch.long),
        ext_table_ids=torch.tensor([[1, 1]]).expand(batch, -1),
        ext_table_sub=torch.tensor([[1, 2]]).expand(batch, -1),
    )


def test_incremental_decoding_equals_full_recomputation():
    model = tiny_model()
    prompt = structured_prompt()
    generated = [5, 121, 40, 120, 7]  # includes two ext columns fed back (120 = first ext entry)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = [model(**prompt, cache=cache).logits[:, -1]]
        for token in generated[:-1]:
            logits.append(model(**{**prompt, "input_ids": torch.tensor([[token]])}, cache=cache).logits[:, -1])
        full_ids = torch.cat([prompt["input_ids"], torch.tensor([generated[:-1]])], dim=1)
        full = model(**{**prompt, "input_ids": full_ids}, use_cache=False).logits
    torch.testing.assert_close(torch.stack(logits, 1), full[:, prompt["input_ids"].shape[1] - 1 :], atol=1e-5, rtol=1e-5)


def test_generate_with_cache_equals_generate_without():
    model = tiny_model()
    prompt = structured_prompt()
    cached = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    uncached = model.generate(**prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    torch.testing.assert_close(cached, uncached)
    assert cached.shape[1] > prompt["input_ids"].shape[1]


def test_left_padded_batch_equals_rows_alone():
    model = tiny_model()
    short, long = structured_prompt(10), structured_prompt(14)
    pad = long["input_ids"].shape[1] - short["input_ids"].shape[1]
    batch = {}
    for name, value in short.items():
        if name in ("segment_rel", "ext_table_ids", "ext_table_sub"):
            batch[name] = torch.cat([value, long[name]])
        else:
            batch[name] = torch.cat([torch.nn.functional.pad(value, (pad, 0)), long[name]])
    batch["attention_mask"] = torch.cat([torch.arange(14)[None] >= pad, torch.ones(1, 14, dtype=torch.bool)]).long()
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, alone in enumerate((short, long)):
        expected = model.generate(**alone, max_new_tokens=6, do_sample=False)
        torch.testing.assert_close(out[row, 14:], expected[0, alone["input_ids"].shape[1] :])


def test_padded_queries_attend_to_nothing():
    """Padding rows carry the pad embedding pushed through the FFNs only (the original's behaviour)."""
    model = tiny_model()
    prompt = structured_prompt()
    mask = torch.ones_like(prompt["input_ids"])
    mask[:, -3:] = 0
    seen = []
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        hidden = model(**prompt, attention_mask=mask, use_cache=False).logits
    assert torch.isfinite(hidden).all()
    assert seen[0][:, -3:].abs().max() == 0 and seen[0][:, :-3].abs().max() > 0


def test_sdpa_and_eager_agree():
    prompt = structured_prompt(batch=2)
    outputs = []
    for implementation in ("sdpa", "eager"):
        model = tiny_model()
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs.append(model(**prompt, use_cache=False).logits)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_ext_columns_and_loss():
    model = tiny_model()
    prompt = structured_prompt()
    out = model(**prompt, labels=prompt["input_ids"])
    assert out.logits.shape[-1] == 120 + 2
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.position_bias.relative_attention_bias.grad.abs().sum() > 0


def test_ext_ids_without_a_table_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="ext table"):
        model(input_ids=torch.tensor([[3, 125]]))


def test_auto_classes_and_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is CpmBeeConfig
    assert type(AutoModel.from_pretrained(tmp_path)) is CpmBeeModel
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    prompt = structured_prompt()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**prompt).logits, model(**prompt).logits, rtol=0, atol=0)


def test_the_base_model_and_the_head_load_each_others_folders_strictly(tmp_path):
    """The tied head is not missing from a folder (it is the embedding), and the prefix `model.` is added or
    dropped as transformers does, so neither direction is refused."""
    head = tiny_model()
    head.save_pretrained(tmp_path / "head")
    CpmBeeModel.from_pretrained(tmp_path / "head").save_pretrained(tmp_path / "base")
    loaded, info = CpmBeeForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    prompt = structured_prompt()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**prompt).logits, head(**prompt).logits, rtol=0, atol=0)


def test_a_folder_missing_a_tensor_or_holding_an_unknown_one_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    weights["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for model_class in (CpmBeeForCausalLM, AutoModelForCausalLM):
        with pytest.raises(RuntimeError, match=r"missing .*layers\.1\.mlp\.down_proj\.weight.*unexpected .*mlp\.extra"):
            model_class.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"^CpmBeeModel.* missing .*: layers\.1\.mlp\.down_proj\.weight\. "):
        AutoModel.from_pretrained(tmp_path)  # what the base model lacks of the head class's folder is left out
    CpmBeeForCausalLM.from_pretrained(tmp_path, strict=False)  # partial weights, on purpose


def test_an_untied_head_is_left_out_of_a_base_model_or_initialised_in_a_head_class_as_transformers_does(tmp_path):
    """A folder of the other class: the base model drops the head's tensor; the head class, loading a base model's
    folder, initialises its head (reported in the log). A head class's own folder without its head is refused."""
    head = tiny_model(tie_word_embeddings=False)
    head.save_pretrained(tmp_path / "head")
    base, info = CpmBeeModel.from_pretrained(tmp_path / "head", output_loading_info=True)
    assert info["unexpected_keys"] == {"lm_head.weight"} and not info["missing_keys"]
    base.save_pretrained(tmp_path / "base")
    loaded, info = CpmBeeForCausalLM.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == {"lm_head.weight"}
    torch.testing.assert_close(loaded.model.embed_tokens.weight, head.model.embed_tokens.weight, rtol=0, atol=0)


def test_max_position_embeddings_is_enforced():
    model = tiny_model(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.ones(1, 9, dtype=torch.long))


# --- output conventions and missing weights -------------------------------------------------------------------


def test_return_dict_false_gives_the_outputs_as_a_tuple():
    model = tiny_model()
    prompt = structured_prompt()
    with torch.no_grad():
        as_object = model(**prompt, use_cache=False)
        as_tuple = model(**prompt, use_cache=False, return_dict=False)
        model.config.return_dict = False
        from_config = model(**prompt, use_cache=False)
        base = model.model(**prompt, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(from_config, tuple) and isinstance(base, tuple)
    torch.testing.assert_close(as_tuple[0], as_object.logits)
    torch.testing.assert_close(from_config[0], as_object.logits)


def test_config_level_output_flags_are_honoured():
    model = tiny_model(attn_implementation="eager")
    prompt = structured_prompt()
    model.config.output_attentions = True
    model.config.output_hidden_states = True
    with torch.no_grad():
        out = model(**prompt, use_cache=False)
        off = model(**prompt, use_cache=False, output_attentions=False, output_hidden_states=False)
    length = prompt["input_ids"].shape[1]
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 4, length, length)
    assert len(out.hidden_states) == 3  # embeddings + one per layer (the last after the final norm)
    assert off.attentions is None and off.hidden_states is None


def test_a_missing_untied_head_is_initialised_and_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model(tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match=r"missing .*: lm_head\.weight\. .*strict=False"):
        CpmBeeForCausalLM.from_pretrained(tmp_path)
    loaded, info = CpmBeeForCausalLM.from_pretrained(tmp_path, strict=False, output_loading_info=True)
    assert set(info["missing_keys"]) == {"lm_head.weight"}
    head = loaded.lm_head.weight
    assert torch.isfinite(head).all() and 0.5 < head.std() < 2.0  # unit scale, as a fresh build
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_static_cache_generates_the_dynamic_caches_tokens(num_beams):
    model = tiny_model()
    prompt = structured_prompt(batch=2)
    kwargs = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False)
    dynamic = model.generate(**prompt, **kwargs)
    static = model.generate(**prompt, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


# --- padding-free (packed) batches ----------------------------------------------------------------------------


def pack(prompts: list[dict]) -> dict:
    """One row holding every prompt, as a padding-free collator builds it; each keeps its own relation table."""
    packed = {name: torch.cat([p[name] for p in prompts], dim=1) for name in ("input_ids", "input_id_subs",
              "context", "segment_ids", "num_segments", "ext_table_ids", "ext_table_sub")}  # fmt: skip
    offsets, start = [], 0
    for p in prompts:
        offsets.append(p["segment_rel_offset"] + start)
        start += p["segment_rel"].shape[1]
    packed["segment_rel_offset"] = torch.cat(offsets, dim=1)
    packed["segment_rel"] = torch.cat([p["segment_rel"] for p in prompts], dim=1)
    packed["ext_table_ids"], packed["ext_table_sub"] = prompts[0]["ext_table_ids"], prompts[0]["ext_table_sub"]
    packed["position_ids"] = torch.cat([torch.arange(p["input_ids"].shape[1]) for p in prompts])[None]
    return packed


@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
def test_packed_sequences_give_the_unpacked_logits(form):
    model = tiny_model()
    torch.manual_seed(1)
    prompts = [structured_prompt(length=7), structured_prompt(length=10)]
    packed = pack(prompts)
    if form == "cu_seq_lens":
        packed.pop("position_ids")
        packed["cu_seq_lens_q"] = torch.tensor([0, 7, 17])
    with torch.no_grad():
        separate = torch.cat([model(**p, use_cache=False).logits for p in prompts], dim=1)
        together = model(**packed, use_cache=False).logits
        plain = model(input_ids=packed["input_ids"], position_ids=pack(prompts)["position_ids"], use_cache=False).logits
        plain_separate = torch.cat([model(input_ids=p["input_ids"], use_cache=False).logits for p in prompts], dim=1)
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, plain_separate, atol=1e-5, rtol=1e-5)


def test_the_length_limit_applies_to_each_packed_sequence():
    model = tiny_model(max_position_embeddings=10)
    prompts = [structured_prompt(length=8), structured_prompt(length=9)]
    with torch.no_grad():
        assert model(**pack(prompts), use_cache=False).logits.shape[1] == 17
        with pytest.raises(ValueError, match="11 tokens long"):
            model(**pack([structured_prompt(length=6), structured_prompt(length=11)]), use_cache=False)


def test_a_compiled_forward_with_a_static_cache_generates_the_eager_tokens():
    # Dynamo's graph capture (the "eager" backend skips the slow inductor code generation; the benchmark times that).
    model = tiny_model()
    prompt = torch.randint(11, 120, (1, 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, num_beams=1, do_sample=False, cache_implementation="static")
    eager = model.generate(prompt, **kwargs)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager")
    try:
        assert torch.equal(model.generate(prompt, **kwargs), eager)
    finally:
        del model.forward
        torch._dynamo.reset()


# --- training contracts ---------------------------------------------------------------------------------------


def test_resized_embeddings_keep_the_scaled_embedding_and_the_tied_head():
    model = tiny_model()
    ids = torch.randint(0, 120, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.resize_token_embeddings(130)
    assert type(model.model.embed_tokens).__name__ == "CpmBeeScaledEmbedding"  # keeps its 1/sqrt(hidden)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.vocab_size == 130
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert after.shape[-1] == 130
    torch.testing.assert_close(after[..., :120], before)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    ids = torch.randint(0, 120, (2, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        loss = model(**structured_prompt(length=9, batch=2), labels=ids, use_cache=False).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_checkpointed, grads_checkpointed) = results
    torch.testing.assert_close(loss_checkpointed, loss)
    assert all(g is not None for g in grads.values())  # every parameter trains
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, msg=name)


@pytest.mark.parametrize("assisted", ["prompt_lookup", "assistant_model"])
def test_assisted_decoding_gives_the_greedy_tokens(assisted):
    model = tiny_model()
    prompt = structured_prompt(length=12)
    greedy = dict(max_new_tokens=8, do_sample=False, num_beams=1)
    extra = {"prompt_lookup_num_tokens": 3} if assisted == "prompt_lookup" else {"assistant_model": tiny_model()}
    assert torch.equal(model.generate(**prompt, **greedy, **extra), model.generate(**prompt, **greedy))


# --- pipeline("text-generation"): the pipeline passes input_ids and attention_mask only -------------------------------


@pytest.fixture(scope="module")
def text_generation_folder(tmp_path_factory, parity_model):
    from viscpm_hf import CpmBeeTokenizer
    from viscpm_hf.models.cpmbee.prompt_cpmbee import viscpm_chat_template

    folder = tmp_path_factory.mktemp("cpmbee-text-generation")
    tokenizer = CpmBeeTokenizer(PARITY_DIR / "cpmbee_vocab.txt", prompt_format="structured")
    tokenizer.chat_template = viscpm_chat_template()
    tokenizer.padding_side = "left"
    parity_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CHATS = [
    [{"role": "user", "content": "What colour is the sky?"}],
    [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "天空是什么颜色？<b>"},  # markup-like user text stays literal
    ],
]


def generate_answer(model, tokenizer, chat, **decoding) -> str:
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=6, **decoding)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("decoding", [{"num_beams": 1, "do_sample": False}, {"num_beams": 3, "do_sample": False}])
def test_text_generation_pipeline_answers_as_generate(text_generation_folder, decoding):
    from transformers import AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(text_generation_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(text_generation_folder)
    expected = [generate_answer(model, tokenizer, chat, **decoding) for chat in CHATS]
    generator = pipeline("text-generation", model=text_generation_folder)
    for batch_size in (1, 2):  # batched rows are left-padded
        answers = generator(CHATS, max_new_tokens=6, return_full_text=False, batch_size=batch_size, **decoding)
        assert [a[0]["generated_text"] for a in answers] == expected
    assert any(expected)


def test_ids_alone_with_text_outside_the_vocabulary_or_a_plain_string_are_refused(text_generation_folder):
    from transformers import pipeline

    generator = pipeline("text-generation", model=text_generation_folder)
    with pytest.raises(ValueError, match="outside CPM-Bee's vocabulary"):
        generator([{"role": "user", "content": "a \u2603 snowman"}], max_new_tokens=2)
    with pytest.raises(ValueError, match="JSON CPM-Bee prompt dict"):
        generator("What colour is the sky?", max_new_tokens=2)


def test_a_forward_on_prompt_ids_without_their_structure_is_refused(text_generation_folder, parity_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_generation_folder)
    inputs = tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True, return_dict=True, return_tensors="pt")
    parity_model(**inputs)  # with the structure: fine
    with pytest.raises(ValueError, match="no structural inputs"):
        parity_model(input_ids=inputs["input_ids"])


@pytest.mark.parametrize(
    "chat, message",
    [
        ([{"role": "bot", "content": "hi"}], "Message 0 has role bot"),
        ([{"role": "user", "content": [{"type": "text", "text": None}]}], "Message 0, item 0"),
    ],
)
def test_the_tokenizers_own_chat_template_refuses_what_it_would_drop(text_generation_folder, chat, message):
    """The path of pipeline("text-generation"), which uses the tokenizer's template without the processor."""
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(text_generation_folder)
    with pytest.raises(TemplateError, match=message):
        tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_a_cache_continues_under_the_current_name_and_the_deprecated_one(name):
    """`cache` is the name since transformers 5.24; `past_key_values` still works (deprecated, as in LLaVA)."""
    model = tiny_model()
    prompt, step = torch.tensor([[5, 9, 11, 3]]), torch.tensor([[7]])
    with torch.no_grad():
        first = model(input_ids=prompt, **{name: DynamicCache(config=model.config)})
        assert isinstance(first.cache, DynamicCache) and first.cache.get_seq_length() == 4
        continued = model(input_ids=step, **{name: first.cache}).logits[:, -1]
        full = model(input_ids=torch.cat([prompt, step], 1), use_cache=False).logits[:, -1]
    torch.testing.assert_close(continued, full, atol=ATOL, rtol=RTOL)


def test_generate_hands_back_the_cache():
    model = tiny_model()
    out = model.generate(
        torch.tensor([[5, 9, 11, 3]]), max_new_tokens=3, num_beams=1, do_sample=False, return_dict_in_generate=True
    )
    assert isinstance(out.cache, DynamicCache) and out.cache.get_seq_length() == out.sequences.shape[1] - 1
