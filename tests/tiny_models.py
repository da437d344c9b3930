"""Tiny VisCPM-Chat components built in code (dims <= 64): tests never download."""

import numpy as np
import torch
from PIL import Image

from viscpm_hf import (
    CpmBeeConfig,
    CpmBeeForCausalLM,
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    VisCPMChatProcessor,
    paper_image_processor,
)


NUM_QUERY_TOKENS = 4
IMAGE_SIZE = 32

VISION_CONFIGS = {
    "siglip_vision_model": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, vision_use_head=False,
    ),
    "clip_vision_model": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=8, projection_dim=32,
    ),
    # A convolutional tower with batch norm; its feature map has hidden_sizes[-1] channels (pass vision_feature_dim).
    "resnet": dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"),
}

TEXT_CONFIGS = {
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "gemma3_text": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
    ),
}


def make_chat_config(
    tokenizer, text_model_type="qwen2", vision_model_type="siglip_vision_model", text_config_overrides=None, **overrides
):
    text_config = dict(
        model_type=text_model_type,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TEXT_CONFIGS[text_model_type],
        **(text_config_overrides or {}),
    )
    return VisCPMChatConfig(
        vision_config=dict(model_type=vision_model_type, **VISION_CONFIGS[vision_model_type]),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_query_tokens=NUM_QUERY_TOKENS,
        **overrides,
    )


def make_chat_model(tokenizer, seed=0, **config_kwargs):
    torch.manual_seed(seed)
    return VisCPMChatForConditionalGeneration(make_chat_config(tokenizer, **config_kwargs)).eval()


def make_cpmbee(hidden_size=32, intermediate_size=64, vocab_size=120, seed=0, **overrides):
    """A 2-layer CPM-Bee with 4 heads, in eval mode."""
    torch.manual_seed(seed)
    config = CpmBeeConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
        head_dim=hidden_size // 4, intermediate_size=intermediate_size, **overrides,
    )  # fmt: skip
    return CpmBeeForCausalLM(config).eval()


def random_image(seed=0, size=(40, 48), mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).convert(mode)


def make_processor(tokenizer):
    return VisCPMChatProcessor(
        image_processor=paper_image_processor(IMAGE_SIZE), tokenizer=tokenizer, num_image_tokens=NUM_QUERY_TOKENS
    )
