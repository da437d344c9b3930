"""VisCPM-Chat against transformers' LLaVA built from the same vision and text configs, in one run.

Prints, per size: prefill latency (vision tower + LLM over the prompt), decode tokens/s with the KV cache, each
as VisCPMChat / LLaVA throughput ratios (target >= 0.95), and a second chat turn on a cached image against
recomputing the vision tower. LLaVA feeds every patch to the LLM; VisCPM-Chat feeds `num_query_tokens`.

    python benchmarks/bench_chat.py [--sizes tiny small] [--repeats 5] [--new-tokens 32]
"""

import argparse

import torch
from timing import median_seconds
from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from viscpm_hf import (
    VisCPMChatConfig,
    VisCPMChatForConditionalGeneration,
    build_byte_level_tokenizer,
)


SIZES = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "vision_hidden": 64, "vision_layers": 2},
    "small": {"hidden": 512, "layers": 8, "heads": 8, "vision_hidden": 384, "vision_layers": 6},
}
IMAGE_SIZE, PATCH_SIZE = 224, 16


def sub_configs(size: dict, vocab_size: int, tokenizer) -> tuple[dict, dict]:
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": size["vision_hidden"],
        "intermediate_size": 4 * size["vision_hidden"],
        "num_hidden_layers": size["vision_layers"],
        "num_attention_heads": size["heads"],
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "vision_use_head": False,
    }
    text = {
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": size["hidden"],
        "intermediate_size": 4 * size["hidden"],
        "num_hidden_layers": size["layers"],
        "num_attention_heads": size["heads"],
        "num_key_value_heads": size["heads"],
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    return vision, text


def prompt(tokenizer, image_token_id: int, num_image_tokens: int) -> torch.Tensor:
    question = tokenizer("User: ", add_special_tokens=False)["input_ids"]
    rest = tokenizer("What is shown in this picture? Describe it.\nAI: ", add_special_tokens=False)["input_ids"]
    return torch.tensor([question + [image_token_id] * num_image_tokens + rest])


@torch.inference_mode()
def measure(model, input_ids, pixel_values, repeats: int, new_tokens: int) -> tuple[float, float]:
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}
    greedy = {"do_sample": False, "num_beams": 1, "suppress_tokens": None, "length_penalty": 1.0}
    prefill = median_seconds(lambda: model(**inputs), repeats)
    one = median_seconds(lambda: model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **greedy), repeats)
    full = median_seconds(
        lambda: model.generate(**inputs, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **greedy),
        repeats,
    )
    return prefill, new_tokens / (full - one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tokenizer = build_byte_level_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    num_patches = (IMAGE_SIZE // PATCH_SIZE) ** 2
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, median of {args.repeats}")

    for name in args.sizes:
        vision, text = sub_configs(SIZES[name], len(tokenizer), tokenizer)
        torch.manual_seed(0)
        ours = VisCPMChatForConditionalGeneration(
            VisCPMChatConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, num_query_tokens=64)
        ).eval()
        llava = LlavaForConditionalGeneration(
            LlavaConfig(
                vision_config=vision,
                text_config=text,
                image_token_id=image_token_id,
                image_seq_length=num_patches,
                vision_feature_layer=-1,
                vision_feature_select_strategy="full",
            )
        ).eval()

        ours_prefill, ours_decode = measure(ours, prompt(tokenizer, image_token_id, 64), pixel_values, args.repeats, args.new_tokens)
        llava_prefill, llava_decode = measure(
            llava, prompt(tokenizer, image_token_id, num_patches), pixel_values, args.repeats, args.new_tokens
        )
        print(f"\n[{name}] VisCPMChat {ours.num_parameters() / 1e6:.1f}M params, 64 image tokens; "
              f"LLaVA {llava.num_parameters() / 1e6:.1f}M params, {num_patches} image tokens")
        print(f"  prefill latency   VisCPMChat {ours_prefill * 1e3:8.2f} ms   LLaVA {llava_prefill * 1e3:8.2f} ms   "
              f"throughput ratio {llava_prefill / ours_prefill:.3f}")
        print(f"  decode tokens/s   VisCPMChat {ours_decode:8.1f}      LLaVA {llava_decode:8.1f}      "
              f"ratio {ours_decode / llava_decode:.3f}")

        # Second turn: the cached bridge outputs against running the vision tower again.
        input_ids = prompt(tokenizer, image_token_id, 64)
        text_inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        with torch.inference_mode():
            cached = ours.get_image_features(pixel_values).pooler_output
            generate = {"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 3}
            recompute_s = median_seconds(lambda: ours.generate(**text_inputs, pixel_values=pixel_values, **generate), args.repeats)
            cached_s = median_seconds(
                lambda: ours.generate(
                    **text_inputs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=cached)}, **generate
                ),
                args.repeats,
            )
        print(f"  second turn (beam 3, 8 tokens)  cached image {cached_s * 1e3:8.2f} ms   "
              f"recomputed {recompute_s * 1e3:8.2f} ms   speed-up {recompute_s / cached_s:.2f}x")


if __name__ == "__main__":
    main()
