"""viscpm-hf: VisCPM and the MPM recipe as native transformers models and diffusers pipelines.

Importing the package registers every model with the transformers Auto classes (no `trust_remote_code`), makes
`transformers serve` (run as `viscpm-serve`) answer with VisCPM-Chat, and `DiffusionPipeline.from_pretrained` find
VisCPMPaintPipeline and its components: all in `registration.py`.
"""

# diffusers finds a component's loading method by looking up these base classes in the component's library
# (`viscpm_hf`): see registration.register_with_diffusers.
from diffusers import ModelMixin  # noqa: F401
from transformers import PreTrainedModel, PreTrainedTokenizer  # noqa: F401

from . import registration
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
from .paint import PixelShuffleAutoencoder, VisCPMPaintPipeline, VisCPMPaintPipelineOutput, VisCPMTransBlock


registration.register()

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
    "PixelShuffleAutoencoder",
    "VisCPMPaintPipeline",
    "VisCPMPaintPipelineOutput",
    "VisCPMTransBlock",
    "build_byte_level_tokenizer",
    "paper_image_processor",
]
