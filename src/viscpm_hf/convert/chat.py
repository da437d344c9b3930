"""Converts a released VisCPM-Chat checkpoint (balance / zhplus, v1 / v1.1) into a transformers folder.

The original file is one flat state dict: `query`, `mapping.{0,2}.*`, `vpm.*` (BEiT-3) and `llm.*` (CPM-Bee).
Tensors are streamed piece by piece into safetensors shards, renamed to the layout of
`VisCPMChatCpmBeeForConditionalGeneration`; what inference never uses (the MIM head, BEiT-3's text embedding and mask
token) is dropped. The sizes of both towers and of the bridge are read from the tensors' shapes; every name and
shape is checked against the target model before anything is written.
"""

import json
import os
from pathlib import Path

import torch

from ..models.beit3 import beit3_config_from_original, convert_beit3_key
from ..models.cpmbee import CpmBeeTokenizer
from ..models.cpmbee.convert_cpmbee import convert_cpmbee_key, cpmbee_config_from_original, special_token_ids
from ..models.cpmbee.prompt_cpmbee import viscpm_chat_template
from ..models.viscpm_chat import paper_image_processor
from ..models.viscpm_chat_cpmbee import (
    VisCPMChatCpmBeeConfig,
    VisCPMChatCpmBeeForConditionalGeneration,
    VisCPMChatCpmBeeProcessor,
)
from .checkpoint import (
    FiniteCheck,
    OriginalCheckpoint,
    atomic_output_folder,
    check_floating,
    parse_size,
    prepare_output,
    refuse_output_over_inputs,
    write_safetensors_shards,
)
from .model_card import write_model_card
from .sizes import merge_sizes, read_beit3_sizes, read_cpmbee_sizes


# The released configs (config/cpm-bee-10b.json; BEiT-3 large as VisCPM builds it through torchscale). A conversion
# reads every size from the checkpoint's shapes; these give only what no shape says (epsilons, the bucket settings).
CPMBEE_10B = {
    "vocab_size": 86583, "dim_model": 4096, "num_heads": 32, "dim_head": 128, "dim_ff": 10240, "num_layers": 48,
    "position_bias_num_buckets": 256, "position_bias_num_segment_buckets": 256, "position_bias_max_distance": 2048,
    "eps": 1e-6,
}  # fmt: skip
BEIT3_LARGE = {
    "img_size": 224, "patch_size": 16, "encoder_embed_dim": 1024, "encoder_attention_heads": 16,
    "encoder_ffn_embed_dim": 4096, "encoder_layers": 24,
}  # fmt: skip
RELEASED_NUM_QUERY_TOKENS = 64
# BEiT-3's attention heads are 64 wide in every released size (base 768/12, large 1024/16); no shape tells the count.
BEIT3_HEAD_WIDTH = 64
# The original chat reads prompts of at most 3000 tokens (`max_inp_length`, images included) and writes at most
# 514 (max_length 512, one more, and `</s>`): the context the released model was run with.
MAX_PROMPT_TOKENS, MAX_ANSWER_TOKENS = 3000, 514
# The image placeholder: a vocabulary special that escaped user text never produces; its embedding is replaced by
# the image features anyway (the original wrote `<unk>`, which also stands for the first unknown string of a text).
IMAGE_TOKEN, IMAGE_TOKEN_ID = "<mask>", 2


def chat_config_from_original(
    llm: dict | None = None, vision: dict | None = None, num_query_tokens: int = RELEASED_NUM_QUERY_TOKENS
) -> VisCPMChatCpmBeeConfig:
    """The chat config of complete original configs (default: the release's)."""
    return VisCPMChatCpmBeeConfig(
        vision_config=beit3_config_from_original(vision or BEIT3_LARGE, num_query_tokens=num_query_tokens),
        text_config={
            **cpmbee_config_from_original(llm or CPMBEE_10B).to_dict(),
            "max_position_embeddings": MAX_PROMPT_TOKENS + MAX_ANSWER_TOKENS,
        },
        image_token_id=IMAGE_TOKEN_ID,
        num_query_tokens=num_query_tokens,
        bridge_type="in_tower",
    )


