"""The transblock of VisCPM-Paint: the frozen LLM's hidden states -> the UNet's cross-attention width."""

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class VisCPMTransBlock(ModelMixin, ConfigMixin):
    """Linear (no bias) then LayerNorm, kept in float32 as the original: `(batch, length, in_features)` ->
    `(batch, length, out_features)`. With the LLM frozen, this and the UNet's cross-attention are what Paint trains."""

    _keep_in_fp32_modules = ["projection", "layer_norm"]

    @register_to_config
    def __init__(self, in_features: int = 4096, out_features: int = 1024, layer_norm_eps: float = 1e-6):
        super().__init__()
        self.projection = nn.Linear(in_features, out_features, bias=False)
        self.layer_norm = nn.LayerNorm(out_features, eps=layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states.to(self.projection.weight.dtype)
        return self.layer_norm(self.projection(hidden_states))
