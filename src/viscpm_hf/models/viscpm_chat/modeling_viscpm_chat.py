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
    """Base class of the VisCPM-Chat models: their config class, weight initialisation, and loading.

    `from_pretrained` loads strictly (a folder whose tensors do not cover the model exactly raises with their names;
    `strict=False` loads partial weights) and keeps `modules_not_to_quantize` (the vision tower, the bridge and the
    LLM's head) in full precision under a quantization config that names no modules to skip.
    """

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
        """As `PreTrainedModel.from_pretrained`, keeping the most sensitive weights out of quantization.

        Args:
            args (`tuple`, *optional*):
                Passed on: the folder or Hub repo id first, as for any model.
            quantization_config (`QuantizationConfigMixin`, *optional*):
                A bitsandbytes config without `llm_int8_skip_modules` (or a quanto / torchao one without
                `modules_to_not_convert`) gets a copy that keeps `modules_not_to_quantize` in full precision; a config
                that names its own modules is followed as given.
            kwargs (`dict[str, Any]`, *optional*):
                Passed on to `PreTrainedModel.from_pretrained` (e.g. `dtype`, `device_map`); `strict=False` loads
                partial weights on purpose.

        Returns:
            (`VisCPMChatPreTrainedModel`): The loaded model.

        Raises:
            RuntimeError: the folder's tensors do not cover the model exactly (missing or unexpected ones, named).
        """
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

        Args:
            pixel_values (`torch.Tensor` of shape `(num_images, channels, height, width)`):
                The images, as the processor prepares them.
            kwargs (`dict[str, Any]`, *optional*):
                Passed on to the vision tower.

        Returns:
            The tower's outputs with `pooler_output` set to the bridge outputs, `(num_images, num_query_tokens,
                text_hidden_size)`: pass them back as `mm_encoder_outputs={"image": ...}` to skip the vision tower for
                images already seen.

        Raises:
            ValueError: `pixel_values` is not a 4D tensor.
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
        """Finds the image placeholder positions and checks them against the number of image features.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                The prompt's ids; compared with `config.image_token_id`.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                Used when `input_ids` is None: a position is a placeholder where it equals the image token's
                embedding.
            num_image_features (`int`, *optional*):
                Image features to place (`num_images * num_query_tokens`); None or 0 when there are none.

        Returns:
            `(batch_size, sequence_length)`, True at the image placeholders.

        Raises:
            ValueError: the number of placeholders differs from `num_image_features` (the message says whether the
                prompt was truncated or has another number of images), or there are features but
                `config.image_token_id` is not set.
        """
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
        turns).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                The prompt's ids, image placeholders included; exactly one of `input_ids` and `inputs_embeds`.
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                The LLM's input embeddings, instead of `input_ids`.
            pixel_values (`torch.Tensor` of shape `(num_images, channels, height, width)`, *optional*):
                Images to run through the vision tower and the bridge.
            mm_encoder_outputs (`dict[str, BaseModelOutputWithPooling]`, *optional*):
                Precomputed image features instead of `pixel_values`: `{"image": output}` whose `pooler_output` is
                what `get_image_features` returned; checked by `check_image_features`.
            cache (`Cache`, *optional*):
                The LLM's cache: its length counts towards the context limit, and a non-empty cache without images
                means a decoding step.

        Returns:
            `(llm_inputs, image_features, image_mask)`: the `input_ids` / `inputs_embeds` keyword arguments
                of the LLM, the bridge outputs (None without images) and the placeholder mask (None in decoding
                steps).

        Raises:
            ValueError: neither or both of `input_ids` and `inputs_embeds`, both `pixel_values` and
                `mm_encoder_outputs`, precomputed features of another shape, a sequence longer than the LLM's context,
                or placeholders that do not match the images.
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
            image_features (`torch.Tensor`):
                `(num_images, num_query_tokens, hidden_size)` features from `get_image_features`.
            name (`str`, *optional*):
                What the features are, as the error names them.
            fix (`str`, *optional*):
                What the error tells the caller to do.

        Raises:
            ValueError: the features are not `(num_images, config.num_query_tokens, text_config.hidden_size)`.
        """
        expected = (self.config.num_query_tokens, self.config.text_config.hidden_size)
        if image_features.ndim != 3 or tuple(image_features.shape[1:]) != expected:
            raise ValueError(
                f"{name} have shape {tuple(image_features.shape)}, but this model's bridge makes (num_images, "
                f"{expected[0]}, {expected[1]}): they come from another model (another number of query tokens or "
                f"hidden size). {fix}"
            )

    def check_sequence_length(self, length: int, cache: Cache | None) -> None:
        """Refuses a sequence longer than the LLM's context instead of degrading silently.

        Args:
            length (`int`):
                Tokens of the current input.
            cache (`Cache`, *optional*):
                The cache the input continues; its length counts too.

        Raises:
            ValueError: the cache and the input together exceed `text_config.max_position_embeddings`, stretched by
                its RoPE scaling factor where the config has one (no check when the LLM sets no limit).
        """
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
        """Runs the vision tower and the bridge on the images, then the LLM's decoder (no language-model head).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                The prompt's ids, each image's placeholder expanded to `num_query_tokens` image tokens (the processor
                does so).
            pixel_values (`torch.Tensor` of shape `(num_images, channels, height, width)`, *optional*):
                The prompt's images, in the order of their placeholders.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding; passed to the LLM.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Passed to the LLM.
            cache (`Cache`, *optional*):
                The LLM's key/value cache from earlier steps (formerly `past_key_values`).
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                The LLM's input embeddings instead of `input_ids`; the image features replace the rows equal to the
                image token's embedding.
            mm_encoder_outputs (`dict[str, BaseModelOutputWithPooling]`, *optional*):
                Precomputed image features instead of `pixel_values` (see `get_image_features`).
            kwargs (`dict[str, Any]`, *optional*):
                Passed on to the LLM (e.g. `use_cache`, `output_hidden_states`).

        Returns:
            The LLM's last hidden states, cache, hidden states and attentions, and
                `image_hidden_states`, the bridge outputs of this call's images.
        """
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
        """Runs the vision tower and the bridge (see [`VisCPMChatModel`]'s `get_image_features`).

        Args:
            pixel_values (`torch.Tensor` of shape `(num_images, channels, height, width)`):
                The images, as the processor prepares them.
            kwargs (`dict[str, Any]`, *optional*):
                Passed on to the vision tower.

        Returns:
            The tower's outputs, `pooler_output` the bridge outputs
                `(num_images, num_query_tokens, text_hidden_size)`.
        """
        return self.model.get_image_features(pixel_values, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        """transformers' preparation; the image inputs go in whenever the cache does not hold the prompt yet.

        An assistant model's first pass is not the "first iteration" of `generate`, but it still reads the images.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                The sequences so far.
            pixel_values (`torch.Tensor`, *optional*):
                The prompt's images; passed on only while the cache is empty (or not used).
            mm_encoder_outputs (`dict[str, BaseModelOutputWithPooling]`, *optional*):
                Precomputed image features; passed on like `pixel_values`.
            is_first_iteration (`bool`, *optional*, defaults to `False`):
                Whether this is the first step of `generate`.
            kwargs (`dict[str, Any]`, *optional*):
                The other model inputs (`cache`, `attention_mask`, `use_cache`, ...), as transformers prepares them.

        Returns:
            The keyword arguments of this step's `forward`.
        """
        model_inputs = super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)
        cache = kwargs.get("cache")
        if is_first_iteration or cache is None or not kwargs.get("use_cache", True) or cache.get_seq_length() == 0:
            model_inputs.update(pixel_values=pixel_values, mm_encoder_outputs=mm_encoder_outputs)
        return model_inputs

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """transformers' `generate`, with `num_beams` checked first.

        The generation config of a model built from its config decodes as the paper does (3 beams, at most 512 new
        tokens, length penalty 3) and never writes the image token; a folder's `generation_config.json` may differ.

        Args:
            inputs (`torch.Tensor`, *optional*):
                The prompt's ids (or pass `input_ids`).
            kwargs (`dict[str, Any]`, *optional*):
                Model inputs (`pixel_values`, `attention_mask`, `mm_encoder_outputs`, ...) and generation options
                (`num_beams`, `max_new_tokens`, `generation_config`, `streamer`, ...), as for any transformers model.

        Returns:
            (`torch.LongTensor` or `GenerateOutput`): The generated ids, prompt included (a `GenerateOutput` with
                `return_dict_in_generate=True`).

        Raises:
            ValueError: `num_beams` is not a positive integer (transformers itself does not check it).
        """
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
        """The LLM's logits (and loss) over a prompt with images.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                The prompt's ids, each image's placeholder expanded to `num_query_tokens` image tokens (the processor
                does so).
            pixel_values (`torch.Tensor` of shape `(num_images, channels, height, width)`, *optional*):
                The prompt's images, in the order of their placeholders.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding; padding positions are left out of the loss.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Passed to the LLM.
            cache (`Cache`, *optional*):
                The LLM's key/value cache from earlier steps (formerly `past_key_values`).
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                The LLM's input embeddings instead of `input_ids`.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets in the LLM's convention (shifted inside, -100 ignored); image and padding positions never
                count.
            logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
                Logits of the last `logits_to_keep` positions only (0: all), or of the given indices.
            mm_encoder_outputs (`dict[str, BaseModelOutputWithPooling]`, *optional*):
                Precomputed image features instead of `pixel_values` (see `get_image_features`).
            kwargs (`dict[str, Any]`, *optional*):
                Passed on to the LLM (e.g. `use_cache`, `output_hidden_states`).

        Returns:
            The LLM's loss, logits, cache, hidden states and attentions, and
                `image_hidden_states`, the bridge outputs of this call's images (reusable in a later turn).
        """
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
        """Answers `question` about `image`; pass the returned history back to continue the conversation.

        Args:
            image (`PIL.Image.Image`, `str`, `list`, or `None`):
                One image (a PIL image, a path or URL, an array or tensor), a list of them, or None in later turns to
                keep talking about earlier images: images already in `history` are not run through the vision tower
                again.
            question (`str`):
                The question.
            processor ([`VisCPMChatProcessor`]):
                The model's processor.
            history ([`VisCPMChatHistory`], *optional*):
                What an earlier call returned, unchanged; None starts a new conversation.
            generate_kwargs (`dict[str, Any]`, *optional*):
                Override the generation config (e.g. `num_beams=1, max_new_tokens=64`); a `TextStreamer` passed as
                `streamer` decodes as the answer does.

        Returns:
            The answer, and the conversation with it, holding the image features of
                every image so far.

        Raises:
            ValueError: an empty question (whitespace and invisible characters count as nothing) or text that is not
                valid Unicode, `num_beams` that is not a positive integer, or a history this model cannot continue
                (from another model, or its messages and image features no longer match).
        """
        return chat(self, processor, image, question, history=history, **generate_kwargs)


__all__ = [
    "VisCPMChatForConditionalGeneration",
    "VisCPMChatModel",
    "VisCPMChatPreTrainedModel",
]
