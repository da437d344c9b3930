"""BEiT-3 with learned queries, the vision bridge of VisCPM-Chat."""

from .configuration_beit3 import VisCPMBeit3Config
from .convert_beit3 import beit3_config_from_original, convert_beit3_key, convert_beit3_state_dict
from .modeling_beit3 import VisCPMBeit3Model, VisCPMBeit3ModelOutput, VisCPMBeit3PreTrainedModel


__all__ = [
    "VisCPMBeit3Config",
    "VisCPMBeit3Model",
    "VisCPMBeit3ModelOutput",
    "VisCPMBeit3PreTrainedModel",
    "beit3_config_from_original",
    "convert_beit3_key",
    "convert_beit3_state_dict",
]
