"""VisCPM-Chat end to end, offline: save a model folder, reload it with the Auto classes, ask two questions.

By default the model is built from a small config with random weights, so its answers are noise: what this shows
is that every step a real checkpoint goes through (safetensors save, Auto-class loading, processor, chat template,
beam search, cached image features in the second turn) runs, in seconds, with nothing but viscpm-hf installed.

`--trained` starts from the trained model that ships instead, `examples/mpm/default/chat`: a 6 MB adapter (bridge
and LoRA, trained by `examples/mpm/chat_openmoji.py` on OpenMoji emoji) over gemma-3-270m and the ImageNet
EfficientNet-Lite0, which the `demo` extra's packages ship (built once into ~/.cache/viscpm_hf/pivots). The adapter
is merged and the result saved as an ordinary VisCPM-Chat folder, which `viscpm-serve` and `viscpm-demo
--chat_model` also take. It knows emoji only:

    python examples/chat_quickstart.py [--image examples/assets/house.png] [--output outputs/viscpm-chat-small]
    python examples/chat_quickstart.py --trained --image examples/assets/elephant.png --output outputs/viscpm-chat-mpm
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


def save_trained_default(output_dir: Path) -> None:
    """The shipped MPM adapter merged into its packaged LLM and vision tower, saved as a VisCPM-Chat folder."""
    from viscpm_hf.mpm.chat_models import load_chat
    from viscpm_hf.mpm.pivots import show_build_messages

    show_build_messages()  # the first run builds gemma-3-270m and EfficientNet-Lite0 from their packages
    model, processor = load_chat(TRAINED_DEFAULT)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


TRAINED_DEFAULT = Path(__file__).parent / "mpm" / "default" / "chat"
QUESTIONS = {
    "random": ("What is in this picture?", "图中的房子是什么颜色？"),
    "trained": ("What is shown in the image?", "图中是什么？"),  # what the OpenMoji model was trained to answer
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(Path(__file__).parent / "assets" / "house.png"), help="a local image")
    parser.add_argument("--output", default=None,
                        help="where the model folder is written (default: outputs/viscpm-chat-small, or "
                        "outputs/viscpm-chat-mpm with --trained)")  # fmt: skip
    parser.add_argument("--trained", action="store_true",
                        help=f"start from the trained default in {TRAINED_DEFAULT} (needs the demo extra)")  # fmt: skip
    args = parser.parse_args(argv)

    kind = "trained" if args.trained else "random"
    output_dir = Path(args.output or ("outputs/viscpm-chat-mpm" if args.trained else "outputs/viscpm-chat-small"))
    if args.trained:
        save_trained_default(output_dir)
    else:
        build_small_model(output_dir)
    print(f"saved {sorted(p.name for p in output_dir.iterdir())} to {output_dir}")

    model = AutoModelForImageTextToText.from_pretrained(output_dir)
    processor = AutoProcessor.from_pretrained(output_dir)
    print(f"reloaded {type(model).__name__} ({model.num_parameters() / 1e6:.1f}M parameters) and {type(processor).__name__}")

    first, second = QUESTIONS[kind]
    start = time.perf_counter()
    answer, history = model.chat(args.image, first, processor, max_new_tokens=24)
    print(f"turn 1 ({time.perf_counter() - start:.2f}s): {first} -> {answer!r}")
    start = time.perf_counter()
    answer, history = model.chat(None, second, processor, history=history, max_new_tokens=24)
    print(f"turn 2, image features reused ({time.perf_counter() - start:.2f}s): {second} -> {answer!r}")


if __name__ == "__main__":
    main()
