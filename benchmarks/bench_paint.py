"""VisCPM-Paint against diffusers' StableDiffusionPipeline on the same UNet, VAE, scheduler and steps, in one run.

Prints the wall time per image with the text already encoded (both pipelines get `prompt_embeds`; target ratio
VisCPM / SD <= 1.05), and the text-encoding cost per call of each: an LLM of the CPM-Bee architecture against a CLIP
text encoder of similar size.

    python benchmarks/bench_paint.py [--size 64] [--steps 20] [--repeats 3]
"""

import argparse
import time

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from timing import interleaved_medians, per_round_ratio
from transformers import CLIPTextConfig, CLIPTextModel

from viscpm_hf import (
    CpmBeeConfig,
    CpmBeeModel,
    CpmBeeTokenizer,
    VisCPMPaintPipeline,
    VisCPMTransBlock,
    build_byte_level_tokenizer,
)


def components(cross_attention_dim: int = 512):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, use_linear_projection=True,
    ).eval()  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
    ).eval()  # fmt: skip
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=0, clip_sample=False
    )
    return unet, vae, scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="image height and width")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--vocab", help="CPM-Bee vocabulary (bee.txt); default: a byte-level tokenizer")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}px, {args.steps} steps")

    unet, vae, scheduler = components()
    llm = CpmBeeModel(
        CpmBeeConfig(vocab_size=86583, hidden_size=512, num_hidden_layers=6, num_attention_heads=8, head_dim=64,
                     intermediate_size=1536)  # fmt: skip
    ).eval()
    clip = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=8, max_position_embeddings=77)  # fmt: skip
    ).eval()
    byte_tokenizer = build_byte_level_tokenizer(add_bos_token=True)
    byte_tokenizer.model_max_length = 77
    bee_tokenizer = CpmBeeTokenizer(vocab_file=args.vocab, prompt_format="caption") if args.vocab else None
    viscpm = VisCPMPaintPipeline(
        tokenizer=bee_tokenizer or byte_tokenizer, text_encoder=llm, transblock=VisCPMTransBlock(512, 512),
        unet=unet, vae=vae, scheduler=scheduler,
    )  # fmt: skip
    if bee_tokenizer is None:  # without the vocabulary, a byte-level tokenizer stands in (ids < 260)
        viscpm.register_modules(tokenizer=byte_tokenizer)
    sd = StableDiffusionPipeline(
        vae=vae, text_encoder=clip, tokenizer=byte_tokenizer, unet=unet, scheduler=DDPMScheduler.from_config(scheduler.config),
        safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    for pipe in (viscpm, sd):
        pipe.set_progress_bar_config(disable=True)

    prompt, negative = "a watercolor painting of a lighthouse at dawn", "blurry"
    with torch.inference_mode():
        ours = viscpm.encode_prompt(prompt, "cpu", 1, True, negative)
        theirs = sd.encode_prompt(prompt, "cpu", 1, True, negative)
        common = {"height": args.size, "width": args.size, "num_inference_steps": args.steps, "output_type": "np"}

        def run_viscpm():
            viscpm(prompt_embeds=ours[0], negative_prompt_embeds=ours[1], prompt_attention_mask=ours[2],
                   negative_prompt_attention_mask=ours[3], generator=torch.Generator().manual_seed(0), **common)  # fmt: skip

        def run_sd():
            sd(prompt_embeds=theirs[0], negative_prompt_embeds=theirs[1], generator=torch.Generator().manual_seed(0), **common)

        def seconds(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        viscpm_s, sd_s, ratio = per_round_ratio(lambda: seconds(run_viscpm), lambda: seconds(run_sd), args.repeats)
        viscpm_text, sd_text = interleaved_medians(
            lambda: viscpm.encode_prompt(prompt, "cpu", 1, True, negative),
            lambda: sd.encode_prompt(prompt, "cpu", 1, True, negative),
            args.repeats,
        )
    print(f"per image, text encoded beforehand: VisCPM-Paint {viscpm_s:.3f} s   StableDiffusion {sd_s:.3f} s   "
          f"ratio {ratio:.3f} (median of {args.repeats} alternated rounds' ratios)")
    print(f"text encoding per call (prompt + negative): VisCPM-Paint ({llm.num_parameters() / 1e6:.0f}M CPM-Bee) "
          f"{viscpm_text * 1e3:.1f} ms   StableDiffusion ({clip.num_parameters() / 1e6:.0f}M CLIP) {sd_text * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
