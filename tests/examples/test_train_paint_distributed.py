"""examples/train_paint.py under FSDP: the units it gives accelerate for examples/configs/fsdp.yaml are the UNet's
`_no_split_modules` classes that the UNet contains, and FSDP2 with them really shards the script's denoiser on CPU
(gloo, 2 processes) and trains as one process does. accelerate itself turns FSDP on only for GPU runs: on CPU the same
launch trains unsharded, and the script says so."""

import logging
import os
from pathlib import Path

import pytest
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import FullyShardedDataParallelPlugin
from diffusers import UNet2DConditionModel
from example_scripts import accelerate_config, load_example, run_unsharded_and_sharded, wrapped_classes
from tiny_paint import tiny_pipeline, tiny_unet

from viscpm_hf.training.paint import PaintDenoiser


train_paint = load_example("train_paint")
WORKER = Path(__file__).with_name("distributed_paint_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def script_units(unet) -> list[str]:
    """What train_paint.py sets for a config without a class list, as fsdp.yaml is."""
    PartialState()  # the script logs through accelerate
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    assert plugin.transformer_cls_names_to_wrap is None
    train_paint.set_fsdp_units(plugin, unet)
    return plugin.transformer_cls_names_to_wrap


def test_the_fsdp_units_are_the_unets_no_split_modules_that_it_contains():
    config = accelerate_config("fsdp.yaml")["fsdp_config"]
    assert "fsdp_transformer_layer_cls_to_wrap" not in config and config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config["fsdp_version"] == 2
    pipeline = tiny_pipeline()
    denoiser = PaintDenoiser(pipeline.transblock, pipeline.unet)
    names = script_units(pipeline.unet)
    assert set(names) == set(UNet2DConditionModel._no_split_modules)  # the tiny UNet has every one of them
    assert {"BasicTransformerBlock", "ResnetBlock2D"} <= set(names)
    assert wrapped_classes(denoiser, names) == set(names)

    # A UNet with cross-attention in every up block has no UpBlock2D: diffusers still lists it, accelerate refuses it.
    unet = UNet2DConditionModel(**{**tiny_unet().config, "down_block_types": ("CrossAttnDownBlock2D",) * 2,
                                   "up_block_types": ("CrossAttnUpBlock2D",) * 2})  # fmt: skip
    denoiser = PaintDenoiser(pipeline.transblock, unet)
    assert set(script_units(unet)) == set(UNet2DConditionModel._no_split_modules) - {"UpBlock2D"}
    assert wrapped_classes(denoiser, script_units(unet)) == set(script_units(unet))
    with pytest.raises(ValueError, match="Could not find the transformer layer class UpBlock2D"):
        wrapped_classes(denoiser, UNet2DConditionModel._no_split_modules)

    listed = FullyShardedDataParallelPlugin(fsdp_version=2, transformer_cls_names_to_wrap=["ResnetBlock2D"])
    train_paint.set_fsdp_units(listed, unet)  # a config's own list is kept
    assert listed.transformer_cls_names_to_wrap == ["ResnetBlock2D"]


@pytest.mark.timeout(300)
def test_fsdp2_shards_the_denoiser_on_cpu_and_trains_as_one_process(paint_workspace, tmp_path):
    """Each of 2 processes holds half of the transblock + UNet, and the three losses of `training_step` equal those
    of one unsharded process on the same batch."""
    one, ranks = run_unsharded_and_sharded(WORKER, tmp_path, [str(paint_workspace)], ENV, timeout=200)
    assert one["wrapped"] == [] and one["local"] == one["total"]
    assert one["losses"][-1] < one["losses"][0]  # the trained cross-attention and transblock moved
    for rank in ranks:
        assert rank["total"] == one["total"]
        assert 0.45 * rank["total"] < rank["local"] < 0.55 * rank["total"]  # about half each: really sharded
        assert rank["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert set(rank["wrapped"]) == set(UNet2DConditionModel._no_split_modules)
    assert ranks[0]["local"] + ranks[1]["local"] == one["total"]


def test_an_fsdp_launch_on_cpu_trains_unsharded_and_says_so(paint_workspace, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with caplog.at_level(logging.WARNING):
            train_paint.main(["--pretrained_model_name_or_path", str(paint_workspace / "model"), "--train_data_dir",
                              str(paint_workspace / "images"), "--output_dir", str(tmp_path), "--resolution", "32",
                              "--train_batch_size", "4", "--max_train_steps", "1", "--checkpointing_steps", "0"])  # fmt: skip
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "asks for FSDP, but this run is NO (accelerate enables FSDP on GPUs only)" in caplog.text
    assert (tmp_path / "pipeline" / "model_index.json").is_file()
