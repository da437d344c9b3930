"""CPM-Bee in transformers.

CPM-Bee reads a *structured* prompt: every token carries, besides its id, a sub id (which of several
out-of-vocabulary strings sharing one base id it is), a context flag (prompt tokens are visible to all; answer
tokens are causal), and a segment id; a per-sample segment-relation table says how two segments sit in the prompt
tree. Attention adds a learned bias chosen by relative position within a segment, or by segment relation across
segments. The output head scores the vocabulary plus per-input "ext" columns, one per out-of-vocabulary string.

Structural inputs may describe only a prefix of the sequence: tokens after it (the generated ones) continue the
last segment as answer tokens. `generate` passes the prompt's structural inputs unchanged at every step, so a
decoding step costs O(sequence) with the KV cache.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from ..strict_loading import StrictLoadingMixin
from .configuration_cpmbee import CpmBeeConfig
from .generation_cpmbee import check_streamed_batch, cpmbee_generate_kwargs, stream_final_answer
from .prompt_cpmbee import PromptTokenIds, flat_prompt_structure


class CpmBeeRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
        return (hidden_states * torch.rsqrt(variance + self.eps)).to(hidden_states.dtype) * self.weight


class CpmBeeScaledEmbedding(nn.Embedding):
    """Token embeddings enter the model divided by sqrt(hidden); the output head uses the raw table."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) / math.sqrt(self.embedding_dim)


class CpmBeeSubRotation(nn.Module):
    """Rotates an embedding by position `sub_id * sub_position_scale` (rotate-half over the full width).

    This is how CPM-Bee tells apart out-of-vocabulary strings that share a base id; sub id 0 is the identity.
    """

    def __init__(self, config: CpmBeeConfig):
        super().__init__()
        self.base = config.rope_theta
        self.scale = config.sub_position_scale

    def forward(self, hidden_states: torch.Tensor, sub_ids: torch.Tensor) -> torch.Tensor:
        dim, dtype = hidden_states.shape[-1], hidden_states.dtype
        inv_freq = 1.0 / (self.base ** (torch.arange(0, dim, 2, device=hidden_states.device, dtype=torch.float32) / dim))
        angles = (sub_ids * self.scale)[..., None].to(dtype) * inv_freq.to(dtype)
        angles = torch.cat([angles, angles], dim=-1)
        first, second = hidden_states.chunk(2, dim=-1)
        rotated = torch.cat([-second, first], dim=-1)
        return hidden_states * angles.cos() + rotated * angles.sin()


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 buckets: half per direction, exact for small distances, logarithmic up to max_distance."""
    half = num_buckets // 2
    max_exact = half // 2
    buckets = (relative_position > 0).long() * half
    distance = relative_position.abs()
    log_bucket = max_exact + (
        torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (half - max_exact)
    ).long()
    return buckets + torch.where(distance < max_exact, distance, log_bucket.clamp(max=half - 1))


@dataclass
class CpmBeeStructure:
    """Structural inputs over the whole sequence seen so far (cache + current tokens), each `(batch, total)`."""

    sub_ids: torch.Tensor
    context: torch.Tensor
    segment_ids: torch.Tensor
    segment_rel_offset: torch.Tensor
    num_segments: torch.Tensor
    segment_rel: torch.Tensor  # (batch, flattened relation table)

    @classmethod
    def build(
        cls,
        batch_size: int,
        total_length: int,
        device: torch.device,
        input_id_subs: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        segment_rel_offset: torch.Tensor | None = None,
        num_segments: torch.Tensor | None = None,
        segment_rel: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> "CpmBeeStructure":
        def last_real(values):
            """Each row's value at its last real token of the prefix: right padding is not what the answer continues."""
            length = values.shape[1]
            if attention_mask is None or attention_mask.shape[1] < length:
                return values[:, -1:]
            real = attention_mask[:, :length].to(device=device, dtype=torch.long)
            last = (real * torch.arange(1, length + 1, device=device)).argmax(-1, keepdim=True)
            return torch.gather(values, 1, last)

        def extend(values, fill):
            """A prefix continues with `fill` (or its last real value when fill is None) up to the total length."""
            if values is None:
                return torch.full((batch_size, total_length), 0 if fill is None else fill, dtype=torch.long, device=device)
            values = values.to(device=device, dtype=torch.long)
            if values.shape[1] >= total_length:
                return values[:, :total_length]
            pad = last_real(values) if fill is None else torch.full_like(values[:, -1:], fill)
            return torch.cat([values, pad.expand(-1, total_length - values.shape[1])], dim=1)

        if segment_rel is None:
            segment_rel = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        return cls(
            sub_ids=extend(input_id_subs, 0),
            context=extend(context, 0).bool(),
            segment_ids=extend(segment_ids, None),
            segment_rel_offset=extend(segment_rel_offset, None),
            num_segments=extend(num_segments, None) if num_segments is not None else extend(None, 1),
            segment_rel=segment_rel.to(device=device, dtype=torch.long).reshape(batch_size, -1),
        )


