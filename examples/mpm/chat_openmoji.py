"""MPM experiment 2: VisCPM-Chat on a frozen multilingual LLM, English image data, a small share of Chinese.

Stage 1 (LLM frozen) aligns a small vision tower to gemma-3-270m with English captions of OpenMoji emoji. Stage 2
instruction-tunes (LoRA on the LLM, bridge and tower in full) on English question-answer pairs plus a share of
Chinese ones: 0%, 0.1%, 1%, 10%, 50% (paper appendix D.4, Figure 5). Each model is then asked "what is shown?" in
Chinese, English, German and French; scores per share and language: answer correctness (names the emoji in any
language) and response-language accuracy (lingua). German and French are never trained: zero-shot.

    python examples/mpm/chat_openmoji.py --output_dir runs/mpm-chat

Writes `results.json`, `results.md` (the table) and `results.png` (language accuracy against the share).
`--llm smollm2` runs the English-only control (SmolLM2-135M-Instruct).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import logging as transformers_logging

from viscpm_hf import VisCPMChatConfig, VisCPMChatForConditionalGeneration, VisCPMChatProcessor, paper_image_processor
from viscpm_hf.data.openmoji import build_openmoji_dataset
from viscpm_hf.evaluation import LanguageIdentifier, answer_names_emoji
from viscpm_hf.pivots import load_gemma3_270m, load_smollm2


EXAMPLES = Path(__file__).resolve().parents[1]
LLMS = {"gemma": load_gemma3_270m, "smollm2": load_smollm2}
LANGUAGES = ("en", "zh", "de", "fr")
DEMO_EMOJI = ("🐘", "🍎", "🐱", "🏠", "🚗", "☀️")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--output_dir", default="runs/mpm-chat")
    add("--llm", choices=sorted(LLMS), default="gemma")
    add("--shares", type=float, nargs="+", default=[0.0, 0.001, 0.01, 0.1, 0.5], help="Shares of Chinese in stage 2.")
    add("--num_emoji", type=int, default=300, help="Emoji drawn; the train split is trained on and asked about.")
    add("--image_size", type=int, default=32)
    add("--num_query_tokens", type=int, default=8)
    add("--sft_repeats", type=int, default=5, help="Copies of each English Q&A in stage 2 (so 0.1%% is an example).")
    add("--stage1_steps", type=int, default=600)
    add("--stage2_steps", type=int, default=300)
    add("--batch_size", type=int, default=16)
    add("--stage1_learning_rate", type=float, default=1e-3)
    add("--stage2_learning_rate", type=float, default=5e-4)
    add("--eval_emoji", type=int, default=60, help="Emoji asked about per language.")
    add("--max_new_tokens", type=int, default=16)
    add("--num_beams", type=int, default=1, help="The paper decodes with 3 beams; greedy keeps the sweep fast.")
    add("--threads", type=int, default=None)
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


# 1. Data: PNG files and the JSON formats train_chat.py reads.


def _llava(image: str, question: str, answer: str) -> dict:
    return {"image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}


def build_data(args, folder: Path):
    """Writes images/, captions_en.json (stage 1), sft_en.json and sft_zh.json (stage 2); returns the train split."""
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
        for lang in ("en", "zh"):
            rows = [_llava(n, q, a) for n, q, a in zip(names, train[f"question_{lang}"], train[f"answer_{lang}"])]
            (folder / f"sft_{lang}.json").write_text(json.dumps(rows * args.sft_repeats, ensure_ascii=False))
    return train


# 2. The model: the pretrained LLM whole, a small vision tower and the bridge from scratch.


def build_initial_model(args, folder: Path) -> None:
    if (folder / "config.json").is_file():
        return
    llm, tokenizer = LLMS[args.llm]()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = VisCPMChatConfig(
        vision_config={
            "model_type": "siglip_vision_model", "hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 4,
            "num_attention_heads": 4, "image_size": args.image_size, "patch_size": 4, "vision_use_head": False,
        },
        text_config=llm.config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        num_query_tokens=args.num_query_tokens,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = VisCPMChatForConditionalGeneration(config)
    model.model.llm.load_state_dict(llm.state_dict())
    model.resize_token_embeddings(len(tokenizer))
    model.generation_config.update(num_beams=args.num_beams, length_penalty=1.0, max_new_tokens=args.max_new_tokens)
    model.save_pretrained(folder)
    processor = VisCPMChatProcessor(
        image_processor=paper_image_processor(args.image_size), tokenizer=tokenizer, num_image_tokens=args.num_query_tokens
    )
    processor.save_pretrained(folder)


# 3. The two stages, with examples/train_chat.py.


def run_train_chat(args, extra: list[str], out: Path) -> float:
    if (out / "config.json").is_file():
        return json.loads((out / "run_time.json").read_text())["seconds"]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [
        sys.executable, str(EXAMPLES / "train_chat.py"), "--output_dir", str(out),
        "--per_device_train_batch_size", str(args.batch_size), "--lr_scheduler_type", "constant_with_warmup",
        "--warmup_steps", "20", "--logging_steps", "20", "--save_strategy", "no", "--report_to", "none",
        "--seed", str(args.seed), "--dataloader_num_workers", "0", "--use_cpu", str(not torch.cuda.is_available()),
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
        "--learning_rate", str(args.stage1_learning_rate),
    ], out)  # fmt: skip


def stage2(args, data: Path, stage1_dir: Path, share: float, out: Path) -> float:
    mixing = ["--target_language_data", str(data / "sft_zh.json"), "--target_language_ratio", str(share)] if share else []
    return run_train_chat(args, [
        "--model_name_or_path", str(stage1_dir), "--stage", "sft", "--lora", "--merge_adapters",
        "--data", str(data / "sft_en.json"), *mixing, "--max_steps", str(args.stage2_steps),
        "--learning_rate", str(args.stage2_learning_rate),
    ], out)  # fmt: skip


# 4. Asking in four languages.


@torch.no_grad()
def answer(model, processor, images, questions: list[str], batch: int = 16) -> list[str]:
    answers = []
    processor.tokenizer.padding_side = "left"
    for start in range(0, len(questions), batch):
        messages = [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            for q in questions[start : start + batch]
        ]
        texts = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[[i] for i in images[start : start + batch]], text=texts, padding=True, return_tensors="pt")
        output = model.generate(**inputs, do_sample=False)
        answers += processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def evaluate(args, model_dir: Path, train, identify: LanguageIdentifier) -> dict:
    saved = model_dir / "eval.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    rows = train.select(range(min(args.eval_emoji, len(train))))
    images = list(rows["image"])
    names = [{lang: rows[f"name_{lang}"][i] for lang in LANGUAGES} for i in range(len(rows))]
    result = {}
    for lang in ("zh", "en", "de", "fr"):
        answers = answer(model, processor, images, list(rows[f"question_{lang}"]))
        result[lang] = {
            "correct": sum(answer_names_emoji(a, n) for a, n in zip(answers, names)) / len(answers),
            "language": identify.accuracy(answers, lang),
            "examples": answers[:5],
        }
        print(model_dir.name, lang, json.dumps(result[lang], ensure_ascii=False), flush=True)
    saved.write_text(json.dumps(result, ensure_ascii=False, indent=2))
    return result


def report(args, results: dict, out: Path) -> str:
    lines = [
        "| Chinese share in stage 2 | " + " | ".join(f"{lang}: correct / right language %" for lang in ("zh", "en", "de", "fr")) + " |",
        "|---|" + "---|" * 4,
    ]
    for share, result in results.items():
        cells = [f"{100 * result[l]['correct']:.0f} / {100 * result[l]['language']:.0f}" for l in ("zh", "en", "de", "fr")]
        lines.append(f"| {100 * float(share):g}% | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        shares = [float(s) for s in results]
        positions = range(len(shares))
        figure, axis = plt.subplots(figsize=(6, 3))
        for lang, style in (("zh", "o-"), ("en", "s--"), ("de", "^:"), ("fr", "v:")):
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
    build_initial_model(args, out / "init")
    times = {"stage1": stage1(args, data, out / "init", out / "stage1")}
    identify = LanguageIdentifier(LANGUAGES)
    results = {}
    for share in args.shares:
        folder = out / f"stage2-{share:g}"
        times[f"stage2-{share:g}"] = stage2(args, data, out / "stage1", share, folder)
        results[str(share)] = evaluate(args, folder, train, identify)
    (out / "results.json").write_text(
        json.dumps({"args": vars(args), "seconds": times, "results": results}, indent=2, ensure_ascii=False)
    )
    print(report(args, results, out))
    return results


if __name__ == "__main__":
    main()
