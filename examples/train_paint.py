"""Train VisCPM-Paint the MPM way (paper section 3.3) with accelerate.

The multilingual LLM (the text encoder) and the VAE stay frozen: no gradients, no optimizer state, and they are
only placed on the device, never prepared. The transblock and the UNet's cross-attention layers (`attn2`) learn
from English image-caption pairs; `--train_unet full` trains the whole UNet (small UNets trained from scratch).
`--lora_rank R` trains a rank-R LoRA of the cross-attention layers instead, with the transblock as loaded: a small
`pytorch_lora_weights.safetensors` that `pipe.load_lora_weights(f"{output_dir}/pipeline")` puts into the base pipeline.
The loss is the MSE between the UNet's prediction (noise, or the scheduler's prediction type) and its target on
VAE latents with uniformly drawn timesteps; `--caption_dropout` replaces captions by "" so that classifier-free
guidance works at sampling time. The paper trains at 256 x 256, then continues at 512 x 512 from that checkpoint.

    accelerate launch examples/train_paint.py --pretrained_model_name_or_path viscpm-paint \\
        --train_data_dir images/ --resolution 256 --output_dir paint-256 --max_train_steps 10000
    accelerate launch --config_file examples/configs/deepspeed_zero2.yaml examples/train_paint.py ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_paint.py ...   # 2 CPU processes

Outputs, in `--output_dir`: `pipeline/`, the folder to load or upload as is (safetensors, json configs, tokenizer
files and a model card; no optimizer state or pickle): `VisCPMPaintPipeline.from_pretrained(f"{output_dir}/pipeline")`,
or `DiffusionPipeline.from_pretrained(...)` after `import viscpm_hf` (with `--lora_rank`: the LoRA file, loaded into the
base pipeline with `load_lora_weights`). It is written under a hidden name and renamed once complete, so a killed run
never leaves half a pipeline and an earlier one stays until the new one is whole. Beside it: `train_log.jsonl` (the
loss of every step), `validation/` images and the `checkpoint-N/` folders that `--resume_from_checkpoint latest`
continues from.
"""

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path

import datasets
import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import convert_state_dict_to_diffusers
from huggingface_hub import ModelCardData
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import viscpm_hf  # noqa: F401  (registers VisCPM-Paint with diffusers)
from viscpm_hf import VisCPMPaintPipeline
from viscpm_hf.hub import check_hub_target, derived_metadata, missing_metadata, push_to_hub, write_card
from viscpm_hf.integrations.hub_kernels import disable_hub_kernels_when_offline
from viscpm_hf.training.paint import (
    CaptionEncoder,
    EpochSampler,
    PaintDenoiser,
    PaintTrainDataset,
    TextEmbeddingCache,
    collate_paint,
    load_image_captions,
    mark_trainable,
    pad_text_states,
)
from viscpm_hf.training.sharding import SHARDED, deepspeed_problem, set_fsdp_units, warn_if_not_sharded


logger = get_logger(__name__, log_level="INFO")

PROGRESS_FILE = "training_progress.json"  # inside every checkpoint: where the run stood
LOG_FILE = "train_log.jsonl"  # one line per optimizer step: step, epoch, loss, lr
EXPORT_FOLDER = "pipeline"  # inside --output_dir: the trained pipeline (or LoRA), to load or upload as is


def read_log_rows(path: Path) -> list[dict]:
    """The records of `train_log.jsonl`; a line a kill tore mid-write is skipped and reported, not fatal."""
    if not path.exists():
        return []
    rows, torn = [], 0
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn += 1
    if torn:
        logger.warning(f"{path}: skipped {torn} torn line(s), left by a run that was killed while writing them.")
    return rows


