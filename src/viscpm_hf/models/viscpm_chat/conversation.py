"""Multi-turn chat in one call, reusing the bridge outputs of images already seen.

The original VisCPM returned `(answer, context, vision_hidden_states)` and took the last two back in the next
turn; `VisCPMChatHistory` carries the same state (messages in the transformers chat format, and the image
features of every image in them, in order).
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import TextStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .processing_viscpm_chat import check_conversation, check_valid_unicode, is_blank


if TYPE_CHECKING:
    from .modeling_viscpm_chat import VisCPMChatForConditionalGeneration
    from .processing_viscpm_chat import VisCPMChatProcessor


@dataclass
class VisCPMChatHistory:
    """The conversation so far, as [`VisCPMChatForConditionalGeneration`]'s `chat` returns and takes it back.

    Attributes:
        messages (`list[dict[str, Any]]`):
            The messages in the transformers chat format, answers included; image items hold their images.
        image_features (`torch.Tensor`, *optional*):
            The bridge outputs of every image in `messages`, in order, `(num_images, num_query_tokens, hidden_size)`;
            None before the first image.
    """

    messages: list[dict[str, Any]] = field(default_factory=list)
    image_features: torch.Tensor | None = None


def check_num_beams(num_beams: Any) -> None:
    """Refuses a `num_beams` that is not a positive integer.

    transformers 5.24 neither validates `num_beams` (GenerationConfig.validate accepts 0) nor fails clearly on it
    (0 divides by zero, -1 makes a tensor of negative size).

    Args:
        num_beams (`int`, *optional*):
            The value to check; None passes.

    Raises:
        ValueError: `num_beams` is not an `int` (a `bool` is not one) or is below 1.
    """
    if num_beams is not None and (isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1):
        raise ValueError(
            f"num_beams must be a positive integer (1: greedy or sampling, more: beam search); got {num_beams!r}."
        )


def check_history(model: "VisCPMChatForConditionalGeneration", history: VisCPMChatHistory) -> None:
    """Refuses a history this model cannot continue: image features of another shape than this model's bridge makes
    (a history from another model folder), or not one per image of its messages.

    Args:
        model ([`VisCPMChatForConditionalGeneration`]):
            The model that would continue the conversation.
        history ([`VisCPMChatHistory`]):
            The history passed to `chat`.

    Raises:
        ValueError: the image features have another shape, or count another number of images than the messages
            hold, or the messages fail `check_conversation`.
    """
    features = history.image_features
    if features is None:
        return
    model.model.check_image_features(
        features,
        name="The history's image features",
        fix="The history comes from another model: start a new conversation with this model (history=None), or "
        "continue this one with the model that made it.",
    )
    if history.messages:
        check_conversation(history.messages)
    num_images = sum(
        item["type"] in ("image", "image_url")
        for message in history.messages
        if not isinstance(message["content"], str)
        for item in message["content"]
    )
    if num_images != features.shape[0]:
        raise ValueError(
            f"The history's messages hold {num_images} images but its image_features {features.shape[0]}: pass "
            "back the history that chat() returned, unchanged, or start a new conversation (history=None)."
        )


def chat(
    model: "VisCPMChatForConditionalGeneration",
    processor: "VisCPMChatProcessor",
    image: Any,
    question: str,
    history: VisCPMChatHistory | None = None,
    **generate_kwargs: Any,
) -> tuple[str, VisCPMChatHistory]:
    """Answers `question` about `image`: what [`VisCPMChatForConditionalGeneration`]'s `chat` does.

    Args:
        model ([`VisCPMChatForConditionalGeneration`]):
            The model that answers.
        processor ([`VisCPMChatProcessor`]):
            Its processor.
        image (`PIL.Image.Image`, `str`, `list`, or `None`):
            One image (a PIL image, a path or URL, an array or tensor), a list of them, or None to keep talking about
            earlier images.
        question (`str`):
            The question.
        history ([`VisCPMChatHistory`], *optional*):
            What an earlier call returned; None starts a new conversation.
        generate_kwargs (`dict[str, Any]`, *optional*):
            Passed on to `generate`.

    Returns:
        The answer and the conversation with it.

    Raises:
        ValueError: an empty or invalid question, `num_beams` that is not a positive integer, or a history this model
            cannot continue.
    """
    if not isinstance(question, str) or is_blank(question):
        raise ValueError(
            f"The question is empty ({question!r}; whitespace and invisible characters count as nothing): ask "
            "something about the image."
        )
    check_valid_unicode(question, "The question")
    config = generate_kwargs.get("generation_config") or model.generation_config
    check_num_beams(generate_kwargs.get("num_beams", config.num_beams))
    history = history or VisCPMChatHistory()
    check_history(model, history)
    new_images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    content = [{"type": "image", "image": img} for img in new_images] + [{"type": "text", "text": question}]
    messages = [*history.messages, {"role": "user", "content": content}]

    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(model.device)
    pixel_values = inputs.pop("pixel_values", None)

    image_features = history.image_features
    num_seen = 0 if image_features is None else image_features.shape[0]
    if new_images:
        new_features = model.get_image_features(pixel_values[num_seen:]).pooler_output
        image_features = new_features if image_features is None else torch.cat([image_features, new_features])
    if image_features is not None:
        generate_kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=image_features)}

    decode_kwargs = processor.answer_decode_kwargs(messages)
    streamer = generate_kwargs.get("streamer")
    if isinstance(streamer, TextStreamer):  # it decodes as the answer below does
        streamer.decode_kwargs = {**decode_kwargs, **streamer.decode_kwargs}
    output_ids = model.generate(**inputs, **generate_kwargs)
    prompt_length = inputs["input_ids"].shape[1]
    answer = processor.decode(output_ids[0, prompt_length:], skip_special_tokens=True, **decode_kwargs).strip()
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return answer, VisCPMChatHistory(messages=messages, image_features=image_features)
