"""Train VisCPM-Chat with MPM's two stages on TRL's SFTTrainer (MPM paper, section 3.2, equations 1 and 2).

Stage 1, `--stage pretrain`: the LLM stays frozen and the vision side (bridge, and the vision tower unless
`--tune_vision false`) learns from image-caption pairs; the loss covers the captions only.
Stage 2, `--stage sft`: instruction tuning of the bridge and the LLM (`--tune_vision`, `--tune_llm`, or `--lora`),
with the loss on every assistant turn of multi-turn conversations, never on prompts, image or padding tokens.

Data: LLaVA-style conversation JSON, caption JSON/CSV (`image`, `caption`), or a local `datasets` dataset with
image and text columns; images are resolved against `--image_folder`. `--target_language_data` and
`--target_language_ratio` mix in translated data as the paper does.

    python examples/train_chat.py --model_name_or_path DIR --stage pretrain --data captions.json \\
        --image_folder images/ --output_dir out/ --max_steps 1000
    accelerate launch --config_file examples/configs/deepspeed_zero2.yaml examples/train_chat.py ...   # multi-GPU

Any `SFTConfig` / `TrainingArguments` flag works too (`--learning_rate`, `--save_steps`, `--bf16`, ...).
"""

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser
from trl import SFTConfig, SFTTrainer

import viscpm_hf  # noqa: F401  (registers the VisCPM classes)
from viscpm_hf.data import caption_dataset, conversation_dataset, image_text_dataset, mix_languages


LLM_PROJECTIONS = r".*\.llm\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "A VisCPM-Chat folder (or Hub id) to start from."})
    stage: Literal["pretrain", "sft"] = field(
        default="sft", metadata={"help": "pretrain: LLM frozen, captions; sft: instruction tuning (paper eq. 1 / 2)."}
    )
    data: str = field(
        default=None,
        metadata={"help": "Conversation JSON (LLaVA style), caption JSON/CSV, or a local `datasets` folder."},
    )
    image_folder: str | None = field(default=None, metadata={"help": "Folder the data's image paths are relative to."})
    image_column: str = field(default="image", metadata={"help": "Image column of a `datasets` dataset."})
    caption_column: str = field(default="caption", metadata={"help": "Text column of a `datasets` dataset."})
    caption_prompts: list[str] = field(
        default_factory=lambda: ["Describe the image briefly."],
        metadata={"help": "User prompts for caption data, one drawn per example."},
    )
    target_language_data: str | None = field(
        default=None, metadata={"help": "Translated (target-language) data in any of the formats of --data."}
    )
    target_language_ratio: float = field(
        default=0.0, metadata={"help": "Share of target-language examples in the mixture (the paper: 0.001 to 0.5)."}
    )
    on_missing_image: Literal["skip", "error"] = field(
        default="skip", metadata={"help": "A missing or unreadable image: skip the example (with a count) or fail."}
    )
    tune_vision: bool = field(default=True, metadata={"help": "Train the vision tower too (the bridge always trains)."})
    tune_llm: bool = field(default=True, metadata={"help": "sft only: train the LLM (frozen in pretrain)."})
    lora: bool = field(default=False, metadata={"help": "sft only: LoRA on the LLM's projections; the bridge trains fully."})
    qlora: bool = field(default=False, metadata={"help": "LoRA over a 4-bit LLM (needs bitsandbytes and a GPU)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    merge_adapters: bool = field(default=False, metadata={"help": "Merge LoRA adapters into the saved model."})


def load_data(source: str, args: ScriptArguments, seed: int):
    path = Path(source)
    if path.is_dir():
        return image_text_dataset(path, args.image_column, args.caption_column, args.caption_prompts, seed=seed)
    if not path.is_file():
        raise SystemExit(f"error: data not found: {source}")
    if path.suffix == ".json" and '"conversations"' in path.read_text(encoding="utf-8")[:100_000]:
        return conversation_dataset(path, args.image_folder, args.on_missing_image)
    return caption_dataset(path, args.image_folder, args.caption_prompts, args.on_missing_image, seed=seed)


def set_trainable(model, args: ScriptArguments) -> None:
    """Freezes what the stage keeps fixed, before the trainer sees the model."""
    model.requires_grad_(False)
    model.model.bridge.requires_grad_(True)
    model.model.vision_tower.requires_grad_(args.tune_vision)
    if not args.tune_vision:
        # The trainer calls model.train() every step: a frozen tower with batch norm (EfficientNet, ResNet) would
        # then normalise with batch statistics and overwrite its pretrained running ones.
        model.model.vision_tower.register_forward_pre_hook(_keep_in_eval_mode)
    model.model.llm.requires_grad_(args.stage == "sft" and args.tune_llm and not args.lora)


def _keep_in_eval_mode(module, _inputs) -> None:
    module.eval()


def add_lora(model, args: ScriptArguments):
    from peft import LoraConfig, get_peft_model

    modules_to_save = ["bridge"] + (["vision_tower"] if args.tune_vision else [])
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=LLM_PROJECTIONS,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def check_arguments(args: ScriptArguments, training: SFTConfig) -> None:
    if args.data is None:
        raise SystemExit("error: pass --data (conversations, captions, or a datasets folder).")
    if args.stage == "pretrain" and args.lora:
        raise SystemExit("error: --lora trains the LLM, which stage pretrain keeps frozen; use --stage sft.")
    if args.qlora and not (torch.cuda.is_available() and _has_bitsandbytes()):
        raise SystemExit("error: --qlora needs bitsandbytes and a CUDA GPU; use --lora on this machine.")
    resume = training.resume_from_checkpoint
    if resume and resume not in ("latest", "True", "true") and not Path(resume).is_dir():
        raise SystemExit(f"error: --resume_from_checkpoint {resume} does not exist.")
    if args.target_language_ratio and not args.target_language_data:
        raise SystemExit("error: --target_language_ratio needs --target_language_data.")


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def load_model(args: ScriptArguments):
    kwargs = {}
    if args.qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=["vision_tower", "bridge", "lm_head"],
        )
    return AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, **kwargs)


def main(argv: list[str] | None = None) -> SFTTrainer:
    parser = HfArgumentParser((ScriptArguments, SFTConfig))
    args, training = parser.parse_args_into_dataclasses(args=argv)
    args.lora = args.lora or args.qlora
    check_arguments(args, training)
    # Vision data: the processor pads and the loss covers assistant turns only (image tokens never count).
    training.max_length = None
    training.assistant_only_loss = True
    training.remove_unused_columns = False

    with training.main_process_first():
        dataset = load_data(args.data, args, training.seed)
        if args.target_language_data:
            target = load_data(args.target_language_data, args, training.seed)
            dataset = mix_languages(dataset, target, args.target_language_ratio, seed=training.seed)

    model = load_model(args)
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    set_trainable(model, args)
    if args.lora:
        model = add_lora(model, args)

    trainer = SFTTrainer(model=model, args=training, train_dataset=dataset, processing_class=processor)
    resume = training.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume in ("latest", "True", "true") else resume)
    save(trainer, processor, args, training.output_dir)
    return trainer


def save(trainer: SFTTrainer, processor, args: ScriptArguments, output_dir: str) -> None:
    """An AutoModelForImageTextToText folder (adapters merged on request), written by the main process only."""
    if args.lora and args.merge_adapters:
        if trainer.accelerator.is_main_process:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        Path(output_dir, "train_log.json").write_text(json.dumps(history, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
