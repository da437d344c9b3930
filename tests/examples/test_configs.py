"""Every accelerate config in examples/configs/: it loads as `accelerate launch` reads it and its usage line names
itself and its script; the FSDP layer classes are the trained models' `_no_split_modules`; the paint DeepSpeed configs
go through DeepSpeed's own parser with the values train_paint.py gives them. (The chat DeepSpeed configs, and the FSDP
units on the real models, are checked in test_distributed_chat.py and test_train_paint_distributed.py.)"""

import gc
import re

import pytest
from accelerate import PartialState
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import FullyShardedDataParallelPlugin
from example_scripts import CONFIGS, accelerate_config, load_example
from tiny_models import make_chat_model
from tiny_paint import tiny_unet

from viscpm_hf import build_byte_level_tokenizer
from viscpm_hf.models.beit3.modeling_beit3 import VisCPMBeit3Model
from viscpm_hf.models.cpmbee.modeling_cpmbee import CpmBeeForCausalLM
from viscpm_hf.models.viscpm_chat.modeling_viscpm_chat import VisCPMChatForConditionalGeneration
from viscpm_hf.training.sharding import fsdp_wrap_classes


KINDS = {"cpu": "NO", "single_gpu": "NO", "multi_gpu_ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp_chat": "FSDP",
         "fsdp_chat_cpmbee": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED",
         "deepspeed_zero2_chat": "DEEPSPEED", "deepspeed_zero3_chat": "DEEPSPEED"}  # fmt: skip
# The classes whose `_no_split_modules` together make the units of an FSDP config that lists them.
LISTED_UNITS = {"fsdp_chat_cpmbee": [VisCPMChatForConditionalGeneration, CpmBeeForCausalLM, VisCPMBeit3Model]}
# DeepSpeed `auto` values accelerate fills from `model.config.hidden_size`, which train_paint.py's denoiser (transblock +
# UNet, a plain module) does not have: accelerate would stop at prepare.
HIDDEN_SIZE_KEYS = ["zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                    "zero_optimization.stage3_param_persistence_threshold"]  # fmt: skip
USAGE = re.compile(r"accelerate launch (?:--config_file (\S+) )?examples/(\w+\.py)")


def script_units(name: str) -> tuple[list[str], list[str]]:
    """For a config without a class list: the units its script picks on a small model, and that model's
    `_no_split_modules`."""
    if name == "fsdp":  # train_paint.py on a UNet
        PartialState()  # the script logs through accelerate
        unet = tiny_unet()
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
        load_example("train_paint").set_fsdp_units(plugin, unet)
        return plugin.transformer_cls_names_to_wrap, unet._no_split_modules
    model = make_chat_model(build_byte_level_tokenizer())  # train_chat.py on a VisCPM-Chat with a Qwen2 LLM
    return fsdp_wrap_classes(model), model._no_split_modules


def test_every_config_is_checked():
    assert {path.stem for path in CONFIGS.glob("*")} == set(KINDS)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_a_config_loads_as_accelerate_reads_it_and_names_its_script(name):
    config = ClusterConfig.from_yaml_file(CONFIGS / f"{name}.yaml")
    assert config.distributed_type.value == KINDS[name]
    assert config.use_cpu == (name == "cpu")
    if KINDS[name] == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == int(re.search(r"zero(\d)", name)[1])
    usage = USAGE.findall((CONFIGS / f"{name}.yaml").read_text())
    assert usage and all(path == f"examples/configs/{name}.yaml" for path, _ in usage if path), usage
    if KINDS[name] in ("FSDP", "DEEPSPEED"):  # sharded configs are written for one script
        assert {script for _, script in usage} == {"train_chat.py" if "chat" in name else "train_paint.py"}


@pytest.mark.parametrize("name", sorted(name for name, kind in KINDS.items() if kind == "FSDP"))
def test_every_fsdp_unit_is_one_of_the_models_no_split_modules(name):
    fsdp = accelerate_config(f"{name}.yaml")["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    listed = fsdp.get("fsdp_transformer_layer_cls_to_wrap")
    if listed is None:
        units, no_split = script_units(name)
        assert units and set(units) <= set(no_split), (units, no_split)
    else:
        no_split = {unit for model_class in LISTED_UNITS[name] for unit in model_class._no_split_modules}
        assert set(listed.split(",")) == no_split, f"{name}.yaml wraps {listed}; the models' _no_split_modules: {no_split}"


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_the_paint_deepspeed_configs_load_through_deepspeed_with_the_scripts_values(name):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    config = accelerate_config(f"{name}.yaml")
    options = config["deepspeed_config"]
    args = load_example("train_paint").parse_args(["--pretrained_model_name_or_path", "base", "--train_data_dir", "data"])
    plugin = DeepSpeedPlugin(**options)
    assert not [key for key in HIDDEN_SIZE_KEYS if plugin.is_auto(key)]
    plugin.set_mixed_precision(config["mixed_precision"])
    # What accelerate.prepare fills in (one process here); raises where the config contradicts the script's defaults.
    plugin.deepspeed_config_process(
        must_match=True, train_micro_batch_size_per_gpu=args.train_batch_size, gradient_clipping=args.max_grad_norm,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        train_batch_size=args.train_batch_size * args.gradient_accumulation_steps,
    )  # fmt: skip
    parsed = DeepSpeedConfig(plugin.deepspeed_config)
    assert parsed.zero_optimization_stage == options["zero_stage"]
    assert parsed.gradient_accumulation_steps == args.gradient_accumulation_steps
    assert parsed.gradient_clipping == args.max_grad_norm
    assert parsed.bfloat16_config.enabled == (config["mixed_precision"] == "bf16")
    if options["zero_stage"] == 3:
        # The script gathers the trained weights for the pipeline (accelerate needs the 16-bit gather for that), and the
        # frozen LLM, which is not prepared, must load whole: no partitioned from_pretrained.
        assert parsed.zero_config.gather_16bit_weights_on_model_save and not options["zero3_init_flag"]
    del plugin
    gc.collect()
    assert not is_deepspeed_zero3_enabled()