class CpmBeePositionBias(nn.Module):
    """Learned attention bias: relative-position buckets within a segment, segment-relation rows across them."""

    def __init__(self, config: CpmBeeConfig):
        super().__init__()
        self.num_buckets = config.position_bias_num_buckets
        self.max_distance = config.position_bias_max_distance
        self.relative_attention_bias = nn.Parameter(
            torch.empty(config.position_bias_num_buckets + config.position_bias_num_segment_buckets, config.num_attention_heads)
        )

    def buckets(self, structure: CpmBeeStructure, query_start: int) -> torch.Tensor:
        """Row of the bias table for every (query, key) pair: `(batch, queries, keys)`."""
        total = structure.segment_ids.shape[1]
        positions = torch.arange(total, device=structure.segment_ids.device)
        query = slice(query_start, total)
        relation_index = (
            structure.segment_ids[:, query, None] * structure.num_segments[:, query, None]
            + structure.segment_ids[:, None, :]
            + structure.segment_rel_offset[:, query, None]
        ).clamp(max=structure.segment_rel.shape[1] - 1)
        relation = torch.gather(structure.segment_rel, 1, relation_index.flatten(1)).view_as(relation_index)
        same_segment = relative_position_bucket(
            positions[None, :] - positions[query, None], self.num_buckets, self.max_distance
        )
        return torch.where(relation == 0, same_segment[None], self.num_buckets + relation - 1)

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        return F.embedding(buckets, self.relative_attention_bias).permute(0, 3, 1, 2)


def packed_sequence_ids(
    position_ids: torch.Tensor | None,
    cu_seq_lens: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    batch_size: int,
    length: int,
) -> torch.Tensor | None:
    """Which packed sequence each token is in, `(batch, length)`, or None when every row holds one sequence.

    Padding-free batches (TRL's `padding_free`, `DataCollatorWithFlattening`) mark where each sequence starts by
    position ids that restart at 0, or by cumulative lengths (`cu_seq_lens_q`, one flattened row). Only a real token
    starts a sequence: `generate` gives padding position 0 too, and padding is not packing.
    """
    if cu_seq_lens is not None:
        if batch_size != 1:
            raise ValueError(f"cu_seq_lens_q describes one flattened row, but the batch has {batch_size} rows.")
        positions = torch.arange(length, device=cu_seq_lens.device)
        return torch.searchsorted(cu_seq_lens[1:].to(positions.dtype), positions, right=True)[None]
    if position_ids is None or position_ids.shape[-1] != length:
        return None
    starts = position_ids.expand(batch_size, -1) == 0
    if attention_mask is not None:
        starts = starts & attention_mask[:, -length:].bool()
    if bool((starts.sum(-1) <= 1).all()):  # one sequence per row
        return None
    return starts.cumsum(-1)


