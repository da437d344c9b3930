"""VisCPM-Chat against transformers' LLaVA built from the same vision and text configs, and against its own LLM.

Prints, per size, each comparison as the median of per-round ratios of alternated rounds (`timing.per_round_ratio`:
a slow spell of the machine hits both sides of a round alike):
- prefill latency (vision tower + LLM over the prompt) and decode tokens/s with the KV cache, VisCPMChat / LLaVA
  throughput ratios (target >= 0.95); LLaVA feeds every patch to the LLM, VisCPM-Chat `num_query_tokens`;
- decode tokens/s of VisCPM-Chat against its bare LLM on a text prompt of the same length: the wrapper's overhead
  alone (target >= 0.95);
- a second chat turn on a cached image against recomputing the vision tower.

    python benchmarks/bench_chat.py [--sizes tiny small] [--repeats 5] [--new-tokens 32]
"""

import argparse
import time
from functools import partial

import torch
from timing import per_round_ratio
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


def seconds(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        fn(*args, **kwargs)
    return time.perf_counter() - start


def timers(model, input_ids: torch.Tensor, new_tokens: int, **inputs):
    """Two measurements of `model` on a prompt (each returns its seconds): one forward over the prompt (prefill), and
    the seconds per decoded token, generate(n + 1) minus generate(1) over n, so that the prefill cancels out."""
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **inputs}
    greedy = {"do_sample": False, "num_beams": 1, "suppress_tokens": None, "length_penalty": 1.0}

    def generate(n: int) -> float:
        return seconds(model.generate, **inputs, max_new_tokens=n, min_new_tokens=n, **greedy)

    return lambda: seconds(model, **inputs), lambda: (generate(new_tokens + 1) - generate(1)) / new_tokens


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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, "
          f"medians of {args.repeats} alternated rounds")  # fmt: skip

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

        input_ids = prompt(tokenizer, image_token_id, 64)
        ours_prefill, ours_decode = timers(ours, input_ids, args.new_tokens, pixel_values=pixel_values)
        llava_prefill, llava_decode = timers(
            llava, prompt(tokenizer, image_token_id, num_patches), args.new_tokens, pixel_values=pixel_values
        )
        # The bare LLM on a text prompt as long as the chat's (its image tokens replaced by text).
        text_ids = torch.where(input_ids == image_token_id, tokenizer.convert_tokens_to_ids("a"), input_ids)
        _, llm_decode = timers(ours.model.llm, text_ids, args.new_tokens)
        print(f"\n[{name}] VisCPMChat {ours.num_parameters() / 1e6:.1f}M params, 64 image tokens; "
              f"LLaVA {llava.num_parameters() / 1e6:.1f}M params, {num_patches} image tokens")
        # Each ratio is the other's seconds / VisCPMChat's: VisCPMChat's relative throughput.
        llava_s, ours_s, ratio = per_round_ratio(llava_prefill, ours_prefill, args.repeats)
        print(f"  prefill latency   VisCPMChat {ours_s * 1e3:8.2f} ms   LLaVA {llava_s * 1e3:8.2f} ms   "
              f"throughput ratio {ratio:.3f}")
        llava_s, ours_s, ratio = per_round_ratio(llava_decode, ours_decode, args.repeats)
        print(f"  decode tokens/s   VisCPMChat {1 / ours_s:8.1f}      LLaVA {1 / llava_s:8.1f}      ratio {ratio:.3f}")
        llm_s, ours_s, ratio = per_round_ratio(llm_decode, ours_decode, args.repeats)
        print(f"  decode tokens/s   VisCPMChat {1 / ours_s:8.1f}      its LLM alone {1 / llm_s:8.1f} "
              f"({input_ids.shape[1]}-token prompt)   ratio {ratio:.3f}")

        # Second turn: the cached bridge outputs against running the vision tower again.
        text_inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        with torch.inference_mode():
            cached = ours.get_image_features(pixel_values).pooler_output
        features = {"image": BaseModelOutputWithPooling(pooler_output=cached)}
        generate = {"max_new_tokens": 8, "min_new_tokens": 8, "num_beams": 3}
        recompute_s, cached_s, speedup = per_round_ratio(
            partial(seconds, ours.generate, **text_inputs, pixel_values=pixel_values, **generate),
            partial(seconds, ours.generate, **text_inputs, mm_encoder_outputs=features, **generate),
            args.repeats,
        )
        print(f"  second turn (beam 3, 8 tokens)  cached image {cached_s * 1e3:8.2f} ms   "
              f"recomputed {recompute_s * 1e3:8.2f} ms   speed-up {speedup:.2f}x")


if __name__ == "__main__":
    main()
