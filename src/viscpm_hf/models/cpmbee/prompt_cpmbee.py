"""CPM-Bee structured prompts: a nested dict of markup strings flattened into the token-level arrays CPM-Bee reads.

The dict is a tree of segments in depth-first order: segment 0 is the root (`<root>`), then every key is a segment
followed by its value (a string leaf, or the segments of a nested dict). A segment is `<s> tokens </s>`, except a
leaf under the top-level `<ans>` key: that one is *predicted* (context 0, no `</s>`, the model writes it). Attention
between two segments is biased by how they sit in the tree (`segment_rel`).

Three layouts are built here, each as the original VisCPM builds it:

- `flatten_prompt`: the dict as is (the training layout; an empty answer is a bare `<s>` with context 0);
- `flatten_prompt_for_generation`: empty answers become placeholders `<ans_1>`, ... and predicted tokens are left
  out, so the prompt ends where generation starts;
- `collate_prompts` / `paint_prompts`: right-padded batches with next-token targets (training and VisCPM-Paint);
- `caption_prompt` / `truncate_caption`: VisCPM-Paint's caption prompt, and how an over-long one is cut;
- `model_prompt` / `pad_model_prompts`: the layout transformers models read, where the sequence runs on into the
  answer (its `<s>` when generating, the whole answer and `</s>` when training) and labels shift inside the model;
- `flat_prompt_structure`: the structural inputs of such a generation prompt recovered from its ids alone, for
  callers that pass only `input_ids` (transformers' `pipeline("text-generation")`).

Strings in the dict are markup (see `tokenization_cpmbee.py`): a literal `<` must be written `<<`.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources
from typing import TYPE_CHECKING

import torch

from .markup_cpmbee import CpmBeeExtTable, escape_markup


if TYPE_CHECKING:
    from .tokenization_cpmbee import CpmBeeTokenizer


ANSWER_KEY = "<ans>"
IMAGE_KEY = "image"
MAX_RELATION_DEPTH = 7  # depths below the common ancestor are clipped here in segment_rel
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PromptTokenIds:
    """The vocabulary ids that delimit a flattened prompt, read from the tokenizer or the model config."""

    unk: int
    bos: int
    eos: int
    root: int
    answer: int

    @classmethod
    def of_tokenizer(cls, tokenizer: "CpmBeeTokenizer") -> "PromptTokenIds":
        unk, bos, eos, root, answer = tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<root>", ANSWER_KEY])
        return cls(unk=unk, bos=bos, eos=eos, root=root, answer=answer)

    @classmethod
    def of_config(cls, config) -> "PromptTokenIds":
        """From a [`CpmBeeConfig`] (its `unk_token_id`, `bos_token_id`, ... as the converter wrote them)."""
        return cls(
            unk=config.unk_token_id,
            bos=config.bos_token_id,
            eos=config.eos_token_id,
            root=config.root_token_id,
            answer=config.answer_token_id,
        )


@dataclass
class PromptSegment:
    """One node of the prompt tree: a key or a string value."""

    markup: str
    parent: int | None
    depth: int
    predicted: bool
    where: str  # for error messages
    is_image: bool = False


@dataclass
class CpmBeePrompt:
    """One flattened structured prompt, without a batch axis; every per-token list has one entry per token."""

    input_ids: list[int]
    input_id_subs: list[int]
    context: list[int]  # 1: prompt token, visible to every token; 0: predicted token, causal
    segment_ids: list[int]
    segment_rel: list[int]  # (num_segments * num_segments) flattened, row = query segment, column = key segment
    num_segments: int
    ext_table: CpmBeeExtTable
    image_bound: list[tuple[int, int]]  # [start, end) of each `image` value, without its <s> and </s>

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class CpmBeeGenerationPrompt(CpmBeePrompt):
    """A prompt that stops where generation starts, with what generation needs to score and decode ext strings."""

    predict_segments: list[tuple[int, int]]  # (segment id, k) of each answer placeholder <ans_k>
    answer_placeholders: list[list[str]]  # key path of each placeholder inside the answer ([] for a string answer)
    ext_table_ids: list[int]  # base id of each extra logit column; column c has output id vocab_size + c
    ext_table_sub: list[int]
    output_ext_table: dict[int, str]  # output id -> text, for `CpmBeeTokenizer.decode_markup`

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `CpmBeeForCausalLM` for this prompt, each with a batch axis of 1."""
        length = len(self)
        return {
            "input_ids": torch.tensor([self.input_ids]),
            "attention_mask": torch.ones(1, length, dtype=torch.long),
            "input_id_subs": torch.tensor([self.input_id_subs]),
            "context": torch.tensor([self.context], dtype=torch.bool),
            "segment_ids": torch.tensor([self.segment_ids]),
            "segment_rel_offset": torch.zeros(1, length, dtype=torch.long),
            "num_segments": torch.full((1, length), self.num_segments),
            "segment_rel": torch.tensor([self.segment_rel]),
            "ext_table_ids": torch.tensor([self.ext_table_ids], dtype=torch.long),
            "ext_table_sub": torch.tensor([self.ext_table_sub], dtype=torch.long),
        }


