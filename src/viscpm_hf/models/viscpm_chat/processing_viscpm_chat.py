"""VisCPM-Chat processor: the paper's image preprocessing, a tokenizer, and the chat template."""

import unicodedata
from collections.abc import Mapping
from importlib import resources
from typing import Any

from transformers import ProcessorMixin, SiglipImageProcessorPil

from ...image_inputs import load_images


def default_chat_template() -> str:
    return resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


ROLES = ("system", "user", "assistant")
ITEM_TYPES = ("text", "image", "image_url")  # image_url: OpenAI's form, which transformers turns into an image item


def message_text(message: Mapping) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(i["text"] for i in content if i["type"] == "text")


def is_blank(text: str) -> bool:
    """Whether `text` shows nothing: whitespace and invisible format characters only (zero-width space, ZWJ, ZWNJ,
    word joiner, BOM: Unicode category Cf), which would reach the model as an empty question."""
    return all(char.isspace() or unicodedata.category(char) == "Cf" for char in text)


def check_valid_unicode(text: str, where: str) -> None:
    """Refuses text the tokenizers cannot encode (a lone surrogate, e.g. from bytes decoded with "surrogateescape"),
    which would otherwise fail inside the tokenizer with a TypeError that names neither the text nor the fix."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{where} is not valid Unicode text: it holds the lone surrogate U+{ord(text[error.start]):04X} at "
            f"position {error.start}. Decode the text with errors='replace' on the client side (e.g. "
            "data.decode('utf-8', errors='replace')), or remove the character."
        ) from None


def check_conversation(conversation: Any) -> None:
    """Refuses what the chat templates would silently drop or garble (an unknown role, a `None` text turning into the
    question "None", a user turn without a question) or the tokenizer fail on (text that is not valid Unicode), naming
    the message and the fix.

    Args:
        conversation (`list[dict]`):
            Messages in the transformers chat format, or a batch of such lists.

    Raises:
        ValueError: an empty conversation, an unknown role or item type, a message without content, a text item
            without text, a user message without text, or text that is not valid Unicode.
        TypeError: a message that is not a dict, content that is neither a string nor a list, or a text that is not a
            string.
    """
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(
            f"The conversation is {conversation!r}: pass a non-empty list of messages such as "
            "[{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What is it?'}]}]."
        )
    if isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"):  # a batch
        for number, chat in enumerate(conversation):
            try:
                check_conversation(getattr(chat, "messages", chat))
            except (TypeError, ValueError) as error:
                raise type(error)(f"Conversation {number} of the batch: {error}") from error
        return
    for index, message in enumerate(conversation):
        where = f"Message {index}"
        if not isinstance(message, Mapping):
            raise TypeError(f"{where} is a {type(message).__name__}; a message is a dict with 'role' and 'content'.")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where} has role {role!r}; use one of {ROLES} ('bot' or 'gpt' is 'assistant').")
        content = message.get("content")
        if content is None:
            raise ValueError(f"{where} ({role}) has no 'content': give its text, or a list of text and image items.")
        if not isinstance(content, (str, list, tuple)):
            raise TypeError(
                f"{where} ({role}) has content of type {type(content).__name__}; give a string, or a list of items "
                "such as [{'type': 'image'}, {'type': 'text', 'text': 'What is it?'}]."
            )
        for number, item in enumerate([] if isinstance(content, str) else content):
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind not in ITEM_TYPES:
                raise ValueError(
                    f"{where} ({role}), item {number} is {item!r}; an item is a dict with 'type' one of {ITEM_TYPES}."
                )
            if kind == "text" and not isinstance(item.get("text"), str):
                raise (ValueError if item.get("text") is None else TypeError)(
                    f"{where} ({role}), item {number} has text {item.get('text')!r}; give the text as a string, or "
                    "drop the item."
                )
            if kind == "text":
                check_valid_unicode(item["text"], f"{where} ({role}), item {number}")
        if isinstance(content, str):
            check_valid_unicode(content, f"{where} ({role})")
        if role == "user" and is_blank(message_text(message)):
            raise ValueError(
                f"{where} (user) has no text: add the question, e.g. {{'type': 'text', 'text': 'Describe it.'}} "
                "(whitespace and invisible characters such as zero-width spaces are no text)."
            )


def paper_image_processor(image_size: int = 224) -> SiglipImageProcessorPil:
    """The paper's preprocessing: bicubic resize to a square, no crop, mean = std = 0.5.

    Args:
        image_size (`int`, defaults to 224):
            Side of the square the images are resized to.

    Returns:
        The image processor.
    """
    return SiglipImageProcessorPil(
        size={"height": image_size, "width": image_size},
        resample=3,  # PIL bicubic
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


class VisCPMChatProcessor(ProcessorMixin):
    r"""
    Prepares images and text for [`VisCPMChatForConditionalGeneration`]: each `<image>` placeholder in the text
    becomes `num_image_tokens` image tokens (the bridge's query count), and the images become `pixel_values`.

    Args:
        image_processor (`BaseImageProcessor`):
            The image processor; [`paper_image_processor`] when building a new processor.
        tokenizer (`PreTrainedTokenizerBase`):
            Any tokenizer that has `image_token` as a single token.
        chat_template (`str`, *optional*):
            Defaults to the packaged `chat_template.jinja`.
        image_token (`str`, defaults to `"<image>"`):
            The image placeholder.
        num_image_tokens (`int`, defaults to 64):
            Image tokens per image; must equal the model's `num_query_tokens`.

    Raises:
        ValueError: the tokenizer has no `image_token` token (the message says how to add it).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        num_image_tokens: int = 64,
        **kwargs,
    ):
        if chat_template is None:
            chat_template = default_chat_template()
        self.image_token = image_token
        self.num_image_tokens = num_image_tokens
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {image_token!r} token: add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}}) "
                "and resize the model's embeddings."
            )
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if images is not None:
            images = load_images(images)
        return super().prepare_inputs_layout(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        texts = [text] if isinstance(text, str) else text
        if texts is not None and (len(texts) == 0 or any(isinstance(t, str) and is_blank(t) for t in texts)):
            raise ValueError(
                "The text is empty (or only whitespace and invisible characters): give a question or a prompt (it "
                "may contain '<image>')."
            )
        for number, sample in enumerate(texts or []):
            if isinstance(sample, str):
                check_valid_unicode(sample, "text" if len(texts) == 1 else f"text[{number}]")
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs: Any):
        """transformers' `apply_chat_template` on a checked conversation (`check_conversation`), with the tokenizer's
        `<bos>` written by the template.

        Message text is what people wrote, never an image placeholder: a template may escape it (then a literal
        placeholder reaches the model as text). A template that writes text as is (the generic one) would turn a literal
        `<image>` into an image's place; that raises, unless `sanitize_control_tokens=True` (with `tokenize=True`) has
        transformers encode it as plain text.

        A tokenizer that prepends `<bos>` (gemma, llama) saw it in pretraining; the template writes it (`prepend_bos`)
        so the rendered text is the whole prompt, and it is tokenized with no special tokens added, as TRL's trainers
        do. Training and `chat()` then see the same ids: a bridge asked otherwise than it was trained loses most of its
        answers (measured in the MPM experiments, `docs/mpm.md`).

        Args:
            conversation (`list[dict]`):
                Messages in the transformers chat format (`{"type": "image"}` items for the images), or a batch of
                such lists.
            chat_template (`str`, *optional*):
                A template instead of the processor's.
            kwargs (`dict[str, Any]`, *optional*):
                As for transformers' `apply_chat_template` (`add_generation_prompt`, `tokenize`, `return_dict`,
                `return_tensors`, `sanitize_control_tokens`, ...).

        Returns:
            (`str`, `list[int]` or `BatchFeature`): The rendered text, or with `tokenize=True` its ids; with
                `return_dict=True` too, all the model inputs (`pixel_values` included).

        Raises:
            ValueError: the conversation fails `check_conversation`, or a message's text holds the image placeholder
                that the template would write as is.
            TypeError: a message or its content of the wrong type (see `check_conversation`).
        """
        check_conversation(conversation)
        if not kwargs.get("sanitize_control_tokens"):
            self.check_no_placeholder_in_text(conversation, chat_template)
        if self.tokenizer_prepends_bos:  # only then: a template without the variable would pass it on to __call__
            kwargs.setdefault("prepend_bos", True)
        if kwargs.get("tokenize"):
            kwargs["processor_kwargs"] = {"add_special_tokens": False, **(kwargs.get("processor_kwargs") or {})}
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    def check_no_placeholder_in_text(self, conversation: list, chat_template: str | None = None) -> None:
        """Raises if a message's text holds the image token and the template writes it unescaped (a probe tells).

        Args:
            conversation (`list`):
                Messages, or a batch of message lists.
            chat_template (`str`, *optional*):
                The template to probe; the processor's by default.

        Raises:
            ValueError: naming the message, and the two ways out (image items, or `sanitize_control_tokens=True`).
        """
        batched = isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")
        chats = [getattr(chat, "messages", chat) for chat in conversation] if batched else [conversation]
        found = next(
            ((number, index) for number, chat in enumerate(chats) for index, message in enumerate(chat)
             if self.image_token in message_text(message)),
            None,
        )  # fmt: skip
        if found is None:
            return
        probe = [{"role": "user", "content": [{"type": "text", "text": self.image_token}]}]
        if self.image_token not in super().apply_chat_template(probe, chat_template):
            return  # the template escapes user text
        where = f"Conversation {found[0]}, message {found[1]}" if batched else f"Message {found[1]}"
        raise ValueError(
            f"{where}'s text contains {self.image_token!r}, the image placeholder, which this chat template writes "
            f"as is: it would take an image's place. Give each image as a {{'type': 'image'}} item and leave "
            f"{self.image_token!r} out of the text, or pass sanitize_control_tokens=True (with tokenize=True) to "
            "have it read as plain text."
        )

    @property
    def tokenizer_prepends_bos(self) -> bool:
        """Whether the tokenizer's `tokenizers` pipeline starts every text with `<bos>` (gemma, llama) or not (SmolLM2,
        Qwen2). A tokenizer without such a pipeline writes its prompts its own way."""
        backend, bos = getattr(self.tokenizer, "backend_tokenizer", None), self.tokenizer.bos_token_id
        return backend is not None and bos is not None and backend.encode("a").ids[:1] == [bos]

    def answer_decode_kwargs(self, conversation: list[dict]) -> dict[str, Any]:
        """What `decode` needs besides the ids to read an answer to `conversation`.

        Nothing for a tokenizer whose ids name the same strings in every prompt. `chat()` passes these to `decode`
        and to a `TextStreamer`.

        Args:
            conversation (`list[dict]`):
                The messages of the prompt (rendered with a generation prompt).

        Returns:
            Keyword arguments of `decode`; empty here.
        """
        return {}

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.image_token * self.num_image_tokens

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + ["pixel_values"]))


__all__ = ["VisCPMChatProcessor", "check_conversation", "paper_image_processor"]
