"""A parameter-free stand-in for the VAE, for images small enough to diffuse in pixel space."""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .strict_loading import StrictLoadingMixin


class PixelShuffleAutoencoder(StrictLoadingMixin, ModelMixin, ConfigMixin):
    """Folds each `factor x factor` patch of pixels into channels (`(b, 3, h, w)` in [-1, 1] ->
    `(b, 3 * factor**2, h / factor, w / factor)`) and back, exactly: the "latents" are the pixels rearranged.

    A trained VAE is the right choice at Stable Diffusion sizes; at 32x32 (the OpenMoji MPM demo) it would cost
    more to train than it saves, while folding still gives the UNet a 4x smaller grid. It has the interface the
    pipeline and `train_paint.py` use of `AutoencoderKL` (`encode(...).latent_dist`, `decode(...)`, the `config`
    fields `scaling_factor` and `block_out_channels`, from which the downscaling factor is read).

    Args:
        factor (`int`, *optional*, defaults to 2):
            The side of the folded patches; a power of two.
        in_channels (`int`, *optional*, defaults to 3):
            The image channels.
        scaling_factor (`float`, *optional*, defaults to 1.0):
            As `AutoencoderKL`'s: the pipeline divides the latents by it before `decode`.
        block_out_channels (`list[int]`, *optional*):
            Follows from `factor` and `in_channels`; stored because diffusers reads the downscaling factor as
            `2 ** (len(vae.config.block_out_channels) - 1)`. Leave it out.
        latent_channels (`int`, *optional*):
            Follows from them too (`in_channels * factor**2`). Leave it out.

    Raises:
        ValueError: `factor` is not a power of two, or a derived field given contradicts it.
    """

    @register_to_config
    def __init__(
        self,
        factor: int = 2,
        in_channels: int = 3,
        scaling_factor: float = 1.0,
        block_out_channels: list[int] | None = None,
        latent_channels: int | None = None,
    ):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two, got {factor}.")
        derived = {"block_out_channels": [in_channels] * factor.bit_length(), "latent_channels": in_channels * factor**2}
        given = {"block_out_channels": block_out_channels and list(block_out_channels), "latent_channels": latent_channels}
        for name, value in given.items():
            if value is not None and value != derived[name]:
                raise ValueError(f"{name}={value} contradicts factor={factor}, in_channels={in_channels}: leave it out.")
        self.register_to_config(**derived)
        self.fold, self.unfold = nn.PixelUnshuffle(factor), nn.PixelShuffle(factor)
        # No weights; a one-value buffer gives the model a device and dtype that `.to()` moves, and a (tiny)
        # weights file, which diffusers' `from_pretrained` requires of every model.
        self.register_buffer("anchor", torch.zeros(()))

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Folds images into latents, as a (degenerate) Gaussian centred on the folded pixels, so that
        `latent_dist.sample()` returns them exactly.

        Args:
            x (`torch.Tensor`):
                Images `(b, in_channels, h, w)` in [-1, 1], `h` and `w` multiples of `factor`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an `AutoencoderKLOutput` instead of a plain tuple.

        Returns:
            `AutoencoderKLOutput(latent_dist=...)`, or the tuple `(latent_dist,)`.
        """
        mean = self.fold(x.to(self.anchor.dtype))
        distribution = DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=distribution) if return_dict else (distribution,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs) -> DecoderOutput | tuple:
        """Unfolds latents back into images, exactly.

        Args:
            z (`torch.Tensor`):
                Latents `(b, in_channels * factor**2, h / factor, w / factor)`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a `DecoderOutput` instead of a plain tuple.
            kwargs (`dict[str, Any]`, *optional*):
                Ignored: there for the signature of `AutoencoderKL.decode` (its `generator`).

        Returns:
            `DecoderOutput(sample=images)` with images `(b, in_channels, h, w)`, or the tuple `(images,)`.
        """
        image = self.unfold(z.to(self.anchor.dtype))
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)
