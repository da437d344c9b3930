"""Train VisCPM-Chat with MPM's two stages on TRL's SFTTrainer (MPM paper, section 3.2, equations 1 and 2).

Stage 1, `--stage pretrain`: the LLM stays frozen and the vision side (bridge, and the vision tower unless
`--tune_vision false`) learns from image-caption pairs; the loss covers the captions only.
Stage 2, `--stage sft`: instruction tuning of the bridge and the LLM (`--tune_vision`, `--tune_llm`, `--lora` or
`--qlora`), with the loss on every assistant turn of multi-turn conversations, never on prompts, image or padding.

The LLM is any causal LM, or CPM-Bee, the paper's own (a folder from `viscpm-convert chat`). On CPM-Bee the prompt
is the original's structure (image, context, question, answer; prompt bidirectional, answer causal); each assistant
turn becomes one example whose earlier turns are its context, and `CpmBeeChatCollator` puts the loss on exactly the
answer tokens and their `</s>` (see `viscpm_hf/training/cpmbee.py`).

Data: LLaVA-style conversation JSON, caption JSON/CSV (`image`, `caption`), or a local `datasets` dataset with
image and text columns; images are resolved against `--image_folder`. `--target_language_data` and
`--target_language_ratio` mix in translated data as the paper does.

    python examples/train_chat.py --model_name_or_path DIR --stage pretrain --data captions.json \\
        --image_folder images/ --output_dir run/ --max_steps 1000
    accelerate launch --config_file examples/configs/deepspeed_zero2_chat.yaml examples/train_chat.py ...   # multi-GPU

Outputs, in `--output_dir`: `model/` (what to load or upload: safetensors, configs, processor files and a model card;
with `--lora` and no `--merge_adapters`, the adapter), `train_log.json`, `training_args.json`, and the resumable
`checkpoint-N/` folders beside it. `--resume_from_checkpoint latest` continues from the newest complete checkpoint;
half-written ones (a crash during a save) are reported and set aside.

Any `SFTConfig` / `TrainingArguments` flag works too (`--learning_rate`, `--save_steps`, `--bf16`, ...). The Trainer's
`--push_to_hub` (with `--hub_model_id`, `--hub_token`, `--hub_private_repo`) uploads `model/` once exported, not the
checkpoints; the card names the base model, licence and languages of the starting model's card unless
`--base_model`, `--license` or `--language` say otherwise.
"""

import json
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from huggingface_hub import ModelCardData
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser
from trl import SFTConfig, SFTTrainer

from viscpm_hf import VisCPMChatCpmBeeProcessor
from viscpm_hf.hub import check_hub_target, derived_metadata, missing_metadata, push_to_hub, write_card
from viscpm_hf.integrations.hub_kernels import disable_hub_kernels_when_offline
from viscpm_hf.mpm.data import (
    caption_dataset,
    conversation_dataset,
    image_text_dataset,
    mix_languages,
    split_assistant_turns,
)
from viscpm_hf.training.checkpoints import (
    CompleteCheckpoints,
    checkpoint_problem,
    latest_complete_checkpoint,
    write_json_atomically,
)
from viscpm_hf.training.cpmbee import CpmBeeChatCollator, ModelLossSFTTrainer
from viscpm_hf.training.sharding import deepspeed_problem, set_fsdp_units, warn_if_not_sharded


logger = logging.getLogger("train_chat")

