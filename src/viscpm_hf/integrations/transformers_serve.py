"""What `transformers serve` looks up by name instead of through the Auto classes.

serve's `ModelLoader` loads `getattr(transformers, config.architectures[0])`, and calls a model a VLM (the modality
that turns `image_url` parts into images) only when its class name is a value of
`MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`. Neither sees `AutoModel.register`. So the generative heads are set on
the `transformers` module, and the chat models are entered in that table (a dict mutated in place: every module that
imported it sees the entry). Idempotent; imported by `viscpm_hf.serving` only.
"""

import sys

# Importing processing_utils runs transformers/__init__.py a second time and puts a new module object in
# sys.modules["transformers"]; it must have happened before a class is set on that module.
import transformers.processing_utils  # noqa: F401
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from ..models.cpmbee import CpmBeeForCausalLM
from ..models.viscpm_chat import VisCPMChatConfig, VisCPMChatForConditionalGeneration


# The classes a saved folder names in `architectures` that serve can answer with, by model type when they are chat
# models (image-text-to-text).
CHAT_HEADS = {VisCPMChatConfig.model_type: VisCPMChatForConditionalGeneration}
TEXT_HEADS = (CpmBeeForCausalLM,)


def register() -> None:
    module = sys.modules["transformers"]  # the module object serve's `import transformers` gets
    for head in (*CHAT_HEADS.values(), *TEXT_HEADS):
        setattr(module, head.__name__, head)
    for model_type, head in CHAT_HEADS.items():
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault(model_type, head.__name__)
