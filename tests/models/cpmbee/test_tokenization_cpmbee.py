"""CpmBeeTokenizer against the original's tokenizer vectors (../shared/parity/tokenizer_cases.json), plus the
transformers API on plain text."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parity import PARITY_DIR, json_file

from viscpm_hf.models.cpmbee.markup_cpmbee import CpmBeeExtTable, escape_markup, unescape_markup
from viscpm_hf.models.cpmbee.tokenization_cpmbee import CpmBeeTokenizer


if not PARITY_DIR.is_dir():
    pytest.skip(f"golden vectors and vocabulary not found at {PARITY_DIR}", allow_module_level=True)

VOCAB_FILE = PARITY_DIR / "cpmbee_vocab.txt"
TOKENIZER_CASES = json_file("tokenizer_cases.json")
CASES = TOKENIZER_CASES["cases"]
ENCODED = [case for case in CASES if "encode_ids" in case]
MODEL_LEVEL = [case for case in CASES if "model_ids" in case]
INVALID_SPECIAL = [case for case in CASES if "flatten_error" in case]
MALFORMED = [case for case in CASES if "tokenize_error" in case]


def case_id(case: dict) -> str:
    return repr(case["text"][:24])


@pytest.fixture(scope="module")
def bee_tokenizer():
    return CpmBeeTokenizer(VOCAB_FILE)


def original_ext_states(tokenizer: CpmBeeTokenizer, ext_table: CpmBeeExtTable) -> dict:
    """Our ext table in the original's form: temporary ids by first appearance, and subs per base token."""
    states = {"ext_table": {}, "token_id_table": {}}
    for position, (text, (base, sub)) in enumerate(ext_table.entries.items()):
        temporary_id = str(tokenizer.vocab_size + position)
        states["ext_table"][temporary_id] = text
        states["token_id_table"].setdefault(tokenizer.convert_ids_to_tokens(base), {})[temporary_id] = sub
    return states


def test_vocabulary_and_special_tokens(bee_tokenizer):
    assert bee_tokenizer.vocab_size == len(bee_tokenizer) == TOKENIZER_CASES["vocab_size"] == 86583
    for token, index in TOKENIZER_CASES["special_ids"].items():
        assert bee_tokenizer.convert_tokens_to_ids(token) == index
        assert bee_tokenizer.convert_ids_to_tokens(index) == token
    assert sorted(bee_tokenizer.all_special_ids) == sorted(TOKENIZER_CASES["special_ids"].values())
    assert bee_tokenizer.convert_ids_to_tokens(TOKENIZER_CASES["newline_id"]) == "\n"
    assert bee_tokenizer.convert_ids_to_tokens(TOKENIZER_CASES["space_id"]) == " "
    assert (bee_tokenizer.pad_token_id, bee_tokenizer.unk_token_id) == (0, 1)
    assert (bee_tokenizer.bos_token_id, bee_tokenizer.eos_token_id) == (6, 7)


@pytest.mark.parametrize("case", ENCODED, ids=case_id)
def test_markup_pieces_ids_and_decoding_match_the_original(bee_tokenizer, case):
    pieces = bee_tokenizer.tokenize_markup(case["text"])
    expected = [(p["token"], p["start"], p["is_unk"], p["is_special"]) for p in case["pieces"]]
    assert [tuple(piece) for piece in pieces] == expected
    ids, ext_table = bee_tokenizer.encode_markup(case["text"])
    assert ids == case["encode_ids"]
    assert ext_table == {int(index): text for index, text in case["encode_ext_table"].items()}
    assert bee_tokenizer.decode_markup(ids, ext_table) == case["decode_roundtrip"]


@pytest.mark.parametrize("case", MODEL_LEVEL, ids=case_id)
def test_model_level_ids_match_the_original(bee_tokenizer, case):
    ext_table = CpmBeeExtTable()
    ids, subs = bee_tokenizer.encode_model_ids(case["text"], ext_table)
    assert ids == case["model_ids"]
    assert subs == case["model_subs"]
    assert original_ext_states(bee_tokenizer, ext_table) == case["model_ext_states"]


