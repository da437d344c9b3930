"""VisCPM-Chat end to end, offline: build a small model from config, save it, reload it with the Auto classes, chat.

The weights are random until a trained default ships, so the answers are noise; every step a real checkpoint
goes through (safetensors save, Auto-class loading, processor, chat template, beam search, cached image
features in the second turn) runs for real.

    python examples/chat_quickstart.py [--image examples/assets/house.png] [--output outputs/viscpm-chat-small]
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from viscpm_hf import (
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    VisCPMChatProcessor,
    build_byte_level_tokenizer,
    paper_image_processor,
)


def build_small_model(output_dir: Path) -> None:
    tokenizer = build_byte_level_tokenizer()
    config = VisCPMChatConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 16,
            "vision_use_head": False,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_query_tokens=64,
    )
    torch.manual_seed(0)
    VisCPMChatForConditionalGeneration(config).save_pretrained(output_dir)
    VisCPMChatProcessor(image_processor=paper_image_processor(), tokenizer=tokenizer, num_image_tokens=64).save_pretrained(
        output_dir
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(Path(__file__).parent / "assets" / "house.png"), help="a local image")
    parser.add_argument("--output", default="outputs/viscpm-chat-small", help="where the model folder is written")
    args = parser.parse_args()

    output_dir = Path(args.output)
    build_small_model(output_dir)
    print(f"saved {sorted(p.name for p in output_dir.iterdir())} to {output_dir}")

    model = AutoModelForImageTextToText.from_pretrained(output_dir)
    processor = AutoProcessor.from_pretrained(output_dir)
    print(f"reloaded {type(model).__name__} ({model.num_parameters() / 1e6:.1f}M parameters) and {type(processor).__name__}")

    start = time.perf_counter()
    answer, history = model.chat(args.image, "What is in this picture?", processor, max_new_tokens=24)
    print(f"turn 1 ({time.perf_counter() - start:.2f}s): {answer!r}")
    start = time.perf_counter()
    answer, history = model.chat(None, "图中的房子是什么颜色？", processor, history=history, max_new_tokens=24)
    print(f"turn 2, image features reused ({time.perf_counter() - start:.2f}s): {answer!r}")


if __name__ == "__main__":
    main()