@dataclass
class CpmBeeBatch:
    """Right-padded prompts `(batch, max_length)`; padding has id 0, context 0, segment 0 and num_segments 0."""

    input_ids: torch.Tensor
    input_id_subs: torch.Tensor
    context: torch.Tensor  # bool
    segment_ids: torch.Tensor
    segment_rel_offset: torch.Tensor
    num_segments: torch.Tensor
    segment_rel: torch.Tensor  # (batch, max(max_length, longest n * n)), zero-padded
    length: torch.Tensor  # (batch,) true lengths
    target: torch.Tensor  # next-token target per position (transformers' `shift_labels`), -100 where not trained
    ext_table_ids: torch.Tensor  # (num_ext,) one table for the whole batch
    ext_table_sub: torch.Tensor
    image_bound: list[list[tuple[int, int]]]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of `CpmBeeForCausalLM`; the model takes one ext table per row."""
        batch_size, max_length = self.input_ids.shape
        return {
            "input_ids": self.input_ids,
            "attention_mask": (torch.arange(max_length)[None] < self.length[:, None]).long(),
            "input_id_subs": self.input_id_subs,
            "context": self.context,
            "segment_ids": self.segment_ids,
            "segment_rel_offset": self.segment_rel_offset,
            "num_segments": self.num_segments,
            "segment_rel": self.segment_rel,
            "ext_table_ids": self.ext_table_ids[None].expand(batch_size, -1),
            "ext_table_sub": self.ext_table_sub[None].expand(batch_size, -1),
        }


def prompt_segments(data: dict) -> list[PromptSegment]:
    """The segment tree of a prompt dict in depth-first order, root first."""
    segments = [PromptSegment("<root>", None, 0, False, "the root")]

    def visit(node: dict, parent: int, depth: int, predicted: bool) -> None:
        for key, value in node.items():
            if not isinstance(key, str):
                raise TypeError(f"Prompt keys must be strings, got {key!r}.")
            key_index = len(segments)
            segments.append(PromptSegment(key, parent, depth, False, f"the key {key!r}"))
            in_answer = predicted or (depth == 1 and key == ANSWER_KEY)
            if isinstance(value, dict):
                visit(value, key_index, depth + 1, in_answer)
            elif isinstance(value, str):
                where, is_image = f"the value of {key!r}", depth == 1 and key == IMAGE_KEY
                segments.append(PromptSegment(value, key_index, depth + 1, in_answer, where, is_image))
            else:
                raise TypeError(f"Prompt values must be strings or dicts, got {type(value).__name__} under {key!r}.")

    if not isinstance(data, dict):
        raise TypeError(f"A CPM-Bee prompt is a dict of strings and dicts, got {type(data).__name__}.")
    visit(data, 0, 1, False)
    return segments


def segment_relations(segments: Sequence[PromptSegment]) -> list[int]:
    """Flattened n x n relation ids: 0 within a segment, else 1 + 8 * min(dq - dl, 7) + min(dk - dl, 7).

    dq, dk are the depths of the query and key segments and dl the depth of their lowest common ancestor.
    """
    paths: list[list[int]] = []  # ancestors of each segment from the root down, itself last
    for index, segment in enumerate(segments):
        paths.append(([] if segment.parent is None else paths[segment.parent]) + [index])
    relations = []
    for query, query_path in enumerate(paths):
        for key, key_path in enumerate(paths):
            if query == key:
                relations.append(0)
                continue
            common = 0
            while common < min(len(query_path), len(key_path)) and query_path[common] == key_path[common]:
                common += 1
            lca_depth = common - 1
            query_up = min(len(query_path) - 1 - lca_depth, MAX_RELATION_DEPTH)
            key_up = min(len(key_path) - 1 - lca_depth, MAX_RELATION_DEPTH)
            relations.append(1 + 8 * query_up + key_up)
    return relations


def _flatten(
    tokenizer: "CpmBeeTokenizer", data: dict, keep_predicted: bool, max_length: int | None
) -> tuple[CpmBeePrompt, list[PromptSegment]]:
    segments = prompt_segments(data)
    ext_table = CpmBeeExtTable()
    prompt = CpmBeePrompt([], [], [], [], segment_relations(segments), len(segments), ext_table, [])
    full_length = 0  # predicted tokens included, whether kept or not
    for index, segment in enumerate(segments):
        try:  # dropped segments are encoded too: they number sub ids
            ids, subs = tokenizer.encode_model_ids(segment.markup, ext_table)
        except ValueError as error:
            raise ValueError(f"In {segment.where} of the prompt: {error}") from error
        if segment.is_image:
            start = len(prompt) + 1
            prompt.image_bound.append((start, start + len(ids)))
        ids = [tokenizer.bos_token_id, *ids] + ([] if segment.predicted else [tokenizer.eos_token_id])
        subs = [0, *subs] + ([] if segment.predicted else [0])
        full_length += len(ids)
        if segment.predicted and not keep_predicted:
            continue
        prompt.input_ids += ids
        prompt.input_id_subs += subs
        prompt.context += [0 if segment.predicted else 1] * len(ids)
        prompt.segment_ids += [index] * len(ids)
    if max_length is not None and full_length > max_length:
        raise ValueError(
            f"The prompt is longer than max_length: {full_length} > {max_length} tokens. Shorten the context or "
            "question, or raise max_length."
        )
    return prompt, segments


def flatten_prompt(tokenizer: "CpmBeeTokenizer", data: dict, max_length: int | None = None) -> CpmBeePrompt:
    """Flattens a prompt dict as is: the layout of training, where answers are filled in.

    Raises `ValueError` for invalid markup, and when the prompt is longer than `max_length` tokens.
    """
    return _flatten(tokenizer, data, keep_predicted=True, max_length=max_length)[0]


def flatten_prompt_for_generation(
    tokenizer: "CpmBeeTokenizer", data: dict, max_length: int | None = None
) -> CpmBeeGenerationPrompt:
    """Flattens a prompt whose `<ans>` leaves are empty, stopping where the answer starts.

    Each empty answer leaf becomes a placeholder `<ans_k>` whose tokens are left out (the answer segment still
    counts in `num_segments`). Extra logit columns are the ext entries with sub > 0, `<ans>` ones excepted.
    `max_length` (VisCPM-Chat used 3000) counts the placeholder's `<s>` and `<ans_k>` too; a longer prompt raises a
    `ValueError` (the original truncated it and then failed with "No answer to predict").
    """
    data, placeholder_paths = _with_answer_placeholders(data)
    prompt, segments = _flatten(tokenizer, data, keep_predicted=False, max_length=max_length)
    answer_id = tokenizer.convert_tokens_to_ids(ANSWER_KEY)
    columns = prompt.ext_table.columns(exclude_base=answer_id)
    output_ext_table = {}
    for text, (base, sub) in prompt.ext_table.entries.items():
        if base != answer_id:
            output_ext_table[base if sub == 0 else tokenizer.vocab_size + columns.index((base, sub))] = text
    predicted = [index for index, segment in enumerate(segments) if segment.predicted]
    return CpmBeeGenerationPrompt(
        **vars(prompt),
        predict_segments=[(index, k) for k, index in enumerate(predicted, start=1)],
        answer_placeholders=placeholder_paths,
        ext_table_ids=[base for base, _ in columns],
        ext_table_sub=[sub for _, sub in columns],
        output_ext_table=output_ext_table,
    )


def _with_answer_placeholders(data: dict) -> tuple[dict, list[list[str]]]:
    if not isinstance(data, dict):
        raise TypeError(f"A CPM-Bee prompt is a dict of strings and dicts, got {type(data).__name__}.")
    if ANSWER_KEY not in data:
        raise ValueError(f"No answer to predict: the prompt needs a top-level {ANSWER_KEY!r} key, such as '<ans>': ''.")
    paths: list[list[str]] = []

    def fill(value, path: list[str]):
        if isinstance(value, dict):
            return {key: fill(item, [*path, key]) for key, item in value.items()}
        if value != "":
            raise ValueError(f"The answer to generate must be empty, got {value!r} at {[ANSWER_KEY, *path]}.")
        paths.append(path)
        return f"<ans_{len(paths)}>"

    return {**data, ANSWER_KEY: fill(data[ANSWER_KEY], [])}, paths


def collate_prompts(tokenizer: "CpmBeeTokenizer", prompts: Sequence[CpmBeePrompt], max_length: int) -> CpmBeeBatch:
    """Right-pads flattened prompts to `max_length` and sets next-token targets on their predicted tokens.

    A predicted position's target is the next token (`</s>` where a new segment starts, and after the last token);
    an ext string with sub > 0 is targeted by its column id. The batch shares one ext table: each new (id, sub > 0)
    pair in token order is a column, and a table with no such pair still gets one placeholder column (id 0, sub 1),
    as the original collater does.
    """
    if not prompts:
        raise ValueError("collate_prompts needs at least one prompt.")
    too_long = [len(prompt) for prompt in prompts if len(prompt) > max_length]
    if too_long:
        raise ValueError(f"Prompts of {too_long} tokens do not fit max_length={max_length}; raise it or shorten them.")
    columns: dict[tuple[int, int], int] = {}
    for prompt in prompts:
        for pair in zip(prompt.input_ids, prompt.input_id_subs):
            if pair[1] > 0:
                columns.setdefault(pair, tokenizer.vocab_size + len(columns))
    ext_pairs = list(columns) or [(0, 1)]
    rel_width = max(max_length, *(len(prompt.segment_rel) for prompt in prompts))

    def padded(rows: list[list[int]], width: int, fill: int = 0) -> torch.Tensor:
        return torch.tensor([row + [fill] * (width - len(row)) for row in rows], dtype=torch.long)

    return CpmBeeBatch(
        input_ids=padded([p.input_ids for p in prompts], max_length),
        input_id_subs=padded([p.input_id_subs for p in prompts], max_length),
        context=padded([p.context for p in prompts], max_length).bool(),
        segment_ids=padded([p.segment_ids for p in prompts], max_length),
        segment_rel_offset=torch.zeros(len(prompts), max_length, dtype=torch.long),
        num_segments=padded([[p.num_segments] * len(p) for p in prompts], max_length),
        segment_rel=padded([p.segment_rel for p in prompts], rel_width),
        length=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        target=padded([_targets(tokenizer, p, columns) for p in prompts], max_length, IGNORE_INDEX),
        ext_table_ids=torch.tensor([base for base, _ in ext_pairs], dtype=torch.long),
        ext_table_sub=torch.tensor([sub for _, sub in ext_pairs], dtype=torch.long),
        image_bound=[list(p.image_bound) for p in prompts],
    )


def _targets(tokenizer: "CpmBeeTokenizer", prompt: CpmBeePrompt, columns: dict[tuple[int, int], int]) -> list[int]:
    targets = [IGNORE_INDEX] * len(prompt)
    for position, is_context in enumerate(prompt.context):
        if is_context:
            continue
        if position + 1 == len(prompt):
            targets[position] = tokenizer.eos_token_id
            continue
        following = (prompt.input_ids[position + 1], prompt.input_id_subs[position + 1])
        if following[1] > 0:
            targets[position] = columns[following]
        elif following[0] == tokenizer.bos_token_id:  # the answer ends where the next segment starts
            targets[position] = tokenizer.eos_token_id
        else:
            targets[position] = following[0]
    return targets


# VisCPM-Paint reads a text as the caption of `{'caption': text, 'objects': ''}`, whose segments are the root, the key
# 'caption', then the caption itself.
CAPTION_SEGMENT = 2
# The original set no limit on a caption. It read at most 3000 prompt tokens with this LLM (VisCPM-Chat's
# `max_inp_length`): the bound here, since the text encoder's attention grows with the square of the length.
MAX_CAPTION_TOKENS = 3000


def caption_prompt(tokenizer: "CpmBeeTokenizer", text: str) -> CpmBeePrompt:
    """Plain text in the original's caption prompt; a `<` in it is just a character (the original raised)."""
    return flatten_prompt(tokenizer, {"caption": escape_markup(text), "objects": ""})


