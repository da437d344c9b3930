"""`viscpm-convert` / `python -m viscpm_hf.convert`: released VisCPM checkpoints to Hugging Face folders."""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from ..hub import check_hub_target, push_to_hub
from .checkpoint import refuse_output_over_inputs


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHECK_HELP = (
    "check every tensor (after --dtype's cast) for NaN and infinite values; if any has some, list them, write nothing "
    "and exit 1"
)


def read_json(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"error: config file not found: {path}")
    except json.JSONDecodeError as error:
        raise SystemExit(f"error: {path} is not valid JSON ({error})")


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    # Both spellings: the converter's own (dashes) and the Trainer's (underscores), which the training scripts take.
    parser.add_argument(
        "--push-to-hub", "--push_to_hub", dest="push_to_hub", action="store_true",
        help="upload the finished folder to the Hub, after checking it (no pickled file, a complete model card)",
    )
    parser.add_argument(
        "--hub-model-id", "--hub_model_id", dest="hub_model_id",
        help="the repo: user/name, or name for the token's user (default: the output folder's name); the model card's "
        "usage snippet loads it",
    )
    parser.add_argument(
        "--hub-token", "--hub_token", dest="hub_token", help="a token with write access (default: `hf auth login`'s)"
    )
    parser.add_argument(
        "--hub-private-repo", "--hub_private_repo", dest="hub_private_repo", action="store_true",
        help="create the repo private (an existing repo keeps its visibility)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="viscpm-convert", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="VisCPM-Chat (BEiT-3 bridge + CPM-Bee) -> AutoModelForImageTextToText folder")
    chat.add_argument("--checkpoint", required=True, help="original .pt / .bin / .safetensors file")
    chat.add_argument("--vocab", required=True, help="the original CPM-Bee vocabulary (vocabs/bee.txt)")
    chat.add_argument("--output", required=True, help="folder to create")
    chat.add_argument(
        "--llm-config",
        help="original CPM-Bee config JSON; sizes are read from the checkpoint, this gives the rest (default: 10B's)",
    )
    chat.add_argument(
        "--vision-config",
        help="original BEiT-3 config JSON (torchscale keys); sizes are read from the checkpoint, this gives the rest "
        "(default: large's; attention heads 64 wide)",
    )
    chat.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (default: keep the checkpoint's)")
    chat.add_argument("--max-shard-size", default="1GB", help="largest safetensors shard (default 1GB)")
    chat.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    chat.add_argument("--check", action="store_true", help=CHECK_HELP)
    add_hub_arguments(chat)

    paint = commands.add_parser("paint", help="VisCPM-Paint (CPM-Bee + transblock + SD-2.1 UNet) -> diffusers pipeline folder")
    paint.add_argument("--checkpoint", required=True, help="original .pt / .bin / .safetensors file")
    paint.add_argument("--vocab", required=True, help="the original CPM-Bee vocabulary (vocabs/bee.txt)")
    paint.add_argument(
        "--vae", required=True, help="local diffusers VAE folder: the vae/ folder of stabilityai/stable-diffusion-2-1-base"
    )
    paint.add_argument("--output", required=True, help="folder to create")
    paint.add_argument(
        "--llm-config",
        help="original CPM-Bee config JSON; sizes are read from the checkpoint, this gives the rest (default: 10B's)",
    )
    paint.add_argument(
        "--unet-config",
        help="diffusers UNet2DConditionModel config.json; channels and blocks are read from the checkpoint, this "
        "gives the rest (default: SD-2.1-base's)",
    )
    paint.add_argument(
        "--dtype", choices=list(DTYPES), help="cast text encoder, UNet and VAE (default: keep the files'); transblock stays float32"
    )
    paint.add_argument("--max-shard-size", default="1GB", help="largest safetensors shard (default 1GB)")
    paint.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    paint.add_argument("--check", action="store_true", help=CHECK_HELP)
    add_hub_arguments(paint)
    return parser


class NotesToStderr(logging.Handler):
    """Prints what the conversion reports on the way (leftovers of interrupted runs cleaned or kept) to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"note: {record.getMessage()}", file=sys.stderr)  # the stderr of the moment, not of the first call


def show_notes() -> None:
    logger = logging.getLogger("viscpm_hf.convert")
    if not any(isinstance(handler, NotesToStderr) for handler in logger.handlers):
        logger.addHandler(NotesToStderr())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    common = {
        "dtype": DTYPES.get(args.dtype), "max_shard_size": args.max_shard_size, "overwrite": args.overwrite,
        "check": args.check, "repo_id": args.hub_model_id,
    }  # fmt: skip
    repo_id = args.hub_model_id or Path(args.output).resolve().name
    show_notes()
    llm_config = read_json(args.llm_config)
    try:
        if args.push_to_hub:  # before a conversion that may take an hour
            check_hub_target(repo_id, args.hub_token)
        # The converters protect their weights and vocabulary; the config files are inputs too.
        configs = [args.llm_config, getattr(args, "vision_config", None), getattr(args, "unet_config", None)]
        refuse_output_over_inputs(args.output, configs)
        if args.command == "chat":
            from .chat import convert_chat

            vision_config = read_json(args.vision_config)
            output = convert_chat(args.checkpoint, args.vocab, args.output, llm_config, vision_config, **common)
        else:
            from .paint import convert_paint

            unet_config = read_json(args.unet_config)
            output = convert_paint(args.checkpoint, args.vocab, args.vae, args.output, llm_config, unet_config, **common)
    except (OSError, ValueError) as error:  # missing or unwritable paths, and every refused input
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {output}")
    if args.push_to_hub:
        try:
            commit = push_to_hub(
                output, repo_id, token=args.hub_token, private=args.hub_private_repo or None,
                commit_message=f"viscpm-convert {args.command} of {Path(args.checkpoint).name}",
            )  # fmt: skip
        except (OSError, ValueError) as error:  # a refused folder, or a failed upload and how to retry it
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"uploaded to {commit.commit_url}")
    return 0
