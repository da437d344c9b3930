import torch

from viscpm_hf import VisCPMTransBlock


def test_linear_then_layer_norm():
    block = VisCPMTransBlock(in_features=8, out_features=6)
    hidden = torch.randn(2, 5, 8)
    expected = torch.nn.functional.layer_norm(hidden @ block.projection.weight.T, (6,), block.layer_norm.weight, block.layer_norm.bias, 1e-6)
    torch.testing.assert_close(block(hidden), expected)
    assert block.projection.bias is None


def test_stays_float32_when_loaded_in_half_precision(tmp_path):
    VisCPMTransBlock(in_features=8, out_features=6).save_pretrained(tmp_path)
    block = VisCPMTransBlock.from_pretrained(tmp_path, dtype=torch.float16)
    assert block.projection.weight.dtype == torch.float32
    assert block(torch.randn(1, 3, 8, dtype=torch.float16)).dtype == torch.float32


def test_sentence_token_is_the_masked_mean_of_the_real_tokens():
    torch.manual_seed(0)
    hidden, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    plain = VisCPMTransBlock(in_features=8, out_features=6)
    for mode, length in (("prepend", 5), ("only", 1)):
        block = VisCPMTransBlock(in_features=8, out_features=6, sentence_token=mode)
        block.load_state_dict(plain.state_dict())
        out = block(hidden, mask)
        assert out.shape == (2, length, 6)
        means = torch.stack([hidden[0].mean(0), hidden[1, :2].mean(0)])[:, None]
        torch.testing.assert_close(out[:, :1], plain(means))
        # Padding never reaches the sentence token.
        padded = hidden.clone()
        padded[1, 2:] = 100.0
        torch.testing.assert_close(block(padded, mask)[:, 0], out[:, 0])
        expected_mask = torch.ones(2, 1, dtype=torch.long) if mode == "only" else torch.cat([torch.ones(2, 1, dtype=torch.long), mask], 1)
        assert torch.equal(block.conditioning_mask(mask), expected_mask)
    torch.testing.assert_close(plain(hidden, mask), plain(hidden))
    assert plain.conditioning_mask(mask) is mask and plain.conditioning_mask(None) is None


def test_unknown_sentence_token_mode_is_refused():
    import pytest

    with pytest.raises(ValueError, match="sentence_token must be one of"):
        VisCPMTransBlock(in_features=8, out_features=6, sentence_token="max")


def test_language_directions_remove_what_separates_languages(tmp_path):
    import pytest

    torch.manual_seed(0)
    meaning = torch.randn(50, 16)
    offsets = torch.randn(3, 16) * 5  # each language shifts every sentence the same way
    by_language = [meaning + offset for offset in offsets]
    block = VisCPMTransBlock(in_features=16, out_features=8, sentence_token="only", num_language_directions=2)
    unprojected = VisCPMTransBlock(in_features=16, out_features=8, sentence_token="only")
    unprojected.load_state_dict(block.state_dict(), strict=False)
    block.set_language_directions(by_language)
    directions = block.language_directions
    torch.testing.assert_close(directions @ directions.T, torch.eye(2), atol=1e-5, rtol=0)
    # The same sentences in two languages condition the UNet identically once projected, not before.
    first, second = (block(states[:, None]) for states in by_language[:2])
    torch.testing.assert_close(first, second, atol=1e-4, rtol=0)
    assert (unprojected(by_language[0][:, None]) - unprojected(by_language[1][:, None])).abs().max() > 0.1
    # The directions are saved and loaded with the weights.
    block.save_pretrained(tmp_path)
    loaded = VisCPMTransBlock.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.language_directions, directions)
    with pytest.raises(ValueError, match="at most 1 directions"):
        block.set_language_directions(by_language[:2])
