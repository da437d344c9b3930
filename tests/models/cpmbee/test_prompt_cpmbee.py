"""Structured-prompt flattening against the original's vectors (../shared/parity/flatten_cases.json): the raw and
generation layouts of chat, the paint collation and a training batch."""

import pytest
import torch
from parity import PARITY_DIR, json_file, tensors

from viscpm_hf import CpmBeeConfig
from viscpm_hf.models.cpmbee.markup_cpmbee import CpmBeeExtTable
from viscpm_hf.models.cpmbee.prompt_cpmbee import (
    PromptTokenIds,
    collate_prompts,
    flat_prompt_structure,
    flatten_prompt,
    flatten_prompt_for_generation,
    model_prompt,
    pad_model_prompts,
    paint_prompts,
    prompt_segments,
    segment_relations,
)
from viscpm_hf.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer


if not PARITY_DIR.is_dir():
    pytest.skip(f"golden vectors and vocabulary not found at {PARITY_DIR}", allow_module_level=True)

FLATTEN_CASES = json_file("flatten_cases.json")
CHAT = FLATTEN_CASES["chat"]
PAINT = FLATTEN_CASES["paint"]
TRAIN = FLATTEN_CASES["train_batch"]
CHAT_ERRORS = FLATTEN_CASES["chat_errors"]
BATCH_FIELDS = (
    "input_ids", "input_id_subs", "context", "segment_ids", "segment_rel_offset", "segment_rel", "num_segments",
    "length", "target", "ext_table_ids", "ext_table_sub",
)  # fmt: skip
# Model keyword -> name of the same input in llm_forward.safetensors (as tests/cpmbee/test_modeling_cpmbee.py reads it).
FORWARD_INPUT_NAMES = {
    "input_ids": "input",
    "input_id_subs": "input_sub",
    "context": "context",
    "segment_ids": "segment",
    "segment_rel_offset": "segment_rel_offset",
    "num_segments": "num_segments",
    "segment_rel": "segment_rel",
}


@pytest.fixture(scope="module")
def bee_tokenizer():
    return CpmBeeTokenizer(PARITY_DIR / "cpmbee_vocab.txt")


def original_ext_states(tokenizer: CpmBeeTokenizer, ext_table: CpmBeeExtTable) -> dict:
    """Our ext table in the original's form: temporary ids by first appearance, and subs per base token."""
    states = {"ext_table": {}, "token_id_table": {}}
    for position, (text, (base, sub)) in enumerate(ext_table.entries.items()):
        temporary_id = str(tokenizer.vocab_size + position)
        states["ext_table"][temporary_id] = text
        states["token_id_table"].setdefault(tokenizer.convert_ids_to_tokens(base), {})[temporary_id] = sub
    return states


def bounds(image_bound) -> list[list[int]]:
    return [list(bound) for bound in image_bound]


def assert_batch_matches(batch, expected: dict) -> None:
    for field in BATCH_FIELDS:
        assert getattr(batch, field).tolist() == expected[field], field
    rows, length = batch.input_ids.shape
    assert expected["sample_ids"] == expected["span"] == [[0] * length] * rows  # the original's packing, unused
    assert [bounds(row) for row in batch.image_bound] == expected["image_bound"]


def assert_model_inputs_match_forward_case(inputs: dict, case: str) -> None:
    """The model kwargs equal the inputs the original's forward got (read as the modeling test reads them)."""
    data = tensors("llm_forward.safetensors")
    for ours, theirs in FORWARD_INPUT_NAMES.items():
        assert torch.equal(inputs[ours].long(), data[f"{case}.in.{theirs}"].long()), ours
    length = data[f"{case}.in.length"].long()
    positions = torch.arange(inputs["input_ids"].shape[1])
    assert torch.equal(inputs["attention_mask"], (positions[None] < length[:, None]).long())
    rows = inputs["input_ids"].shape[0]
    for name in ("ext_table_ids", "ext_table_sub"):
        assert torch.equal(inputs[name], data[f"{case}.in.{name}"].long()[None].expand(rows, -1)), name


@pytest.mark.parametrize("name", CHAT)
def test_raw_layout_matches_the_original(bee_tokenizer, name):
    prompt = flatten_prompt(bee_tokenizer, CHAT[name]["input_dict"])
    expected = CHAT[name]["raw_convert_data_to_id"]
    for field in ("input_ids", "input_id_subs", "context", "segment_ids", "segment_rel", "num_segments"):
        assert getattr(prompt, field) == expected[field], field
    assert original_ext_states(bee_tokenizer, prompt.ext_table) == expected["ext_states"]
    assert bounds(prompt.image_bound) == expected["image_bound"]


