"""Configuration of VisCPM's BEiT-3 vision bridge: a multiway encoder reading image patches and learned queries."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


# Position rows 0 and 1 of both tables are never read: the image tokens and the queries each count from row 2
# (a padding-index convention inherited by torchscale's positional embedding).
POSITION_OFFSET = 2


@strict
class VisCPMBeit3Config(PreTrainedConfig):
    r"""
    Defaults are the BEiT-3 large tower of VisCPM-Chat. The image tokens (class token + patches) run through the
    "image" expert of every multiway layer, the `num_query_tokens` learned queries appended after them through the
    "query" expert (BEiT-3's language expert); all tokens attend to each other. The model returns the query outputs.

    Args:
        image_size (`int`, defaults to 224):
            Side of the square training resolution. It sizes the image position table: `(image_size // patch_size)**2`
            patches plus the class token, so smaller inputs (fewer patches) also work.
        patch_size (`int`, defaults to 16):
            Side of a patch and stride of the patch-embedding convolution.
        num_channels (`int`, defaults to 3):
            Channels of the input images.
        hidden_size (`int`, defaults to 1024):
            Width of the encoder; a multiple of `num_attention_heads`.
        num_attention_heads (`int`, defaults to 16):
            Attention heads per layer.
        intermediate_size (`int`, defaults to 4096):
            Width of the feed-forward layers.
        num_hidden_layers (`int`, defaults to 24):
            Number of multiway encoder layers.
        layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of every LayerNorm (pre-norms, the sub-LayerNorms inside attention and FFN, the final norm).
        num_query_tokens (`int`, defaults to 64):
            Learned queries appended after the image tokens; their outputs are the model's `last_hidden_state`.
        max_query_positions (`int`, defaults to 1024):
            Rows of the query position table (BEiT-3's text position table, of which the queries use rows
            `2 .. 2 + num_query_tokens`).
        hidden_act (`str`, defaults to `"gelu"`):
            Activation of the feed-forward layers (computed in float32).
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the (truncated) normal initialisation.
    """

    model_type = "viscpm_beit3"
    base_config_key = "vision_config"

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 1024
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    layer_norm_eps: float = 1e-5
    num_query_tokens: int = 64
    max_query_positions: int = 1024
    hidden_act: str = "gelu"
    initializer_range: float = 0.02

    @property
    def num_patches(self) -> int:
        """Patches of an `image_size` x `image_size` image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_positions(self) -> int:
        """Rows of the image position table: the class token and every patch, after the two unused rows."""
        return POSITION_OFFSET + 1 + self.num_patches

    def validate_architecture(self):
        """Part of `@strict`-powered validation.

        Raises:
            ValueError: `hidden_size` is not a multiple of `num_attention_heads`, `image_size` not a multiple of
                `patch_size`, `num_query_tokens` is below 1, or the query position table has too few rows for the
                queries.
        """
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size}).")
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be at least 1, got {self.num_query_tokens}.")
        if POSITION_OFFSET + self.num_query_tokens > self.max_query_positions:
            raise ValueError(
                f"num_query_tokens ({self.num_query_tokens}) needs {POSITION_OFFSET + self.num_query_tokens} rows of "
                f"the query position table, but max_query_positions is {self.max_query_positions}."
            )


__all__ = ["VisCPMBeit3Config"]