LLM_PROJECTIONS = r".*\.llm\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# Module names kept in full precision under --qlora. bitsandbytes' skip list matches a name from the start up to a
# module boundary (or as a suffix), so these exact names cover their submodules and nothing else.
QLORA_FULL_PRECISION = ("model.vision_tower", "model.bridge", "model.llm.lm_head")
EXPORT_FOLDER = "model"


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
    lora: bool = field(
        default=False, metadata={"help": "sft only: LoRA on the LLM's projections; the bridge trains fully."}
    )
    qlora: bool = field(
        default=False,
        metadata={"help": "LoRA over the LLM's Linears quantized to 4 bits (NF4, bitsandbytes); vision tower, bridge "
                  "and head stay in full precision."},
    )  # fmt: skip
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    merge_adapters: bool = field(default=False, metadata={"help": "Merge LoRA adapters into the saved model."})
    base_model: str | None = field(
        default=None,
        metadata={"help": "Hub id the model card names as the base model (default: --model_name_or_path if it is a "
                  "Hub id, else the base model of that folder's card)."},
    )  # fmt: skip
    license: str | None = field(
        default=None, metadata={"help": "Licence id for the model card (default: the starting model's card's)."}
    )
    language: list[str] | None = field(
        default=None, metadata={"help": "Languages for the model card (default: the starting model's card's)."}
    )


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
    if args.qlora:
        problem = qlora_problem(training.device)
        if problem:
            raise SystemExit(f"error: --qlora cannot run here: {problem}. Use --lora (full-precision LLM) instead.")
    resume = training.resume_from_checkpoint
    if resume and resume not in ("latest", "True", "true"):
        if not Path(resume).exists():
            raise SystemExit(f"error: --resume_from_checkpoint {resume} does not exist.")
        problem = checkpoint_problem(resume)
        if problem:
            raise SystemExit(
                f"error: --resume_from_checkpoint {resume} is not a complete checkpoint: {problem}. Pass another "
                "checkpoint-N folder, or 'latest' for the newest complete one."
            )
    if args.target_language_ratio and not args.target_language_data:
        raise SystemExit("error: --target_language_ratio needs --target_language_data.")


