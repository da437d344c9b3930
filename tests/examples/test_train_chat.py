"""examples/train_chat.py end to end on a tiny VisCPM-Chat (CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from example_scripts import ROOT, load_example, write_chat_data
from fake_hub import FakeHub
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from tiny_models import make_chat_model, make_processor
from transformers import AutoModelForImageTextToText

from viscpm_hf import build_byte_level_tokenizer


CPU = ["--use_cpu", "--report_to", "none", "--bf16", "false", "--save_strategy", "no", "--logging_steps", "1",
       "--per_device_train_batch_size", "2", "--seed", "0", "--dataloader_num_workers", "0"]  # fmt: skip
train_chat = load_example("train_chat")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_chat")
    tokenizer = build_byte_level_tokenizer()
    make_chat_model(tokenizer).save_pretrained(root / "model")
    make_processor(tokenizer).save_pretrained(root / "model")
    write_chat_data(root, [f"Shape {i}." for i in range(4)])
    translated = [{"image": f"{i}.png", "caption": f"第{i}张图"} for i in range(4)]
    (root / "captions_zh.json").write_text(json.dumps(translated))
    return root


def run(workspace, tmp_path, *extra, stage="sft", data="conversations.json"):
    args = ["--model_name_or_path", str(workspace / "model"), "--stage", stage, "--data", str(workspace / data),
            "--image_folder", str(workspace / "images"), "--output_dir", str(tmp_path / "out"), *CPU, *extra]  # fmt: skip
    return train_chat.main(args)


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def exported(tmp_path: Path) -> Path:
    return tmp_path / "out" / "model"


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_pretrain_trains_the_vision_side_only(workspace, tmp_path):
    run(workspace, tmp_path, "--max_steps", "2", "--learning_rate", "1e-2", stage="pretrain", data="captions.json")
    moved = changed(weights(workspace / "model"), weights(exported(tmp_path)))
    assert any(n.startswith("model.bridge.") for n in moved)
    assert any(n.startswith("model.vision_tower.") for n in moved)
    assert not any(n.startswith("model.llm.") for n in moved)


def test_sft_trains_bridge_and_llm_and_can_keep_the_tower(workspace, tmp_path):
    run(workspace, tmp_path, "--max_steps", "2", "--learning_rate", "1e-2", "--tune_vision", "false")
    moved = changed(weights(workspace / "model"), weights(exported(tmp_path)))
    assert any(n.startswith("model.llm.") for n in moved) and any(n.startswith("model.bridge.") for n in moved)
    assert not any(n.startswith("model.vision_tower.") for n in moved)


def test_a_frozen_batch_norm_tower_keeps_its_running_statistics(workspace, tmp_path):
    tokenizer = build_byte_level_tokenizer()
    model = make_chat_model(tokenizer, vision_model_type="resnet", vision_feature_dim=32)
    model.save_pretrained(tmp_path / "model")
    make_processor(tokenizer).save_pretrained(tmp_path / "model")
    args = ["--model_name_or_path", str(tmp_path / "model"), "--stage", "pretrain", "--data",
            str(workspace / "captions.json"), "--image_folder", str(workspace / "images"), "--output_dir",
            str(tmp_path / "out"), *CPU, "--max_steps", "2", "--learning_rate", "1e-2", "--tune_vision", "false"]  # fmt: skip
    train_chat.main(args)
    moved = changed(weights(tmp_path / "model"), weights(exported(tmp_path)))
    assert any(n.startswith("model.bridge.") for n in moved)
    assert not any(n.startswith("model.vision_tower.") for n in moved), sorted(moved)


def test_lora_output_merges_into_a_loadable_model(workspace, tmp_path):
    run(workspace, tmp_path, "--max_steps", "2", "--learning_rate", "1e-2", "--lora", "--merge_adapters",
        "--tune_vision", "false")  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(exported(tmp_path))
    moved = changed(weights(workspace / "model"), {k: v for k, v in model.state_dict().items()})
    assert any(".llm.model.layers." in n and "proj" in n for n in moved)  # merged deltas
    assert any(n.startswith("model.bridge.") for n in moved)
    assert not any(n.startswith("model.vision_tower.") for n in moved)


def test_loss_falls_when_overfitting(workspace, tmp_path):
    trainer = run(workspace, tmp_path, "--max_steps", "25", "--learning_rate", "5e-3")
    losses = [entry["loss"] for entry in json.loads((tmp_path / "out" / "train_log.json").read_text())]
    assert len(losses) == 25 and sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5
    assert trainer.state.global_step == 25


def test_loss_covers_every_assistant_turn_and_nothing_else(workspace):
    from trl import SFTConfig, SFTTrainer

    from viscpm_hf.mpm.data import conversation_dataset

    dataset = conversation_dataset(workspace / "conversations.json", workspace / "images")
    processor = make_processor(build_byte_level_tokenizer())
    args = SFTConfig(output_dir="unused", use_cpu=True, report_to="none", max_length=None, assistant_only_loss=True)
    trainer = SFTTrainer(model=make_chat_model(processor.tokenizer), args=args, train_dataset=dataset, processing_class=processor)
    batch = trainer.data_collator([dataset[0], dataset[1]])
    trained = [processor.tokenizer.decode(ids[labels != -100]) for ids, labels in zip(batch["input_ids"], batch["labels"])]
    # Each answer with the space after "AI:", which the model generates (the prompt ends at "AI:").
    assert trained == [" Shape 0.</s> Blue.</s>", " Shape 1.</s> Red.</s>"]
    assert not (batch["labels"] == processor.image_token_id).any()


def test_resume_continues_the_same_loss_trajectory(workspace, tmp_path):
    common = ["--max_steps", "6", "--learning_rate", "5e-3"]
    run(workspace, tmp_path / "straight", *common)
    straight = json.loads((tmp_path / "straight" / "out" / "train_log.json").read_text())
    run(workspace, tmp_path / "first", "--max_steps", "3", "--learning_rate", "5e-3", "--save_strategy", "steps",
        "--save_steps", "3", "--lr_scheduler_type", "constant")  # fmt: skip
    checkpoint = tmp_path / "first" / "out" / "checkpoint-3"
    assert checkpoint.is_dir()
    run(workspace, tmp_path / "straight_constant", *common, "--lr_scheduler_type", "constant")
    reference = json.loads((tmp_path / "straight_constant" / "out" / "train_log.json").read_text())
    out = tmp_path / "first" / "out"
    args = ["--model_name_or_path", str(workspace / "model"), "--data", str(workspace / "conversations.json"),
            "--image_folder", str(workspace / "images"), "--output_dir", str(out), *CPU, *common,
            "--lr_scheduler_type", "constant", "--resume_from_checkpoint", str(checkpoint)]  # fmt: skip
    train_chat.main(args)
    resumed = json.loads((out / "train_log.json").read_text())
    assert [round(e["loss"], 5) for e in resumed if e["step"] > 3] == [round(e["loss"], 5) for e in reference if e["step"] > 3]
    assert len(straight) == 6


def test_bilingual_mixing_is_deterministic(workspace):
    from viscpm_hf.mpm.data import caption_dataset, mix_languages

    english = caption_dataset(workspace / "captions.json", workspace / "images")
    chinese = caption_dataset(workspace / "captions_zh.json", workspace / "images")
    mixed = mix_languages(english, chinese, 0.2, seed=1)
    assert len(mixed) == 5  # 4 English + round(0.2 / 0.8 * 4) = 1 Chinese
    assert mixed["messages"] == mix_languages(english, chinese, 0.2, seed=1)["messages"]
    with pytest.raises(ValueError, match="needs 12 target-language examples"):
        mix_languages(english, chinese, 0.75)


# --- bad input ---------------------------------------------------------------------------------------------


def test_missing_images_are_skipped_with_a_count_or_fail(workspace, tmp_path, caplog):
    from viscpm_hf.mpm.data import conversation_dataset

    broken = json.loads((workspace / "conversations.json").read_text())
    broken[1]["image"] = "missing.png"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    assert len(conversation_dataset(path, workspace / "images")) == 3
    assert "skipped 1 example" in caplog.text
    with pytest.raises(ValueError, match="missing.png"):
        conversation_dataset(path, workspace / "images", on_missing_image="error")


def test_bad_data_gets_clear_messages(workspace, tmp_path):
    from viscpm_hf.mpm.data import caption_dataset, conversation_dataset, image_text_dataset

    no_answer = tmp_path / "no_answer.json"
    no_answer.write_text(json.dumps([{"image": "0.png", "conversations": [{"from": "human", "value": "Hi"}]}]))
    with pytest.raises(ValueError, match="no assistant"):
        conversation_dataset(no_answer, workspace / "images")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no usable example"):
        caption_dataset(empty, workspace / "images")
    folder = tmp_path / "hf_dataset"
    caption_dataset(workspace / "captions.json", workspace / "images").save_to_disk(folder)
    with pytest.raises(ValueError, match="no column \\['caption'\\]"):
        image_text_dataset(folder, image_column="images", caption_column="caption")


def test_resume_path_that_does_not_exist(workspace, tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        run(workspace, tmp_path, "--resume_from_checkpoint", str(tmp_path / "nope"))


def test_lora_in_pretrain_is_refused(workspace, tmp_path):
    with pytest.raises(SystemExit, match="stage pretrain keeps frozen"):
        run(workspace, tmp_path, "--lora", stage="pretrain", data="captions.json")


def test_two_processes_with_accelerate(workspace, tmp_path):
    # `--cpu --num_processes 2` starts a single process without MPI; `--multi_gpu` on CPU gives real DDP (gloo).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "examples" / "train_chat.py"), "--model_name_or_path", str(workspace / "model"),
               "--data", str(workspace / "conversations.json"), "--image_folder", str(workspace / "images"),
               "--output_dir", str(tmp_path / "out"), "--max_steps", "2", *CPU]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # 4 examples, 2 per device: two processes finish an epoch per step, one process every two steps.
    assert json.loads((tmp_path / "out" / "train_log.json").read_text())[-1]["epoch"] == 2.0
    assert (exported(tmp_path) / "model.safetensors").is_file()


def test_a_deepspeed_config_on_cpu_stops_before_loading_the_model_and_says_what_to_use(
    workspace, tmp_path, monkeypatch
):
    """What `accelerate launch --config_file examples/configs/deepspeed_zero3_chat.yaml` sets: ZeRO-3 would partition
    the model at loading, which a CPU run never gathers ("weight should have at least three dimensions")."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setattr(train_chat, "load_model", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=r"error: the accelerate config \(--config_file\) asks for DeepSpeed ZeRO-3 "
                       r"\(examples/configs/deepspeed_zero3\*\.yaml\), which needs GPUs, but (this machine has no "
                       r"GPU for it|--use_cpu was given)\. On CPU, launch with examples/configs/cpu\.yaml or an FSDP "
                       r"config"):  # fmt: skip
        run(workspace, tmp_path, "--max_steps", "1")


