"""The sizes of the original models, read from the shapes of a checkpoint's tensors.

A released checkpoint says its own widths, depths, vocabulary and query count; a config file only has to give
what no shape shows (BEiT-3's and the UNet's attention heads, epsilons, the split of CPM-Bee's position buckets).
Each reader takes `{key: shape}` and returns the original config keys it could read; a tensor that is absent or
of an unexpected rank is skipped, so that the key check of the conversion reports it instead.
"""

import math
import re
from collections.abc import Mapping, Sequence


Shapes = Mapping[str, tuple[int, ...]]


def _shape(shapes: Shapes, key: str, ndim: int) -> tuple[int, ...] | None:
    shape = shapes.get(key)
    return shape if shape is not None and len(shape) == ndim else None


def _count(shapes: Shapes, pattern: str) -> int | None:
    """1 + the largest index captured by `pattern` among the keys, or None when no key matches."""
    regex = re.compile(pattern)
    indices = [int(match.group(1)) for key in shapes if (match := regex.fullmatch(key))]
    return max(indices) + 1 if indices else None


def read_cpmbee_sizes(shapes: Shapes, prefix: str = "llm.") -> dict:
    """Original CPM-Bee config keys (`vocab_size`, `dim_model`, `num_heads`, `dim_head`, `dim_ff`, `num_layers`)."""
    sizes = {}
    if embedding := _shape(shapes, f"{prefix}input_embedding.weight", 2):
        sizes["vocab_size"], sizes["dim_model"] = embedding
    layers = _count(shapes, rf"{re.escape(prefix)}encoder\.layers\.(\d+)\..+")
    if layers:
        sizes["num_layers"] = layers
    # One bias column per head: (num_buckets + num_segment_buckets, num_heads).
    if bias := _shape(shapes, f"{prefix}position_bias.relative_attention_bias", 2):
        sizes["num_heads"] = bias[1]
        query = _shape(shapes, f"{prefix}encoder.layers.0.self_att.self_attention.project_q.weight", 2)
        if query and bias[1] and query[0] % bias[1] == 0:
            sizes["dim_head"] = query[0] // bias[1]
    if gate := _shape(shapes, f"{prefix}encoder.layers.0.ffn.ffn.w_in.w_0.weight", 2):
        sizes["dim_ff"] = gate[0]
    return sizes


def read_beit3_sizes(shapes: Shapes) -> tuple[dict, int | None]:
    """Original BEiT-3 config keys (torchscale's names) and the number of learned queries (`query` rows)."""
    sizes = {}
    if cls_token := _shape(shapes, "vpm.beit3.vision_embed.cls_token", 3):
        sizes["encoder_embed_dim"] = cls_token[2]
    if patch := _shape(shapes, "vpm.beit3.vision_embed.proj.weight", 4):
        sizes["in_chans"], sizes["patch_size"] = patch[1], patch[2]
        # Image positions: two unused rows, the class token, then one row per patch of the square training size.
        positions = _shape(shapes, "vpm.beit3.encoder.embed_positions.A.weight", 2)
        side = math.isqrt(positions[0] - 3) if positions and positions[0] > 3 else 0
        if side and side * side == positions[0] - 3:
            sizes["img_size"] = side * patch[2]
    if query_positions := _shape(shapes, "vpm.beit3.encoder.embed_positions.B.weight", 2):
        sizes["max_source_positions"] = query_positions[0]
    if fc1 := _shape(shapes, "vpm.beit3.encoder.layers.0.ffn.A.fc1.weight", 2):
        sizes["encoder_ffn_embed_dim"] = fc1[0]
    layers = _count(shapes, r"vpm\.beit3\.encoder\.layers\.(\d+)\..+")
    if layers:
        sizes["encoder_layers"] = layers
    query = _shape(shapes, "query", 2)
    return sizes, query[0] if query else None


