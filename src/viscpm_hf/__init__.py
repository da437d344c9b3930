"""viscpm-hf: VisCPM and the MPM recipe as native transformers models and diffusers pipelines.

Importing the package registers every model with the transformers Auto classes (no `trust_remote_code`) and makes
`DiffusionPipeline.from_pretrained` find VisCPMPaintPipeline and its components.
"""

import diffusers
from diffusers import ModelMixin  # noqa: F401 (see below)
from diffusers.pipelines import pipeline_loading_utils
from transformers import (  # noqa: F401 (PreTrainedModel, PreTrainedTokenizer: see below)
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizer,
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
from .paint import PixelShuffleAutoencoder, VisCPMPaintPipeline, VisCPMPaintPipelineOutput, VisCPMTransBlock


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

# diffusers resolves a pipeline's `_class_name` in its own namespace, only downloads components of libraries it
# knows, and picks a component's loading method by finding its base class (ModelMixin, PreTrainedModel,
# PreTrainedTokenizer, imported above) in the component's library: all three must include ours for
# `DiffusionPipeline.from_pretrained` (local folders and Hub repos alike).
diffusers.VisCPMPaintPipeline = VisCPMPaintPipeline
pipeline_loading_utils.LOADABLE_CLASSES.setdefault(
    "viscpm_hf",
    {
        "ModelMixin": ["save_pretrained", "from_pretrained"],
        "PreTrainedModel": ["save_pretrained", "from_pretrained"],
        "PreTrainedTokenizer": ["save_pretrained", "from_pretrained"],
    },
)

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
