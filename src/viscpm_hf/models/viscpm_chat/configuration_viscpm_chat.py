"""Configuration of VisCPM-Chat: a vision tower, the MPM bridge and any causal LLM as the pivot."""

from typing import ClassVar, Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


@strict
class VisCPMChatConfig(PreTrainedConfig):
    r"""
    Composes a `vision_config` (any transformers vision model) and a `text_config` (any causal LM) with the
    bridge of the MPM paper (section 3.2): learned queries turn the vision features into `num_query_tokens`
    image tokens, and a mapping MLP (Linear, GELU, Linear) moves them into the LLM's embedding space.

    Args:
        vision_config (`dict` or `PreTrainedConfig`):
            Config of the vision tower. Defaults to a SigLIP vision tower at the paper's 224x224 resolution.
        text_config (`dict` or `PreTrainedConfig`):
            Config of the pivot LLM, any model type that `AutoModelForCausalLM` can build.
        image_token_id (`int`, *optional*):
            Id of the image placeholder token; each image occupies `num_query_tokens` of them in `input_ids`.
        num_query_tokens (`int`, defaults to 64):
            Image tokens per image (64 in the paper).
        bridge_type (`str`, defaults to `"query_resampler"`):
            `"query_resampler"`: learned queries cross-attend to the vision features (works for any tower).
            `"in_tower"`: the vision tower already returns `num_query_tokens` query outputs (BEiT-3 with appended
            queries, as in the paper), so only the mapping MLP is applied.
        bridge_num_attention_heads (`int`, *optional*):
            Heads of the resampler's cross-attention; defaults to the vision tower's head count.
        vision_feature_dim (`int`, *optional*):
            Width of the vision features; read from `vision_config.hidden_size` when not given.
        vision_feature_layer (`int`, defaults to -1):
            Hidden-state index of the vision tower whose output feeds the bridge (-1: last hidden state).
        projector_hidden_act (`str`, defaults to `"gelu"`):
            Activation of the mapping MLP.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the bridge's initialisation (normal for its Linear layers, truncated normal for the
            resampler's queries).

    Raises:
        ValueError: the width of the vision features cannot be read from `vision_config` (pass `vision_feature_dim`),
            is not divisible by `bridge_num_attention_heads`, or `num_query_tokens` is below 1.
    """

    model_type = "viscpm_chat"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="siglip_vision_model",
            init_kwargs={"image_size": 224, "patch_size": 16, "vision_use_head": False},
        ),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    # LLMs whose chat model needs a class of its own (text `model_type` -> its config class, entered by that model's
    # package). A folder saved with the generic type and such an LLM loads as the specific one.
    llm_specific_configs: ClassVar[dict[str, type["VisCPMChatConfig"]]] = {}

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int | None = None
    num_query_tokens: int = 64
    bridge_type: Literal["query_resampler", "in_tower"] = "query_resampler"
    bridge_num_attention_heads: int | None = None
    vision_feature_dim: int | None = None
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        text_config = config_dict.get("text_config")
        text_type = text_config.get("model_type") if isinstance(text_config, dict) else None
        specific = cls.llm_specific_configs.get(text_type)
        if cls is VisCPMChatConfig and specific is not None:
            return specific.from_dict({**config_dict, "model_type": specific.model_type}, **kwargs)
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_feature_dim is None:
            self.vision_feature_dim = getattr(self.vision_config, "hidden_size", None)
        if self.vision_feature_dim is None:
            raise ValueError(
                f"Cannot infer the width of the {self.vision_config.model_type!r} vision features: "
                "pass `vision_feature_dim` (e.g. the number of channels of the tower's last feature map)."
            )
        if self.bridge_num_attention_heads is None:
            self.bridge_num_attention_heads = getattr(self.vision_config, "num_attention_heads", 1)
        if self.vision_feature_dim % self.bridge_num_attention_heads:
            raise ValueError(
                f"vision_feature_dim ({self.vision_feature_dim}) must be divisible by "
                f"bridge_num_attention_heads ({self.bridge_num_attention_heads})."
            )
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be at least 1, got {self.num_query_tokens}.")


__all__ = ["VisCPMChatConfig"]