def visibility_mask(
    structure: CpmBeeStructure,
    attention_mask: torch.Tensor,
    query_start: int,
    sequence_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(batch, queries, keys)`: a key is visible if it is context, or if both are answer tokens and it is not later;
    padding (attention_mask 0) sees and is seen by nothing, and packed sequences see only themselves."""
    total = structure.context.shape[1]
    positions = torch.arange(total, device=structure.context.device)
    query = slice(query_start, total)
    causal = positions[None, :] <= positions[query, None]
    visible = structure.context[:, None, :] | (~structure.context[:, query, None] & causal[None])
    if sequence_ids is not None:
        visible = visible & (sequence_ids[:, query, None] == sequence_ids[:, None, :])
    valid = attention_mask.bool()
    return visible & valid[:, None, :] & valid[:, query, None]


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask
    weights = F.softmax(weights, dim=-1)  # in the model dtype, as the original
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class CpmBeeAttention(nn.Module):
    def __init__(self, config: CpmBeeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        inner = self.num_heads * self.head_dim
        # CPM-Bee stores its projections at unit scale and divides by sqrt(fan_in) around them: the division is
        # written here, outside plain Linears, so tools that swap, wrap or merge Linears (PEFT, quantizers) stay exact.
        self.input_scale = math.sqrt(config.hidden_size)
        self.inner_scale = math.sqrt(inner)
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor,
        visible_rows: torch.Tensor,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, length, _ = hidden_states.shape
        shape = (batch_size, length, self.num_heads, self.head_dim)
        query = (self.q_proj(hidden_states) / self.input_scale).view(shape).transpose(1, 2)
        key = (self.k_proj(hidden_states) / self.input_scale).view(shape).transpose(1, 2)
        value = (self.v_proj(hidden_states) / self.input_scale).view(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask=attention_bias,
            scaling=self.scaling,
            dropout=self.config.attention_dropout if self.training else 0.0,
        )
        # A query that sees nothing (padding) attends to nothing: zeros, as the original.
        output = torch.where(visible_rows, output, 0.0)
        return self.o_proj(output.reshape(batch_size, length, -1)) / self.inner_scale, weights


class CpmBeeFeedForward(nn.Module):
    """Gated GELU: down(GELU(gate(x)) * up(x)), each unit-scale projection divided by sqrt(fan_in).

    The output projection divides its input, the others their output: the original's order, which matters in fp16.
    """

    def __init__(self, config: CpmBeeConfig):
        super().__init__()
        self.input_scale = math.sqrt(config.hidden_size)
        self.inner_scale = math.sqrt(config.intermediate_size)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = F.gelu(self.gate_proj(hidden_states) / self.input_scale)
        up = self.up_proj(hidden_states) / self.input_scale
        return self.down_proj(gate * up / self.inner_scale)


class CpmBeeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: CpmBeeConfig, layer_idx: int):
        super().__init__()
        self.residual_scale = config.residual_scale
        self.input_layernorm = CpmBeeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = CpmBeeAttention(config, layer_idx)
        self.post_attention_layernorm = CpmBeeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = CpmBeeFeedForward(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: torch.Tensor,
        visible_rows: torch.Tensor,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.self_attn(
            self.input_layernorm(hidden_states), attention_bias, visible_rows, cache
        )
        hidden_states = (hidden_states + attended) / self.residual_scale
        hidden_states = (hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))) / self.residual_scale
        return hidden_states, weights


class CpmBeePreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    """Base class of the CPM-Bee models: their config class, weight initialisation, and strict loading (a folder
    whose tensors do not cover the model exactly raises with their names; `strict=False` loads partial weights)."""

    config: CpmBeeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CpmBeeDecoderLayer"]
    _skip_keys_device_placement = ["cache"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # The callers divide each Linear by sqrt(fan_in), so weights (and the embedding) are unit-scale.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=1.0)
        elif isinstance(module, CpmBeePositionBias):
            init.normal_(module.relative_attention_bias, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, CpmBeeRMSNorm):
            init.ones_(module.weight)


class CpmBeeModel(CpmBeePreTrainedModel):
    """CPM-Bee without its output head: embeddings, the decoder stack and the final RMSNorm."""

    def __init__(self, config: CpmBeeConfig):
        super().__init__(config)
        self.embed_tokens = CpmBeeScaledEmbedding(config.vocab_size, config.hidden_size)
        self.sub_rotation = CpmBeeSubRotation(config)
        self.position_bias = CpmBeePositionBias(config)
        self.layers = nn.ModuleList([CpmBeeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = CpmBeeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def embed_ext_table(self, ext_table_ids: torch.Tensor, ext_table_sub: torch.Tensor) -> torch.Tensor:
        """Embeddings of the per-input ext entries: what the ext logit columns score against.

        Args:
            ext_table_ids (`torch.Tensor` of shape `(batch_size, num_ext)`):
                Base id of each ext entry.
            ext_table_sub (`torch.Tensor` of shape `(batch_size, num_ext)`):
                Sub id of each ext entry.

        Returns:
            The `(batch_size, num_ext, hidden_size)` base embeddings, rotated by the sub ids.
        """
        return self.sub_rotation(self.embed_tokens(ext_table_ids.long()), ext_table_sub.long())

    def resolve_ext_ids(
        self, input_ids: torch.Tensor, ext_table_ids: torch.Tensor | None, ext_table_sub: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ids of ext columns (>= vocab_size, e.g. fed back by generation) become their (base id, sub id).

        Args:
            input_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`):
                Ids, some of which may be ext columns.
            ext_table_ids (`torch.Tensor` of shape `(batch_size, num_ext)`, *optional*):
                Base id of each ext column.
            ext_table_sub (`torch.Tensor` of shape `(batch_size, num_ext)`, *optional*):
                Sub id of each ext column.

        Returns:
            `(base_ids, sub_ids)`: `input_ids` with ext ids replaced by their base ids, and the sub id of
                every position (0 outside ext ids), or `(input_ids, None)` when there are no ext ids.

        Raises:
            ValueError: `input_ids` holds ext ids but no ext table was given.
        """
        is_ext = input_ids >= self.config.vocab_size
        if not is_ext.any():
            return input_ids, None
        if ext_table_ids is None or ext_table_ids.shape[-1] == 0:
            raise ValueError(
                f"input_ids holds ids >= vocab_size ({self.config.vocab_size}) but no ext table was given: pass the "
                "ext_table_ids / ext_table_sub that the CpmBeeTokenizer built for this input."
            )
        column = (input_ids - self.config.vocab_size).clamp(min=0, max=ext_table_ids.shape[-1] - 1)
        base = torch.where(is_ext, torch.gather(ext_table_ids.long(), 1, column), input_ids)
        sub = torch.where(is_ext, torch.gather(ext_table_sub.long(), 1, column), 0)
        return base, sub

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        input_id_subs: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        segment_rel_offset: torch.Tensor | None = None,
        num_segments: torch.Tensor | None = None,
        segment_rel: torch.Tensor | None = None,
        ext_table_ids: torch.Tensor | None = None,
        ext_table_sub: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Runs the decoder over a structured prompt (what `CpmBeeTokenizer` returns for a prompt dict).

        Missing structural inputs make CPM-Bee a plain causal LM over one segment (ids of a flattened prompt, which
        hold `<root>`, are then refused: only `generate` reads the structure back from ids). They may describe a prefix
        only: later tokens continue its last segment as answer tokens.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Token ids; ids >= `vocab_size` are ext columns, resolved through `ext_table_ids` / `ext_table_sub`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding (which sees and is seen by nothing); may cover the new tokens only.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                The biases depend on token order only, so positions (or `cu_seq_lens_q` in `kwargs`) matter only in
                padding-free batches, where they mark where each packed sequence starts: tokens then attend within
                their own sequence, as if each were a row of its own.
            cache (`Cache`, *optional*):
                Key/value cache from earlier steps (formerly `past_key_values`).
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                `embed_tokens(input_ids)`, before the sub-id rotation (applied here); instead of `input_ids`.
            use_cache (`bool`, *optional*):
                Whether to return the cache; defaults to `config.use_cache`.
            input_id_subs (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                Sub id per token (0 for vocabulary tokens); rotates the embedding.
            context (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for prompt tokens (seen by every token), 0 for answer tokens (causal).
            segment_ids (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                Segment of each token.
            segment_rel_offset (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                Offset of the token's sample into `segment_rel`.
            num_segments (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                Segments in the token's sample.
            segment_rel (`torch.Tensor` of shape `(batch_size, n * n)`, *optional*):
                Flattened segment-relation table of `n` segments (0 = same segment).
            ext_table_ids (`torch.Tensor` of shape `(batch_size, num_ext)`, *optional*):
                Base id of each ext column.
            ext_table_sub (`torch.Tensor` of shape `(batch_size, num_ext)`, *optional*):
                Sub id of each ext column.
            output_hidden_states (`bool`, *optional*):
                Return the input of every layer and the final output; defaults to the config's.
            output_attentions (`bool`, *optional*):
                Return every layer's attention weights; defaults to the config's.
            kwargs (`dict[str, Any]`, *optional*):
                `cu_seq_lens_q` (packed sequence starts, see `position_ids`) is read; the rest is ignored.

        Returns:
            The final hidden states (after the last RMSNorm), the cache, and the hidden
                states and attentions when asked for.

        Raises:
            ValueError: neither or both of `input_ids` and `inputs_embeds`, a flattened prompt's ids without their
                structural inputs, a sequence longer than `config.max_position_embeddings`, or ext ids without an
                ext table.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch_size, length = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        device = (input_ids if input_ids is not None else inputs_embeds).device
        past_length = int(cache.get_seq_length()) if cache is not None else 0  # a static cache counts in a tensor
        total = past_length + length
        # Packed sequences only in a first pass: a decoding step continues the sequence its cache holds.
        sequence_ids = None
        if past_length == 0:
            root = self.config.root_token_id
            if segment_ids is None and input_ids is not None and root is not None and bool((input_ids == root).any()):
                raise ValueError(
                    "input_ids hold a flattened CPM-Bee prompt (<root>) but no structural inputs: pass all the "
                    "tokenizer's outputs (model(**tokenizer(prompt, return_tensors='pt'))), or call generate, which "
                    "reads the structure of a dict-of-strings prompt back from its ids."
                )
            sequence_ids = packed_sequence_ids(
                position_ids, kwargs.get("cu_seq_lens_q"), attention_mask, batch_size, length
            )
        longest = total
        if sequence_ids is not None:  # the limit is per packed sequence (ids made unique across rows first)
            rows = torch.arange(batch_size, device=device)[:, None] * (length + 1)
            longest = int(torch.unique(sequence_ids + rows, return_counts=True)[1].max())
        if self.config.max_position_embeddings is not None and longest > self.config.max_position_embeddings:
            raise ValueError(
                f"The sequence is {longest} tokens long, more than max_position_embeddings "
                f"({self.config.max_position_embeddings}); shorten the input."
            )

        structure = CpmBeeStructure.build(
            batch_size, total, device, input_id_subs, context, segment_ids, segment_rel_offset, num_segments, segment_rel,
            attention_mask,
        )  # fmt: skip
        sub_ids = structure.sub_ids[:, past_length:]
        if inputs_embeds is None:
            input_ids, ext_sub_ids = self.resolve_ext_ids(input_ids, ext_table_ids, ext_table_sub)
            if ext_sub_ids is not None:  # generated positions have sub id 0 in the structure
                sub_ids = sub_ids + ext_sub_ids
            inputs_embeds = self.embed_tokens(input_ids)
        hidden_states = self.sub_rotation(inputs_embeds, sub_ids)

        if attention_mask is None:
            attention_mask = torch.ones(batch_size, total, dtype=torch.bool, device=device)
        elif attention_mask.shape[1] < total:  # a mask over the new tokens only: the cache is all real tokens
            attention_mask = F.pad(attention_mask, (total - attention_mask.shape[1], 0), value=1)
        visible = visibility_mask(structure, attention_mask[:, :total], past_length, sequence_ids)
        bias = self.position_bias(self.position_bias.buckets(structure, past_length)).to(hidden_states.dtype)
        hidden = torch.finfo(hidden_states.dtype).min / 2
        attention_bias = bias.masked_fill(~visible[:, None], hidden)
        key_length = cache.get_mask_sizes(length, 0)[0] if cache is not None else total
        if key_length > total:  # a static cache hands back its whole buffer: the slots not written yet stay hidden
            attention_bias = F.pad(attention_bias, (0, key_length - total), value=hidden)
        visible_rows = visible.any(-1)[:, :, None, None]

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, weights = layer(hidden_states, attention_bias, visible_rows, cache)
            if output_attentions:
                all_attentions += (weights,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


def generate_with_cpmbee_decoding(generate, config: CpmBeeConfig, generation_config, inputs, kwargs: dict):
    """Runs `generate` (a bound `GenerationMixin.generate`) with this call's CPM-Bee decoding applied; a streamer held
    back from a beam search gets the final answer when it is known. Shared by the models that own CPM-Bee's rules."""
    input_ids = inputs if inputs is not None else kwargs.get("input_ids")
    check_streamed_batch(kwargs.get("streamer"), input_ids)
    kwargs, streamer = cpmbee_generate_kwargs(
        kwargs, input_ids.shape[-1], config.vocab_size, config.unk_token_id, generation_config
    )
    output = generate(inputs, **kwargs)
    if streamer is not None:
        stream_final_answer(streamer, input_ids, output)
    return output