def caption_template(tokenizer: "CpmBeeTokenizer") -> tuple[list[int], list[int]]:
    """The ids a caption prompt adds before and after the caption's own tokens."""
    empty = caption_prompt(tokenizer, "")
    start = empty.segment_ids.index(CAPTION_SEGMENT) + 1  # after the caption's <s>
    return empty.input_ids[:start], empty.input_ids[start:]


def truncate_caption(prompt: CpmBeePrompt, max_length: int) -> CpmBeePrompt:
    """Drops the caption's last tokens (not its `</s>`) until the caption prompt has `max_length` tokens; every other
    segment stays, so the text encoder still reads the structure the original built."""
    excess = len(prompt) - max_length
    if excess <= 0:
        return prompt
    caption = [i for i, segment in enumerate(prompt.segment_ids) if segment == CAPTION_SEGMENT][1:-1]
    if excess > len(caption):
        raise ValueError(
            f"A caption prompt needs {len(prompt) - len(caption)} tokens without any caption, more than "
            f"max_length={max_length}: raise max_length (a pipeline's max_prompt_length is the smaller of the "
            "tokenizer's model_max_length and the text encoder's max_position_embeddings)."
        )
    drop = set(caption[len(caption) - excess :])

    def keep(values: list[int]) -> list[int]:
        return [value for position, value in enumerate(values) if position not in drop]

    return replace(
        prompt,
        input_ids=keep(prompt.input_ids),
        input_id_subs=keep(prompt.input_id_subs),
        context=keep(prompt.context),
        segment_ids=keep(prompt.segment_ids),
    )