def read_unet_sizes(shapes: Shapes, prefix: str = "") -> dict:
    """diffusers `UNet2DConditionModel` config keys: channels, blocks and their types, cross-attention width."""
    sizes = {}
    if conv_in := _shape(shapes, f"{prefix}conv_in.weight", 4):
        sizes["in_channels"] = conv_in[1]
    if conv_out := _shape(shapes, f"{prefix}conv_out.weight", 4):
        sizes["out_channels"] = conv_out[0]
    blocks = _count(shapes, rf"{re.escape(prefix)}down_blocks\.(\d+)\..+")
    if blocks:
        widths = [_shape(shapes, f"{prefix}down_blocks.{i}.resnets.0.conv2.weight", 4) for i in range(blocks)]
        if all(widths):
            sizes["block_out_channels"] = [width[0] for width in widths]
        has_attention = [any(k.startswith(f"{prefix}down_blocks.{i}.attentions.") for k in shapes) for i in range(blocks)]
        sizes["down_block_types"] = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention]
        resnets = _count(shapes, rf"{re.escape(prefix)}down_blocks\.0\.resnets\.(\d+)\..+")
        if resnets:
            sizes["layers_per_block"] = resnets
    up_blocks = _count(shapes, rf"{re.escape(prefix)}up_blocks\.(\d+)\..+")
    if up_blocks:
        has_attention = [any(k.startswith(f"{prefix}up_blocks.{i}.attentions.") for k in shapes) for i in range(up_blocks)]
        sizes["up_block_types"] = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in has_attention]
    cross = re.compile(rf"{re.escape(prefix)}.*\.attn2\.to_k\.weight")
    if key := next((key for key in shapes if cross.fullmatch(key) and len(shapes[key]) == 2), None):
        sizes["cross_attention_dim"] = shapes[key][1]
    projection = re.compile(rf"{re.escape(prefix)}.*\.attentions\.\d+\.proj_in\.weight")
    if key := next((key for key in shapes if projection.fullmatch(key)), None):
        sizes["use_linear_projection"] = len(shapes[key]) == 2
    return sizes


def read_vae_sizes(shapes: Shapes) -> dict:
    """diffusers `AutoencoderKL` config keys: image and latent channels, block widths and depth."""
    sizes = {}
    if conv_in := _shape(shapes, "encoder.conv_in.weight", 4):
        sizes["in_channels"] = conv_in[1]
    if conv_out := _shape(shapes, "decoder.conv_out.weight", 4):
        sizes["out_channels"] = conv_out[0]
    if latent := _shape(shapes, "decoder.conv_in.weight", 4):
        sizes["latent_channels"] = latent[1]
    blocks = _count(shapes, r"encoder\.down_blocks\.(\d+)\..+")
    if blocks:
        widths = [_shape(shapes, f"encoder.down_blocks.{i}.resnets.0.conv2.weight", 4) for i in range(blocks)]
        if all(widths):
            sizes["block_out_channels"] = [width[0] for width in widths]
        resnets = _count(shapes, r"encoder\.down_blocks\.0\.resnets\.(\d+)\..+")
        if resnets:
            sizes["layers_per_block"] = resnets
    return sizes


def _same(a, b) -> bool:
    if isinstance(a, Sequence) and not isinstance(a, str) and isinstance(b, Sequence) and not isinstance(b, str):
        return list(a) == list(b)
    return a == b


def merge_sizes(read: dict, given: Mapping | None, defaults: Mapping, given_name: str, source: str) -> dict:
    """`defaults`, then the config the user gave, then what the tensors say; a given value the tensors contradict
    raises a ValueError naming both. `given_name` (e.g. "--llm-config") and `source` (the checkpoint) are for it."""
    given = dict(given or {})
    conflicts = [
        f"{key}: {given_name} says {given[key]!r}, the tensors {value!r}"
        for key, value in read.items()
        if key in given and not _same(given[key], value)
    ]
    if conflicts:
        raise ValueError(
            f"{given_name} does not describe {source}: " + "; ".join(conflicts)
            + f". The checkpoint's shapes are what counts: fix or drop these keys of {given_name}."
        )
    return {**defaults, **given, **read}
