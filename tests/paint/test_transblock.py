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
