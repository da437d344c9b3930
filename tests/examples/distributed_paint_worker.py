"""Run by test_train_paint_distributed.py: three steps of examples/train_paint.py's `training_step` on its denoiser
(transblock + UNet, cross-attention trained), on one fixed batch, sharded with FSDP2 or in one process.

    python distributed_paint_worker.py WORKSPACE OUT_DIR                                            # one process
    python -m torch.distributed.run --nproc_per_node 2 distributed_paint_worker.py WORKSPACE OUT_DIR  # FSDP2, gloo

WORKSPACE holds `model/` (a VisCPM-Paint) and `images/`. Sharded, the units are those the script gives accelerate for
examples/configs/fsdp.yaml (`set_fsdp_units`), picked by accelerate's TRANSFORMER_BASED_WRAP and sharded by torch's
`fully_shard` over a CPU mesh, as accelerate does on GPUs (where it turns FSDP on). Every process trains on the same
batch with the same draws (process 0's `step_generator`), so the sharded run must give the single process's losses.
Writes `rank{N}.json`: losses, the parameter elements this process holds and the denoiser's total, the wrapped classes.
"""

import json
import os
import sys
from pathlib import Path

import torch
from example_scripts import load_example


def main(workspace: str, out: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin, get_module_children_bottom_up
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from diffusers import DDPMScheduler
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from viscpm_hf import VisCPMPaintPipeline
    from viscpm_hf.training.paint import (
        CaptionEncoder,
        PaintDenoiser,
        PaintTrainDataset,
        collate_paint,
        load_image_captions,
        mark_trainable,
    )  # fmt: skip

    train_paint = load_example("train_paint")
    accelerator = Accelerator(cpu=True)  # under torchrun: MULTI_CPU, the gloo process group the mesh shards over
    pipeline = VisCPMPaintPipeline.from_pretrained(Path(workspace, "model"))
    pipeline.text_encoder.requires_grad_(False)
    pipeline.vae.requires_grad_(False)
    denoiser = PaintDenoiser(pipeline.transblock, pipeline.unet)
    mark_trainable(denoiser, "attn2")
    records = load_image_captions(str(Path(workspace, "images")))
    batch = collate_paint([PaintTrainDataset(records, 32)[index] for index in range(4)])
    caption_encoder = CaptionEncoder(pipeline)
    wrapped = []
    if accelerator.num_processes > 1:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        train_paint.set_fsdp_units(plugin, pipeline.unet)
        policy = fsdp2_prepare_auto_wrap_policy(plugin, denoiser)
        mesh = init_device_mesh("cpu", (accelerator.num_processes,))
        for module in get_module_children_bottom_up(denoiser)[:-1]:  # inner units first, as accelerate shards
            if policy(module):
                wrapped.append(type(module).__name__)  # before fully_shard, which renames the class FSDP<name>
                fully_shard(module, mesh=mesh)
        fully_shard(denoiser, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in denoiser.parameters() if p.requires_grad], lr=1e-3)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    losses = []
    for micro_step in range(3):
        loss = train_paint.training_step(
            batch, train_paint.step_generator(0, micro_step, 0), accelerator=accelerator, denoiser=denoiser,
            vae=pipeline.vae, noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
            caption_encoder=caption_encoder, empty_states=caption_encoder([""])[0], optimizer=optimizer,
            lr_scheduler=lr_scheduler, caption_dropout=0.25, max_grad_norm=1.0,
        )  # fmt: skip
        losses.append(loss.item())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in denoiser.parameters())
    report = {"losses": losses, "local": local, "total": sum(p.numel() for p in denoiser.parameters()),
              "wrapped": wrapped}  # fmt: skip
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(report))
    accelerator.end_training()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*sys.argv[1:])
