"""VisCPM-Chat: any vision tower, the MPM bridge, and any causal LLM as the multilingual pivot.

Data flow (MPM paper, section 3.2): pixels -> vision tower -> bridge (learned queries, then the mapping MLP)
-> `num_query_tokens` embeddings per image, scattered into the LLM's input embeddings at the image placeholder
positions -> the LLM, with its own head (so Gemma's soft-capping keeps working). An LLM whose inputs or decoding
need more gets a chat model class of its own, subclassing these (as transformers gives LLaVA variants theirs).
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.siglip.modeling_siglip import eager_attention_forward
from transformers.utils import can_return_tuple, torch_compilable_check
from transformers.utils.deprecation import deprecate_kwarg

from ..strict_loading import StrictLoadingMixin
from .configuration_viscpm_chat import VisCPMChatConfig
from .conversation import VisCPMChatHistory, chat, check_num_beams


# The paper decodes with beam search of 3 beams, at most 512 new tokens, and a length penalty of 3 on the
# generated length (HF's `length_penalty` is applied to the generated length too).
PAPER_GENERATION_DEFAULTS = {"num_beams": 3, "max_new_tokens": 512, "length_penalty": 3.0, "do_sample": False}


@dataclass
class VisCPMChatModelOutputWithPast(BaseModelOutputWithPast):
    """`image_hidden_states`: bridge outputs, `(num_images, num_query_tokens, text_hidden_size)`."""

    image_hidden_states: torch.Tensor | None = None


@dataclass
class VisCPMChatCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Language-model outputs plus the bridge outputs of the images in the prompt (reusable in a later turn)."""

    image_hidden_states: torch.Tensor | None = None


def llm_context_limit(text_config) -> int | None:
    """The LLM's context in tokens: `max_position_embeddings`, stretched by a RoPE scaling factor where the config
    has one (linear, dynamic, YaRN, ... stretch the original range by `factor`); None when the LLM sets no limit."""
    limit = getattr(text_config, "max_position_embeddings", None)
    rope = getattr(text_config, "rope_parameters", None) or {}
    if limit is None or not isinstance(rope, dict):
        return limit
    per_layer_type = [rope] if "rope_type" in rope or "factor" in rope else [v for v in rope.values() if isinstance(v, dict)]
    for parameters in per_layer_type:
        if parameters.get("rope_type", "default") != "default" and parameters.get("factor"):
            original = parameters.get("original_max_position_embeddings") or getattr(
                text_config, "max_position_embeddings", limit
            )
            limit = max(limit, int(original * parameters["factor"]))
    return limit