@pytest.mark.timeout(600)
def test_accelerate_launch_with_the_zero3_config_on_cpu_is_refused_with_the_message(workspace, tmp_path):
    """The user's run: the CPU recipe's ACCELERATE_USE_CPU with the ZeRO-3 config trained an empty model and failed
    at its first forward ("weight should have at least three dimensions")."""
    pytest.importorskip("deepspeed", reason="accelerate launches DeepSpeed configs only with DeepSpeed installed")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "examples" / "configs" / "deepspeed_zero3_chat.yaml"), "--num_processes", "1",
               "--mixed_precision", "no", str(ROOT / "examples" / "train_chat.py"), "--model_name_or_path",
               str(workspace / "model"), "--data", str(workspace / "conversations.json"), "--image_folder",
               str(workspace / "images"), "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *CPU]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert "asks for DeepSpeed ZeRO-3" in result.stderr and "needs GPUs" in result.stderr, result.stderr[-3000:]
    assert "at least three dimensions" not in result.stderr and not (tmp_path / "out" / "model").exists()


def test_push_to_hub_needs_what_the_card_cannot_inherit_and_uploads_the_export(workspace, tmp_path, monkeypatch):
    """The starting folder has no card: --push_to_hub stops before training until the flags complete it."""
    hub = FakeHub(monkeypatch)
    with pytest.raises(SystemExit, match="would lack its base_model, license, language: .* pass --base_model / "
                                         "--license / --language"):  # fmt: skip
        run(workspace, tmp_path, "--push_to_hub", "--hub_token", "hf_secret")
    assert hub.repos == []
    run(workspace, tmp_path, "--max_steps", "1", "--lora", "--push_to_hub", "--hub_token", "hf_secret",
        "--base_model", "org/tiny-llm", "--license", "apache-2.0", "--language", "en")  # fmt: skip
    assert hub.repos[0]["repo_id"] == "out"  # as the Trainer's default: the output folder's name
    assert hub.commit["repo_id"] == "user/out"  # under the token's user
    files = hub.commit["files"]
    assert set(files) == {p.name for p in exported(tmp_path).iterdir()} >= {"adapter_model.safetensors", "README.md"}
    card = ModelCard(files["README.md"].decode()).data
    assert (card.library_name, card.base_model, card.license) == ("peft", "org/tiny-llm", "apache-2.0")
    assert card.language == ["en"]
    assert "lora" in card.tags and card.pipeline_tag == "image-text-to-text"
