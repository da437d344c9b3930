import json

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from viscpm_hf import build_byte_level_tokenizer
from viscpm_hf.mpm.data.translation import Translator, main, translate_records


RECORDS = [
    {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]},
    {"image": "b.png", "conversations": [{"from": "human", "value": "Color?\n<image>"}, {"from": "gpt", "value": "Red."}]},
    {"image": "c.png", "caption": "a red apple"},
]


@pytest.fixture
def translator():
    torch.manual_seed(0)
    tokenizer = build_byte_level_tokenizer(add_bos_token=True)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=2,
    )  # fmt: skip
    return Translator(BartForConditionalGeneration(config), tokenizer, max_new_tokens=6)


def test_texts_are_translated_and_images_kept(translator, tmp_path):
    output = tmp_path / "zh.json"
    translated = translate_records(RECORDS, translator, output, batch_size=2)
    assert json.loads(output.read_text()) == translated
    assert [r["image"] for r in translated] == ["a.png", "b.png", "c.png"]
    first = translated[0]["conversations"][0]["value"]
    assert first.startswith("<image>\n") and first != RECORDS[0]["conversations"][0]["value"]
    assert translated[1]["conversations"][0]["value"].endswith("\n<image>")
    assert translated[2]["caption"] != "a red apple"
    assert not (tmp_path / "zh.json.partial.jsonl").exists()


def test_an_interrupted_run_resumes(translator, tmp_path):
    output = tmp_path / "zh.json"
    calls = []
    original = translator.__class__.__call__

    def failing_second_batch(self, texts):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, texts)

    translator.__class__.__call__ = failing_second_batch
    try:
        with pytest.raises(KeyboardInterrupt):
            translate_records(RECORDS, translator, output, batch_size=2)
    finally:
        translator.__class__.__call__ = original
    assert len((tmp_path / "zh.json.partial.jsonl").read_text().splitlines()) == 2 and not output.exists()
    seen = []
    translator.__class__.__call__ = lambda self, texts: seen.append(texts) or original(self, texts)
    try:
        result = translate_records(RECORDS, translator, output, batch_size=2)
    finally:
        translator.__class__.__call__ = original
    assert seen == [["a red apple"]] and len(result) == 3


def test_command_line(tmp_path, translator):
    translator.model.save_pretrained(tmp_path / "mt")
    translator.tokenizer.save_pretrained(tmp_path / "mt")
    (tmp_path / "in.json").write_text(json.dumps(RECORDS[2:]))
    assert main(["--input", str(tmp_path / "in.json"), "--output", str(tmp_path / "out.json"), "--model",
                 str(tmp_path / "mt"), "--max_new_tokens", "4", "--device", "cpu"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "out.json").read_text())[0]["image"] == "c.png"


def test_records_need_text(translator, tmp_path):
    with pytest.raises(ValueError, match="'conversations'"):
        translate_records([{"image": "x.png"}], translator, tmp_path / "out.json")