class VisCPMChatBridgeAttention(nn.Module):
    """Cross-attention of the learned queries over the vision features (bidirectional, no mask)."""

    def __init__(self, config: VisCPMChatConfig):
        super().__init__()
        self.config = config
        dim = config.vision_feature_dim
        self.num_heads = config.bridge_num_attention_heads
        self.head_dim = dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        batch_size, num_queries, _ = queries.shape
        q = self.q_proj(queries).view(batch_size, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(features).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(features).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(self, q, k, v, attention_mask=None, scaling=self.scaling, dropout=0.0)
        return self.o_proj(attn_output.reshape(batch_size, num_queries, -1))


class VisCPMChatQueryResampler(nn.Module):
    """Learned queries that read any number of vision features and return exactly `num_query_tokens` of them."""

    def __init__(self, config: VisCPMChatConfig):
        super().__init__()
        dim = config.vision_feature_dim
        self.queries = nn.Parameter(torch.empty(config.num_query_tokens, dim))
        self.query_norm = nn.LayerNorm(dim)
        self.feature_norm = nn.LayerNorm(dim)
        self.attention = VisCPMChatBridgeAttention(config)
        self.output_norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`(num_images, num_patches, dim)` -> `(num_images, num_query_tokens, dim)`."""
        queries = self.queries.unsqueeze(0).expand(features.shape[0], -1, -1)
        attended = self.attention(self.query_norm(queries), self.feature_norm(features))
        return self.output_norm(queries + attended)


class VisCPMChatMapping(nn.Module):
    """The paper's mapping MLP (Linear, GELU, Linear) from the vision width into the LLM's hidden size."""

    def __init__(self, config: VisCPMChatConfig):
        super().__init__()
        text_hidden_size = config.text_config.hidden_size
        self.linear_1 = nn.Linear(config.vision_feature_dim, text_hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_hidden_size, text_hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class VisCPMChatBridge(nn.Module):
    """Vision features -> `num_query_tokens` LLM-space embeddings per image."""

    def __init__(self, config: VisCPMChatConfig):
        super().__init__()
        self.num_query_tokens = config.num_query_tokens
        self.resampler = VisCPMChatQueryResampler(config) if config.bridge_type == "query_resampler" else None
        self.mapping = VisCPMChatMapping(config)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.resampler is not None:
            features = self.resampler(features)
        elif features.shape[1] != self.num_query_tokens:
            raise ValueError(
                f"bridge_type='in_tower' expects the vision tower to return num_query_tokens="
                f"{self.num_query_tokens} features per image, got {features.shape[1]}. Use "
                "bridge_type='query_resampler' for a tower that returns patch features."
            )
        return self.mapping(features)


class VisCPMChatPreTrainedModel(StrictLoadingMixin, PreTrainedModel):
    config: VisCPMChatConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisCPMChatBridge"]
    _skip_keys_device_placement = ["cache"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # What a quantization config that names no modules to skip leaves in full precision: the vision tower, the bridge
    # and the LLM's head (a few percent of the weights, and the most sensitive ones). Patterns as the quantizers match
    # them: from the start of a module's name, in the head class (`model.`) and the base model alike.
    modules_not_to_quantize = (r"(?:model\.)?vision_tower", r"(?:model\.)?bridge", r"(?:model\.)?llm\.lm_head")

    @classmethod
    def from_pretrained(cls, *args, quantization_config=None, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a bitsandbytes config without `llm_int8_skip_modules` (or a quanto /
        torchao one without `modules_to_not_convert`) keeps `modules_not_to_quantize` in full precision."""
        for field in ("llm_int8_skip_modules", "modules_to_not_convert"):
            if hasattr(quantization_config, field) and getattr(quantization_config, field) is None:
                quantization_config = copy.deepcopy(quantization_config)
                setattr(quantization_config, field, list(cls.modules_not_to_quantize))
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        return super().from_pretrained(*args, **kwargs)

    @classmethod
    def is_custom_code(cls) -> bool:
        """Not remote code: loading then initialises missing weights with each sub-model's full `_init_weights`
        (transformers' path for code outside the library inits only modules holding the missing parameters, so a
        missing SigLIP `fc1` would get the Linear init instead of the MLP's). `transformers.initialization` skips the
        loaded parameters by itself."""
        return cls.is_remote_code()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VisCPMChatQueryResampler):
            init.trunc_normal_(module.queries, std=self.config.initializer_range)


