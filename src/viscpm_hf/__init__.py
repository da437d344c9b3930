"""viscpm-hf: VisCPM and the MPM recipe as native transformers models and diffusers pipelines.

Importing the package registers every model with the transformers Auto classes (no `trust_remote_code`).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from .beit3 import VisCPMBeit3Config, VisCPMBeit3Model
from .byte_tokenizer import build_byte_level_tokenizer
from .chat import (
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    VisCPMChatHistory,
    VisCPMChatModel,
    VisCPMChatPreTrainedModel,
    VisCPMChatProcessor,
    paper_image_processor,
)
from .cpmbee import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeModel, CpmBeePreTrainedModel, CpmBeeTokenizer


AutoConfig.register(VisCPMBeit3Config.model_type, VisCPMBeit3Config, exist_ok=True)
AutoModel.register(VisCPMBeit3Config, VisCPMBeit3Model, exist_ok=True)
AutoConfig.register(CpmBeeConfig.model_type, CpmBeeConfig, exist_ok=True)
AutoModel.register(CpmBeeConfig, CpmBeeModel, exist_ok=True)
AutoModelForCausalLM.register(CpmBeeConfig, CpmBeeForCausalLM, exist_ok=True)
AutoTokenizer.register(CpmBeeConfig, slow_tokenizer_class=CpmBeeTokenizer, exist_ok=True)
AutoConfig.register(VisCPMChatConfig.model_type, VisCPMChatConfig, exist_ok=True)
AutoModel.register(VisCPMChatConfig, VisCPMChatModel, exist_ok=True)
AutoModelForImageTextToText.register(VisCPMChatConfig, VisCPMChatForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VisCPMChatConfig, VisCPMChatProcessor, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "CpmBeeConfig",
    "CpmBeeForCausalLM",
    "CpmBeeModel",
    "CpmBeePreTrainedModel",
    "CpmBeeTokenizer",
    "VisCPMBeit3Config",
    "VisCPMBeit3Model",
    "VisCPMChatConfig",
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatHistory",
    "VisCPMChatModel",
    "VisCPMChatPreTrainedModel",
    "VisCPMChatProcessor",
    "build_byte_level_tokenizer",
    "paper_image_processor",
]