def test_sub_ids_count_over_every_text_of_one_input(bee_tokenizer):
    ext_table = CpmBeeExtTable()
    assert bee_tokenizer.encode_model_ids("наука", ext_table) == ([1], [0])
    assert bee_tokenizer.encode_model_ids("и <mask_7> наука", ext_table) == ([1, 5, 2, 5, 1], [1, 0, 0, 0, 0])
    assert ext_table.columns() == [(1, 1)]


@pytest.mark.parametrize("case", INVALID_SPECIAL, ids=case_id)
def test_special_tokens_without_a_vocabulary_base_are_rejected(bee_tokenizer, case):
    with pytest.raises(ValueError, match=re.escape(case["flatten_error"])) as error:
        bee_tokenizer.encode_model_ids(case["text"], CpmBeeExtTable())
    assert "<<" in str(error.value) and "<ans_1>" in str(error.value)


@pytest.mark.parametrize("case", MALFORMED, ids=case_id)
def test_malformed_markup_raises_with_offset_and_fix(bee_tokenizer, case):
    offset = case["text"].index("<")
    for call in (bee_tokenizer.tokenize_markup, bee_tokenizer.encode_markup):
        with pytest.raises(ValueError, match="Unexpected end of text") as error:
            call(case["text"])
        assert f"character {offset}" in str(error.value)
        assert "'<<'" in str(error.value) and "escape_markup" in str(error.value)


def test_a_stray_lt_inside_a_special_token_raises(bee_tokenizer):
    with pytest.raises(ValueError, match="'<' at character 2 inside the special token opened at character 0"):
        bee_tokenizer.tokenize_markup("<a<b>")


@pytest.mark.parametrize("case", TOKENIZER_CASES["decode_cases"], ids=lambda case: repr(case["text"]))
def test_decode_cases_match_the_original(bee_tokenizer, case):
    ext_table = {int(index): text for index, text in case.get("ext_table", {}).items()}
    assert bee_tokenizer.decode_markup(case["ids"], ext_table) == case["text"]


def test_decode_markup_rejects_ids_outside_vocabulary_and_table(bee_tokenizer):
    with pytest.raises(ValueError, match="Id 86583 is neither in the vocabulary"):
        bee_tokenizer.decode_markup([86583])


@pytest.mark.parametrize("text", ["", "<", "<<", "a<b", "<s>", "x <<= y", "<<<"])
def test_escaping_makes_any_text_literal(bee_tokenizer, text):
    markup = escape_markup(text)
    assert unescape_markup(markup) == text
    pieces = bee_tokenizer.tokenize_markup(markup)
    assert not any(piece.is_special for piece in pieces)
    assert "".join(piece.token for piece in pieces) == text


def test_plain_text_is_literal(bee_tokenizer):
    assert bee_tokenizer.tokenize("<s>") == ["<", "s", ">"]
    encoding = bee_tokenizer("Hello world")
    assert encoding["input_ids"] == [69652, 37791]
    assert encoding["attention_mask"] == [1, 1]
    assert bee_tokenizer.encode("a << b") == bee_tokenizer.encode_markup("a <<<< b")[0]
    assert bee_tokenizer.decode(bee_tokenizer.encode("x < y </s>")) == "x < y </s>"


def test_token_and_id_conversion(bee_tokenizer):
    assert bee_tokenizer.convert_tokens_to_ids("<mask>") == 2
    assert bee_tokenizer.convert_ids_to_tokens(6) == "<s>"
    assert bee_tokenizer.convert_tokens_to_ids(["Hello", " world"]) == [69652, 37791]


def test_decode_can_skip_special_tokens(bee_tokenizer):
    ids = [6, 69652, 37791, 7, 9, 0, 65756]
    assert bee_tokenizer.decode(ids) == "<s>Hello world</s><ans><pad><eod>"
    assert bee_tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"


def test_unknown_plain_text_gets_remembered_ext_ids(bee_tokenizer):
    first = bee_tokenizer.encode("猫🐱 and 𠀀𠀁")
    unknown = [index for index in first if index >= bee_tokenizer.vocab_size]
    assert len(unknown) == 2  # 🐱 and the run 𠀀𠀁
    assert bee_tokenizer.encode("𠀀𠀁 🐱") == [unknown[1], 5, unknown[0]]
    assert bee_tokenizer.decode(unknown) == "🐱𠀀𠀁"
    assert bee_tokenizer.convert_ids_to_tokens(unknown) == ["🐱", "𠀀𠀁"]