def qlora_problem(device: torch.device) -> str | None:
    """Why 4-bit bitsandbytes layers cannot run on `device`, or None: a small NF4 round trip tells."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    try:
        weight = torch.randn(64, 64, device=device)
        packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4")
        bnb_functional.dequantize_4bit(packed, state, quant_type="nf4")
    except Exception as error:  # bitsandbytes raises many kinds for an unsupported backend
        return f"bitsandbytes {version('bitsandbytes')} has no 4-bit kernels for {device} ({error})"
    return None


def load_model(args: ScriptArguments, training: SFTConfig):
    kwargs = {}
    if args.qlora:
        from transformers import BitsAndBytesConfig

        compute_dtype = torch.bfloat16 if training.bf16 else torch.float16 if training.fp16 else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=[re.escape(name) for name in QLORA_FULL_PRECISION],
        )
        kwargs["device_map"] = {"": training.device}  # 4-bit weights are placed when loaded; they cannot move later
    model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, **kwargs)
    if args.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training.gradient_checkpointing)
    return model


def resolve_resume(training: SFTConfig) -> str | None:
    """`latest` -> the newest complete checkpoint in --output_dir (incomplete ones set aside), or None."""
    resume = training.resume_from_checkpoint
    if resume not in ("latest", "True", "true"):
        return resume
    found = latest_complete_checkpoint(training.output_dir)
    if found is None:
        logger.info("No complete checkpoint in %s: starting a new run.", training.output_dir)
        return None
    logger.info("Resuming from %s.", found)
    return str(found)


def main(argv: list[str] | None = None) -> SFTTrainer:
    disable_hub_kernels_when_offline()
    parser = HfArgumentParser((ScriptArguments, SFTConfig))
    # Before SFTConfig is built: building it sets up DeepSpeed, and ZeRO-3 then partitions the model being loaded.
    problem = deepspeed_problem(use_cpu=parser.parse_known_args(argv)[0].use_cpu)
    if problem:
        raise SystemExit(f"error: {problem}")
    args, training = parser.parse_args_into_dataclasses(args=argv)
    args.lora = args.lora or args.qlora
    check_arguments(args, training)
    card = derived_metadata(args.model_name_or_path, base_model=args.base_model, license=args.license,
                            language=args.language)  # fmt: skip
    repo_id = hub_repo(training, card) if training.push_to_hub else None
    # The Trainer would upload output_dir, checkpoints and all, at every save; model/ goes up once exported instead.
    training.push_to_hub = False
    processor = AutoProcessor.from_pretrained(args.model_name_or_path)
    structured = isinstance(processor, VisCPMChatCpmBeeProcessor)  # the released model: CPM-Bee's structured prompts
    # Vision data: the processor pads. Generic LLMs: TRL's collator with the loss on assistant turns (from the
    # template's generation spans); CPM-Bee: our collator puts it on the answer of each example.
    training.max_length = None
    training.assistant_only_loss = not structured
    training.remove_unused_columns = False
    # Old checkpoints are pruned once the new one is complete (CompleteCheckpoints), not by the Trainer before.
    checkpoints = CompleteCheckpoints(training.save_total_limit)
    training.save_total_limit = None

    with training.main_process_first():
        dataset = load_data(args.data, args, training.seed)
        if args.target_language_data:
            target = load_data(args.target_language_data, args, training.seed)
            dataset = mix_languages(dataset, target, args.target_language_ratio, seed=training.seed)
        if structured:
            dataset = split_assistant_turns(dataset)

    model = load_model(args, training)
    set_trainable(model, args)
    if args.lora:
        model = add_lora(model, args)

    trainer_class, collator = (ModelLossSFTTrainer, CpmBeeChatCollator(processor)) if structured else (SFTTrainer, None)
    trainer = trainer_class(
        model=model,
        args=training,
        train_dataset=dataset,
        processing_class=processor,
        data_collator=collator,
        callbacks=[checkpoints],
    )
    if trainer.is_fsdp_enabled:
        set_fsdp_units(trainer.accelerator.state.fsdp_plugin, trainer.model)
    warn_if_not_sharded(trainer.accelerator)
    trainer.train(resume_from_checkpoint=resolve_resume(training))
    folder = export(trainer, processor, args, training, card, repo_id)
    if repo_id and PartialState().is_main_process:
        upload(folder, repo_id, training, f"train_chat.py: stage {args.stage}, {trainer.state.global_step} steps")
    return trainer


def hub_repo(training: SFTConfig, card: dict) -> str:
    """The repo --push_to_hub uploads to (by default, as the Trainer's, the output folder's name), checked before
    training: a valid id, a login, and a model card that will be complete."""
    repo_id = training.hub_model_id or Path(training.output_dir).absolute().name
    try:
        check_hub_target(repo_id, training.hub_token, card)
    except ValueError as error:
        raise SystemExit(f"error: --push_to_hub: {error}")
    return repo_id


def upload(folder: Path, repo_id: str, training: SFTConfig, message: str) -> None:
    try:
        commit = push_to_hub(folder, repo_id, token=training.hub_token, private=training.hub_private_repo,
                             commit_message=message)  # fmt: skip
    except (OSError, ValueError) as error:  # a refused folder, or a failed upload and how to retry it
        raise SystemExit(f"error: {error}")
    logger.info("Uploaded %s to %s.", folder, commit.commit_url)


def export(
    trainer: SFTTrainer, processor, args: ScriptArguments, training: SFTConfig, card: dict, repo_id: str | None = None
) -> Path:
    """Writes `output_dir/model`, a folder to load or upload as is, and the run's log and arguments beside it.

    The folder is written under a hidden name and renamed once complete. It holds the weights (safetensors), the
    configs, the processor files and a model card; no optimizer state, checkpoint or pickle (the Trainer's
    `training_args.bin` becomes `training_args.json` beside the folder).
    """
    output_dir = Path(training.output_dir)
    final, partial = output_dir / EXPORT_FOLDER, output_dir / f".{EXPORT_FOLDER}.partial"
    adapter = output_dir / f".{EXPORT_FOLDER}.adapter"
    merge = args.lora and args.merge_adapters
    state = PartialState()
    if state.is_main_process:
        for stale in (partial, adapter):
            shutil.rmtree(stale, ignore_errors=True)
    state.wait_for_everyone()
    trainer.save_model(str(adapter if merge else partial))  # every process: gathers sharded weights (FSDP, ZeRO-3)
    if merge and state.is_main_process:
        merge_adapter(args.model_name_or_path, adapter, partial)
        processor.save_pretrained(partial)
        shutil.rmtree(adapter)
    if state.is_main_process:
        (partial / "training_args.bin").unlink(missing_ok=True)
        write_model_card(partial / "README.md", trainer, args, args.lora and not args.merge_adapters, card, repo_id)
        if final.exists():
            previous = output_dir / f".{EXPORT_FOLDER}.previous"
            shutil.rmtree(previous, ignore_errors=True)
            final.rename(previous)
            partial.rename(final)
            shutil.rmtree(previous)
        else:
            partial.rename(final)
        write_json_atomically(output_dir / "training_args.json", json.loads(training.to_json_string()))
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        write_json_atomically(output_dir / "train_log.json", history)
    state.wait_for_everyone()
    return final


def merge_adapter(base: str, adapter: Path, output: Path) -> None:
    """Base model + saved adapter -> one model, on the main process: the base is loaded anew in its own precision
    (so a --qlora adapter is merged into unquantized weights, the usual QLoRA export, and sharded training needs no
    gathered PEFT model)."""
    from peft import PeftModel
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if is_deepspeed_zero3_enabled():  # training is over: load whole, not partitioned across processes that wait
        unset_hf_deepspeed_config()
    model = AutoModelForImageTextToText.from_pretrained(base, dtype="auto")
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(output)


CARD = """# {what} trained with MPM {stage}

