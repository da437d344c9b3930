"""`viscpm-convert` / `python -m viscpm_hf.convert`: released VisCPM checkpoints to Hugging Face folders."""

import argparse
import json
import sys
from pathlib import Path

import torch


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def read_json(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"error: config file not found: {path}")
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {path} is not valid JSON ({error})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viscpm-convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="VisCPM-Chat (BEiT-3 bridge + CPM-Bee) -> AutoModelForImageTextToText folder")
    chat.add_argument("--checkpoint", required=True, help="original .pt / .bin / .safetensors file")
    chat.add_argument("--vocab", required=True, help="the original CPM-Bee vocabulary (vocabs/bee.txt)")
    chat.add_argument("--output", required=True, help="folder to create")
    chat.add_argument("--llm-config", help="original CPM-Bee config JSON (default: CPM-Bee 10B)")
    chat.add_argument("--vision-config", help="original BEiT-3 config JSON (torchscale keys; default: large)")
    chat.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (default: keep the checkpoint's)")
    chat.add_argument("--max-shard-size", default="1GB", help="largest safetensors shard (default 1GB)")
    chat.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    paint = commands.add_parser("paint", help="VisCPM-Paint (CPM-Bee + transblock + SD-2.1 UNet) -> diffusers pipeline folder")
    paint.add_argument("--checkpoint", required=True, help="original .pt / .bin / .safetensors file")
    paint.add_argument("--vocab", required=True, help="the original CPM-Bee vocabulary (vocabs/bee.txt)")
    paint.add_argument(
        "--vae", required=True, help="local diffusers VAE folder: the vae/ folder of stabilityai/stable-diffusion-2-1-base"
    )
    paint.add_argument("--output", required=True, help="folder to create")
    paint.add_argument("--llm-config", help="original CPM-Bee config JSON (default: CPM-Bee 10B)")
    paint.add_argument("--unet-config", help="diffusers UNet2DConditionModel config.json (default: SD-2.1-base)")
    paint.add_argument(
        "--dtype", choices=list(DTYPES), help="cast text encoder, UNet and VAE (default: keep the files'); transblock stays float32"
    )
    paint.add_argument("--max-shard-size", default="1GB", help="largest safetensors shard (default 1GB)")
    paint.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common = {"dtype": DTYPES.get(args.dtype), "max_shard_size": args.max_shard_size, "overwrite": args.overwrite}
    llm_config = read_json(args.llm_config)
    try:
        if args.command == "chat":
            from .chat import convert_chat

            vision_config = read_json(args.vision_config)
            output = convert_chat(args.checkpoint, args.vocab, args.output, llm_config, vision_config, **common)
        else:
            from .paint import convert_paint

            unet_config = read_json(args.unet_config)
            output = convert_paint(args.checkpoint, args.vocab, args.vae, args.output, llm_config, unet_config, **common)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    return 0