def test_the_vocabulary_is_fixed(bee_tokenizer):
    with pytest.raises(ValueError, match="vocabulary is fixed"):
        bee_tokenizer.add_tokens(["<image>"])
    assert bee_tokenizer.add_special_tokens({"sep_token": "<sep>"}) == 0


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_plain_text_round_trips_exactly(bee_tokenizer, text):
    ids = bee_tokenizer.encode(text)
    assert bee_tokenizer(text)["input_ids"] == ids
    assert bee_tokenizer.decode(ids) == text


@pytest.mark.parametrize("text", ["", "\x00\x01\r\n\t", "<<<s>>>", "\U0010ffff", "𪚥" * 40, " " * 33])
def test_plain_text_round_trips_on_edge_cases(bee_tokenizer, text):
    assert bee_tokenizer.decode(bee_tokenizer.encode(text)) == text


def test_save_and_reload(bee_tokenizer, tmp_path):
    bee_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "vocab.txt").read_bytes() == VOCAB_FILE.read_bytes()
    reloaded = CpmBeeTokenizer.from_pretrained(tmp_path)
    text = "User: 图片里有什么？\nAI: a << b <s>\n"
    assert reloaded.encode(text) == bee_tokenizer.encode(text)
    assert reloaded.decode(reloaded.encode("😀 " + text)) == "😀 " + text  # ext ids are per instance
    assert reloaded.all_special_tokens == bee_tokenizer.all_special_tokens
    assert reloaded.all_special_ids == bee_tokenizer.all_special_ids
    assert reloaded.tokenize("<s>") == ["<", "s", ">"]
    assert reloaded.vocab_size == len(reloaded) == 86583


def test_a_prompts_ext_strings_travel_with_it_not_with_the_tokenizer():
    """Decoding one request's answer never reads another request's out-of-vocabulary strings."""
    tokenizer = CpmBeeTokenizer(VOCAB_FILE, prompt_format="structured")
    first = {"question": "Copy ☃ and 𝔸 please", "<ans>": ""}  # 𝔸, the second unknown string, gets an ext id
    second = {"question": "Copy ♞ and ♜ please", "<ans>": ""}
    (first_table,) = tokenizer.output_ext_tables(first)
    tokenizer(second)  # a later request
    ext_id = next(i for i, text in first_table.items() if text == "𝔸")
    assert ext_id >= tokenizer.vocab_size
    assert tokenizer.decode([ext_id], ext_table=first_table) == "𝔸"
    assert tokenizer.decode([ext_id]) == "<unk>"  # without its table, never the other request's string
    assert tokenizer.batch_decode([[ext_id], [ext_id]], ext_tables=[first_table, None]) == ["𝔸", "<unk>"]


# --- The caption format: VisCPM-Paint's prompts -------------------------------------------------------------------

PAINT_CASES = json_file("paint.json")["cases"]
CAPTION_PROMPT = "a watercolor painting of a lighthouse at dawn, with gulls over the waves"


@pytest.fixture(scope="module")
def caption_tokenizer():
    return CpmBeeTokenizer(VOCAB_FILE, prompt_format="caption")


@pytest.mark.parametrize("name", sorted(PAINT_CASES))
def test_captions_are_the_originals_paint_inputs(caption_tokenizer, name):
    """A prompt and its negative in one call: the inputs the original's text encoder got, padded to the longer."""
    import torch

    from viscpm_hf.models.cpmbee.prompt_cpmbee import paint_prompts

    case = PAINT_CASES[name]
    encoding = caption_tokenizer([case["prompt"], case["negative_prompt"] or ""], return_tensors="pt")
    assert encoding["input_ids"].shape == (2, case["padded_len"])
    for row, batch in enumerate(paint_prompts(caption_tokenizer, case["prompt"], case["negative_prompt"])):
        expected = batch.model_inputs()
        for key in caption_tokenizer.model_input_names:
            assert torch.equal(encoding[key][row], expected[key][0]), key
    assert set(encoding) == {*caption_tokenizer.model_input_names, "conditioning_mask"}