class VisCPMChatModel(VisCPMChatPreTrainedModel):
    """Vision tower + bridge + LLM, returning the LLM's last hidden states (no language-model head applied).

    The LLM is kept whole (`AutoModelForCausalLM`) so that this class and
    [`VisCPMChatForConditionalGeneration`] share one weight layout; here only its decoder runs.
    """

    def __init__(self, config: VisCPMChatConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.bridge = VisCPMChatBridge(config)
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Runs the vision tower and the bridge.

        `pixel_values`: `(num_images, channels, height, width)`. Returns the tower's outputs with `pooler_output`
        set to the bridge outputs, `(num_images, num_query_tokens, text_hidden_size)`: pass them back as
        `mm_encoder_outputs={"image": ...}` to skip the vision tower for images already seen.
        """
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"pixel_values must be a tensor of shape (num_images, channels, height, width), got {shape}. "
                "Prepare images with VisCPMChatProcessor."
            )
        kwargs.pop("return_dict", None)
        layer = self.config.vision_feature_layer
        if layer != -1:
            kwargs["output_hidden_states"] = True
        # An offloaded tower sits on the meta device; its offload hook brings pixels where it runs.
        tower_device = self.vision_tower.device
        pixel_values = pixel_values.to(None if tower_device.type == "meta" else tower_device, self.vision_tower.dtype)
        outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
        features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        if features.ndim == 4:  # a convolutional tower's (num_images, channels, height, width) feature map
            features = features.flatten(2).transpose(1, 2)
        outputs.pooler_output = self.bridge(features.to(self.bridge.mapping.linear_1.weight.dtype))
        return outputs

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None, num_image_features: int | None
    ) -> torch.BoolTensor:
        """Boolean `(batch, seq)` mask of the image placeholder positions, checked against the number of features."""
        image_token_id = self.config.image_token_id
        reference = input_ids if input_ids is not None else inputs_embeds
        if image_token_id is None:
            if num_image_features:
                raise ValueError("config.image_token_id is not set: set it to processor.image_token_id.")
            return torch.zeros(reference.shape[:2], dtype=torch.bool, device=reference.device)
        if input_ids is None:
            image_embedding = self.get_input_embeddings()(
                torch.tensor(image_token_id, dtype=torch.long, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embedding).all(-1)
        else:
            mask = input_ids == image_token_id
        per_image = self.config.num_query_tokens

        def mismatch() -> str:
            num_tokens, num_images = int(mask.sum()), (num_image_features or 0) // per_image
            given = (
                f"{num_images} image(s) give {num_images} x {per_image} = {num_image_features} features"
                if num_image_features
                else "no pixel_values or image features were given"
            )
            if num_tokens % per_image:
                hint = (
                    f"{num_tokens} is not a whole number of images of {per_image} tokens: the prompt was truncated, "
                    f"or made by a processor whose num_image_tokens is not this model's num_query_tokens ({per_image})"
                )
            else:
                hint = (
                    f"the prompt has places for {num_tokens // per_image} image(s): give one image per image "
                    f"placeholder (VisCPMChatProcessor expands each to {per_image} tokens)"
                )
            return (
                f"Image features and image tokens do not match: the prompt holds {num_tokens} image tokens but "
                f"{given}; {hint}."
            )

        torch_compilable_check(mask.sum() == (num_image_features or 0), mismatch)
        return mask

    def prepare_llm_inputs(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        cache: Cache | None = None,
    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor | None, torch.BoolTensor]:
        """What the LLM receives: `input_ids`, or `inputs_embeds` with the bridge outputs at the image placeholders.

        Without images the ids go to the LLM as they are, so it embeds them its own way (decoding steps, text-only
        turns). Returns `(llm_inputs, image_features, image_mask)`; the mask is None in decoding steps.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if pixel_values is not None and (mm_encoder_outputs or {}).get("image") is not None:
            raise ValueError("Pass either pixel_values or precomputed image features (mm_encoder_outputs), not both.")

        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values).pooler_output
        elif (mm_encoder_outputs or {}).get("image") is not None:
            image_features = mm_encoder_outputs["image"].pooler_output
            if isinstance(image_features, (list, tuple)):
                image_features = torch.stack(list(image_features))
            self.check_image_features(image_features)

        self.check_sequence_length((input_ids if input_ids is not None else inputs_embeds).shape[1], cache)
        decoding = image_features is None and cache is not None and cache.get_seq_length() > 0
        if decoding:  # generated tokens: the placeholder is suppressed, and a per-step check would sync the device
            return {"input_ids": input_ids, "inputs_embeds": inputs_embeds}, None, None
        num_features = None if image_features is None else image_features.shape[0] * image_features.shape[1]
        image_mask = self.get_placeholder_mask(input_ids, inputs_embeds, num_features)
        if image_features is None:
            return {"input_ids": input_ids, "inputs_embeds": inputs_embeds}, None, image_mask
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_features)
        return {"input_ids": None, "inputs_embeds": inputs_embeds}, image_features, image_mask

    def check_image_features(
        self,
        image_features: torch.Tensor,
        name: str = "The image features",
        fix: str = "Compute them with this model's get_image_features.",
    ) -> None:
        """Refuses precomputed image features of another shape than the bridge makes: from a model with another
        `num_query_tokens` or hidden size they would be miscounted, or silently cut to fit the image tokens.

        Args:
            image_features: `(num_images, num_query_tokens, hidden_size)` features from `get_image_features`.
            name: what the features are, as the error names them.
            fix: what the error tells the caller to do.
        """
        expected = (self.config.num_query_tokens, self.config.text_config.hidden_size)
        if image_features.ndim != 3 or tuple(image_features.shape[1:]) != expected:
            raise ValueError(
                f"{name} have shape {tuple(image_features.shape)}, but this model's bridge makes (num_images, "
                f"{expected[0]}, {expected[1]}): they come from another model (another number of query tokens or "
                f"hidden size). {fix}"
            )

    def check_sequence_length(self, length: int, cache: Cache | None) -> None:
        """Refuses a sequence longer than the LLM's context (`llm_context_limit`) instead of degrading silently."""
        limit = llm_context_limit(self.config.text_config)
        if limit is None:
            return
        total = length + (cache.get_seq_length() if cache is not None else 0)
        torch_compilable_check(
            total <= limit,
            lambda: f"The sequence is {int(total)} tokens long but the language model allows at most {limit} "
            "(text_config.max_position_embeddings, times its RoPE scaling factor). Shorten the prompt or the "
            "history, pass fewer images, or lower max_new_tokens.",
        )

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> VisCPMChatModelOutputWithPast:
        llm_inputs, image_features, _ = self.prepare_llm_inputs(
            input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, cache
        )
        outputs = self.llm.base_model(
            **llm_inputs,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            **{**kwargs, "return_dict": True},
        )
        return VisCPMChatModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )


