"""VisCPM-Chat processor: the paper's image preprocessing, a tokenizer, and the chat template."""

from importlib import resources
from typing import Any

from transformers import ProcessorMixin, SiglipImageProcessorPil

from ..image_inputs import load_images


def default_chat_template() -> str:
    return resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def paper_image_processor(image_size: int = 224) -> SiglipImageProcessorPil:
    """The paper's preprocessing: bicubic resize to a square, no crop, mean = std = 0.5."""
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
        image_processor: The image processor; [`paper_image_processor`] when building a new processor.
        tokenizer: Any tokenizer that has `image_token` as a single token.
        chat_template (`str`, *optional*): Defaults to the packaged `chat_template.jinja`.
        image_token (`str`, defaults to `"<image>"`): The image placeholder.
        num_image_tokens (`int`, defaults to 64): Image tokens per image; must equal the model's `num_query_tokens`.
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
        if texts is not None and (len(texts) == 0 or any(isinstance(t, str) and not t.strip() for t in texts)):
            raise ValueError("The text is empty: give a question or a prompt (it may contain '<image>').")
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs: Any):
        """transformers' `apply_chat_template`, with the tokenizer's `<bos>` written by the template.

        A tokenizer that prepends `<bos>` (gemma, llama) saw it in pretraining; the template writes it (`prepend_bos`)
        so the rendered text is the whole prompt, and it is tokenized with no special tokens added, as TRL's trainers
        do. Training and `chat()` then see the same ids (measured: gemma-3-270m with a bridge trained without `<bos>`
        named 63% of the emoji asked without it, 7% asked with it).
        """
        kwargs.setdefault("prepend_bos", self.tokenizer_prepends_bos)
        if kwargs.get("tokenize"):
            kwargs["processor_kwargs"] = {"add_special_tokens": False, **(kwargs.get("processor_kwargs") or {})}
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    @property
    def tokenizer_prepends_bos(self) -> bool:
        """Whether the tokenizer's `tokenizers` pipeline starts every text with `<bos>` (gemma, llama) or not (SmolLM2,
        Qwen2). CPM-Bee's tokenizer has no such pipeline; its prompts have their own structure and template."""
        backend, bos = getattr(self.tokenizer, "backend_tokenizer", None), self.tokenizer.bos_token_id
        return backend is not None and bos is not None and backend.encode("a").ids[:1] == [bos]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.image_token * self.num_image_tokens

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + ["pixel_values"]))


__all__ = ["VisCPMChatProcessor", "paper_image_processor"]
