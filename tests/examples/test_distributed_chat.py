"""The chat FSDP and DeepSpeed configs against the real models: their layer classes are the models' `_no_split_modules`,
FSDP2 with them really shards the paper's model on CPU (gloo, 2 processes) and trains as one process does, and the
DeepSpeed configs load through DeepSpeed's own parser (ZeRO-3 partitions the model at loading)."""

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from example_scripts import accelerate_config, free_port, run_unsharded_and_sharded, wrapped_classes
from tiny_models import make_chat_model

from viscpm_hf import build_byte_level_tokenizer
from viscpm_hf.training.sharding import fsdp_wrap_classes


WORKER = Path(__file__).with_name("distributed_chat_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_the_cpmbee_fsdp_config_wraps_exactly_the_papers_model_no_split_modules(cpmbee_chat):
    from transformers import AutoModelForImageTextToText

    config = accelerate_config("fsdp_chat_cpmbee.yaml")["fsdp_config"]
    names = config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    model = AutoModelForImageTextToText.from_pretrained(cpmbee_chat)
    assert set(names) == set(model._no_split_modules) == set(fsdp_wrap_classes(model))  # fsdp_chat.yaml: the same
    assert {"CpmBeeDecoderLayer", "VisCPMBeit3Layer", "VisCPMChatBridge"} <= set(names)
    assert wrapped_classes(model, names) == set(names)
    assert config["fsdp_version"] == 2 and config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


@pytest.mark.parametrize("text_model_type", ["qwen2", "llama", "gemma3_text"])
def test_the_generic_fsdp_config_wraps_each_llm_decoder_layer(text_model_type):
    """No class list: the script gives accelerate the model's `_no_split_modules` classes it contains, which are the
    LLM's decoder layer, the vision tower's layers and the bridge, each module of them an FSDP unit. The raw
    `_no_split_modules` of a SigLIP tower name classes the model lacks (accelerate 1.15 refuses them, 1.16 ignores
    them): the script never passes those on."""
    config = accelerate_config("fsdp_chat.yaml")["fsdp_config"]
    assert "fsdp_transformer_layer_cls_to_wrap" not in config and config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    model = make_chat_model(build_byte_level_tokenizer(), text_model_type=text_model_type)
    decoder_layer = type(model.model.llm.model.layers[0]).__name__
    vision_layer = type(model.model.vision_tower.encoder.layers[0]).__name__
    names = fsdp_wrap_classes(model)
    assert {decoder_layer, vision_layer, "VisCPMChatBridge"} <= wrapped_classes(model, names) == set(names)
    absent = set(model._no_split_modules) - {type(module).__name__ for module in model.modules()}
    assert absent and not absent & set(names)


@pytest.mark.timeout(600)
def test_fsdp2_shards_the_papers_model_on_cpu_and_trains_as_one_process(cpmbee_chat, chat_workspace, tmp_path):
    """torch FSDP2 over gloo with the config's units: each of 2 processes holds about half the parameters, and the
    three losses equal those of one unsharded process on the same batch. (accelerate itself enables FSDP on GPUs
    only, so the Trainer path needs a GPU machine. On this model fsdp_chat.yaml gives the same units.)"""
    images = chat_workspace / "images"
    chats = [
        {"images": [str(images / "0.png")], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red shape."}]}]},
        {"images": [str(images / "1.png")], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "这是什么？"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "一个蓝色的圆。"}]}]},
    ]  # fmt: skip
    data = tmp_path / "chats.json"
    data.write_text(json.dumps(chats, ensure_ascii=False))
    names = accelerate_config("fsdp_chat_cpmbee.yaml")["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    arguments = ["fsdp", str(cpmbee_chat), str(data)]
    one, ranks = run_unsharded_and_sharded(WORKER, tmp_path, arguments, ENV, timeout=400, extra=[names])
    for rank in ranks:
        assert rank["total"] == one["total"] == one["local"]
        assert 0.4 * rank["total"] < rank["local"] < 0.6 * rank["total"]  # about half each: really sharded
        assert rank["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert {"CpmBeeDecoderLayer", "VisCPMBeit3Layer", "VisCPMChatBridge"} <= set(rank["wrapped"])
        assert rank["wrapped"].count("CpmBeeDecoderLayer") == 2  # the tiny CPM-Bee's 2 layers, one unit each
    assert ranks[0]["local"] + ranks[1]["local"] == one["total"]
    assert one["losses"][-1] < one["losses"][0]


# --- DeepSpeed --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_name", ["deepspeed_zero2_chat.yaml", "deepspeed_zero3_chat.yaml"])
def test_the_deepspeed_configs_load_through_deepspeed_with_the_trainers_values(config_name, tmp_path):
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig
    from trl import SFTConfig

    config = accelerate_config(config_name)
    assert config["distributed_type"] == "DEEPSPEED"
    options = config["deepspeed_config"]
    plugin = DeepSpeedPlugin(**options)
    training = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", bf16=False)
    filled = HfTrainerDeepSpeedConfig(dict(plugin.deepspeed_config))
    filled.trainer_config_process(training)  # raises where the config contradicts the Trainer's arguments
    assert not filled.mismatches
    parsed = DeepSpeedConfig(filled.config)
    assert parsed.zero_optimization_stage == options["zero_stage"]
    assert parsed.gradient_clipping == training.max_grad_norm
    if options["zero_stage"] == 3:
        assert options["zero3_init_flag"] and options["zero3_save_16bit_model"]
    del plugin, filled  # they switch ZeRO-3 loading on for this process while they live
    gc.collect()
    assert not is_deepspeed_zero3_enabled()


@pytest.mark.timeout(600)
def test_zero3_builds_the_papers_model_partitioned(cpmbee_chat, tmp_path):
    """from_pretrained under the ZeRO-3 config partitions every parameter (one CPU process over gloo; training with
    DeepSpeed needs GPUs: accelerate enables it on GPU runs only)."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import is_deepspeed_zero3_enabled

    plugin = DeepSpeedPlugin(**accelerate_config("deepspeed_zero3_chat.yaml")["deepspeed_config"])
    config = {**plugin.deepspeed_config, "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1}
    del plugin
    gc.collect()
    (tmp_path / "ds.json").write_text(json.dumps(config))
    env = {**ENV, "MASTER_PORT": str(free_port())}
    result = subprocess.run([sys.executable, str(WORKER), "zero3", str(cpmbee_chat), str(tmp_path / "ds.json"), str(tmp_path)],
                            capture_output=True, text=True, timeout=500, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "zero3.json").read_text())
    from transformers import AutoModelForImageTextToText

    assert not is_deepspeed_zero3_enabled()
    whole = AutoModelForImageTextToText.from_pretrained(cpmbee_chat)
    assert report["partitioned"] == report["parameters"] == len(dict(whole.named_parameters()))
    assert report["elements"] == sum(p.numel() for p in whole.parameters())