def paint_prompts(
    tokenizer: "CpmBeeTokenizer", prompt: str, negative_prompt: str | None = None
) -> tuple[CpmBeeBatch, CpmBeeBatch]:
    """Conditional and unconditional CPM-Bee inputs of VisCPM-Paint, right-padded with `<pad>` to a common length,
    as the original builds them (`None` and `""` are the same negative prompt)."""
    cond = caption_prompt(tokenizer, prompt)
    uncond = caption_prompt(tokenizer, negative_prompt or "")
    length = max(len(cond), len(uncond))
    return collate_prompts(tokenizer, [cond], length), collate_prompts(tokenizer, [uncond], length)


@dataclass
class CpmBeeModelPrompt:
    """One prompt as a transformers model reads it; the sequence continues into the answer segment."""

    prompt: CpmBeePrompt
    ext_table_ids: list[int]
    ext_table_sub: list[int]
    output_ext_table: dict[int, str]  # output id -> text, for decoding what the model writes


def viscpm_chat_template() -> str:
    """The chat template of VisCPM-Chat on CPM-Bee: messages -> the original prompt dict, as JSON."""
    return resources.files(__package__).joinpath("chat_template.jinja").read_text(encoding="utf-8")


def model_prompt(tokenizer: "CpmBeeTokenizer", data: dict, max_length: int | None = None) -> CpmBeeModelPrompt:
    """A prompt dict in the layout of `CpmBeeForCausalLM`'s transformers interface.

    With an empty `<ans>` the sequence ends with the answer's `<s>` (context 0): its logits give the first answer
    token, exactly as the original's first decoding step. With a filled-in `<ans>` (training), the answer follows
    in full, then `</s>`, so that next-token labels teach the model to stop.
    """
    if data.get(ANSWER_KEY) == "":
        generation = flatten_prompt_for_generation(tokenizer, data, max_length=max_length)
        answer_segment = generation.predict_segments[0][0]
        prompt = CpmBeePrompt(
            input_ids=[*generation.input_ids, tokenizer.bos_token_id],
            input_id_subs=[*generation.input_id_subs, 0],
            context=[*generation.context, 0],
            segment_ids=[*generation.segment_ids, answer_segment],
            segment_rel=generation.segment_rel,
            num_segments=generation.num_segments,
            ext_table=generation.ext_table,
            image_bound=generation.image_bound,
        )
        return CpmBeeModelPrompt(prompt, generation.ext_table_ids, generation.ext_table_sub, generation.output_ext_table)
    prompt = flatten_prompt(tokenizer, data, max_length=max_length)
    prompt.input_ids.append(tokenizer.eos_token_id)
    prompt.input_id_subs.append(0)
    prompt.context.append(0)
    prompt.segment_ids.append(prompt.segment_ids[-1])
    answer_id = tokenizer.convert_tokens_to_ids(ANSWER_KEY)
    columns = prompt.ext_table.columns(exclude_base=answer_id)
    output_ext_table = {
        base if sub == 0 else tokenizer.vocab_size + columns.index((base, sub)): text
        for text, (base, sub) in prompt.ext_table.entries.items()
        if base != answer_id
    }
    return CpmBeeModelPrompt(prompt, [b for b, _ in columns], [s for _, s in columns], output_ext_table)