@pytest.mark.parametrize("name", CHAT)
def test_generation_layout_matches_the_original(bee_tokenizer, name):
    prompt = flatten_prompt_for_generation(bee_tokenizer, CHAT[name]["input_dict"], max_length=3000)
    expected, other = CHAT[name]["inference_inputs"], CHAT[name]["other_info"]
    inputs = prompt.model_inputs()
    length = len(prompt)
    for field in ("input_ids", "input_id_subs", "segment_ids", "segment_rel_offset", "num_segments", "segment_rel"):
        assert inputs[field].tolist() == expected[field], field
    assert inputs["context"].long().tolist() == expected["context"] == [[1] * length]
    assert expected["input_pos"] == [list(range(length))]  # positions are token indices: the model derives them
    assert expected["sample_idx"] == [[0] * length]
    assert prompt.ext_table_ids == inputs["ext_table_ids"][0].tolist() == expected["batch_ext_table_ids"]
    assert prompt.ext_table_sub == inputs["ext_table_sub"][0].tolist() == expected["batch_ext_table_sub"]
    assert [bounds(prompt.image_bound)] == expected["image_bound"]
    assert [list(segment) for segment in prompt.predict_segments] == other["predict_segments"]
    assert prompt.answer_placeholders == other["answer_placeholders"]
    assert prompt.output_ext_table == {int(index): text for index, text in other["ext_table"].items()}


@pytest.mark.parametrize("name", ["en_empty", "zh_multiturn", "ext_oov", "special_mask"])
def test_generation_inputs_are_what_the_original_forward_got(bee_tokenizer, name):
    prompt = flatten_prompt_for_generation(bee_tokenizer, CHAT[name]["input_dict"])
    assert_model_inputs_match_forward_case(prompt.model_inputs(), f"chat_{name}")


def test_generated_ext_ids_decode_through_the_output_table(bee_tokenizer):
    prompt = flatten_prompt_for_generation(bee_tokenizer, CHAT["ext_oov"]["input_dict"])
    answer = [6, 1, 5, 86583, 5, 86584, 7]  # <s> 😀 𠀀 𠀁 </s>
    assert bee_tokenizer.decode_markup(answer, prompt.output_ext_table) == "<s>😀 𠀀 𠀁</s>"


@pytest.mark.parametrize("name", CHAT_ERRORS)
def test_bad_chat_prompts_raise(bee_tokenizer, name):
    case = CHAT_ERRORS[name]
    # Deliberate fix: an over-long prompt says so, where the original truncated it and found "No answer to predict".
    message = case["error"].removeprefix("ValueError: ").split(" `")[0]
    if name == "max_inp_length_50":
        message = "longer than max_length"
    with pytest.raises(ValueError, match=message) as error:
        flatten_prompt_for_generation(bee_tokenizer, case["input_dict"], max_length=case.get("max_inp_length", 3000))
    if name != "max_inp_length_50":
        assert "In the value of 'question'" in str(error.value)


def test_the_length_limit_counts_the_answer_placeholder(bee_tokenizer):
    data = CHAT["en_empty"]["input_dict"]
    raw_length = len(flatten_prompt(bee_tokenizer, data))  # ends with the empty answer's <s>; <ans_1> adds one
    assert len(flatten_prompt_for_generation(bee_tokenizer, data, max_length=raw_length + 1)) == raw_length - 1
    with pytest.raises(ValueError, match=f"{raw_length + 1} > {raw_length}"):
        flatten_prompt_for_generation(bee_tokenizer, data, max_length=raw_length)


def test_answer_dicts_get_one_placeholder_per_leaf(bee_tokenizer):
    data = {"input": "Name and age?", "<ans>": {"name": "", "age": ""}}
    prompt = flatten_prompt_for_generation(bee_tokenizer, data)
    assert prompt.answer_placeholders == [["name"], ["age"]]
    # segments: root 0, input 1, its value 2, <ans> 3, name 4, its leaf 5, age 6, its leaf 7
    assert prompt.predict_segments == [(5, 1), (7, 2)]
    assert prompt.num_segments == 8 and prompt.segment_ids[-1] == 6


@pytest.mark.parametrize(
    ("data", "message"),
    [({"question": "Hi"}, "No answer to predict"), ({"<ans>": "already written"}, "answer to generate must be empty")],
)
def test_generation_needs_an_empty_answer(bee_tokenizer, data, message):
    with pytest.raises(ValueError, match=message):
        flatten_prompt_for_generation(bee_tokenizer, data)


def test_prompt_values_must_be_strings_or_dicts(bee_tokenizer):
    with pytest.raises(TypeError, match="strings or dicts, got int under 'n'"):
        flatten_prompt(bee_tokenizer, {"n": 3})