Trained from `{base}` with `examples/train_chat.py` of viscpm-hf (TRL `SFTTrainer`) on `{data}`: {steps} steps,
final training loss {loss:.4f}. Trained: {trained}. The base model's licence applies to these weights.

```python
import viscpm_hf  # registers the VisCPM classes
from transformers import AutoModelForImageTextToText, AutoProcessor
{load}
processor = AutoProcessor.from_pretrained("{where}")
answer, history = model.chat("photo.jpg", "What is in the picture?", processor)
```
"""


def write_model_card(
    path: Path, trainer: SFTTrainer, args: ScriptArguments, adapter: bool, card: dict, repo_id: str | None
) -> None:
    """A short card: what was trained, from what, on which data, and how to load it (from `repo_id` once pushed);
    `card` gives the base model, licence and languages."""
    base = args.model_name_or_path
    where = repo_id or "path/to/this/folder"
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    trained = ["the bridge"] + (["the vision tower"] if args.tune_vision else [])
    if args.lora:
        trained.append("LoRA adapters on the LLM" + (" (4-bit base)" if args.qlora else ""))
    elif args.stage == "sft" and args.tune_llm:
        trained.append("the LLM")
    if adapter:
        load = (f'from peft import PeftModel\n\nmodel = AutoModelForImageTextToText.from_pretrained("{base}")\n'
                f'model = PeftModel.from_pretrained(model, "{where}")')  # fmt: skip
    else:
        load = f'\nmodel = AutoModelForImageTextToText.from_pretrained("{where}")'
    body = CARD.format(
        what="LoRA adapter" if adapter else "VisCPM-Chat",
        stage="stage 1 (captions, LLM frozen)" if args.stage == "pretrain" else "stage 2 (instructions)",
        base=base,
        data=Path(args.data).name,
        steps=trainer.state.global_step,
        loss=losses[-1] if losses else float("nan"),
        trained=", ".join(trained),
        load=load,
        where=where,
    )
    tags = ["viscpm", "mpm", "trl", "sft"] + (["lora"] if adapter else [])
    data = ModelCardData(
        library_name="peft" if adapter else "transformers", pipeline_tag="image-text-to-text", tags=tags, **card
    )
    missing = missing_metadata(data)
    if missing:
        logger.warning(
            "The model card lacks %s (the card of %s does not give them): pass --base_model / --license / --language "
            "to complete it.", ", ".join(missing), base,
        )  # fmt: skip
    write_card(path, data, body)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
