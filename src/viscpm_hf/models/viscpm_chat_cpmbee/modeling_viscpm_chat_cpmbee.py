"""The released VisCPM-Chat: the generic VisCPM-Chat with what CPM-Bee needs, carried by its own model class.

- `forward` names CPM-Bee's structural inputs (segments, context, relation and ext tables), so `generate` validates
  and passes them like any model input, and refuses labels that TRL's generic collator puts on the bidirectional
  prompt;
- `generate` applies the original's decoding (`cpmbee_decoding` of the generation config, merged as transformers
  merges its own fields; the original beam search; a streamer fed with the final beam answer);
- the attention comes from the prompt structure, so a static cache gets the 2D padding mask, not a 4D causal one.
"""

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from ..cpmbee.modeling_cpmbee import generate_with_cpmbee_decoding
from ..viscpm_chat.modeling_viscpm_chat import (
    VisCPMChatCausalLMOutputWithPast,
    VisCPMChatForConditionalGeneration,
    VisCPMChatModel,
    VisCPMChatModelOutputWithPast,
)
from .configuration_viscpm_chat_cpmbee import VisCPMChatCpmBeeConfig


TRAIN_WITH = (
    "train it with viscpm_hf.training.cpmbee.CpmBeeChatCollator (labels on exactly the answer) and ModelLossSFTTrainer "
    "(the model's own loss, with CPM-Bee's head scaling and ext columns), as examples/train_chat.py does"
)


class VisCPMChatCpmBeeModel(VisCPMChatModel):
    """The backbone (no head). Its hidden states are not logits under `lm_head.weight` alone (CPM-Bee divides by
    sqrt(hidden_size) and adds a column per ext-table entry), so it refuses to run in training: that is how TRL's
    fused-head loss would train it."""

    config: VisCPMChatCpmBeeConfig

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, *args, **kwargs) -> VisCPMChatModelOutputWithPast:
        """[`VisCPMChatModel`]'s `forward`, refused in training with gradients.

        Args:
            args (`tuple`, *optional*):
                As for [`VisCPMChatModel`]'s `forward`.
            kwargs (`dict[str, Any]`, *optional*):
                As for [`VisCPMChatModel`]'s `forward`, CPM-Bee's structural inputs included.

        Returns:
            The backbone's outputs.

        Raises:
            ValueError: called in training mode with gradients enabled (train the model with its head instead).
        """
        if self.training and torch.is_grad_enabled():
            raise ValueError(
                "The VisCPM-Chat backbone on CPM-Bee was called to train from its hidden states, as TRL's SFTTrainer "
                f"does with its fused LM head; that trains a different objective: {TRAIN_WITH}."
            )
        return super().forward(*args, **kwargs)


class VisCPMChatCpmBeeForConditionalGeneration(VisCPMChatForConditionalGeneration):
    """VisCPM-Chat on CPM-Bee (the released model); `viscpm-convert chat` writes its folders."""

    config: VisCPMChatCpmBeeConfig
    base_model_class = VisCPMChatCpmBeeModel

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        """transformers' `generate` with this call's `cpmbee_decoding` (the call's argument, else the passed
        generation config's, else the model's): the original's logit rules, and with beams its beam search, whose
        final answer a streamer receives when it is known.

        Args:
            inputs (`torch.Tensor`, *optional*):
                The prompt's ids (or pass `input_ids`).
            kwargs (`dict[str, Any]`, *optional*):
                The processor's other outputs (`pixel_values`, structural inputs, ext tables), generation options as
                for any model, and `cpmbee_decoding` (`{"temperature": ..., "repetition_penalty": ...}`; None turns
                the original's rules off for the call).

        Returns:
            (`torch.LongTensor` or `GenerateOutput`): The generated ids, prompt included (a `GenerateOutput` with
                `return_dict_in_generate=True`); ids >= `vocab_size` name strings of the prompt's ext table (see
                [`VisCPMChatCpmBeeProcessor`]).

        Raises:
            ValueError: a `streamer` with a batch of several prompts, or `num_beams` that is not a positive integer.
        """
        if (inputs if inputs is not None else kwargs.get("input_ids")) is None:
            return super().generate(inputs, **kwargs)
        return generate_with_cpmbee_decoding(
            super().generate, self.config.text_config, self.generation_config, inputs, kwargs
        )

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
        input_id_subs: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        segment_rel_offset: torch.Tensor | None = None,
        num_segments: torch.Tensor | None = None,
        segment_rel: torch.Tensor | None = None,
        ext_table_ids: torch.Tensor | None = None,
        ext_table_sub: torch.Tensor | None = None,
        **kwargs,
    ) -> VisCPMChatCausalLMOutputWithPast:
        """CPM-Bee's logits (vocabulary and ext columns) and loss over a prompt with images.

        The structural inputs (`input_id_subs` to `ext_table_sub`) are [`CpmBeeModel`]'s (what the processor returns).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                The prompt's ids, each image's placeholder expanded to `num_query_tokens` image tokens.
            pixel_values (`torch.Tensor` of shape `(num_images, channels, height, width)`, *optional*):
                The prompt's images, in the order of their placeholders.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding.
            position_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Starts of packed sequences in padding-free batches.
            cache (`Cache`, *optional*):
                Key/value cache from earlier steps (formerly `past_key_values`).
            inputs_embeds (`torch.Tensor` of shape `(batch_size, sequence_length, hidden_size)`, *optional*):
                The LLM's input embeddings instead of `input_ids`.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Targets (shifted inside, -100 ignored), on answer tokens only (context 0): a label on the
                bidirectional prompt would teach the model to copy what it sees.
            logits_to_keep (`int` or `torch.Tensor`, defaults to 0):
                Logits of the last `logits_to_keep` positions only (0: all), or of the given indices.
            mm_encoder_outputs (`dict[str, BaseModelOutputWithPooling]`, *optional*):
                Precomputed image features instead of `pixel_values`.
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
                Base id of each ext column.
            ext_table_sub (`torch.Tensor` of shape `(batch_size, num_ext)`, *optional*):
                Sub id of each ext column.
            kwargs (`dict[str, Any]`, *optional*):
                Passed on to CPM-Bee.

        Returns:
            The loss, logits, cache, hidden states and attentions, and
                `image_hidden_states`, the bridge outputs of this call's images.

        Raises:
            ValueError: `labels` on prompt tokens (context 1).
        """
        if labels is not None and context is not None:
            on_prompt = (labels[:, : context.shape[1]] != -100) & context.to(labels.device).bool()
            if bool(on_prompt.any()):
                raise ValueError(
                    f"{int(on_prompt.sum())} of {int((labels != -100).sum())} labels sit on the prompt, which CPM-Bee "
                    f"reads in both directions (context 1); only answer tokens can be learned: {TRAIN_WITH}."
                )
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
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


__all__ = ["VisCPMChatCpmBeeForConditionalGeneration", "VisCPMChatCpmBeeModel"]
