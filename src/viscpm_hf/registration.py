"""The one place where transformers, its `serve` command and diffusers learn about this project's classes.

`import viscpm_hf` calls `register()` once, after every class is defined. Each step is idempotent, so calling it again
changes nothing. No `trust_remote_code` is involved anywhere: a locally registered class wins over `auto_map`.

- **transformers' Auto classes**: every model type of the project, its config, models, processor and tokenizer.
- **`transformers serve`** (5.23 and 5.24) asks no Auto class. `ModelManager._load_model` loads
  `getattr(transformers, config.architectures[0])`, and `ModelManager.get_model_modality` calls a model a VLM (the
  modality that turns `image_url` parts into images) only when its class name is a value of
  `MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`. Neither sees `register`. So the generative heads are set on the
  `transformers` module, and VisCPM-Chat is entered in that table (a dict mutated in place: every module that
  imported it sees the entry, unlike a rebound name). The serving process imports viscpm_hf through `viscpm-serve`.
- **diffusers**: `DiffusionPipeline.from_pretrained` finds `VisCPMPaintPipeline` and its components.
"""

import sys

import diffusers
from diffusers.pipelines import pipeline_loading_utils

# Importing processing_utils runs transformers/__init__.py a second time and puts a new module object in
# sys.modules["transformers"]; it must have happened before a class is set on that module (see `_module`).
import transformers.processing_utils  # noqa: F401
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from .beit3 import VisCPMBeit3Config, VisCPMBeit3Model
from .chat import VisCPMChatConfig, VisCPMChatForConditionalGeneration, VisCPMChatModel, VisCPMChatProcessor
from .cpmbee import CpmBeeConfig, CpmBeeForCausalLM, CpmBeeModel, CpmBeeTokenizer
from .paint import VisCPMPaintPipeline


# The classes a saved folder names in `architectures` and `transformers serve` can answer with.
SERVED_HEADS = (VisCPMChatForConditionalGeneration, CpmBeeForCausalLM)


def register_auto_classes() -> None:
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


def register_for_serve() -> None:
    """What `transformers serve` looks up by name instead of through the Auto classes (see the module docstring)."""
    module = sys.modules["transformers"]  # the module object serve's `import transformers` gets
    for head in SERVED_HEADS:
        setattr(module, head.__name__, head)
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault(
        VisCPMChatConfig.model_type, VisCPMChatForConditionalGeneration.__name__
    )


def register_with_diffusers() -> None:
    """diffusers resolves a pipeline's `_class_name` in its own namespace, only downloads components of libraries it
    knows, and picks a component's loading method by finding its base class (ModelMixin, PreTrainedModel,
    PreTrainedTokenizer, which the package `__init__` imports for this) in the component's library: all three must
    include ours for `DiffusionPipeline.from_pretrained` (local folders and Hub repos alike)."""
    diffusers.VisCPMPaintPipeline = VisCPMPaintPipeline
    pipeline_loading_utils.LOADABLE_CLASSES.setdefault(
        "viscpm_hf",
        {
            "ModelMixin": ["save_pretrained", "from_pretrained"],
            "PreTrainedModel": ["save_pretrained", "from_pretrained"],
            "PreTrainedTokenizer": ["save_pretrained", "from_pretrained"],
        },
    )


def register() -> None:
    register_auto_classes()
    register_for_serve()
    register_with_diffusers()