def test_the_caption_structure_is_what_add_special_tokens_adds(caption_tokenizer):
    """[6,8,7] [6,83680,7300,7] [6, caption.., 7] [6,83350,7] [6,7]: 14 tokens around the caption's own."""
    own = caption_tokenizer("a < b", add_special_tokens=False)["input_ids"]
    assert own == [78, 68011, 42473]  # plain text: `<` is a character
    assert caption_tokenizer.num_special_tokens_to_add() == 14
    (ids,) = caption_tokenizer(["a < b"])["input_ids"]
    assert ids == [6, 8, 7, 6, 83680, 7300, 7, 6, *own, 7, 6, 83350, 7, 6, 7]
    assert caption_tokenizer.model_max_length == 3000  # no limit given: the caption limit


def test_captions_are_right_padded_with_pad_rows_that_condition(caption_tokenizer):
    encoding = caption_tokenizer(["a cat", CAPTION_PROMPT], return_tensors="pt")
    short = int(encoding["attention_mask"][0].sum())
    assert short == 16 and encoding["attention_mask"][1].all()
    assert encoding["input_ids"][0, short:].eq(caption_tokenizer.pad_token_id).all()
    assert not encoding["context"][0, short:].any() and encoding["num_segments"][0, short:].eq(0).all()
    assert encoding["conditioning_mask"].all()  # the original's UNet sees the <pad> rows too
    padded = caption_tokenizer(["a cat"], padding="max_length", max_length=40, return_tensors="pt")
    assert padded["input_ids"].shape == (1, 40) and int(padded["attention_mask"].sum()) == 16
    with pytest.raises(ValueError, match="right-padded"):
        caption_tokenizer(["a cat"], padding_side="left")


def test_truncation_drops_caption_tokens_and_counts_as_for_any_tokenizer(caption_tokenizer):
    (full,) = caption_tokenizer([CAPTION_PROMPT])["input_ids"]
    cut = caption_tokenizer([CAPTION_PROMPT], truncation=True, max_length=20)
    assert len(cut["input_ids"][0]) == 20
    # The caption loses its end; its </s> and the segments after it stay.
    assert cut["input_ids"][0] == full[:14] + full[-6:]
    assert cut["segment_ids"][0][-6:] == caption_tokenizer([CAPTION_PROMPT])["segment_ids"][0][-6:]
    own = caption_tokenizer([CAPTION_PROMPT], add_special_tokens=False)["input_ids"][0]
    kept = sum(cut["attention_mask"][0])
    assert len(own) + caption_tokenizer.num_special_tokens_to_add() - kept == len(full) - 20
    with pytest.raises(ValueError, match="needs 14 tokens without any caption, more than max_length=10"):
        caption_tokenizer(["a cat"], truncation=True, max_length=10)


def test_a_20000_character_prompt_and_negative_stay_bounded(caption_tokenizer):
    text = ("一只可爱的猫 a lighthouse at dawn 🐱 " * 1000)[:20000]
    encoding = caption_tokenizer([text, text[::-1]], truncation=True, return_tensors="pt")
    assert encoding["input_ids"].shape == (2, 3000)
    assert encoding["input_ids"][:, -6:].tolist() == [[7, 6, 83350, 7, 6, 7]] * 2
    own = caption_tokenizer([text, text[::-1]], add_special_tokens=False, verbose=False)["input_ids"]
    assert min(len(ids) for ids in own) > 3000  # both were cut
    limited = CpmBeeTokenizer(VOCAB_FILE, prompt_format="caption", model_max_length=512)
    assert limited([text], truncation=True, return_tensors="pt")["input_ids"].shape == (1, 512)


def test_the_caption_format_is_saved_and_asked_for(bee_tokenizer, caption_tokenizer, tmp_path):
    caption_tokenizer.save_pretrained(tmp_path)
    reloaded = CpmBeeTokenizer.from_pretrained(tmp_path)
    assert (reloaded.prompt_format, reloaded.model_max_length) == ("caption", 3000)
    captions = bee_tokenizer.with_caption_format()
    assert captions is not bee_tokenizer and captions.with_caption_format() is captions
    assert bee_tokenizer.prompt_format == "text" and bee_tokenizer("a cat")["input_ids"] == [78, 39651]
    assert captions(["a cat"]) == caption_tokenizer(["a cat"])
    assert captions.model_max_length == 3000
