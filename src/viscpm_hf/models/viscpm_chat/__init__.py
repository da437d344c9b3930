"""VisCPM-Chat for any vision tower and causal LLM, registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_viscpm_chat import VisCPMChatConfig
from .conversation import VisCPMChatHistory
from .modeling_viscpm_chat import (
    VisCPMChatForConditionalGeneration,
    VisCPMChatModel,
    VisCPMChatPreTrainedModel,
)
from .processing_viscpm_chat import VisCPMChatProcessor, paper_image_processor


__all__ = [
    "VisCPMChatConfig",
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatHistory",
    "VisCPMChatModel",
    "VisCPMChatPreTrainedModel",
    "VisCPMChatProcessor",
    "paper_image_processor",
]

AutoConfig.register(VisCPMChatConfig.model_type, VisCPMChatConfig, exist_ok=True)
AutoModel.register(VisCPMChatConfig, VisCPMChatModel, exist_ok=True)
AutoModelForImageTextToText.register(VisCPMChatConfig, VisCPMChatForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VisCPMChatConfig, VisCPMChatProcessor, exist_ok=True)
