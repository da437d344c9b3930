"""viscpm-hf: VisCPM and the MPM recipe as native transformers models and diffusers pipelines.

Importing the package registers every model with the transformers Auto classes (each model folder registers its own
classes; no `trust_remote_code`), and makes `DiffusionPipeline.from_pretrained` find VisCPMPaintPipeline and its
components (`integrations.diffusers`). `viscpm-serve` adds what `transformers serve` needs
(`integrations.transformers_serve`).
"""

# diffusers finds a component's loading method by looking up these base classes in the component's library
# (`viscpm_hf`): see integrations/diffusers.py.
from diffusers import ModelMixin  # noqa: F401
from transformers import PreTrainedModel, PreTrainedTokenizer  # noqa: F401

from .byte_tokenizer import build_byte_level_tokenizer
from .integrations import diffusers as _diffusers_integration
from .models.beit3 import VisCPMBeit3Config, VisCPMBeit3Model
from .models.cpmbee import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeModel, CpmBeePreTrainedModel, CpmBeeTokenizer
from .models.viscpm_chat import (
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    VisCPMChatHistory,
    VisCPMChatModel,
    VisCPMChatPreTrainedModel,
    VisCPMChatProcessor,
    paper_image_processor,
)
from .models.viscpm_chat_cpmbee import (
    VisCPMChatCpmBeeConfig,
    VisCPMChatCpmBeeForConditionalGeneration,
    VisCPMChatCpmBeeModel,
    VisCPMChatCpmBeeProcessor,
)
from .pipelines.viscpm_paint import (
    PixelShuffleAutoencoder,
    VisCPMPaintPipeline,
    VisCPMPaintPipelineOutput,
    VisCPMTransBlock,
)


_diffusers_integration.register()

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
    "VisCPMChatCpmBeeConfig",
    "VisCPMChatCpmBeeForConditionalGeneration",
    "VisCPMChatCpmBeeModel",
    "VisCPMChatCpmBeeProcessor",
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
