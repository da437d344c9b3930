"""Key names of the original CPM-Bee checkpoint (`llm.*` inside VisCPM files) in the transformers layout."""

import re
from collections.abc import Mapping

from .configuration_cpmbee import CpmBeeConfig


_LAYER_RENAMES = {
    "self_att.layernorm_before_attention.weight": "input_layernorm.weight",
    "self_att.self_attention.project_q.weight": "self_attn.q_proj.weight",
    "self_att.self_attention.project_k.weight": "self_attn.k_proj.weight",
    "self_att.self_attention.project_v.weight": "self_attn.v_proj.weight",
    "self_att.self_attention.attention_out.weight": "self_attn.o_proj.weight",
    "ffn.layernorm_before_ffn.weight": "post_attention_layernorm.weight",
    "ffn.ffn.w_in.w_0.weight": "mlp.gate_proj.weight",
    "ffn.ffn.w_in.w_1.weight": "mlp.up_proj.weight",
    "ffn.ffn.w_out.weight": "mlp.down_proj.weight",
}
_TOP_RENAMES = {
    "input_embedding.weight": "embed_tokens.weight",
    "position_bias.relative_attention_bias": "position_bias.relative_attention_bias",
    "encoder.output_layernorm.weight": "norm.weight",
}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def convert_cpmbee_key(original_key: str) -> str:
    """`llm.encoder.layers.3.ffn.ffn.w_out.weight` -> `layers.3.mlp.down_proj.weight` (a `CpmBeeModel` key).

    Accepts keys with or without the `llm.` prefix; raises KeyError for a key that is not part of CPM-Bee.
    """
    key = original_key.removeprefix("llm.")
    if key in _TOP_RENAMES:
        return _TOP_RENAMES[key]
    match = _LAYER_KEY.fullmatch(key)
    if match and match.group(2) in _LAYER_RENAMES:
        return f"layers.{match.group(1)}.{_LAYER_RENAMES[match.group(2)]}"
    raise KeyError(f"{original_key!r} is not a CPM-Bee weight of the original checkpoint layout.")


def cpmbee_config_from_original(original: Mapping) -> CpmBeeConfig:
    """[`CpmBeeConfig`] from the original config keys (`dim_model`, `num_heads`, `dim_head`, ...)."""
    return CpmBeeConfig(
        vocab_size=original["vocab_size"],
        hidden_size=original["dim_model"],
        num_attention_heads=original["num_heads"],
        head_dim=original["dim_head"],
        intermediate_size=original["dim_ff"],
        num_hidden_layers=original["num_layers"],
        position_bias_num_buckets=original["position_bias_num_buckets"],
        position_bias_num_segment_buckets=original["position_bias_num_segment_buckets"],
        position_bias_max_distance=original["position_bias_max_distance"],
        rms_norm_eps=original["eps"],
    )


def special_token_ids(tokenizer) -> dict[str, int]:
    """The config fields of the ids that delimit prompts and drive decoding, read from the vocabulary converted with
    (a `CpmBeeTokenizer`), so no id is assumed."""
    names = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "root": "<root>", "answer": "<ans>"}
    return {f"{field}_token_id": tokenizer.convert_tokens_to_ids(token) for field, token in names.items()}
