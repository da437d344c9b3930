"""The CPM-Bee tokenizer: greedy longest match over a fixed 86,583-entry vocabulary, plus a markup syntax.

CPM-Bee prompts are written in *markup*: `<name>` is a special token and `<<` is a literal `<`. Text between special
tokens is cut greedily, taking at each point the longest vocabulary string (at most 32 characters) that is not a
special token; a run of characters where no vocabulary string matches becomes one unknown piece.

Two levels of ids exist:

- the markup API (`tokenize_markup`, `encode_markup`, `decode_markup`) gives unknown pieces and special tokens
  missing from the vocabulary temporary ids from `vocab_size` on, with an ext table id -> string;
- the model sees a (base id, sub id) pair per token (`encode_model_ids`): an out-of-vocabulary string is embedded
  as its base token (`<unk>`, or `<name>` for a special `<name_k>`) rotated by its sub id, and scored by an extra
  logit column. Model inputs are built from a structured prompt (see `prompt_cpmbee.py`), not from plain `encode`.

The transformers API (`tokenizer(text)`, `encode`, `decode`, `tokenize`) reads plain text literally, so
`decode(encode(text)) == text` for any string; unknown pieces get ids from `vocab_size` on that this instance
remembers, so `decode` can map them back.
"""

import copy
import json
import os
import warnings
from functools import cached_property
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models
from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from .markup_cpmbee import (
    ESCAPE_HINT,
    FILE_SPELLINGS,
    CpmBeeExtTable,
    MarkupPiece,
    escape_markup,
    is_special_name,
    load_vocab,
    split_markup,
)
from .prompt_cpmbee import (
    MAX_CAPTION_TOKENS,
    caption_prompt,
    caption_template,
    collate_prompts,
    model_prompt,
    pad_model_prompts,
    truncate_caption,
)


VOCAB_FILES_NAMES = {"vocab_file": "vocab.txt"}
UNNAMED_EXT_IDS = (
    "{count} id(s) of the text are out-of-vocabulary strings of its prompt (ids >= vocab_size), which only the "
    "prompt's ext table names: they read '<unk>'. model.chat() keeps them; after generate, decode with "
    "processor.decode(ids, ext_table=processor.ext_tables(prompt)[0]); a TextStreamer takes ext_table= as a decode "
    "argument."
)

