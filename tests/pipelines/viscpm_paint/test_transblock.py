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


def test_anchors_move_a_sentence_onto_its_nearest_known_caption(tmp_path):
    import pytest

    torch.manual_seed(0)
    anchors = torch.randn(20, 16) * 3
    block = VisCPMTransBlock(in_features=16, out_features=8, sentence_token="only", num_language_directions=1)
    block.set_language_directions([torch.randn(30, 16) + 4, torch.randn(30, 16) - 4])
    free = VisCPMTransBlock.from_config(block.config)
    free.load_state_dict(block.state_dict())
    block.set_anchors(anchors, temperature=0.01)
    # A caption moved a little off an anchor (as a translation moves it) is drawn as that anchor...
    moved = anchors + 0.3 * torch.randn(20, 16)
    torch.testing.assert_close(block(moved[:, None]), free(anchors[:, None]), atol=1e-4, rtol=0)
    assert (free(moved[:, None]) - free(anchors[:, None])).abs().max() > 0.05  # ...which it is not without anchors
    # ...and half-way between two anchors, as an even mix of the two.
    middle = block._remove_language_directions((anchors[:1] + anchors[1:2]) / 2)
    mixed = block(middle[:, None])
    expected = block.layer_norm(block.projection(block.anchors[:2].mean(0, keepdim=True)))[:, None]
    torch.testing.assert_close(mixed, expected, atol=1e-4, rtol=0)
    # The temperature is relative to the anchors' spacing, so a rescaled encoder behaves the same.
    scaled = VisCPMTransBlock(in_features=16, out_features=8, sentence_token="only")
    scaled.set_anchors(10 * anchors, temperature=0.01)
    plain = VisCPMTransBlock(in_features=16, out_features=8, sentence_token="only")
    plain.set_anchors(anchors, temperature=0.01)
    assert abs(scaled.config.anchor_temperature / plain.config.anchor_temperature - 100) < 1e-3
    # Saved and loaded with the weights, the anchors count and the temperature included.
    block.save_pretrained(tmp_path)
    loaded = VisCPMTransBlock.from_pretrained(tmp_path)
    assert loaded.config.num_anchors == 20
    torch.testing.assert_close(loaded(moved[:, None]), block(moved[:, None]))
    for make, message in [
        (lambda: VisCPMTransBlock(in_features=16, out_features=8, num_anchors=3), "sentence_token='only'"),
        (lambda: VisCPMTransBlock(in_features=16, out_features=8).set_anchors(anchors), "sentence_token='only'"),
        (lambda: block.set_anchors(anchors[:, :8]), r"\(n >= 2, 16\)"),
        (lambda: block.set_anchors(anchors, temperature=0), "positive"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