WEIGHTS_FILE = "model.safetensors"  # accelerate's name for the (here: trained-only) weights of the prepared model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    # Model
    add("--pretrained_model_name_or_path", required=True, help="A VisCPM-Paint pipeline folder (or Hub id) to start from.")
    add("--train_unet", choices=["attn2", "full"], default="attn2",
        help="attn2: train the UNet's cross-attention layers only (the paper); full: the whole UNet.")
    add("--lora_rank", type=int, default=None,
        help="Train a LoRA of this rank on the cross-attention layers (to_q, to_k, to_v, to_out.0 of every attn2) "
             "instead of the layers themselves; the transblock stays as loaded. OUTPUT_DIR/pipeline then holds "
             "pytorch_lora_weights.safetensors, for pipe.load_lora_weights('OUTPUT_DIR/pipeline') on the base pipeline.")
    add("--lora_alpha", type=float, default=None,
        help="LoRA alpha (the update is scaled by alpha / rank); default: the rank, a scale of 1.")
    add("--prediction_type", choices=["epsilon", "v_prediction", "sample"], default=None,
        help="What the UNet predicts (default: the pipeline scheduler's). A new value is saved into the scheduler.")
    # Data
    add("--train_data_dir", default=None,
        help='An image folder with metadata.jsonl lines {"file_name": ..., "text": ...}.')
    add("--dataset_name", default=None,
        help="A datasets dataset: a save_to_disk folder, a data folder/file that load_dataset reads, or a Hub id.")
    add("--image_column", default="image", help="Image column of --dataset_name (images, or paths relative to it).")
    add("--caption_column", default="text", help="Caption column of --dataset_name, or caption key of metadata.jsonl.")
    add("--on_missing_image", choices=["skip", "error"], default="skip",
        help="A missing or unreadable image: leave the example out (with a warning and a count) or stop.")
    add("--resolution", type=int, default=512,
        help="Square training size; the paper trains at 256, then continues at 512 from that checkpoint.")
    add("--center_crop", action="store_true", help="Crop the centre after resizing (default: a random crop).")
    add("--random_flip", action="store_true", help="Mirror images horizontally with probability 0.5.")
    add("--caption_dropout", type=float, default=0.1,
        help='Share of captions replaced by "" (trains the unconditional branch of classifier-free guidance).')
    add("--conditioning_shift", type=float, default=0.0,
        help="Norm of a random offset added to each caption's LLM states (all tokens alike) while training: another "
             "language moves a caption's states by an offset too, so the UNet learns not to rely on their exact place.")
    add("--conditioning_offsets", default=None,
        help="A safetensors file whose tensor 'offsets' (n, LLM hidden size) holds real shifts, e.g. translated "
             "captions' mean states minus their English caption's: each caption gets one row drawn at random "
             "instead of an isotropic offset, times --conditioning_offsets_scale.")
    add("--conditioning_offsets_scale", type=float, default=1.0, help="Multiplier of the drawn --conditioning_offsets.")
    add("--precompute_text_embeddings", action="store_true",
        help="Encode every caption once with the frozen LLM and keep the hidden states on disk (the transblock "
             "still trains on top); an existing cache is reused and only missing captions are encoded.")
    add("--text_embedding_cache", default=None,
        help="Folder of the text embedding cache (implies --precompute_text_embeddings; default: "
             "OUTPUT_DIR/text_embedding_cache).")
    add("--dataloader_num_workers", type=int, default=0, help="Data-loading worker processes (0: the main process).")
    # Optimisation
    add("--train_batch_size", type=int, default=16, help="Images per device and micro-batch.")
    add("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    add("--learning_rate", type=float, default=1e-4, help="Peak learning rate of AdamW.")
    add("--lr_scheduler", default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule after the warm-up.")
    add("--lr_warmup_steps", type=int, default=0, help="Optimizer steps of linear warm-up.")
    add("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    add("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    add("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    add("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    add("--max_train_steps", type=int, default=None, help="Optimizer steps to train (overrides --num_train_epochs).")
    add("--num_train_epochs", type=int, default=1, help="Epochs to train when --max_train_steps is not given.")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
        help="Mixed precision through the Accelerator (default: the accelerate config's). The frozen parts are "
             "held in this precision, the trained parameters in float32.")
    add("--gradient_checkpointing", action="store_true", help="Recompute UNet activations in backward to save memory.")
    add("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    add("--use_ema", action="store_true", help="Keep an exponential moving average of the trained parameters; "
        "the saved pipeline gets the averaged weights.")
    add("--ema_decay", type=float, default=0.9999, help="Highest EMA decay (it warms up from 0).")
    add("--seed", type=int, default=0, help="Seed of the data order, augmentations, caption dropout, noise and timesteps.")
    # Checkpoints, validation, logging
    add("--output_dir", default="viscpm-paint-finetuned",
        help="The run's folder: the trained pipeline in OUTPUT_DIR/pipeline, the checkpoints, logs and validation images "
             "beside it.")
    add("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps (0: never).")
    add("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    add("--resume_from_checkpoint", default=None,
        help='A checkpoint folder, or "latest" for the newest checkpoint in --output_dir (none: start afresh).')
    add("--validation_prompts", nargs="+", default=None,
        help='Prompts to sample during and after training, in any language, e.g. "a red apple" "一个红苹果".')
    add("--validation_steps", type=int, default=500, help="Sample the validation prompts every N steps.")
    add("--validation_inference_steps", type=int, default=50, help="Sampling steps of validation images.")
    add("--validation_guidance_scale", type=float, default=7.5, help="Guidance scale of validation images.")
    add("--report_to", default="none", help='Trackers for accelerate ("tensorboard", "wandb", "all", or "none").')
    add("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    add("--tracker_project_name", default="train_paint", help="Project name given to the trackers.")
    # Model card and Hub
    add("--push_to_hub", action="store_true", help="Upload the exported folder (never the checkpoints) once written, "
        "after checking it: no pickled file, a complete model card.")
    add("--hub_model_id", default=None,
        help="The repo: user/name, or name for the token's user (default: the name of --output_dir).")
    add("--hub_token", default=None, help="A Hub token with write access (default: `hf auth login`'s).")
    add("--hub_private_repo", action="store_true", help="Create the repo private (an existing one keeps its visibility).")
    add("--base_model", default=None, help="Hub id the model card names as the base model (default: "
        "--pretrained_model_name_or_path if it is a Hub id, else the base model of that folder's card).")
    add("--license", default=None, help="Licence id for the model card (default: the starting pipeline's card's).")
    add("--language", nargs="+", default=None,
        help="Languages for the model card (default: the starting pipeline's card's).")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Problems that need no model to find, reported before anything large is loaded."""
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise SystemExit("error: pass exactly one of --train_data_dir (an image folder) and --dataset_name.")
    if args.train_data_dir is not None and not Path(args.train_data_dir).is_dir():
        raise SystemExit(f"error: --train_data_dir {args.train_data_dir} is not a folder.")
    if args.conditioning_shift < 0:
        raise SystemExit(f"error: --conditioning_shift is a norm and must be >= 0, got {args.conditioning_shift}.")
    if args.conditioning_offsets is not None:
        if args.conditioning_shift:
            raise SystemExit("error: pass --conditioning_shift (isotropic) or --conditioning_offsets (drawn), not both.")
        if not Path(args.conditioning_offsets).is_file():
            raise SystemExit(f"error: --conditioning_offsets {args.conditioning_offsets} is not a file.")
    if not 0 <= args.caption_dropout <= 1:
        raise SystemExit(f"error: --caption_dropout must be in [0, 1], got {args.caption_dropout}.")
    for flag in ("resolution", "train_batch_size", "gradient_accumulation_steps", "validation_steps"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag} must be at least 1, got {getattr(args, flag)}.")
    if args.lora_rank is not None:
        if args.lora_rank < 1:
            raise SystemExit(f"error: --lora_rank must be at least 1, got {args.lora_rank}.")
        if args.train_unet == "full":
            raise SystemExit(
                "error: --lora_rank adapts the cross-attention layers and --train_unet full trains every UNet weight: "
                "pass one of them."
            )
    elif args.lora_alpha is not None:
        raise SystemExit("error: --lora_alpha scales a LoRA: pass --lora_rank too.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise SystemExit("error: --checkpoints_total_limit must be at least 1.")
    resume = args.resume_from_checkpoint
    if resume and resume != "latest":
        if not Path(resume).is_dir():
            raise SystemExit(
                f"error: --resume_from_checkpoint {resume} does not exist; pass a checkpoint-N folder of an earlier "
                "run, or 'latest' to take the newest one in --output_dir."
            )
        if not (Path(resume) / PROGRESS_FILE).is_file():
            raise SystemExit(f"error: {resume} is not a train_paint.py checkpoint (it has no {PROGRESS_FILE}).")
    if args.text_embedding_cache is not None:
        args.precompute_text_embeddings = True
    if args.precompute_text_embeddings and args.text_embedding_cache is None:
        args.text_embedding_cache = str(Path(args.output_dir) / "text_embedding_cache")
    if args.push_to_hub:  # a push that would fail after training is refused before it
        args.hub_model_id = args.hub_model_id or Path(args.output_dir).absolute().name
        try:
            check_hub_target(args.hub_model_id, args.hub_token, card_metadata(args))
        except ValueError as error:
            raise SystemExit(f"error: --push_to_hub: {error}")


def card_metadata(args: argparse.Namespace) -> dict:
    """Base model, licence and languages for the model card: the flags, else the starting pipeline's card's."""
    return derived_metadata(args.pretrained_model_name_or_path, base_model=args.base_model, license=args.license,
                            language=args.language)  # fmt: skip


def lora_config(rank: int, alpha: float | None) -> LoraConfig:
    """A LoRA of the projections of every cross-attention layer, as the paper trains them (`attn2`); the regex is
    stored with the weights, so `load_lora_weights` rebuilds exactly these adapters."""
    return LoraConfig(
        r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights="gaussian",
        target_modules=r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)",
    )  # fmt: skip


def step_generator(seed: int, micro_step: int, process_index: int) -> torch.Generator:
    """The randomness of one micro-batch (caption dropout, VAE sample, noise, timesteps) from (seed, micro-step,
    process) alone, so a resumed run draws what an uninterrupted run draws, cache or no cache."""
    state = np.random.SeedSequence([seed, micro_step, process_index]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def shift_captions(
    text_states: torch.Tensor,
    dropped: list[bool],
    norm: float,
    generator: torch.Generator,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adds one random offset per caption, the same on every token; dropped captions ("" of classifier-free guidance)
    stay exact. Without `offsets`, the offset is isotropic with expected norm `norm` (`--conditioning_shift`); with
    `offsets` `(n, hidden)`, it is a row drawn from them times `norm` (`--conditioning_offsets`)."""
    count, hidden = len(dropped), text_states.shape[-1]
    if offsets is None:
        shift = torch.randn(count, hidden, generator=generator) * norm / hidden**0.5
    else:
        shift = offsets[torch.randint(len(offsets), (count,), generator=generator)].float() * norm
    kept = torch.tensor([not drop for drop in dropped], dtype=shift.dtype)[:, None]
    return text_states + (shift * kept)[:, None].to(text_states)


def load_conditioning_offsets(path: str, hidden_size: int) -> torch.Tensor:
    """The `offsets` tensor of `--conditioning_offsets`, checked against the LLM's hidden size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as error:
        raise SystemExit(f"error: --conditioning_offsets {path} is not a readable safetensors file ({error}).")
    offsets = tensors.get("offsets")
    if offsets is None or offsets.ndim != 2 or offsets.shape[1] != hidden_size or not len(offsets):
        found = "no tensor 'offsets'" if offsets is None else f"'offsets' of shape {tuple(offsets.shape)}"
        raise SystemExit(
            f"error: --conditioning_offsets {path} has {found}; expected (n >= 1, {hidden_size}), the LLM's hidden size."
        )
    return offsets.float()


def training_step(
    batch: dict,
    generator: torch.Generator,
    *,
    accelerator: Accelerator,
    denoiser: torch.nn.Module,
    vae,
    noise_scheduler: DDPMScheduler,
    caption_encoder: CaptionEncoder,
    empty_states: torch.Tensor,
    optimizer,
    lr_scheduler,
    caption_dropout: float,
    max_grad_norm: float,
    conditioning_shift: float = 0.0,
    conditioning_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """One micro-batch: conditioning, noised latents, loss, backward, and the optimizer step when the accumulation
    is complete. Returns this process's loss (detached)."""
    pixel_values = batch["pixel_values"]
    batch_size = pixel_values.shape[0]

    # 1. LLM hidden states of the captions (cached, or encoded now); dropped captions become "".
    dropped = (torch.rand(batch_size, generator=generator) < caption_dropout).tolist()
    if "text_states" in batch:
        states = [empty_states if drop else state for state, drop in zip(batch["text_states"], dropped)]
    else:
        states = caption_encoder(["" if drop else caption for caption, drop in zip(batch["captions"], dropped)])
    text_states, text_mask = pad_text_states(states, device=accelerator.device)
    text_mask = None if bool(text_mask.all()) else text_mask
    if conditioning_shift:
        text_states = shift_captions(text_states, dropped, conditioning_shift, generator, conditioning_offsets)

    # 2. Latents of the frozen VAE, noised at uniformly drawn timesteps.
    with torch.no_grad():
        posterior = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    timesteps = timesteps.to(latents.device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = latents

    # 3. Transblock + UNet, MSE, and the (accumulated) update of the trained parameters only.
    with accelerator.accumulate(denoiser):
        prediction = denoiser(noisy_latents, timesteps, text_states, text_mask)
        loss = F.mse_loss(prediction.float(), target.float())
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(denoiser.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# Checkpoints


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first (half-written ones have another name until they are complete)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, progress: dict) -> Path:
    """`accelerator.save_state` into a hidden folder, renamed to checkpoint-N once complete; then prunes."""
    output_dir = Path(args.output_dir)
    final = output_dir / f"checkpoint-{progress['global_step']}"
    partial = output_dir / f".{final.name}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / PROGRESS_FILE).write_text(json.dumps(progress, indent=1) + "\n")
        if final.exists():  # the same step written by an earlier, longer run
            shutil.rmtree(final)
        os.replace(partial, final)
        if args.checkpoints_total_limit is not None:
            for old in list_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
                logger.info(f"Removed {old} (--checkpoints_total_limit {args.checkpoints_total_limit})")
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()
    return final


def _plain_name(name: str) -> str:
    """A parameter name without the prefixes of DDP and torch.compile wrappers."""
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def register_checkpoint_hooks(accelerator: Accelerator, trained_names: list[str], ema: EMAModel | None) -> None:
    """Checkpoints hold the trained parameters only (the frozen ones are in the pretrained folder), and the EMA."""
    trained = set(trained_names)

    def save_hook(models, weights, output_dir):
        for index, state in enumerate(weights):  # empty under DeepSpeed and FSDP, which save the whole model
            weights[index] = {k: v for k, v in state.items() if _plain_name(k) in trained}
        if ema is not None and accelerator.is_main_process:
            shadow = {name: p.detach().contiguous() for name, p in zip(trained_names, ema.shadow_params)}
            save_file(shadow, os.path.join(output_dir, "ema.safetensors"))
            scalars = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
            Path(output_dir, "ema.json").write_text(json.dumps(scalars) + "\n")

    def load_hook(models, input_dir):
        while models:
            model = accelerator.unwrap_model(models.pop())
            state = {_plain_name(k): v for k, v in load_file(os.path.join(input_dir, WEIGHTS_FILE)).items()}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or trained & set(missing):
                raise ValueError(
                    f"Checkpoint {input_dir} does not match this run's trained parameters (missing "
                    f"{sorted(trained & set(missing))[:5]}, unexpected {unexpected[:5]}): was it made with another "
                    "--train_unet or --lora_rank?"
                )
        if ema is not None:
            if not Path(input_dir, "ema.safetensors").is_file():
                raise ValueError(f"Checkpoint {input_dir} has no EMA weights: resume it without --use_ema.")
            shadow = load_file(os.path.join(input_dir, "ema.safetensors"))
            state = json.loads(Path(input_dir, "ema.json").read_text())
            state["shadow_params"] = [shadow[name].to(p.device) for name, p in zip(trained_names, ema.shadow_params)]
            ema.load_state_dict(state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# Validation and the model card


def run_validation(pipeline: VisCPMPaintPipeline, args, accelerator: Accelerator, step: int, label: str, autocast_dtype):
    """Samples every validation prompt (seeded), saves the images under output_dir/validation/<label>/ and logs
    them to the trackers."""
    folder = Path(args.output_dir, "validation", label)
    folder.mkdir(parents=True, exist_ok=True)
    pipeline.set_progress_bar_config(disable=True)
    device = accelerator.device
    mixed = autocast_dtype != torch.float32  # frozen UNet weights in half precision beside float32 trained ones
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if mixed else contextlib.nullcontext()
    images = []
    for index, prompt in enumerate(args.validation_prompts):
        generator = torch.Generator().manual_seed(args.seed + index)
        with autocast, torch.no_grad():
            image = pipeline(
                prompt,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                generator=generator,
            ).images[0]
        image.save(folder / f"{index:02d}.png")
        images.append(image)
    (folder / "prompts.json").write_text(json.dumps(args.validation_prompts, ensure_ascii=False, indent=1) + "\n")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.log_images({f"validation/{label}": stacked}, step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({f"validation/{label}": images}, step)
    logger.info(f"Validation images of step {step} in {folder}")
    return images


def write_model_card(path: Path, args, trained_count: int, examples: int, global_step: int, processes: int) -> None:
    """The README.md of the exported folder: what was trained, from what, how, and how to load it."""
    trained = "the transblock and the " + ("UNet's cross-attention layers" if args.train_unet == "attn2" else "whole UNet")
    prompts = "\n".join(f"- `{p}`" for p in args.validation_prompts or [])
    if prompts:  # the images stay beside the export, in the run's folder
        prompts = f"Sampled after training (images in the training run's `validation/final/`):\n\n{prompts}"
    name = Path(args.output_dir).resolve().name
    where = args.hub_model_id if args.push_to_hub else "path/to/this/folder"
    load = f'pipe = VisCPMPaintPipeline.from_pretrained("{where}")'
    if args.lora_rank:
        trained = f"rank-{args.lora_rank} LoRA weights of the UNet's cross-attention layers (the transblock is the base's)"
        load = (f'pipe = VisCPMPaintPipeline.from_pretrained("{args.pretrained_model_name_or_path}")\n'
                f'pipe.load_lora_weights("{where}")  # its weight per call: cross_attention_kwargs={{"scale": 0.8}}')
    kind = "LoRA" if args.lora_rank else "pipeline"
    conditioning_shift = args.conditioning_shift
    if args.conditioning_offsets is not None:
        conditioning_shift = f"rows of {Path(args.conditioning_offsets).name} x {args.conditioning_offsets_scale}"
    body = f"""# {name}

A VisCPM-Paint {kind} fine-tuned from `{args.pretrained_model_name_or_path}` with `examples/train_paint.py` of
viscpm-hf, following MPM (arXiv 2308.12038, section 3.3): the multilingual LLM that reads the prompt and the VAE
stayed frozen, and {trained} were trained ({trained_count:,} parameters) on image-caption pairs. Because the LLM is the
pivot, prompts in its other languages work too, although the captions were in one language.

## Use

```python
import torch
import viscpm_hf  # registers the pipeline and its components with diffusers
from viscpm_hf import VisCPMPaintPipeline

{load}
image = pipe("a red apple", generator=torch.Generator().manual_seed(0)).images[0]
```

## Training

| setting | value |
|---|---|
| examples | {examples:,} |
| resolution | {args.resolution} |
| optimizer steps | {global_step} |
| batch | {args.train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x {processes} processes |
| learning rate | {args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps) |
| mixed precision | {args.mixed_precision or "from the accelerate config"} |
| caption dropout | {args.caption_dropout} |
| conditioning shift | {conditioning_shift} |
| EMA | {f"decay {args.ema_decay}" if args.use_ema else "no"} |
| seed | {args.seed} |

## Validation prompts

{prompts or "None were given."}

## Limitations

Images can be wrong, biased or unsafe; no safety checker is included unless the base pipeline had one. The licences
of the base model's weights apply to this derivative.
"""
    tags = ["viscpm", "mpm", "text-to-image", "diffusers-training"] + (["lora"] if args.lora_rank else [])
    data = ModelCardData(library_name="diffusers", pipeline_tag="text-to-image", tags=tags, **card_metadata(args))
    missing = missing_metadata(data)
    if missing:
        logger.warning(f"The model card lacks {', '.join(missing)} (the card of {args.pretrained_model_name_or_path} "
                       "does not give them): pass --base_model / --license / --language to complete it.")  # fmt: skip
    write_card(path, data, body)


# The export


def trained_pipeline(args: argparse.Namespace, trained_state: dict[str, torch.Tensor]) -> VisCPMPaintPipeline:
    """The pretrained pipeline with the trained parameters (`unet.*`, `transblock.*` names of the denoiser) put in."""
    final = VisCPMPaintPipeline.from_pretrained(args.pretrained_model_name_or_path)
    parts = {"unet.": {}, "transblock.": {}}
    for name, value in trained_state.items():
        prefix = "unet." if name.startswith("unet.") else "transblock."
        parts[prefix][name.removeprefix(prefix)] = value
    missing, unexpected = final.unet.load_state_dict(parts["unet."], strict=False)
    if unexpected or (args.train_unet == "full" and missing):
        raise RuntimeError(f"The trained UNet weights do not fit the base UNet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # Buffers (e.g. the transblock's language directions) are not trained: they stay as loaded.
    missing, unexpected = final.transblock.load_state_dict(parts["transblock."], strict=False)
    if unexpected or set(missing) & {name for name, _ in final.transblock.named_parameters()}:
        raise RuntimeError(f"The trained transblock weights do not fit: missing {missing}, unexpected {unexpected}")
    if args.prediction_type is not None:
        final.scheduler.register_to_config(prediction_type=args.prediction_type)
    return final


def replace_folder(partial: Path, final: Path) -> None:
    """Puts the complete folder `partial` at `final`. An earlier `final` is moved aside and deleted only after the
    rename, so a kill at any moment leaves each export whole under some name, never a half one at `final`."""
    previous = final.with_name(f".{final.name}.previous")
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        final.rename(previous)
    partial.rename(final)
    shutil.rmtree(previous, ignore_errors=True)


def upload(folder: Path, args: argparse.Namespace, message: str) -> None:
    try:
        commit = push_to_hub(folder, args.hub_model_id, token=args.hub_token, private=args.hub_private_repo or None,
                             commit_message=message)  # fmt: skip
    except (OSError, ValueError) as error:  # a refused folder, or a failed upload and how to retry it
        raise SystemExit(f"error: {error}")
    logger.info(f"Uploaded {folder} to {commit.commit_url}")


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs a training; returns the log records (step, epoch, loss, lr) of the steps this run made."""
    disable_hub_kernels_when_offline()
    args = parse_args(argv)
    check_args(args)
    problem = deepspeed_problem()  # before the Accelerator, which sets DeepSpeed up
    if problem:
        raise SystemExit(f"error: {problem}")

    # 1. Accelerator and logging.
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise SystemExit(
            f"error: {launched} processes were launched but accelerate sees {accelerator.num_processes}, so each would "
            "train alone into the same folder. On a machine without GPUs launch with ACCELERATE_USE_CPU=1, e.g. "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_paint.py ..."
        )
    quiet = not accelerator.is_local_main_process
    for library in (datasets, transformers, diffusers):
        library.utils.logging.set_verbosity(logging.ERROR if quiet else logging.WARNING)
    logging.getLogger("viscpm_hf").setLevel(logging.ERROR if quiet else logging.INFO)
    warn_if_not_sharded(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        deepspeed_steps = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_accumulation_steps")
        if deepspeed_steps not in ("auto", args.gradient_accumulation_steps):
            raise SystemExit(
                f"error: the DeepSpeed config accumulates {deepspeed_steps} steps but --gradient_accumulation_steps is "
                f"{args.gradient_accumulation_steps}: make them equal (deepspeed_config.gradient_accumulation_steps)."
            )
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in output_dir.glob(".checkpoint-*.partial"):  # left by an interrupted save
            shutil.rmtree(stale)

    # 2. Data, checked before any model is loaded.
    with accelerator.main_process_first():
        try:
            records = load_image_captions(
                args.train_data_dir, args.dataset_name, args.image_column, args.caption_column, args.on_missing_image
            )
        except ValueError as error:
            raise SystemExit(f"error: {error}") from error
    logger.info(f"{len(records)} image-caption pairs")

    # 3. Models: the frozen LLM and VAE in the mixed-precision dtype, the trained part in float32.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipeline = VisCPMPaintPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        dtype={"text_encoder": weight_dtype, "vae": weight_dtype, "default": torch.float32},
    )
    if args.resolution % pipeline.vae_scale_factor:
        raise SystemExit(f"error: --resolution must be a multiple of the VAE's factor {pipeline.vae_scale_factor}.")
    if args.prediction_type is not None:  # the sampler of validation images must agree with the training target
        pipeline.scheduler.register_to_config(prediction_type=args.prediction_type)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    text_encoder, vae = pipeline.text_encoder, pipeline.vae
    text_encoder.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    denoiser = PaintDenoiser(pipeline.transblock, pipeline.unet)
    if args.lora_rank:
        pipeline.unet.add_adapter(lora_config(args.lora_rank, args.lora_alpha))
    trained_names = mark_trainable(denoiser, args.train_unet, lora=bool(args.lora_rank))
    if weight_dtype != torch.float32 and accelerator.distributed_type not in SHARDED:
        for parameter in denoiser.unet.parameters():  # frozen UNet weights need no float32 copy
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(weight_dtype)
    if args.gradient_checkpointing:
        denoiser.unet.enable_gradient_checkpointing()
    text_encoder.to(accelerator.device)
    vae.to(accelerator.device)
    caption_encoder = CaptionEncoder(pipeline)
    conditioning_offsets = None
    if args.conditioning_offsets is not None:
        hidden_size = pipeline.transblock.config.in_features
        conditioning_offsets = load_conditioning_offsets(args.conditioning_offsets, hidden_size)
    # The isotropic offset's norm, or the multiplier of the drawn offsets.
    conditioning_shift = args.conditioning_shift if conditioning_offsets is None else args.conditioning_offsets_scale

    # 4. Captions: encoded once into the cache (each process a share of the missing ones), or per step.
    cache = None
    if args.precompute_text_embeddings:
        cache = TextEmbeddingCache(args.text_embedding_cache, caption_encoder.fingerprint())
        captions = set(records["text"]) | {""}
        encoded = cache.build(
            captions, caption_encoder, batch_size=args.train_batch_size, process_index=accelerator.process_index,
            num_processes=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
            progress=accelerator.is_local_main_process,
        )  # fmt: skip
        accelerator.wait_for_everyone()
        cache.refresh()
        logger.info(f"Text embedding cache {cache.directory}: {len(captions)} captions, {encoded} newly encoded here")
        text_encoder.to("cpu")  # not needed on the device again until validation
        empty_states = cache.get("").to(accelerator.device)
    else:
        empty_states = caption_encoder([""])[0]

    dataset = PaintTrainDataset(records, args.resolution, args.center_crop, args.random_flip, args.seed, cache)
    sampler = EpochSampler(len(dataset), args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate_paint,
        num_workers=args.dataloader_num_workers,
    )  # fmt: skip

    # 5. Optimizer over the trained parameters only, schedule, prepare (the frozen parts are not prepared).
    optimizer = torch.optim.AdamW(
        [p for p in denoiser.parameters() if p.requires_grad],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )  # fmt: skip
    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )  # fmt: skip
    if accelerator.distributed_type == DistributedType.FSDP:
        set_fsdp_units(accelerator.state.fsdp_plugin, pipeline.unet)
    denoiser, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        denoiser, optimizer, train_dataloader, lr_scheduler
    )
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    trained_parameters = [p for p in accelerator.unwrap_model(denoiser).parameters() if p.requires_grad]
    ema = None
    if args.use_ema:
        ema = EMAModel(trained_parameters, decay=args.ema_decay)
        ema.to(accelerator.device)
    register_checkpoint_hooks(accelerator, trained_names, ema)
    if args.report_to != "none":
        config = {k: (", ".join(v) if isinstance(v, list) else v) for k, v in vars(args).items()
                  if v is not None and k != "hub_token"}  # fmt: skip
        accelerator.init_trackers(args.tracker_project_name, config=config)
    can_validate = bool(args.validation_prompts)
    if can_validate and accelerator.distributed_type in SHARDED:
        logger.warning("Validation during training is off under DeepSpeed/FSDP (sharded weights); it runs at the end.")

    # 6. Resume: the model, optimizer, schedule and EMA states, and where in which epoch the run stood.
    global_step, first_epoch, skip_batches, micro_step = 0, 0, 0, 0
    resume = args.resume_from_checkpoint
    if resume == "latest":
        found = list_checkpoints(output_dir)
        resume = str(found[-1]) if found else None
        if resume is None:
            logger.info(f"No checkpoint in {output_dir}: starting a new run.")
    if resume:
        accelerator.load_state(resume)
        progress = json.loads(Path(resume, PROGRESS_FILE).read_text())
        global_step, first_epoch = progress["global_step"], progress["epoch"]
        skip_batches, micro_step = progress["batches_in_epoch"], progress["micro_step"]
        if skip_batches >= len(train_dataloader):
            first_epoch, skip_batches = first_epoch + 1, 0
        logger.info(f"Resumed from {resume} at step {global_step}")
    log_path = output_dir / LOG_FILE
    if accelerator.is_main_process:  # steps after the checkpoint are trained again: drop their old records
        kept = [row for row in read_log_rows(log_path) if row["step"] <= global_step] if resume else []
        log_path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    # 7. The loop.
    logger.info(
        f"Training {sum(p.numel() for p in trained_parameters):,} parameters "
        f"({f'LoRA rank {args.lora_rank}' if args.lora_rank else args.train_unet}) for {max_train_steps} "
        f"steps: {args.train_batch_size} x {args.gradient_accumulation_steps} x {accelerator.num_processes} per step"
    )
    records_of_run = []
    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    denoiser.train()
    for epoch in range(first_epoch, num_epochs):
        if global_step >= max_train_steps:
            break
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        skip = skip_batches if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        loader.set_epoch(epoch)
        micro_losses = []
        for batch_index, batch in enumerate(loader, start=skip):
            loss = training_step(
                batch, step_generator(args.seed, micro_step, accelerator.process_index), accelerator=accelerator,
                denoiser=denoiser, vae=vae, noise_scheduler=noise_scheduler, caption_encoder=caption_encoder,
                empty_states=empty_states, optimizer=optimizer, lr_scheduler=lr_scheduler,
                caption_dropout=args.caption_dropout, max_grad_norm=args.max_grad_norm,
                conditioning_shift=conditioning_shift, conditioning_offsets=conditioning_offsets,
            )  # fmt: skip
            micro_step += 1
            micro_losses.append(accelerator.reduce(loss, reduction="mean").item())
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.step(trained_parameters)
            record = {"step": global_step, "epoch": epoch, "loss": sum(micro_losses) / len(micro_losses),
                      "lr": lr_scheduler.get_last_lr()[0]}  # fmt: skip
            micro_losses = []
            records_of_run.append(record)
            accelerator.log({"train_loss": record["loss"], "lr": record["lr"]}, step=global_step)
            if accelerator.is_main_process:
                with log_path.open("a") as log:
                    log.write(json.dumps(record) + "\n")
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{record['loss']:.4f}")

            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                progress = {"global_step": global_step, "epoch": epoch, "batches_in_epoch": batch_index + 1,
                            "micro_step": micro_step}  # fmt: skip
                save_checkpoint(accelerator, args, progress)
            if can_validate and accelerator.distributed_type not in SHARDED and global_step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    denoiser.eval()
                    if ema is not None:
                        ema.store(trained_parameters)
                        ema.copy_to(trained_parameters)
                    text_encoder.to(accelerator.device)
                    run_validation(pipeline, args, accelerator, global_step, f"step-{global_step:06d}", weight_dtype)
                    if cache is not None:
                        text_encoder.to("cpu")
                    if ema is not None:
                        ema.restore(trained_parameters)
                    denoiser.train()
                accelerator.wait_for_everyone()
            if global_step >= max_train_steps:
                break
    progress_bar.close()

    # 8. The export: the pretrained pipeline with the trained (or EMA) parameters put in (or the LoRA weights), written
    # to a hidden folder and renamed to output_dir/pipeline once complete.
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(trained_parameters)
    state = accelerator.get_state_dict(denoiser)  # every process takes part (DeepSpeed ZeRO-3 gathers here)
    trained_state = {name: state[name].detach().to("cpu") for name in trained_names} if accelerator.is_main_process else {}
    if args.lora_rank and accelerator.is_main_process:  # the adapter's config and weights, in diffusers' LoRA format
        unet = accelerator.unwrap_model(denoiser).unet
        lora_metadata = unet.peft_config["default"].to_dict()
        unet_state = {name.removeprefix("unet."): value for name, value in trained_state.items()}
        lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, state_dict=unet_state))
        del unet
    examples, processes = len(dataset), accelerator.num_processes
    del state, denoiser, optimizer, lr_scheduler, train_dataloader, pipeline, text_encoder, vae, caption_encoder
    del ema, trained_parameters, dataset, cache, empty_states
    accelerator.free_memory()
    gc.collect()
    if accelerator.is_main_process:
        export, partial = output_dir / EXPORT_FOLDER, output_dir / f".{EXPORT_FOLDER}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while exporting
        if args.lora_rank:
            VisCPMPaintPipeline.save_lora_weights(
                partial, unet_lora_layers=lora_layers, unet_lora_adapter_metadata=lora_metadata
            )
        else:
            final = trained_pipeline(args, trained_state)
            final.save_pretrained(partial)
        write_model_card(partial / "README.md", args, sum(v.numel() for v in trained_state.values()), examples,
                         global_step, processes)  # fmt: skip
        replace_folder(partial, export)
        logger.info(f"Saved the {'LoRA weights' if args.lora_rank else 'pipeline'} to {export}")
        if args.validation_prompts:
            if args.lora_rank:  # through load_lora_weights, as users load them
                final = VisCPMPaintPipeline.from_pretrained(args.pretrained_model_name_or_path)
                final.load_lora_weights(export)
            run_validation(final.to(accelerator.device), args, accelerator, global_step, "final", torch.float32)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:  # after the others are done: a failed upload stops no one
        upload(output_dir / EXPORT_FOLDER, args, f"train_paint.py: {global_step} steps")
    return records_of_run


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(sys.argv[1:])
