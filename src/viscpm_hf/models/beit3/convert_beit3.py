"""Key names of the original BEiT-3 bridge (`query` and `vpm.*` inside VisCPM checkpoints) in the transformers layout.

The original multiway modules call the vision expert `A` and the language expert `B`; here they are `image` and
`query`, after the tokens they read. torchscale's per-layer `final_layer_norm` is the pre-norm of the feed-forward
block (the encoder's own final norm is `encoder.layer_norm`).
"""

import re
from collections.abc import Mapping

import torch

from .configuration_beit3 import VisCPMBeit3Config


_EXPERTS = {"A": "image", "B": "query"}

_TOP_RENAMES = {
    "query": "embeddings.query_tokens",
    "vpm.beit3.vision_embed.cls_token": "embeddings.cls_token",
    "vpm.beit3.vision_embed.proj.weight": "embeddings.patch_embedding.weight",
    "vpm.beit3.vision_embed.proj.bias": "embeddings.patch_embedding.bias",
    "vpm.beit3.encoder.embed_positions.A.weight": "embeddings.position_embedding_image.weight",
    "vpm.beit3.encoder.embed_positions.B.weight": "embeddings.position_embedding_query.weight",
}

# Weights that inference never reads: the masked-image-modelling head, BEiT-3's text embedding (the queries replace
# text tokens) and the mask token of masked pre-training.
_DROPPED = re.compile(r"vpm\.mim_head\..+|vpm\.beit3\.text_embed\.weight|vpm\.beit3\.vision_embed\.mask_token")

_FINAL_NORM = re.compile(r"vpm\.beit3\.encoder\.layer_norm\.([AB])\.(weight|bias)")
_LAYER = re.compile(r"vpm\.beit3\.encoder\.layers\.(\d+)\.(.+)")
# Inside a layer: original suffix -> new suffix, with the expert and weight/bias carried over by group name.
_EXPERT = r"(?P<expert>[AB])"
_PARAM = r"(?P<param>weight|bias)"
_LAYER_RENAMES = [
    (rf"self_attn\.(?P<proj>[qkv]|out)_proj\.{_EXPERT}\.{_PARAM}", "attention.{proj}_proj.{expert}.{param}"),
    (rf"self_attn\.inner_attn_ln\.{_EXPERT}\.{_PARAM}", "attention.sub_layer_norm.{expert}.{param}"),
    (rf"self_attn_layer_norm\.{_EXPERT}\.{_PARAM}", "layer_norm_before_attention.{expert}.{param}"),
    (rf"final_layer_norm\.{_EXPERT}\.{_PARAM}", "layer_norm_before_ffn.{expert}.{param}"),
    (rf"ffn\.{_EXPERT}\.(?P<fc>fc1|fc2)\.{_PARAM}", "ffn.{expert}.{fc}.{param}"),
    (rf"ffn\.{_EXPERT}\.ffn_layernorm\.{_PARAM}", "ffn.{expert}.sub_layer_norm.{param}"),
]


def _rename_layer_suffix(suffix: str) -> str | None:
    for pattern, template in _LAYER_RENAMES:
        match = re.fullmatch(pattern, suffix)
        if match:
            groups = match.groupdict()
            return template.format(**{**groups, "expert": _EXPERTS[groups["expert"]]})
    return None


def convert_beit3_key(original_key: str) -> str | None:
    """Original key -> [`VisCPMBeit3Model`] parameter name, or None for a weight inference never uses.

    `vpm.beit3.encoder.layers.3.self_attn.q_proj.B.weight` -> `encoder.layers.3.attention.q_proj.query.weight`;
    `query` -> `embeddings.query_tokens`; `vpm.mim_head.weight` -> None. Raises KeyError for any other key
    (the mapping MLP, `llm.*`, or a `vpm.*` key of an unknown layout), so nothing is silently misplaced.
    """
    if original_key in _TOP_RENAMES:
        return _TOP_RENAMES[original_key]
    if _DROPPED.fullmatch(original_key):
        return None
    match = _FINAL_NORM.fullmatch(original_key)
    if match:
        return f"final_layer_norm.{_EXPERTS[match.group(1)]}.{match.group(2)}"
    match = _LAYER.fullmatch(original_key)
    if match:
        suffix = _rename_layer_suffix(match.group(2))
        if suffix is not None:
            return f"encoder.layers.{match.group(1)}.{suffix}"
    raise KeyError(f"{original_key!r} is not a BEiT-3 bridge weight of the original VisCPM checkpoint layout.")


def is_beit3_key(original_key: str) -> bool:
    """Whether a key of an original VisCPM checkpoint belongs to the BEiT-3 bridge (`query` or `vpm.*`)."""
    return original_key == "query" or original_key.startswith("vpm.")


def convert_beit3_state_dict(original: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The BEiT-3 part of an original VisCPM state dict, renamed for [`VisCPMBeit3Model`]; other keys are ignored."""
    converted = {}
    for key, tensor in original.items():
        if is_beit3_key(key) and (new_key := convert_beit3_key(key)) is not None:
            converted[new_key] = tensor
    return converted


def beit3_config_from_original(original: Mapping, num_query_tokens: int = 64, **kwargs) -> VisCPMBeit3Config:
    """[`VisCPMBeit3Config`] from torchscale `EncoderConfig` keywords (`img_size`, `encoder_embed_dim`, ...).

    Keywords the original leaves at torchscale's defaults (`layernorm_eps`, `max_source_positions`, `in_chans`) may
    be given too; `kwargs` override the result.
    """
    values = {
        "image_size": original["img_size"],
        "patch_size": original["patch_size"],
        "num_channels": original.get("in_chans", 3),
        "hidden_size": original["encoder_embed_dim"],
        "num_attention_heads": original["encoder_attention_heads"],
        "intermediate_size": original["encoder_ffn_embed_dim"],
        "num_hidden_layers": original["encoder_layers"],
        "layer_norm_eps": original.get("layernorm_eps", 1e-5),
        "max_query_positions": original.get("max_source_positions", 1024),
        "num_query_tokens": num_query_tokens,
    }
    return VisCPMBeit3Config(**{**values, **kwargs})


__all__ = ["beit3_config_from_original", "convert_beit3_key", "convert_beit3_state_dict", "is_beit3_key"]