class VisCPMChatForConditionalGeneration(VisCPMChatPreTrainedModel, GenerationMixin):
    """VisCPM-Chat with the LLM's own head: `forward` gives logits (and the loss), `generate` and `chat` answer."""

    base_model_class = VisCPMChatModel  # a model class for one LLM family may bring its own

    def __init__(self, config: VisCPMChatConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.post_init()
        self.generation_config.update(**PAPER_GENERATION_DEFAULTS)
        self.generation_config._from_model_config = False  # the defaults above are ours, not the LLM config's
        if config.image_token_id is not None:
            self.generation_config.suppress_tokens = [config.image_token_id]

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.llm.set_output_embeddings(value)

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """transformers' preparation; the image inputs go in whenever the cache does not hold the prompt yet. An
        assistant model's first pass is not the "first iteration" of `generate`, but it still reads the images."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)
        cache = kwargs.get("cache")
        if is_first_iteration or cache is None or not kwargs.get("use_cache", True) or cache.get_seq_length() == 0:
            model_inputs.update(pixel_values=pixel_values, mm_encoder_outputs=mm_encoder_outputs)
        return model_inputs

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """transformers' `generate`, with `num_beams` checked first (see `check_num_beams`)."""
        check_num_beams(kwargs.get("num_beams", (kwargs.get("generation_config") or self.generation_config).num_beams))
        return super().generate(inputs, **kwargs)

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> VisCPMChatCausalLMOutputWithPast:
        """`labels` follow the LLM's convention (shifted inside); image and padding positions never count."""
        llm_inputs, image_features, image_mask = self.model.prepare_llm_inputs(
            input_ids, inputs_embeds, pixel_values, mm_encoder_outputs, cache
        )
        if labels is not None:
            ignored = image_mask.to(labels.device) if image_mask is not None else torch.zeros_like(labels, dtype=torch.bool)
            if attention_mask is not None and attention_mask.ndim == 2:
                ignored = ignored | (attention_mask.to(labels.device) == 0)
            labels = labels.masked_fill(ignored, -100)
        outputs = self.model.llm(
            **llm_inputs,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **{**kwargs, "return_dict": True},
        )
        return VisCPMChatCausalLMOutputWithPast(
            loss=outputs.loss,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )

    @torch.no_grad()
    def chat(
        self,
        image,
        question: str,
        processor,
        history: VisCPMChatHistory | None = None,
        **generate_kwargs,
    ) -> tuple[str, VisCPMChatHistory]:
        """Answers `question` about `image` and returns `(answer, history)`; pass `history` back to continue.

        `image` may be None in later turns: images already in `history` are not run through the vision tower again.
        `generate_kwargs` override the generation config (e.g. `num_beams=1, max_new_tokens=64`).
        """
        return chat(self, processor, image, question, history=history, **generate_kwargs)


__all__ = [
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatModel",
    "VisCPMChatPreTrainedModel",
]
