"""The transblock of VisCPM-Paint: the frozen LLM's hidden states -> the UNet's cross-attention width."""

from collections.abc import Sequence
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .strict_loading import StrictLoadingMixin


SENTENCE_TOKEN_MODES = ("none", "prepend", "only")


class VisCPMTransBlock(StrictLoadingMixin, ModelMixin, ConfigMixin):
    """Linear (no bias) then LayerNorm, kept in float32 as the original: `(batch, length, in_features)` ->
    `(batch, length, out_features)`. With the LLM frozen, this and the UNet's cross-attention are what Paint trains.

    Caption anchors (`set_anchors`, with `sentence_token="only"`) replace the sentence vector by a softmax-weighted
    mix of the sentence vectors of known captions, nearest first. A prompt in another language lands near, not on,
    its English caption, where a UNet trained on English conditions blends neighbouring images; the anchors move it
    onto the conditions the UNet was trained on (the retrieval step of kNN-Diffusion, arXiv 2204.02849), at the
    price of drawing only mixes of the anchors' captions.

    `from_pretrained` refuses weights with missing or unexpected tensors (see `StrictLoadingMixin`).

    Args:
        in_features (`int`, *optional*, defaults to 4096):
            The text encoder's hidden size.
        out_features (`int`, *optional*, defaults to 1024):
            The UNet's `cross_attention_dim`.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            The LayerNorm's epsilon.
        sentence_token (`str`, *optional*, defaults to `"none"`):
            Adds the masked mean of the hidden states as one more conditioning token: `"prepend"` before the token
            states, `"only"` instead of them; `"none"` (the original) keeps the token states only. With a sentence
            encoder as the pivot (e5), that mean is the very vector the encoder aligned across languages, so
            conditioning on it carries over to unseen languages better than the language-specific token states do.
        num_language_directions (`int`, *optional*, defaults to 0):
            How many language directions to hold (set by `set_language_directions`); `forward` projects them out of
            the hidden states first.
        num_anchors (`int`, *optional*, defaults to 0):
            How many caption anchors to hold (set by `set_anchors`); needs `sentence_token="only"`.
        anchor_temperature (`float`, *optional*, defaults to 1.0):
            The softmax temperature over the squared distances to the anchors; `set_anchors` sets it.

    Raises:
        ValueError: an unknown `sentence_token`, or anchors without `sentence_token="only"`.
    """

    _keep_in_fp32_modules = ["projection", "layer_norm"]

    def to(self, *args, **kwargs):
        """Moves the transblock to a device, but keeps its weights in float32 under a floating-point dtype, as
        `from_pretrained(dtype=...)` does: `pipe.to(torch.float16)` casts the UNet, VAE and LLM, not the conditioning
        (the original's transblock runs in float32). `.half()` / `.bfloat16()` still cast it, if that is meant.

        Args:
            args (`tuple`, *optional*):
                As for `torch.nn.Module.to`: a device, a dtype (a floating-point one is dropped), a tensor (its device
                only), `non_blocking`.
            kwargs (`dict[str, Any]`, *optional*):
                As for `torch.nn.Module.to` (`device`, `dtype`, `non_blocking`); a floating-point `dtype` is dropped.
        """
        kwargs = dict(kwargs)
        if isinstance(kwargs.get("dtype"), torch.dtype) and kwargs["dtype"].is_floating_point:
            del kwargs["dtype"]
        positional = []
        for arg in args:
            if isinstance(arg, torch.dtype) and arg.is_floating_point:
                continue
            if isinstance(arg, bool):  # to(device, dtype, non_blocking): keep the flag when the dtype goes
                kwargs["non_blocking"] = arg
            else:
                positional.append(arg.device if isinstance(arg, torch.Tensor) else arg)
        return super().to(*positional, **kwargs) if positional or kwargs else self

    @register_to_config
    def __init__(
        self,
        in_features: int = 4096,
        out_features: int = 1024,
        layer_norm_eps: float = 1e-6,
        sentence_token: Literal["none", "prepend", "only"] = "none",
        num_language_directions: int = 0,
        num_anchors: int = 0,
        anchor_temperature: float = 1.0,
    ):
        super().__init__()
        if sentence_token not in SENTENCE_TOKEN_MODES:
            raise ValueError(f"sentence_token must be one of {SENTENCE_TOKEN_MODES}, got {sentence_token!r}.")
        self.projection = nn.Linear(in_features, out_features, bias=False)
        self.layer_norm = nn.LayerNorm(out_features, eps=layer_norm_eps)
        if num_anchors and sentence_token != "only":
            raise ValueError(
                f"Caption anchors replace the sentence token: they need sentence_token='only', got {sentence_token!r}."
            )
        if num_language_directions:
            self.register_buffer("language_directions", torch.zeros(num_language_directions, in_features))
        if num_anchors:
            self.register_buffer("anchors", torch.zeros(num_anchors, in_features))

    @torch.no_grad()
    def set_language_directions(self, states_by_language: Sequence[torch.Tensor]) -> None:
        """Estimates the language directions that `forward` projects out of the hidden states: the orthonormal span
        of the per-language means around their mean.

        Args:
            states_by_language (`Sequence[torch.Tensor]`):
                Per language, `(n_l, in_features)` hidden states of text in that language (e.g. mean-pooled sentence
                states); more languages than `num_language_directions`.

        Raises:
            ValueError: the transblock holds no directions, or there are not more languages than directions.
        """
        count = self.config.num_language_directions
        if not count or len(states_by_language) <= count:
            raise ValueError(
                f"{len(states_by_language)} languages give at most {len(states_by_language) - 1} directions; this "
                f"transblock holds num_language_directions={count} (must be between 1 and the languages minus one)."
            )
        means = torch.stack([states.float().mean(0) for states in states_by_language])
        directions = torch.linalg.svd(means - means.mean(0), full_matrices=False).Vh[:count]
        self.language_directions.copy_(directions.to(self.language_directions))

    @torch.no_grad()
    def set_anchors(self, sentence_states: torch.Tensor, temperature: float = 0.03) -> None:
        """Keeps sentence vectors as the anchors that `forward` mixes in place of each prompt's sentence vector.

        Args:
            sentence_states (`torch.Tensor`):
                `(n >= 2, in_features)` sentence vectors (masked means of the hidden states, see `sentence_vectors`),
                e.g. of the English training captions and of the empty caption, so that the unconditional branch stays
                itself.
            temperature (`float`, *optional*, defaults to 0.03):
                Relative to the median squared distance between an anchor and its nearest neighbour: near 0, a prompt
                takes its nearest anchor; towards 1, farther anchors weigh in and prompts blur into their mean.

        Raises:
            ValueError: the transblock was not built with `sentence_token="only"`, `sentence_states` has another
                shape, or `temperature` is not positive.
        """
        if self.config.sentence_token != "only":
            raise ValueError(
                "Caption anchors replace the sentence token: build the transblock with sentence_token='only'."
            )
        if sentence_states.ndim != 2 or sentence_states.shape[1] != self.config.in_features or len(sentence_states) < 2:
            raise ValueError(
                f"Expected (n >= 2, {self.config.in_features}) sentence states, got {tuple(sentence_states.shape)}."
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        anchors = self._remove_language_directions(sentence_states.to(self.projection.weight))
        distances = torch.cdist(anchors, anchors).fill_diagonal_(float("inf"))
        scale = distances.min(dim=1).values.pow(2).median().clamp(min=1e-12)
        self.register_buffer("anchors", anchors)
        self.register_to_config(num_anchors=len(anchors), anchor_temperature=float(temperature * scale))

    @staticmethod
    def sentence_vectors(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mean over the real tokens: the sentence vector that the sentence token and the anchors are made of.

        Args:
            hidden_states (`torch.Tensor`):
                `(batch, length, features)`.
            attention_mask (`torch.Tensor`, *optional*):
                `(batch, length)`, 1 for a real token; without it every position is one.

        Returns:
            The sentence vectors `(batch, features)`.
        """
        if attention_mask is None:
            return hidden_states.mean(dim=1)
        weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)

    def _remove_language_directions(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.config.num_language_directions:
            return hidden_states
        directions = self.language_directions.to(hidden_states.dtype)
        return hidden_states - (hidden_states @ directions.T) @ directions

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Maps the text encoder's hidden states to the UNet's conditioning.

        Args:
            hidden_states (`torch.Tensor`):
                `(batch, length, in_features)`, the text encoder's final hidden states.
            attention_mask (`torch.Tensor`, *optional*):
                `(batch, length)`, 1 for a token; it only matters for the sentence token, which averages the real
                tokens.

        Returns:
            The conditioning `(batch, length', out_features)`: `length'` is `length`, one more with
                `sentence_token="prepend"`, 1 with `"only"`. Pair it with `conditioning_mask(attention_mask)`.
        """
        hidden_states = self._remove_language_directions(hidden_states.to(self.projection.weight.dtype))
        if self.config.sentence_token != "none":
            sentence = self.sentence_vectors(hidden_states, attention_mask).unsqueeze(1)
            if self.config.num_anchors:
                anchors = self.anchors.to(sentence.dtype)
                distances = torch.cdist(sentence.squeeze(1), anchors).pow(2)
                sentence = (torch.softmax(-distances / self.config.anchor_temperature, dim=-1) @ anchors).unsqueeze(1)
            hidden_states = sentence if self.config.sentence_token == "only" else torch.cat([sentence, hidden_states], 1)
        return self.layer_norm(self.projection(hidden_states))

    def conditioning_mask(self, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The mask of `forward`'s output, given the mask of its input.

        Args:
            attention_mask (`torch.Tensor`, *optional*):
                The mask `(batch, length)` of `forward`'s input; None: every position is a token.

        Returns:
            The mask `(batch, length')` of `forward`'s output, where the sentence token counts; None when
                `attention_mask` is None.
        """
        if attention_mask is None or self.config.sentence_token == "none":
            return attention_mask
        sentence = attention_mask.new_ones(attention_mask.shape[0], 1)
        return sentence if self.config.sentence_token == "only" else torch.cat([sentence, attention_mask], 1)