def original_configs_from_checkpoint(
    shapes: dict[str, tuple[int, ...]], llm: dict | None = None, vision: dict | None = None, source: str = "the checkpoint"
) -> tuple[dict, dict, int]:
    """`(CPM-Bee config, BEiT-3 config, query count)` with every size the shapes tell read from them.

    `llm` and `vision` (possibly partial original configs) give what the shapes do not; a size they give that the
    shapes contradict raises a ValueError naming both.
    """
    llm_config = merge_sizes(read_cpmbee_sizes(shapes), llm, CPMBEE_10B, "--llm-config", source)
    vision_sizes, num_queries = read_beit3_sizes(shapes)
    vision_config = merge_sizes(vision_sizes, vision, BEIT3_LARGE, "--vision-config", source)
    if "encoder_attention_heads" not in (vision or {}):
        width = vision_config["encoder_embed_dim"]
        if width % BEIT3_HEAD_WIDTH:
            raise ValueError(
                f"The BEiT-3 tower of {source} is {width} wide, not a multiple of the released head width "
                f"{BEIT3_HEAD_WIDTH}, and its number of attention heads shows in no shape: give it as "
                '`"encoder_attention_heads"` in --vision-config.'
            )
        vision_config["encoder_attention_heads"] = width // BEIT3_HEAD_WIDTH
    return llm_config, vision_config, num_queries or RELEASED_NUM_QUERY_TOKENS


def convert_chat_key(original_key: str) -> str | None:
    """Original chat key -> `VisCPMChatCpmBeeForConditionalGeneration` key, or None for weights inference never uses."""
    if original_key.startswith("llm."):
        try:
            return f"model.llm.model.{convert_cpmbee_key(original_key)}"
        except KeyError:
            return original_key  # reported as unexpected by the caller
    if original_key.startswith("mapping."):
        index, parameter = original_key.removeprefix("mapping.").split(".", 1)
        linear = {"0": "linear_1", "2": "linear_2"}.get(index)
        return f"model.bridge.mapping.{linear}.{parameter}" if linear else original_key
    if original_key == "query" or original_key.startswith("vpm."):
        try:
            converted = convert_beit3_key(original_key)
        except KeyError:
            return original_key  # reported as unexpected by the caller
        return None if converted is None else f"model.vision_tower.{converted}"
    return original_key


def plan_conversion(
    checkpoint: OriginalCheckpoint, model: VisCPMChatCpmBeeForConditionalGeneration
) -> list[tuple[str, str]]:
    """`(original key, new key)` pairs, after checking names and shapes against `model` (on the meta device)."""
    tied = set(model.all_tied_weights_keys)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in tied}
    plan, unexpected, wrong_shapes, seen = [], [], [], set()
    for key in checkpoint.keys():
        new_key = convert_chat_key(key)
        if new_key is None:
            continue
        if new_key not in expected:
            unexpected.append(key)
            continue
        seen.add(new_key)
        if checkpoint.shape(key) != expected[new_key]:
            wrong_shapes.append(f"{key}: {checkpoint.shape(key)} (expected {expected[new_key]})")
        else:
            plan.append((key, new_key))
    missing = sorted(set(expected) - seen)  # a misshapen key is listed as misshapen only
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
    if wrong_shapes:
        problems.append(f"wrong shapes ({len(wrong_shapes)}): {wrong_shapes[:10]}")
    if problems:
        raise ValueError(
            f"{str(checkpoint.path)!r} does not match the VisCPM-Chat layout for this config: " + "; ".join(problems)
            + ". Check that it is a VisCPM-Chat checkpoint and that --llm-config / --vision-config describe it."
        )
    return plan


