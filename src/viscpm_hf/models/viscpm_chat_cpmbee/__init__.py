"""The released VisCPM-Chat (BEiT-3 + CPM-Bee), registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_viscpm_chat_cpmbee import VisCPMChatCpmBeeConfig
from .modeling_viscpm_chat_cpmbee import VisCPMChatCpmBeeForConditionalGeneration, VisCPMChatCpmBeeModel
from .processing_viscpm_chat_cpmbee import VisCPMChatCpmBeeProcessor


__all__ = [
    "VisCPMChatCpmBeeConfig",
    "VisCPMChatCpmBeeForConditionalGeneration",
    "VisCPMChatCpmBeeModel",
    "VisCPMChatCpmBeeProcessor",
]

AutoConfig.register(VisCPMChatCpmBeeConfig.model_type, VisCPMChatCpmBeeConfig, exist_ok=True)
AutoModel.register(VisCPMChatCpmBeeConfig, VisCPMChatCpmBeeModel, exist_ok=True)
AutoModelForImageTextToText.register(VisCPMChatCpmBeeConfig, VisCPMChatCpmBeeForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VisCPMChatCpmBeeConfig, VisCPMChatCpmBeeProcessor, exist_ok=True)
