"""FSDP and DeepSpeed for the training scripts: FSDP units from a model's own `_no_split_modules`, and a warning when
a sharding config runs unsharded (accelerate enables FSDP and DeepSpeed on GPUs only; elsewhere it trains as DDP)."""

import logging
import os

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
