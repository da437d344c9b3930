"""Configuration of the released VisCPM-Chat: BEiT-3 with learned queries, the mapping MLP and CPM-Bee."""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import SubConfigSpec

from ..viscpm_chat.configuration_viscpm_chat import VisCPMChatConfig


@strict
class VisCPMChatCpmBeeConfig(VisCPMChatConfig):
    r"""
    [`VisCPMChatConfig`] of the released VisCPM-Chat, whose LLM is CPM-Bee: its prompts are structured (segments, a
    bidirectional context, per-prompt out-of-vocabulary strings) and it decodes by the original's rules, so it has a
    model class of its own ([`VisCPMChatCpmBeeForConditionalGeneration`]). Defaults: a BEiT-3 tower whose queries
    are the bridge (`bridge_type="in_tower"`) and CPM-Bee 10B; `viscpm-convert chat` writes the released sizes.
    """

    model_type = "viscpm_chat_cpmbee"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="viscpm_beit3"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="cpmbee"),
    }

    bridge_type: Literal["query_resampler", "in_tower"] = "in_tower"


# Folders converted before this model type existed name the generic `viscpm_chat` with a CPM-Bee `text_config`.
VisCPMChatConfig.llm_specific_configs["cpmbee"] = VisCPMChatCpmBeeConfig


__all__ = ["VisCPMChatCpmBeeConfig"]
