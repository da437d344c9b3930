"""FSDP and DeepSpeed for the training scripts: FSDP units from a model's own `_no_split_modules`, a warning when
a sharding config runs unsharded (accelerate enables FSDP and DeepSpeed on GPUs only; elsewhere it trains as DDP),
and the refusal of a DeepSpeed config where it cannot run."""

import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import nn


logger = logging.getLogger(__name__)

SHARDED = (DistributedType.DEEPSPEED, DistributedType.FSDP)


def fsdp_wrap_classes(model: nn.Module) -> list[str]:
    """The classes of the model's `_no_split_modules` that it really contains: FSDP's units for any model.

    transformers gathers `_no_split_modules` from the sub-models' classes, so a SigLIP vision tower built without its
    pooling head still names `SiglipMultiheadAttentionPoolingHead`, and diffusers' UNet lists up-block classes a UNet
    may lack (`UpBlock2D`); accelerate's TRANSFORMER_BASED_WRAP refuses a class the model lacks ("Could not find the
    transformer layer class").
    """
    present = {type(module).__name__ for module in model.modules()}
    return sorted(name for name in model._no_split_modules if name in present)


def set_fsdp_units(plugin: FullyShardedDataParallelPlugin, model: nn.Module) -> None:
    """An FSDP config without a layer list (examples/configs/fsdp*.yaml): the units become `fsdp_wrap_classes(model)`;
    a config's own list is kept."""
    if plugin.transformer_cls_names_to_wrap is None:
        plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(model)
        logger.info(f"FSDP units: {', '.join(plugin.transformer_cls_names_to_wrap)}")


def warn_if_not_sharded(accelerator: Accelerator) -> None:
    """Warns when the accelerate config asks for FSDP or DeepSpeed but this run does not shard."""
    for kind in SHARDED:
        asked = os.environ.get(f"ACCELERATE_USE_{kind.value}", "false").lower() == "true"
        if asked and accelerator.distributed_type != kind and accelerator.is_main_process:
            logger.warning(
                f"The accelerate config asks for {kind.value}, but this run is {accelerator.distributed_type.value} "
                f"(accelerate enables {kind.value} on GPUs only): every process holds the whole model."
            )


def deepspeed_problem(use_cpu: bool = False) -> str | None:
    """Why the DeepSpeed config this process was launched with cannot run here, or None.

    The DeepSpeed configs are written for GPUs (bf16, a process per GPU). A run that accelerate puts on the CPU
    (`--use_cpu`, or ACCELERATE_USE_CPU as the CPU recipes set it) still sets DeepSpeed up: ZeRO-3 partitions the
    weights as they load and nothing gathers them, so the first forward fails ("weight should have at least three
    dimensions"); without a GPU at all, DeepSpeed falls back to its CPU accelerator, which they are not written for.
    Reads the launch environment only (DeepSpeed need not be installed): call it before building the training
    arguments, which set DeepSpeed up.
    """
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None or accelerator.type in ("cpu", "mps"):
        reason = "this machine has no GPU for it"
    elif use_cpu:
        reason = "--use_cpu was given"
    elif os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes"):
        reason = "ACCELERATE_USE_CPU is set"
    else:
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    asked = f"DeepSpeed ZeRO-{stage} (examples/configs/deepspeed_zero{stage}*.yaml)" if stage else "DeepSpeed"
    return (
        f"the accelerate config (--config_file) asks for {asked}, which needs GPUs, but {reason}. On CPU, launch with "
        "examples/configs/cpu.yaml or an FSDP config (examples/configs/fsdp*.yaml, which train unsharded there), or "
        "run the script with python."
    )