def build_processor(
    vocab: str | os.PathLike, num_image_tokens: int = RELEASED_NUM_QUERY_TOKENS, image_size: int = 224
) -> VisCPMChatCpmBeeProcessor:
    tokenizer = CpmBeeTokenizer(vocab_file=str(vocab), prompt_format="structured")
    return VisCPMChatCpmBeeProcessor(
        image_processor=paper_image_processor(image_size),
        tokenizer=tokenizer,
        chat_template=viscpm_chat_template(),
        image_token=IMAGE_TOKEN,
        num_image_tokens=num_image_tokens,
    )


def check_vocabulary(tokenizer: CpmBeeTokenizer, vocab: str | os.PathLike, vocab_size: int, source) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"The vocabulary {str(vocab)!r} has {tokenizer.vocab_size} entries but the embedding of {str(source)!r} only "
            f"{vocab_size} rows: pass the vocabulary the checkpoint was trained with (the original vocabs/bee.txt)."
        )


def convert_chat(
    checkpoint: str | os.PathLike,
    vocab: str | os.PathLike,
    output: str | os.PathLike,
    llm_config: dict | None = None,
    vision_config: dict | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: str | int = "1GB",
    overwrite: bool = False,
    check: bool = False,
    repo_id: str | None = None,
) -> Path:
    """Writes a complete `AutoModelForImageTextToText` folder; returns its path.

    `llm_config` / `vision_config` (original config keys) are needed only for what the checkpoint's shapes do not
    tell; `check` refuses, listing them, tensors holding NaN or infinite values (after the cast to `dtype`).
    `repo_id` is the Hub id the model card's usage snippet loads (default: the output folder's name).
    """
    if not Path(vocab).is_file():
        raise FileNotFoundError(f"Vocabulary not found: {str(vocab)!r} (the original vocabs/bee.txt).")
    refuse_output_over_inputs(output, [checkpoint, vocab])
    prepare_output(output, overwrite)
    original = OriginalCheckpoint(checkpoint)
    llm, vision, num_queries = original_configs_from_checkpoint(
        original.shapes(), llm_config, vision_config, source=repr(str(checkpoint))
    )
    config = chat_config_from_original(llm, vision, num_queries)
    with torch.device("meta"):
        model = VisCPMChatCpmBeeForConditionalGeneration(config)
    plan = plan_conversion(original, model)
    check_floating(original, [key for key, _ in plan])
    processor = build_processor(vocab, num_queries, config.vision_config.image_size)
    check_vocabulary(processor.tokenizer, vocab, config.text_config.vocab_size, checkpoint)
    for field, token_id in special_token_ids(processor.tokenizer).items():
        setattr(config.text_config, field, token_id)
    generation_config = model.generation_config
    generation_config.cpmbee_decoding = {"temperature": 0.7, "repetition_penalty": 1.1}
    generation_config.max_new_tokens = MAX_ANSWER_TOKENS  # the original's max_length 512 admits 513 tokens, then </s>

    finite = FiniteCheck() if check else None

    def read(index: int):
        pieces = original.chunks(plan[index][0], dtype)
        return finite.watch(plan[index][0], pieces) if finite else pieces

    with atomic_output_folder(output, overwrite=overwrite) as folder:
        entries = [(new_key, original.shape(key), dtype or original.dtype(key)) for key, new_key in plan]
        write_safetensors_shards(folder, entries, read, parse_size(max_shard_size))
        if finite:
            finite.raise_if_any(checkpoint, dtype)
        config.dtype = entries[0][2]
        config.architectures = [type(model).__name__]  # what `save_pretrained` of the model would write
        config.save_pretrained(folder)
        generation_config.save_pretrained(folder)
        processor.save_pretrained(folder)
        card_repo = repo_id or Path(output).name
        write_model_card(folder / "README.md", "chat", checkpoint=Path(checkpoint).name, config=config, repo_id=card_repo)
        (folder / "conversion.json").write_text(
            json.dumps({"source": Path(checkpoint).name, "tensors": len(plan)}, indent=2) + "\n"
        )
    return Path(output)
