"""The processor of the released VisCPM-Chat: the generic one, plus the ext tables that name what CPM-Bee writes.

CPM-Bee scores out-of-vocabulary strings of a prompt (an emoji, a rare character) with one extra logit column each,
so an answer may hold ids >= vocab_size that only that prompt's ext table names. The table is a property of the
prompt, never of the tokenizer: every decoding entry point here takes it.
"""

from typing import Any

from ..viscpm_chat.processing_viscpm_chat import VisCPMChatProcessor


class VisCPMChatCpmBeeProcessor(VisCPMChatProcessor):
    r"""
    [`VisCPMChatProcessor`] for [`VisCPMChatCpmBeeForConditionalGeneration`]: a `CpmBeeTokenizer` with
    `prompt_format="structured"` and the chat template that renders the original's prompt dict.

    `ext_tables(prompts)` gives, per prompt (rendered text or a conversation), the table of its out-of-vocabulary
    strings; `decode(ids, ext_table=...)`, `batch_decode(..., ext_tables=...)` and
    `post_process_image_text_to_text(..., ext_tables=...)` read answers with them. Without a table such ids read
    `<unk>`, with a warning.
    """

    def ext_tables(self, prompts) -> list[dict[int, str]]:
        """Per prompt, the strings of the ext ids its answer may hold.

        Args:
            prompts (`str`, `list[str]`, or `list[dict]`):
                Rendered prompt text (one or a list), or a conversation (a list of messages) as
                `apply_chat_template` takes it, rendered here with a generation prompt.

        Returns:
            One table per prompt, ext id -> string, for `decode(ids, ext_table=...)`.
        """
        if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict):
            prompts = self.apply_chat_template(list(prompts), add_generation_prompt=True)
        return self.tokenizer.output_ext_tables(prompts)

    def answer_decode_kwargs(self, conversation: list[dict]) -> dict[str, Any]:
        return {"ext_table": self.ext_tables(conversation)[0]}

    def post_process_image_text_to_text(
        self, generated_outputs, skip_special_tokens: bool = True, ext_tables: list[dict[int, str]] | None = None, **kwargs
    ) -> list[str]:
        """Decodes generated ids, each row with its prompt's ext table.

        Args:
            generated_outputs (`torch.Tensor` or `list[list[int]]`):
                The generated ids, one row per prompt.
            skip_special_tokens (`bool`, defaults to `True`):
                Leave out special tokens.
            ext_tables (`list[dict[int, str]]`, *optional*):
                One table per row, from `ext_tables`; without them ext ids read `<unk>`, with a warning.
            kwargs (`dict[str, Any]`, *optional*):
                Passed on to the tokenizer's `batch_decode`.

        Returns:
            The texts.
        """
        return self.tokenizer.batch_decode(
            generated_outputs, skip_special_tokens=skip_special_tokens, ext_tables=ext_tables, **kwargs
        )


__all__ = ["VisCPMChatCpmBeeProcessor"]
