"""Run by test_distributed_chat.py: a few training steps of a CPM-Bee VisCPM-Chat, sharded or partitioned on CPU.

    python distributed_chat_worker.py fsdp MODEL_DIR DATA_JSON OUT_DIR [CLASS,NAMES]   # one process: not sharded
    python -m torch.distributed.run --nproc_per_node 2 distributed_chat_worker.py fsdp ...  # FSDP2 over gloo
    python distributed_chat_worker.py zero3 MODEL_DIR CONFIG_JSON OUT_DIR               # ZeRO-3 partitioned loading

`fsdp`: every process reads the whole batch (the chats in DATA_JSON through `CpmBeeChatCollator`), so the sharded
run must give the single process's losses. The FSDP units are the modules accelerate's TRANSFORMER_BASED_WRAP
picks for CLASS,NAMES (from an accelerate config), or, without them, for `fsdp_wrap_classes` as the script; torch's
`fully_shard` shards them over a CPU mesh, as accelerate does on GPUs. Writes `rank{N}.json`: losses, the parameter
elements this process holds and the model's total, and the wrapped classes.

`zero3`: builds the model under a ZeRO-3 DeepSpeed config (the Trainer's `HfDeepSpeedConfig`), one process over gloo,
and writes how many parameters from_pretrained left partitioned (DeepSpeed's `ds_numel`, an empty local tensor).
"""

import json
import os
import sys
from pathlib import Path

import torch

import viscpm_hf  # noqa: F401  (registers the VisCPM classes)


def fsdp(model_dir: str, data: str, out: str, names: str | None = None) -> None:
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from viscpm_hf.training.cpmbee import CpmBeeChatCollator
    from viscpm_hf.training.sharding import fsdp_wrap_classes

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    model.model.vision_tower.requires_grad_(False)  # stage 2 with the tower kept: frozen and trained in one model
    processor = AutoProcessor.from_pretrained(model_dir)
    batch = CpmBeeChatCollator(processor)(json.loads(Path(data).read_text()))
    wrapped = []
    if world_size > 1:
        dist.init_process_group("gloo")
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=names.split(",") if names else fsdp_wrap_classes(model),  # as the script
        )
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        mesh = init_device_mesh("cpu", (world_size,))
        for module in model.modules():
            if policy(module):
                wrapped.append(type(module).__name__)  # before fully_shard, which renames the class FSDP<name>
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    rank = dist.get_rank() if world_size > 1 else 0
    report = {"losses": losses, "local": local, "total": sum(p.numel() for p in model.parameters()), "wrapped": wrapped}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    if world_size > 1:
        dist.destroy_process_group()


def zero3(model_dir: str, config: str, out: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    import deepspeed
    from transformers import AutoModelForImageTextToText
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    keep = HfDeepSpeedConfig(json.loads(Path(config).read_text()))  # noqa: F841  (alive: from_pretrained partitions)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    parameters = dict(model.named_parameters())
    partitioned = [n for n, p in parameters.items() if getattr(p, "ds_numel", 0) > 0 and p.numel() == 0]
    report = {"parameters": len(parameters), "partitioned": len(partitioned),
              "elements": sum(p.ds_numel for p in parameters.values())}  # fmt: skip
    Path(out, "zero3.json").write_text(json.dumps(report))


if __name__ == "__main__":
    {"fsdp": fsdp, "zero3": zero3}[sys.argv[1]](*sys.argv[2:])