class CpmBeeForCausalLM(CpmBeePreTrainedModel, GenerationMixin):
    """CPM-Bee with its tied output head; logits are `[vocabulary columns, one column per ext-table entry]`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CpmBeeConfig):
        super().__init__(config)
        self.model = CpmBeeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def create_masks_for_generate(self, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
        """Keeps the 2D padding mask under a static cache: CPM-Bee builds its attention from the prompt structure.

        Args:
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                The padding mask.
            kwargs (`dict[str, Any]`, *optional*):
                What transformers passes to build a 4D mask; unused.

        Returns:
            `attention_mask`, unchanged.
        """
        return attention_mask

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """transformers' `generate`, plus two things CPM-Bee needs per call.

        A prompt given by its ids alone (all that `pipeline("text-generation")` passes) gets its structural inputs
        read back from the ids ([`~prompt_cpmbee.flat_prompt_structure`]), and `cpmbee_decoding` (the call's, else
        the passed generation config's, else the model's) becomes this call's decoding
        ([`~generation_cpmbee.cpmbee_generate_kwargs`]).

        Args:
            inputs (`torch.Tensor`, *optional*):
                The prompt's ids (or pass `input_ids`).
            kwargs (`dict[str, Any]`, *optional*):
                The tokenizer's other outputs (structural inputs, ext tables), generation options as for any model,
                and `cpmbee_decoding` (`{"temperature": ..., "repetition_penalty": ...}`: the original's logit rules
                and, with beams, its beam search; None turns them off for the call).

        Returns:
            (`torch.LongTensor` or `GenerateOutput`): The generated ids, prompt included (a `GenerateOutput` with
                `return_dict_in_generate=True`); ids >= `vocab_size` name strings of the prompt's ext table.

        Raises:
            ValueError: a `streamer` with a batch of several prompts, or ids of a prompt whose structure cannot be
                read back from them (a nested dict, text outside the vocabulary): pass the tokenizer's outputs.
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None:
            return super().generate(inputs, **kwargs)
        root = self.config.root_token_id
        if input_ids.shape[-1] > 0 and kwargs.get("segment_ids") is None and bool((input_ids == root).any()):
            token_ids = PromptTokenIds.of_config(self.config)
            kwargs.update(flat_prompt_structure(input_ids, token_ids, kwargs.get("attention_mask")))
        return generate_with_cpmbee_decoding(super().generate, self.config, self.generation_config, inputs, kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        input_id_subs: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        segment_rel_offset: torch.Tensor | None = None,
        num_segments: torch.Tensor | None = None,
        segment_rel: torch.Tensor | None = None,
        ext_table_ids: torch.Tensor | None = None,
        ext_table_sub: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits over the vocabulary and the ext columns (and the loss).

        The structural inputs (`input_id_subs` to `ext_table_sub`) are described in [`CpmBeeModel`]'s `forward`; they
        may cover only the prompt.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Token ids; ids >= `vocab_size` are ext columns.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Starts of packed sequences in padding-free batches (see [`CpmBeeModel`]).
            cache (`Cache`, *optional*):
                Key/value cache from earlier steps (formerly `past_key_values`).
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                `embed_tokens(input_ids)`, before the sub-id rotation; instead of `input_ids`.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets in the transformers convention (shifted inside, -100 ignored); ext entries are targeted by
                column id.
            use_cache (`bool`, *optional*):
                Whether to return the cache; defaults to `config.use_cache`.
            logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
                Logits of the last `logits_to_keep` positions only (0: all), or of the given indices.
            input_id_subs (`torch.Tensor`, *optional*):
                Sub id per token.
            context (`torch.Tensor`, *optional*):
                1 for prompt tokens, 0 for answer tokens.
            segment_ids (`torch.Tensor`, *optional*):
                Segment of each token.
            segment_rel_offset (`torch.Tensor`, *optional*):
                Offset of the token's sample into `segment_rel`.
            num_segments (`torch.Tensor`, *optional*):
                Segments in the token's sample.
            segment_rel (`torch.Tensor`, *optional*):
                Flattened segment-relation table.
            ext_table_ids (`torch.Tensor` of shape `(batch_size, num_ext)`, *optional*):
                Base id of each ext column; each adds a logit column.
            ext_table_sub (`torch.Tensor` of shape `(batch_size, num_ext)`, *optional*):
                Sub id of each ext column; columns of sub id 0 (a batch's padding) are never chosen.
            kwargs (`dict[str, Any]`, *optional*):
                Passed to the model and the loss.

        Returns:
            Logits `(batch_size, kept positions, vocab_size + num_ext)`, the loss with
                `labels`, the cache, and the hidden states and attentions when asked for.
        """
        outputs = self.model(
            return_dict=True,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            input_id_subs=input_id_subs,
            context=context,
            segment_ids=segment_ids,
            segment_rel_offset=segment_rel_offset,
            num_segments=num_segments,
            segment_rel=segment_rel,
            ext_table_ids=ext_table_ids,
            ext_table_sub=ext_table_sub,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        hidden_states = hidden_states[:, keep]
        logits = self.lm_head(hidden_states / math.sqrt(self.config.hidden_size))
        if ext_table_ids is not None and ext_table_ids.shape[-1] > 0:
            ext_embeddings = self.model.embed_ext_table(ext_table_ids, ext_table_sub)
            ext_logits = torch.einsum("bld,bed->ble", hidden_states, ext_embeddings)
            # Batches pad ext tables with sub id 0, which no real entry has: those columns must never be chosen.
            ext_logits = ext_logits.masked_fill(ext_table_sub[:, None, :] == 0, torch.finfo(ext_logits.dtype).min)
            logits = torch.cat([logits, ext_logits], dim=-1)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["CpmBeeForCausalLM", "CpmBeeModel", "CpmBeePreTrainedModel"]
