from .configuration_viscpm_chat import VisCPMChatConfig
from .conversation import VisCPMChatHistory
from .modeling_viscpm_chat import (
    VisCPMChatForConditionalGeneration,
    VisCPMChatModel,
    VisCPMChatPreTrainedModel,
)
from .processing_viscpm_chat import VisCPMChatProcessor, paper_image_processor
