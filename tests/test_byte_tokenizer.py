from hypothesis import given, settings
from hypothesis import strategies as st

from viscpm_hf import build_byte_level_tokenizer


TOKENIZER = build_byte_level_tokenizer()


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_round_trips(text):
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
    assert TOKENIZER.decode(ids) == text


def test_special_tokens_take_the_first_ids():
    assert [TOKENIZER.pad_token_id, TOKENIZER.bos_token_id, TOKENIZER.eos_token_id] == [0, 1, 2]
    assert TOKENIZER.convert_tokens_to_ids("<image>") == 3
    assert TOKENIZER("a<image>b")["input_ids"] == [TOKENIZER.convert_tokens_to_ids("a"), 3, TOKENIZER.convert_tokens_to_ids("b")]
    assert len(TOKENIZER) == 4 + 256
