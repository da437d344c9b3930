from .configuration_cpmbee import CpmBeeConfig
from .modeling_cpmbee import CpmBeeForCausalLM, CpmBeeModel, CpmBeePreTrainedModel
from .tokenization_cpmbee import CpmBeeTokenizer