def test_relations_clip_depths_at_seven():
    data = {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": "leaf"}}}}}}}}
    segments = prompt_segments(data)
    assert [segment.depth for segment in segments] == list(range(10))
    relations = segment_relations(segments)
    assert relations[9] == 1 + 7  # root -> leaf at depth 9
    assert relations[9 * 10] == 1 + 8 * 7  # leaf -> root
    assert relations[9 * 10 + 8] == 1 + 8 * 1  # leaf -> its key


@pytest.mark.parametrize(("name", "branch"), [(name, branch) for name in PAINT for branch in ("cond", "uncond")])
def test_paint_inputs_match_the_original(bee_tokenizer, name, branch):
    case = PAINT[name]
    cond, uncond = paint_prompts(bee_tokenizer, case["prompt"], case["negative_prompt"])
    assert_batch_matches(cond if branch == "cond" else uncond, case[branch])


@pytest.mark.parametrize("name", ["cat_zh_noneg", "sunset_en_neg", "ext_oov"])
def test_paint_inputs_are_what_the_original_forward_got(bee_tokenizer, name):
    case = PAINT[name]
    for branch, batch in zip(("cond", "uncond"), paint_prompts(bee_tokenizer, case["prompt"], case["negative_prompt"])):
        assert_model_inputs_match_forward_case(batch.model_inputs(), f"paint_{name}_{branch}")


def test_paint_prompts_are_plain_text(bee_tokenizer):
    cond, _ = paint_prompts(bee_tokenizer, "a < b")
    assert cond.input_ids[0, 7:12].tolist() == [6, 78, 68011, 42473, 7]  # <s> a " <" " b" </s>


def test_training_batch_matches_the_original(bee_tokenizer):
    prompts = [flatten_prompt(bee_tokenizer, case["input_dict"]) for case in TRAIN["cases"]]
    batch = collate_prompts(bee_tokenizer, prompts, TRAIN["collater_max_len"])
    assert_batch_matches(batch, TRAIN["batch"])
    assert_model_inputs_match_forward_case(batch.model_inputs(), "train_batch")


def test_ext_answers_are_targeted_by_column(bee_tokenizer):
    prompt = flatten_prompt(bee_tokenizer, {"question": "😀", "<ans>": "𠀀 𠀀"})
    batch = collate_prompts(bee_tokenizer, [prompt], len(prompt))
    assert (batch.ext_table_ids.tolist(), batch.ext_table_sub.tolist()) == ([1], [1])
    answer = batch.context[0].logical_not().nonzero().flatten().tolist()
    assert batch.input_ids[0, answer].tolist() == [6, 1, 5, 1]
    assert batch.target[0, answer].tolist() == [86583, 5, 86583, 7]


def test_collation_refuses_prompts_longer_than_max_length(bee_tokenizer):
    prompt = flatten_prompt(bee_tokenizer, {"question": "Hi", "<ans>": ""})
    with pytest.raises(ValueError, match=f"Prompts of \\[{len(prompt)}\\] tokens do not fit max_length=4"):
        collate_prompts(bee_tokenizer, [prompt], 4)


# --- structure read back from ids (what pipeline("text-generation") passes) ------------------------------------------


def test_the_delimiting_ids_come_from_the_vocabulary_and_match_the_configs_defaults(bee_tokenizer):
    ids = PromptTokenIds.of_tokenizer(bee_tokenizer)
    names = {ids.unk: "<unk>", ids.bos: "<s>", ids.eos: "</s>", ids.root: "<root>", ids.answer: "<ans>"}
    assert {i: bee_tokenizer.convert_ids_to_tokens(i) for i in names} == names
    assert ids == PromptTokenIds.of_config(CpmBeeConfig())


def test_structure_read_back_from_ids_equals_the_tokenizers(bee_tokenizer):
    prompts = [
        {"image": "", "context": "User: hi\nAI: hello\n", "question": "How are you, <<friend>?", "<ans>": ""},
        {"input": "天空是什么颜色？", "<ans>": ""},  # fewer segments, left-padded in the batch
    ]
    expected = pad_model_prompts([model_prompt(bee_tokenizer, prompt) for prompt in prompts], "left")
    derived = flat_prompt_structure(expected["input_ids"], PromptTokenIds.of_tokenizer(bee_tokenizer), expected["attention_mask"])
    assert expected["attention_mask"][1, 0] == 0  # the second row really is padded
    assert set(derived) == set(expected) - {"input_ids", "attention_mask"}
    for name, value in derived.items():
        assert torch.equal(value, expected[name].to(value.dtype)), name


@pytest.mark.parametrize(
    "prompt, message",
    [
        ({"a": {"b": "c", "d": "e"}, "<ans>": ""}, "not a CPM-Bee generation prompt of a dict of strings"),
        ({"question": "a \u2603 snowman", "<ans>": ""}, "outside CPM-Bee's vocabulary"),
    ],
)
def test_structure_that_ids_cannot_describe_is_refused(bee_tokenizer, prompt, message):
    ids = pad_model_prompts([model_prompt(bee_tokenizer, prompt)])["input_ids"]
    with pytest.raises(ValueError, match=message):
        flat_prompt_structure(ids, PromptTokenIds.of_tokenizer(bee_tokenizer))


def test_ids_cut_short_are_refused(bee_tokenizer):
    ids = pad_model_prompts([model_prompt(bee_tokenizer, {"question": "hi", "<ans>": ""})])["input_ids"]
    for cut in (ids[:, 1:], ids[:, :-1], ids[:, :-3]):
        with pytest.raises(ValueError, match="cannot be read back"):
            flat_prompt_structure(cut, PromptTokenIds.of_tokenizer(bee_tokenizer))
