"""What `transformers serve` looks up by name instead of through the Auto classes.

serve's `ModelLoader` loads `getattr(transformers, config.architectures[0])`, and calls a model a VLM (the modality
that turns `image_url` parts into images) only when its class name is a value of
`MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`. Neither sees `AutoModel.register`. So the generative heads are set on
the `transformers` module that loader reads, and the chat models are entered in that table (a dict mutated in place:
every module that imported it sees the entry). Idempotent; imported by `viscpm_hf.serving` only.

Since transformers 5.25 the model loads in a process serve spawns (and so do its API servers, with
`--api-server-count`). Such a process re-runs the main module, which need not import viscpm_hf (`python -c`, an
import under `if __name__ == "__main__":`). So serve's loader is sent to it as a call into this module: unpickling it
imports viscpm_hf and registers there too.
"""

import pickle
from multiprocessing.reduction import ForkingPickler

from transformers.cli.serving import model_manager
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from ..models.cpmbee import CpmBeeForCausalLM
from ..models.viscpm_chat import VisCPMChatConfig, VisCPMChatForConditionalGeneration
from ..models.viscpm_chat_cpmbee import VisCPMChatCpmBeeConfig, VisCPMChatCpmBeeForConditionalGeneration


# The classes a saved folder names in `architectures` that serve can answer with, by model type when they are chat
# models (image-text-to-text).
CHAT_HEADS = {
    VisCPMChatConfig.model_type: VisCPMChatForConditionalGeneration,
    VisCPMChatCpmBeeConfig.model_type: VisCPMChatCpmBeeForConditionalGeneration,
}
TEXT_HEADS = (CpmBeeForCausalLM,)


def register() -> None:
    # The module object serve's loader looks architectures up in: importing transformers.processing_utils puts a new
    # one in sys.modules["transformers"], so that may be another object if serve was imported first.
    for head in (*CHAT_HEADS.values(), *TEXT_HEADS):
        setattr(model_manager.transformers, head.__name__, head)
    for model_type, head in CHAT_HEADS.items():
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault(model_type, head.__name__)
    if hasattr(model_manager, "ModelLoader"):  # transformers >= 5.25, whose loader goes to spawned processes
        ForkingPickler.register(model_manager.ModelLoader, _reduce_loader)


def _reduce_loader(loader) -> tuple:
    """Pickles serve's loader for a spawned process as a call to `_unpickle_registered`, so the process imports us."""
    return _unpickle_registered, (pickle.dumps(loader),)


def _unpickle_registered(pickled_loader: bytes):
    register()
    return pickle.loads(pickled_loader)