class CpmBeeTokenizer(PreTrainedTokenizer):
    r"""
    Tokenizer of CPM-Bee, the LLM of VisCPM (see the module docstring for markup and ext ids).

    The vocabulary is fixed: ids from `vocab_size` on name per-input out-of-vocabulary strings, so `add_tokens`
    refuses new tokens, and `decode` shows an id it has never handed out as `<unk>`. Special tokens are the
    vocabulary strings written `<...>`: `<pad>` 0, `<unk>` 1, `<mask>` 2, `<sep>` 3, `<s>` 6, `</s>` 7, `<root>` 8,
    `<ans>` 9, `<option>` 10, `<eod>` 65756.

    Args:
        vocab_file (`str`): One token per line, id = line number; `</n>` stands for a newline, `</_>` for a space.
        split_special_tokens (`bool`, defaults to `True`): Plain text is literal: `"<s>"` in it is three characters.
        prompt_format (`str`, defaults to `"text"`): `"structured"` makes `tokenizer(text)` read each text as a JSON
            CPM-Bee prompt dict (what the VisCPM chat template renders) and return the model's structural inputs.
            The strings behind a prompt's ext ids travel with the prompt, not with the tokenizer: get them with
            `output_ext_tables(prompts)` and pass one to `decode(..., ext_table=...)`; without it an ext id reads
            `<unk>`, so one request's text never shows up in another's answer.
            `"caption"` makes `tokenizer(texts)` put each plain text in VisCPM-Paint's caption prompt (see
            `encode_captions`); its `model_max_length` defaults to 3000 tokens, so that no caption is unbounded.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "<pad>",
        mask_token: str = "<mask>",
        sep_token: str = "<sep>",
        split_special_tokens: bool = True,
        prompt_format: Literal["text", "structured", "caption"] = "text",
        **kwargs,
    ):
        if prompt_format not in ("text", "structured", "caption"):
            raise ValueError(f"prompt_format must be 'text', 'structured' or 'caption', got {prompt_format!r}.")
        self.prompt_format = prompt_format
        self._tokens = load_vocab(vocab_file)
        self._ids = {token: index for index, token in enumerate(self._tokens)}
        if len(self._ids) != len(self._tokens):
            raise ValueError(f"{vocab_file} lists some token twice; every line must be a distinct token.")
        self._special_ids = {index for index, token in enumerate(self._tokens) if is_special_name(token)}
        # Longest non-special vocabulary string per first character: bounds the greedy match.
        self._longest_from: dict[str, int] = {}
        for index, token in enumerate(self._tokens):
            if index not in self._special_ids:
                self._longest_from[token[0]] = max(self._longest_from.get(token[0], 0), len(token))
        self._plain_ext_ids: dict[str, int] = {}  # unknown pieces of plain text seen by this instance
        self._plain_ext_texts: list[str] = []
        named = {bos_token, eos_token, unk_token, pad_token, mask_token, sep_token}
        kwargs.setdefault(
            "extra_special_tokens", [self._tokens[i] for i in sorted(self._special_ids) if self._tokens[i] not in named]
        )
        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            unk_token=unk_token,
            pad_token=pad_token,
            mask_token=mask_token,
            sep_token=sep_token,
            split_special_tokens=split_special_tokens,
            prompt_format=prompt_format,
            **kwargs,
        )
        if prompt_format == "caption":
            self._use_caption_format()

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._ids)

    @cached_property
    def _tokenizer(self) -> Tokenizer:
        """A Rust tokenizer that only decodes, as `decode` does without an ext table (vocabulary strings joined).

        `transformers serve` streams a reply through `tokenizer._tokenizer` and `tokenizers.decoders.DecodeStream`,
        which need a `tokenizers.Tokenizer`; encoding stays in Python (`tokenize_markup`)."""
        backend = Tokenizer(models.WordLevel(vocab=self.get_vocab(), unk_token=self.unk_token))
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in self.all_special_tokens])
        return backend

    # Markup level.

    def tokenize_markup(self, markup: str) -> list[MarkupPiece]:
        """Cuts markup into pieces: special tokens, longest vocabulary matches, and runs of unknown characters.

        Args:
            markup (`str`):
                Text in CPM-Bee markup (`<name>` a special token, `<<` a literal `<`).

        Returns:
            Each piece's text, start (counting `<<` as one character), and whether it is unknown
                or special.

        Raises:
            ValueError: a `<` that is neither `<<` nor a closed `<name>`.
        """
        pieces, offset = [], 0
        for chunk, is_special in split_markup(markup):
            if is_special:
                pieces.append(MarkupPiece(chunk, offset, False, True))
            else:
                pieces.extend(self._cut(chunk, offset))
            offset += len(chunk)
        return pieces

    def _cut(self, text: str, offset: int) -> list[MarkupPiece]:
        pieces, unknown_from, position = [], None, 0
        while position < len(text):
            length = self._match_length(text, position)
            if length == 0:
                if unknown_from is None:
                    unknown_from = position
                position += 1
                continue
            if unknown_from is not None:
                pieces.append(MarkupPiece(text[unknown_from:position], offset + unknown_from, True, False))
                unknown_from = None
            pieces.append(MarkupPiece(text[position : position + length], offset + position, False, False))
            position += length
        if unknown_from is not None:
            pieces.append(MarkupPiece(text[unknown_from:], offset + unknown_from, True, False))
        return pieces

    def _match_length(self, text: str, position: int) -> int:
        """Length of the longest non-special vocabulary string at `position`, 0 if none."""
        for length in range(min(self._longest_from.get(text[position], 0), len(text) - position), 0, -1):
            index = self._ids.get(text[position : position + length])
            if index is not None and index not in self._special_ids:
                return length
        return 0

    def encode_markup(self, markup: str) -> tuple[list[int], dict[int, str]]:
        """Markup -> ids and the ext table: strings outside the vocabulary get ids from `vocab_size` on.

        Args:
            markup (`str`):
                Text in CPM-Bee markup.

        Returns:
            The ids, and the ext table mapping each id >= `vocab_size` to its
                string.

        Raises:
            ValueError: the markup is malformed (see `tokenize_markup`).
        """
        ids, ext_ids = [], {}
        for piece in self.tokenize_markup(markup):
            index = self._ids.get(piece.token)
            if index is None:
                index = ext_ids.setdefault(piece.token, self.vocab_size + len(ext_ids))
            ids.append(index)
        return ids, {index: text for text, index in ext_ids.items()}

    def decode_markup(self, ids: list[int], ext_table: dict[int, str] | None = None) -> str:
        """Ids -> markup that tokenizes back to them: `<` in vocabulary text is doubled, ext ids go through the table.

        The table is looked up first, so it may also rename vocabulary ids (a generation prompt's table maps `<unk>`
        to the first unknown string of the input).

        Args:
            ids (`list[int]`):
                Vocabulary ids and ext ids.
            ext_table (`dict[int, str]`, *optional*):
                The table that came with the ids (from `encode_markup`, or `output_ext_tables`).

        Returns:
            The markup.

        Raises:
            ValueError: an id that is neither in the vocabulary nor in the table.
        """
        ext_table = ext_table or {}
        parts = []
        for index in ids:
            index = int(index)
            if index in ext_table:
                parts.append(ext_table[index])
            elif 0 <= index < self.vocab_size:
                token = self._tokens[index]
                parts.append(token if index in self._special_ids else escape_markup(token))
            else:
                raise ValueError(
                    f"Id {index} is neither in the vocabulary ({self.vocab_size} tokens) nor in the ext table; pass "
                    "the ext table that came with these ids."
                )
        return "".join(parts)

    def encode_model_ids(self, markup: str, ext_table: CpmBeeExtTable) -> tuple[list[int], list[int]]:
        """Markup -> (base ids, sub ids) as the model reads them.

        Args:
            markup (`str`):
                Text in CPM-Bee markup.
            ext_table (`CpmBeeExtTable`):
                The out-of-vocabulary strings of the input, shared by all its texts; new strings are added to it.

        Returns:
            The base id (`<unk>`, or `<name>` for a special `<name_k>`, for a string
                outside the vocabulary) and the sub id (0 for vocabulary tokens) of every piece.

        Raises:
            ValueError: malformed markup, or `"Invalid token ..."` for a special token whose base `<name>` is not in
                the vocabulary.
        """
        ids, subs = [], []
        for piece in self.tokenize_markup(markup):
            index = self._ids.get(piece.token)
            if index is None:
                index = self._base_id(piece)
                subs.append(ext_table.add(piece.token, index))
            else:
                subs.append(0)
            ids.append(index)
        return ids, subs

    def _base_id(self, piece: MarkupPiece) -> int:
        if piece.is_unk:
            return self.unk_token_id
        base = "<" + piece.token[1:-1].split("_", 1)[0] + ">"
        if base not in self._ids:
            raise ValueError(
                f"Invalid token {piece.token} at character {piece.start} (counting '<<' as one): a special token "
                f"outside the vocabulary must be named <name_suffix> after a vocabulary special <name> (such as "
                f"<ans_1>, <mask_2>, <unk_3>), and there is no {base}; {ESCAPE_HINT}."
            )
        return self._ids[base]

    # Structured and caption prompts (prompt_format="structured" or "caption").

    def __call__(self, text=None, *args, **kwargs) -> BatchEncoding:
        if self.prompt_format == "text" or text is None:
            return super().__call__(text, *args, **kwargs)
        if self.prompt_format == "structured":
            return self.encode_structured(text, **kwargs)
        if not kwargs.get("add_special_tokens", True):  # the captions' own tokens, without the prompt around them
            return super().__call__(text, *args, **kwargs)
        return self.encode_captions(text, **kwargs)

    def encode_structured(
        self,
        prompts,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        max_length: int | None = None,
        truncation: bool | None = None,
        **unused,
    ) -> BatchEncoding:
        """CPM-Bee prompt dicts (or their JSON text) -> the inputs of `CpmBeeForCausalLM`, padded into a batch.

        What `tokenizer(prompts)` does with `prompt_format="structured"`.

        Args:
            prompts (`dict`, `str`, or a list of them):
                One prompt or a batch: prompt dicts, or their JSON text (what the chat template renders).
            padding_side (`str`, *optional*):
                `"left"` or `"right"`; defaults to the tokenizer's `padding_side`.
            return_tensors (`str`, *optional*):
                `"pt"` for tensors; lists otherwise.
            max_length (`int`, *optional*):
                Longest prompt accepted, in tokens.
            truncation (`bool`, *optional*):
                Must not be set: structured prompts cannot be truncated.
            unused (`dict[str, Any]`, *optional*):
                Other tokenizer arguments, ignored.

        Returns:
            `input_ids`, `attention_mask` and the structural inputs and ext tables of
                [`CpmBeeModel`]'s `forward`.

        Raises:
            ValueError: `truncation` is asked for, a text is not a JSON prompt dict, a prompt is malformed, or a prompt
                is longer than `max_length`.
        """
        if truncation:
            raise ValueError("Structured CPM-Bee prompts cannot be truncated: shorten the context instead.")
        built = self._model_prompts(prompts, max_length)
        encoded = pad_model_prompts(built, padding_side or self.padding_side)
        return BatchEncoding({k: v if return_tensors else v.tolist() for k, v in encoded.items()}, tensor_type=return_tensors)

    def output_ext_tables(self, prompts, max_length: int | None = None) -> list[dict[int, str]]:
        """Per prompt, the strings of the ext ids its answer may hold, for `decode`.

        Args:
            prompts (`dict`, `str`, or a list of them):
                Prompts as `__call__` takes them (with `prompt_format="structured"`).
            max_length (`int`, *optional*):
                As for `encode_structured`.

        Returns:
            One table per prompt, ext id -> string.
        """
        return [prompt.output_ext_table for prompt in self._model_prompts(prompts, max_length)]

    def _model_prompts(self, prompts, max_length: int | None):
        rows = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        built = []
        for row in rows:
            if isinstance(row, str):
                try:
                    row = json.loads(row)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"With prompt_format='structured' each text must be a JSON CPM-Bee prompt dict ({error}). "
                        "Render chat messages with the chat template (pipelines do so for a list of messages), or "
                        "pass the dict itself."
                    ) from error
            built.append(model_prompt(self, row, max_length=max_length))
        return built

    def encode_captions(
        self,
        texts: str | list[str],
        padding: bool | str = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        **unused,
    ) -> BatchEncoding:
        """Plain texts -> the text encoder's inputs for the original VisCPM-Paint prompts `{'caption': text, 'objects':
        ''}`, right-padded with `<pad>`.

        The prompt's structure is what `add_special_tokens` adds around a text, so `tokenizer(texts,
        add_special_tokens=False)` and `num_special_tokens_to_add()` tell how many tokens truncation dropped, as for
        any tokenizer.

        Args:
            texts (`str` or `list[str]`):
                The captions.
            padding (`bool` or `str`, defaults to `True`):
                Prompts are always padded to the longest; `"max_length"` pads them to `max_length` at least.
            truncation (`bool` or `str`, *optional*):
                A prompt longer than `max_length` (default `model_max_length`) loses caption tokens from its end and
                keeps its structure.
            max_length (`int`, *optional*):
                Length limit for `truncation` and width for `padding="max_length"`.
            padding_side (`str`, *optional*):
                Only `"right"`, as the original pads.
            return_tensors (`str`, *optional*):
                `"pt"` for tensors; lists otherwise.
            unused (`dict[str, Any]`, *optional*):
                Other tokenizer arguments, ignored.

        Returns:
            The model inputs (no ext tables: a text encoder scores no output ids), plus
                `conditioning_mask`, 1 at every position, padding included: the original conditions its UNet on the
                text encoder's states of the `<pad>` rows too, each prompt and its negative padded to the longer of
                the two.

        Raises:
            ValueError: a `padding_side` other than `"right"`.
        """
        if padding_side not in (None, "right"):
            raise ValueError(f"Caption prompts are right-padded, as the original pads them, not {padding_side!r}.")
        prompts = [caption_prompt(self, text) for text in ([texts] if isinstance(texts, str) else texts)]
        if truncation not in (None, False, "do_not_truncate"):
            prompts = [truncate_caption(prompt, max_length or self.model_max_length) for prompt in prompts]
        width = max(len(prompt) for prompt in prompts)
        if padding == "max_length" and max_length is not None:
            width = max(width, max_length)
        inputs = collate_prompts(self, prompts, width).model_inputs()
        del inputs["ext_table_ids"], inputs["ext_table_sub"]  # a text encoder scores no output ids
        inputs["conditioning_mask"] = inputs["attention_mask"].new_ones(inputs["attention_mask"].shape)
        encoded = {k: v if return_tensors else v.tolist() for k, v in inputs.items()}
        return BatchEncoding(encoded, tensor_type=return_tensors)

    def with_caption_format(self) -> "CpmBeeTokenizer":
        """This tokenizer with `prompt_format="caption"` (itself if it has it)."""
        if self.prompt_format == "caption":
            return self
        captions = copy.copy(self)
        captions._use_caption_format()
        return captions

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "CpmBeeTokenizer":
        """As any tokenizer's; the tokenizer of a VisCPM-Paint folder converted before the caption format existed
        (saved as "text") loads in the caption format, which builds the prompts the released model was trained on.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`):
                A tokenizer folder or Hub repo id.
            args (`tuple`, *optional*):
                Passed on to `PreTrainedTokenizer.from_pretrained`.
            kwargs (`dict[str, Any]`, *optional*):
                Passed on likewise (`subfolder` is also where the Paint folder check looks).

        Returns:
            The tokenizer.
        """
        tokenizer = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if tokenizer.prompt_format == "text" and _is_paint_component(folder):
            tokenizer = tokenizer.with_caption_format()
        return tokenizer

    def _use_caption_format(self) -> None:
        self.prompt_format = "caption"
        self.special_tokens_pattern = "prefix_suffix"  # the prompt around a caption counts as its special tokens
        self.prefix_tokens, self.suffix_tokens = caption_template(self)
        self.model_input_names = [
            "input_ids", "attention_mask", "input_id_subs", "context", "segment_ids", "segment_rel_offset",
            "num_segments", "segment_rel",
        ]  # fmt: skip
        if self.model_max_length >= VERY_LARGE_INTEGER:  # no limit given
            self.model_max_length = MAX_CAPTION_TOKENS

    def decode(self, token_ids, skip_special_tokens: bool = False, ext_table: dict[int, str] | None = None, **kwargs):
        """Ids -> text, reading a structured prompt's ext ids through its table.

        Args:
            token_ids (`int`, `list[int]`, `torch.Tensor`, or a batch):
                The ids; a batch (a list of lists) gives a list of texts.
            skip_special_tokens (`bool`, defaults to `False`):
                Leave out special tokens.
            ext_table (`dict[int, str]`, *optional*):
                From `output_ext_tables`: maps a structured prompt's ext ids back to their strings. Without it, with
                `prompt_format="structured"`, an ext id reads `<unk>`, with a warning.
            kwargs (`dict[str, Any]`, *optional*):
                As for any tokenizer's `decode`.

        Returns:
            (`str` or `list[str]`): The text, or one per row of a batch.
        """
        ids = token_ids.tolist() if hasattr(token_ids, "tolist") else [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if ids and isinstance(ids[0], list):  # a batch, as transformers' decode accepts
            return [self.decode(row, skip_special_tokens, ext_table, **kwargs) for row in ids]
        if self.prompt_format == "structured":  # ext ids name per-prompt strings: only the prompt's table knows them
            unnamed = [i for i in map(int, ids) if i >= self.vocab_size and i not in (ext_table or {})]
            if unnamed:
                warnings.warn(UNNAMED_EXT_IDS.format(count=len(unnamed)), stacklevel=2)
            ext_table = {i: self.unk_token for i in unnamed} | (ext_table or {})
        if not ext_table:
            return super().decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)
        special = set(self.all_special_ids)
        return "".join(
            ext_table[i] if i in ext_table else "" if skip_special_tokens and i in special else self._convert_id_to_token(i)
            for i in map(int, ids)
        )

    def batch_decode(
        self, sequences, skip_special_tokens: bool = False, ext_tables: list[dict[int, str]] | None = None, **kwargs
    ) -> list[str]:
        """`decode` over a batch, each row with its own ext table.

        Args:
            sequences (`list[list[int]]` or `torch.Tensor`):
                The rows of ids.
            skip_special_tokens (`bool`, defaults to `False`):
                Leave out special tokens.
            ext_tables (`list[dict[int, str]]`, *optional*):
                One table per row (see `decode`).
            kwargs (`dict[str, Any]`, *optional*):
                As for `decode`.

        Returns:
            The texts.
        """
        tables = ext_tables or [None] * len(sequences)
        return [
            self.decode(row, skip_special_tokens=skip_special_tokens, ext_table=table, **kwargs)
            for row, table in zip(sequences, tables)
        ]

    # Plain-text level (the transformers API).

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [piece.token for piece in self.tokenize_markup(escape_markup(text))]

    def _convert_token_to_id(self, token: str) -> int:
        index = self._ids.get(token)
        if index is None:
            index = self._plain_ext_ids.get(token)
        if index is None:
            index = self._plain_ext_ids[token] = self.vocab_size + len(self._plain_ext_texts)
            self._plain_ext_texts.append(token)
        return index

    def _convert_id_to_token(self, index: int) -> str:
        if 0 <= index < self.vocab_size:
            return self._tokens[index]
        if 0 <= index - self.vocab_size < len(self._plain_ext_texts):
            return self._plain_ext_texts[index - self.vocab_size]
        return self.unk_token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        unknown = [str(token) for token in new_tokens or [] if str(token) not in self._ids]
        if unknown:
            raise ValueError(
                f"Cannot add {unknown}: CPM-Bee's vocabulary is fixed and ids from {self.vocab_size} on are the "
                "per-input ext columns. Out-of-vocabulary strings need no registration: they are encoded as ext ids."
            )
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (f"{filename_prefix}-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(path, "w", encoding="utf-8", newline="") as file:
            file.write("\n".join(FILE_SPELLINGS.get(token, token) for token in self._tokens))
        return (path,)


def _is_paint_component(folder: str) -> bool:
    """Whether `folder` is the tokenizer of a saved VisCPM-Paint pipeline (its parent's model_index.json names it)."""
    folder = os.path.normpath(folder)
    index = os.path.join(os.path.dirname(folder), "model_index.json")
    if not os.path.isfile(index):
        return False
    with open(index, encoding="utf-8") as file:
        entries = json.load(file)
    return entries.get("_class_name") == "VisCPMPaintPipeline" and entries.get(os.path.basename(folder)) == [
        "viscpm_hf", "CpmBeeTokenizer"
    ]


__all__ = ["CpmBeeTokenizer"]
