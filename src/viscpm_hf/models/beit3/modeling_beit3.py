"""BEiT-3 with learned queries: the vision bridge of VisCPM-Chat (MPM paper, section 3.2; Muffin-style bridge).

Data flow: pixels -> patch embedding, class token in front -> the learned queries appended behind the image tokens ->
position embeddings (one table for the image tokens, another for the queries) -> multiway encoder layers, where each
LayerNorm and Linear has an "image" expert (class token and patches) and a "query" expert (the queries) while
attention runs jointly over all tokens -> final multiway LayerNorm. The query outputs are the model's output; the
chat model maps them into the LLM's embedding space.

Each layer is pre-norm with sub-LayerNorms (BEiT-3 / Magneto): a LayerNorm right before the attention output
projection and another between the two feed-forward projections.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..strict_loading import StrictLoadingMixin
from .configuration_beit3 import POSITION_OFFSET, VisCPMBeit3Config


@dataclass
class VisCPMBeit3ModelOutput(BaseModelOutputWithPooling):
    """Outputs of [`VisCPMBeit3Model`].

    - `last_hidden_state`: `(batch, num_query_tokens, hidden_size)`, the query outputs after the final LayerNorm.
    - `pooler_output`: `(batch, hidden_size)`, the class token after the final LayerNorm (BEiT-3's image summary).
    - `hidden_states` (with `output_hidden_states`): the embedding output and the output of every layer,
      `(batch, 1 + num_patches + num_query_tokens, hidden_size)` each, before the final LayerNorm.
    - `attentions` (with `output_attentions`, eager attention only): `(batch, heads, tokens, tokens)` per layer.
    - `all_tokens_last_hidden_state`: `(batch, 1 + num_patches + num_query_tokens, hidden_size)`, every token after
      the final LayerNorm (class token, patches, queries).
    """

    all_tokens_last_hidden_state: torch.Tensor | None = None


class VisCPMBeit3Multiway(nn.Module):
    """Two copies of a token-wise module: `image` for the first `num_image_tokens` tokens, `query` for the rest."""

    def __init__(self, make_expert: Callable[[], nn.Module]):
        super().__init__()
        self.image = make_expert()
        self.query = make_expert()

    def forward(self, hidden_states: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
        image_part = self.image(hidden_states[:, :num_image_tokens])
        query_part = self.query(hidden_states[:, num_image_tokens:])
        return torch.cat([image_part, query_part], dim=1)


class VisCPMBeit3Embeddings(nn.Module):
    """Pixels -> `(batch, 1 + num_patches + num_query_tokens, hidden_size)` token embeddings with positions added."""

    def __init__(self, config: VisCPMBeit3Config):
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.query_tokens = nn.Parameter(torch.empty(config.num_query_tokens, config.hidden_size))
        self.position_embedding_image = nn.Embedding(config.num_image_positions, config.hidden_size)
        self.position_embedding_query = nn.Embedding(config.max_query_positions, config.hidden_size)

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Raises a ValueError naming the problem when the pixels cannot be embedded by this model."""
        config = self.config
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"pixel_values must be a tensor of shape (batch, {config.num_channels}, height, width), got {shape}."
            )
        _, channels, height, width = pixel_values.shape
        if channels != config.num_channels:
            raise ValueError(
                f"pixel_values have {channels} channels but the model expects num_channels={config.num_channels}."
            )
        patch = config.patch_size
        if height < patch or width < patch or height % patch or width % patch:
            raise ValueError(
                f"Image height and width must be positive multiples of patch_size={patch}, got {height}x{width}."
            )
        num_patches = (height // patch) * (width // patch)
        available = self.position_embedding_image.num_embeddings - POSITION_OFFSET - 1
        if num_patches > available:
            raise ValueError(
                f"A {height}x{width} image gives {num_patches} patches, but the image position table holds only "
                f"{available} (image_size={config.image_size}, patch_size={patch}). Resize the images to at most "
                f"{config.image_size}x{config.image_size} pixels."
            )

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(batch, channels, height, width)` -> `(batch, 1 + num_patches, hidden_size)`: class token, then the
        patches in row-major order; no positions yet."""
        self.check_pixel_values(pixel_values)
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        cls_tokens = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls_tokens, patches], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        image_tokens = self.embed_image(pixel_values)
        batch_size, num_image_tokens, _ = image_tokens.shape
        num_queries = self.query_tokens.shape[0]
        # Both groups count their positions from the same offset, each in its own table.
        image_rows = torch.arange(POSITION_OFFSET, POSITION_OFFSET + num_image_tokens, device=image_tokens.device)
        query_rows = torch.arange(POSITION_OFFSET, POSITION_OFFSET + num_queries, device=image_tokens.device)
        image_tokens = image_tokens + self.position_embedding_image(image_rows)
        queries = self.query_tokens + self.position_embedding_query(query_rows)
        return torch.cat([image_tokens, queries.unsqueeze(0).expand(batch_size, -1, -1)], dim=1)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(batch, heads, tokens, head_dim)` inputs -> `(batch, tokens, heads, head_dim)` output and the probabilities.

    The softmax runs in float32 whatever the model's dtype."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probabilities = nn.functional.dropout(probabilities, p=dropout, training=module.training)
    output = torch.matmul(probabilities, value).transpose(1, 2).contiguous()
    return output, probabilities


class VisCPMBeit3Attention(nn.Module):
    """Joint self-attention over image tokens and queries with per-expert projections and a sub-LayerNorm."""

    def __init__(self, config: VisCPMBeit3Config):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = VisCPMBeit3Multiway(partial(nn.Linear, dim, dim))
        self.k_proj = VisCPMBeit3Multiway(partial(nn.Linear, dim, dim))
        self.v_proj = VisCPMBeit3Multiway(partial(nn.Linear, dim, dim))
        self.sub_layer_norm = VisCPMBeit3Multiway(partial(nn.LayerNorm, dim, eps=config.layer_norm_eps))
        self.out_proj = VisCPMBeit3Multiway(partial(nn.Linear, dim, dim))

    def forward(
        self, hidden_states: torch.Tensor, num_image_tokens: int, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, dim = hidden_states.shape
        heads_shape = (batch_size, num_tokens, self.num_heads, self.head_dim)
        # The queries are scaled before the product (as in the original), so every kernel gets scaling=1.
        query = (self.q_proj(hidden_states, num_image_tokens) * self.scaling).view(heads_shape).transpose(1, 2)
        key = self.k_proj(hidden_states, num_image_tokens).view(heads_shape).transpose(1, 2)
        value = self.v_proj(hidden_states, num_image_tokens).view(heads_shape).transpose(1, 2)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attended, probabilities = attention_interface(
            self, query, key, value, attention_mask=None, scaling=1.0, dropout=0.0, **kwargs
        )
        attended = self.sub_layer_norm(attended.reshape(batch_size, num_tokens, dim), num_image_tokens)
        return self.out_proj(attended, num_image_tokens), probabilities


class VisCPMBeit3FeedForward(nn.Module):
    """One expert's feed-forward block: fc1 -> activation (float32) -> sub-LayerNorm -> fc2."""

    def __init__(self, config: VisCPMBeit3Config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.sub_layer_norm = nn.LayerNorm(config.intermediate_size, eps=config.layer_norm_eps)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        hidden_states = self.activation(hidden_states.float()).to(hidden_states.dtype)
        return self.fc2(self.sub_layer_norm(hidden_states))


class VisCPMBeit3Layer(GradientCheckpointingLayer):
    """Pre-norm multiway layer: x + Attention(LN(x)), then x + FFN(LN(x)), each LN and FFN chosen per expert."""

    def __init__(self, config: VisCPMBeit3Config):
        super().__init__()
        make_layer_norm = partial(nn.LayerNorm, config.hidden_size, eps=config.layer_norm_eps)
        self.layer_norm_before_attention = VisCPMBeit3Multiway(make_layer_norm)
        self.attention = VisCPMBeit3Attention(config)
        self.layer_norm_before_ffn = VisCPMBeit3Multiway(make_layer_norm)
        self.ffn = VisCPMBeit3Multiway(partial(VisCPMBeit3FeedForward, config))

    def forward(
        self, hidden_states: torch.Tensor, num_image_tokens: int, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.layer_norm_before_attention(hidden_states, num_image_tokens)
        attended, probabilities = self.attention(normed, num_image_tokens, **kwargs)
        hidden_states = hidden_states + attended
        normed = self.layer_norm_before_ffn(hidden_states, num_image_tokens)
        hidden_states = hidden_states + self.ffn(normed, num_image_tokens)
        return hidden_states, probabilities


class VisCPMBeit3Encoder(nn.Module):
    def __init__(self, config: VisCPMBeit3Config):
        super().__init__()
        self.layers = nn.ModuleList([VisCPMBeit3Layer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(
        self,
        hidden_states: torch.Tensor,
        num_image_tokens: int,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Returns `(last all-token state before the final norm, hidden_states or None, attentions or None)`."""
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, probabilities = layer(hidden_states, num_image_tokens, **kwargs)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probabilities,)
        return hidden_states, all_hidden_states, all_attentions


class VisCPMBeit3PreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    """Base class of the BEiT-3 tower: its config class, weight initialisation (truncated normal for the class token,
    the queries and the position tables), and strict loading (a folder whose tensors do not cover the model exactly
    raises with their names; `strict=False` loads partial weights)."""

    config: VisCPMBeit3Config
    base_model_prefix = "beit3"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisCPMBeit3Embeddings", "VisCPMBeit3Layer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VisCPMBeit3Embeddings):
            std = self.config.initializer_range
            for parameter in (
                module.cls_token,
                module.query_tokens,
                module.position_embedding_image.weight,
                module.position_embedding_query.weight,
            ):
                init.trunc_normal_(parameter, std=std, a=-2 * std, b=2 * std)


class VisCPMBeit3Model(VisCPMBeit3PreTrainedModel):
    """BEiT-3 reading an image together with `num_query_tokens` learned queries; returns the query outputs.

    `pixel_values`: `(batch, num_channels, height, width)`, height and width multiples of `patch_size` with at most
    as many patches as an `image_size` x `image_size` image (positions are taken in row-major patch order, without
    interpolation). `last_hidden_state`: `(batch, num_query_tokens, hidden_size)`.
    """

    def __init__(self, config: VisCPMBeit3Config):
        super().__init__(config)
        self.embeddings = VisCPMBeit3Embeddings(config)
        self.encoder = VisCPMBeit3Encoder(config)
        self.final_layer_norm = VisCPMBeit3Multiway(
            partial(nn.LayerNorm, config.hidden_size, eps=config.layer_norm_eps)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> VisCPMBeit3ModelOutput | tuple:
        """Encodes the images together with the learned queries.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
                Height and width multiples of `patch_size`, with at most as many patches as an `image_size` x
                `image_size` image.
            output_hidden_states (`bool`, *optional*):
                Return the embedding output and every layer's output; defaults to the config's.
            output_attentions (`bool`, *optional*):
                Return every layer's attention probabilities (eager attention only); defaults to the config's.
            return_dict (`bool`, *optional*):
                Return a `VisCPMBeit3ModelOutput` rather than a tuple; defaults to the config's.
            kwargs (`dict[str, Any]`, *optional*):
                Passed to the attention.

        Returns:
            The outputs (a tuple without `return_dict`): `last_hidden_state` the query outputs `(batch_size,
                num_query_tokens, hidden_size)`, `pooler_output` the class token, `all_tokens_last_hidden_state` every
                token, all after the final LayerNorm.

        Raises:
            ValueError: `pixel_values` of the wrong shape, channels or size, or `output_attentions` without eager
                attention.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_attentions and self.config._attn_implementation != "eager":
            raise ValueError(
                "output_attentions=True needs attn_implementation='eager' (got "
                f"{self.config._attn_implementation!r}): other kernels do not return attention probabilities."
            )

        hidden_states = self.embeddings(pixel_values)
        num_image_tokens = hidden_states.shape[1] - self.config.num_query_tokens
        hidden_states, all_hidden_states, all_attentions = self.encoder(
            hidden_states,
            num_image_tokens,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **kwargs,
        )
        hidden_states = self.final_layer_norm(hidden_states, num_image_tokens)

        outputs = VisCPMBeit3ModelOutput(
            last_hidden_state=hidden_states[:, num_image_tokens:],
            pooler_output=hidden_states[:, 0],
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            all_tokens_last_hidden_state=hidden_states,
        )
        return outputs if return_dict else outputs.to_tuple()


__all__ = ["VisCPMBeit3Model", "VisCPMBeit3PreTrainedModel"]
