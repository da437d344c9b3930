"""CPM-Bee, the bilingual LLM of the VisCPM releases, registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .configuration_cpmbee import CpmBeeConfig
from .modeling_cpmbee import CpmBeeForCausalLM, CpmBeeModel, CpmBeePreTrainedModel
from .tokenization_cpmbee import CpmBeeTokenizer


__all__ = ["CpmBeeConfig", "CpmBeeForCausalLM", "CpmBeeModel", "CpmBeePreTrainedModel", "CpmBeeTokenizer"]

AutoConfig.register(CpmBeeConfig.model_type, CpmBeeConfig, exist_ok=True)
AutoModel.register(CpmBeeConfig, CpmBeeModel, exist_ok=True)
AutoModelForCausalLM.register(CpmBeeConfig, CpmBeeForCausalLM, exist_ok=True)
AutoTokenizer.register(CpmBeeConfig, slow_tokenizer_class=CpmBeeTokenizer, exist_ok=True)
