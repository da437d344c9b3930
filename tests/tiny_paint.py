"""Tiny VisCPM-Paint components built in code (a byte-level tokenizer and a BERT as the text encoder)."""

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import BertConfig, BertModel

from viscpm_hf import VisCPMPaintPipeline, VisCPMTransBlock, build_byte_level_tokenizer


def tiny_unet(cross_attention_dim: int = 32) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4), use_linear_projection=True,
    )  # fmt: skip


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip


def sd_scheduler() -> DDPMScheduler:
    """Stable Diffusion 2.1-base's DDPM settings with the original VisCPM's steps offset of 0."""
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        steps_offset=0, timestep_spacing="leading",
    )  # fmt: skip


def tiny_pipeline(seed: int = 0, text_hidden: int = 32, sentence_token: str = "none") -> VisCPMPaintPipeline:
    torch.manual_seed(seed)
    tokenizer = build_byte_level_tokenizer(add_bos_token=True)
    text_encoder = BertModel(
        BertConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=128)  # fmt: skip
    ).eval()
    return VisCPMPaintPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transblock=VisCPMTransBlock(in_features=text_hidden, out_features=32, sentence_token=sentence_token),
        unet=tiny_unet(),
        vae=tiny_vae(),
        scheduler=sd_scheduler(),
    )