def pad_model_prompts(prompts: Sequence[CpmBeeModelPrompt], padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Batches model prompts: per-token inputs padded on `padding_side`, relation and ext tables on the right.

    Padded ext entries have sub id 0, which no real entry has; the model gives their columns no probability.
    """
    if not prompts:
        raise ValueError("pad_model_prompts needs at least one prompt.")
    length = max(len(p.prompt) for p in prompts)

    def pad(rows: list[list[int]], width: int, side: str) -> torch.Tensor:
        return torch.tensor(
            [([0] * (width - len(r)) + r) if side == "left" else (r + [0] * (width - len(r))) for r in rows],
            dtype=torch.long,
        )

    rows = [p.prompt for p in prompts]
    return {
        "input_ids": pad([r.input_ids for r in rows], length, padding_side),
        "attention_mask": pad([[1] * len(r) for r in rows], length, padding_side),
        "input_id_subs": pad([r.input_id_subs for r in rows], length, padding_side),
        "context": pad([r.context for r in rows], length, padding_side),
        "segment_ids": pad([r.segment_ids for r in rows], length, padding_side),
        "segment_rel_offset": torch.zeros(len(rows), length, dtype=torch.long),
        "num_segments": pad([[r.num_segments] * len(r) for r in rows], length, padding_side),
        "segment_rel": pad([r.segment_rel for r in rows], max(len(r.segment_rel) for r in rows), "right"),
        "ext_table_ids": pad([p.ext_table_ids for p in prompts], max(len(p.ext_table_ids) for p in prompts), "right"),
        "ext_table_sub": pad([p.ext_table_sub for p in prompts], max(len(p.ext_table_sub) for p in prompts), "right"),
    }


def flat_prompt_structure(
    input_ids: torch.Tensor, token_ids: PromptTokenIds, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Structural inputs of generation prompts (`model_prompt` of a dict of strings) read back from their ids.

    Segments are delimited by `<s>`/`</s>` (user text cannot hold them: it is escaped), and in a dict of strings they
    alternate key, value after the root, the last one the open `<ans>` value. A nested dict, or text outside the
    vocabulary (a `<unk>` whose sub id is not in the ids), cannot be read back from ids: both raise a `ValueError`
    that says to pass the tokenizer's outputs instead. Rows may be left-padded (`attention_mask` 0).
    """
    batch_size, length = input_ids.shape
    mask = attention_mask.bool().tolist() if attention_mask is not None else [[True] * length] * batch_size
    per_token = {
        name: torch.zeros_like(input_ids, dtype=torch.long)
        for name in ("input_id_subs", "context", "segment_ids", "segment_rel_offset", "num_segments")
    }
    relations = []
    fix = "pass all the tokenizer's outputs to generate (generate(**tokenizer(prompt, return_tensors='pt')))"
    for row, (ids, keep) in enumerate(zip(input_ids.tolist(), mask)):
        positions = [i for i, real in enumerate(keep) if real]
        tokens = [ids[i] for i in positions]
        if token_ids.unk in tokens:
            raise ValueError(
                "The prompt holds text outside CPM-Bee's vocabulary (<unk>), which input_ids alone cannot describe; "
                + fix + "."
            )
        starts = [i for i, token in enumerate(tokens) if token == token_ids.bos]
        spans = list(zip(starts, [*starts[1:], len(tokens)]))
        closed = [tokens[end - 1] == token_ids.eos and token_ids.eos not in tokens[start : end - 1] for start, end in spans]
        if (
            not starts
            or starts[0] != 0
            or tokens[:3] != [token_ids.bos, token_ids.root, token_ids.eos]
            or len(spans) % 2 == 0
            or not all(closed[:-1])
            or tokens[spans[-1][0] :] != [token_ids.bos]
            or tokens[spans[-2][0] : spans[-2][1]] != [token_ids.bos, token_ids.answer, token_ids.eos]
        ):
            raise ValueError(
                f"Row {row} of input_ids is not a CPM-Bee generation prompt of a dict of strings (<s><root></s>, "
                "then <s>key</s><s>value</s> pairs, ending with <s><ans></s><s>); its structure cannot be read back "
                "from the ids: " + fix + "."
            )
        segments = [PromptSegment("<root>", None, 0, False, "the root")]
        for index in range(1, len(spans)):
            is_key = index % 2 == 1
            segments.append(PromptSegment("", 0 if is_key else index - 1, 1 if is_key else 2, False, ""))
        for index, (start, end) in enumerate(spans):
            for i in positions[start:end]:
                per_token["segment_ids"][row, i] = index
                per_token["context"][row, i] = 1
                per_token["num_segments"][row, i] = len(spans)
        per_token["context"][row, positions[-1]] = 0  # the answer's <s>
        relations.append(segment_relations(segments))
    width = max(len(r) for r in relations)
    segment_rel = torch.tensor([r + [0] * (width - len(r)) for r in relations], dtype=torch.long)
    empty = torch.zeros(batch_size, 0, dtype=torch.long, device=input_ids.device)
    return {
        **per_token,
        "segment_rel": segment_rel.to(input_ids.device),
        "ext_table_ids": empty,
        "ext_table_sub": empty.clone(),
    }


__all__ = [
    "CpmBeeBatch",
    "CpmBeeModelPrompt",
    "CpmBeeGenerationPrompt",
    "CpmBeePrompt",
    "PromptTokenIds",
    "caption_prompt",
    "caption_template",
    "collate_prompts",
    "flat_prompt_structure",
    "flatten_prompt",
    "flatten_prompt_for_generation",
    "model_prompt",
    "pad_model_prompts",
    "paint_prompts",
    "truncate_caption",
    "viscpm_chat_template",
]
