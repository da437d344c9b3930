"""BEiT-3 with learned queries, the vision bridge of VisCPM-Chat, registered with the transformers Auto classes on
import."""

from transformers import AutoConfig, AutoModel

from .configuration_beit3 import VisCPMBeit3Config
from .convert_beit3 import beit3_config_from_original, convert_beit3_key, convert_beit3_state_dict
from .modeling_beit3 import VisCPMBeit3Model, VisCPMBeit3ModelOutput, VisCPMBeit3PreTrainedModel


AutoConfig.register(VisCPMBeit3Config.model_type, VisCPMBeit3Config, exist_ok=True)
AutoModel.register(VisCPMBeit3Config, VisCPMBeit3Model, exist_ok=True)

__all__ = [
    "VisCPMBeit3Config",
    "VisCPMBeit3Model",
    "VisCPMBeit3ModelOutput",
    "VisCPMBeit3PreTrainedModel",
    "beit3_config_from_original",
    "convert_beit3_key",
    "convert_beit3_state_dict",
]
