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
