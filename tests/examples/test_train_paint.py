"""examples/train_paint.py end to end on a tiny VisCPM-Paint (CPU, 32 x 32 images)."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from accelerate.state import AcceleratorState
from datasets import Dataset, Image
from diffusers import DiffusionPipeline
from example_scripts import PAINT_CAPTIONS, ROOT, load_example, write_metadata
from fake_hub import FakeHub
from huggingface_hub import ModelCard
from PIL import Image as PILImage
from safetensors.torch import load_file

from viscpm_hf import VisCPMPaintPipeline
from viscpm_hf.hub import is_pickle


PROMPTS = ["a red apple", "一个红苹果", "ein roter Apfel"]
# 8 images, 4 per micro-batch, 2 micro-batches per step: every step sees the whole (tiny) data set.
COMMON = ["--resolution", "32", "--train_batch_size", "4", "--gradient_accumulation_steps", "2",
          "--learning_rate", "1e-3", "--seed", "0"]  # fmt: skip
TRAINING = [*COMMON, "--max_train_steps", "30", "--checkpointing_steps", "10", "--checkpoints_total_limit", "2",
            "--use_ema"]  # fmt: skip
MAIN_RUN = [*TRAINING, "--validation_prompts", *PROMPTS, "--validation_steps", "20", "--validation_inference_steps", "2"]
# What a pipeline folder to load or upload may hold: weights, configs, tokenizer files and the model card.
EXPORT_SUFFIXES = {".safetensors", ".json", ".txt", ".model", ".jinja", ".md"}
PICKLES = {".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt"}
train_paint = load_example("train_paint")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each run builds its own Accelerator (with its own mixed precision) in this one process."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def workspace(paint_workspace) -> Path:
    """The tiny pipeline (`model/`) and captioned images (`images/`) of conftest.py."""
    return paint_workspace


def run(workspace, output_dir, *extra, data=None):
    data = data or ["--train_data_dir", str(workspace / "images")]
    args = ["--pretrained_model_name_or_path", str(workspace / "model"), *data, "--output_dir", str(output_dir), *extra]
    return train_paint.main(args)


def losses(output_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(output_dir) / "train_log.jsonl").read_text().splitlines()]


def weights(folder: Path, component: str) -> dict:
    return load_file(next((folder / component).glob("*.safetensors")))


def changed(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


@pytest.fixture(scope="module")
def main_run(paint_workspace, tmp_path_factory):
    """attn2 training with accumulation, EMA, checkpoints every 10 steps (keep 2) and validation: 30 steps."""
    output_dir = tmp_path_factory.mktemp("main_run")
    run(paint_workspace, output_dir, *MAIN_RUN)
    AcceleratorState._reset_state(reset_partial_state=True)
    return output_dir


def test_a_deepspeed_config_on_cpu_stops_before_any_work_and_says_what_to_use(workspace, tmp_path, monkeypatch):
    """What `accelerate launch --config_file examples/configs/deepspeed_zero3.yaml` sets, on a machine without GPUs
    (or with the CPU recipe's ACCELERATE_USE_CPU): DeepSpeed would be set up for GPUs it does not have."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(SystemExit, match=r"error: the accelerate config \(--config_file\) asks for DeepSpeed ZeRO-3 .*"
                       r"needs GPUs, but .* On CPU, launch with examples/configs/cpu\.yaml"):  # fmt: skip
        run(workspace, tmp_path / "out", "--max_train_steps", "1")
    assert not (tmp_path / "out").exists()


def test_loss_falls_when_overfitting(main_run):
    trajectory = losses(main_run)
    assert len(trajectory) == 30
    first, last = np.mean(trajectory[:5]), np.mean(trajectory[-5:])
    assert last < first - 0.03, (first, last)


def test_only_the_transblock_and_cross_attention_train(workspace, main_run):
    model, export = workspace / "model", main_run / "pipeline"
    for component in ("text_encoder", "vae"):
        assert not changed(weights(model, component), weights(export, component)), component
    unet_changed = changed(weights(model, "unet"), weights(export, "unet"))
    assert unet_changed and all("attn2" in name for name in unet_changed)
    assert changed(weights(model, "transblock"), weights(export, "transblock")) == set(weights(model, "transblock"))
    # Checkpoints hold the trained parameters only (the frozen ones are in the pretrained folder).
    saved = load_file(main_run / "checkpoint-30" / "model.safetensors")
    assert saved and all(name.startswith("transblock.") or "attn2" in name for name in saved)
    assert (main_run / "checkpoint-30" / "ema.safetensors").is_file()


def test_checkpoints_are_complete_and_pruned(main_run):
    assert sorted(p.name for p in main_run.glob("*checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    progress = json.loads((main_run / "checkpoint-20" / "training_progress.json").read_text())
    assert progress == {"global_step": 20, "epoch": 19, "batches_in_epoch": 2, "micro_step": 40}


def exported_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_the_export_is_a_hub_clean_pipeline_folder_that_both_loaders_load(main_run):
    """output_dir/pipeline holds weights, configs, tokenizer files and the card, and nothing of the run: no optimizer
    state, random states or other pickles (those stay in the checkpoints beside it), no logs, no images."""
    export = main_run / "pipeline"
    files = exported_files(export)
    assert {"model_index.json", "README.md", "unet/diffusion_pytorch_model.safetensors",
            "transblock/diffusion_pytorch_model.safetensors"} <= set(files)  # fmt: skip
    assert {Path(f).suffix for f in files} <= EXPORT_SUFFIXES and not {Path(f).suffix for f in files} & PICKLES, files
    assert not (main_run / "model_index.json").exists() and not list(main_run.glob(".pipeline*"))
    assert {p.name for p in main_run.iterdir()} == {"pipeline", "checkpoint-20", "checkpoint-30", "train_log.jsonl",
                                                    "validation"}  # fmt: skip
    assert {p.suffix for p in (main_run / "checkpoint-30").iterdir()} & PICKLES  # where accelerate's pickles live
    for loader in (VisCPMPaintPipeline, DiffusionPipeline):
        pipe = loader.from_pretrained(export)
        assert type(pipe) is VisCPMPaintPipeline
        image = pipe("一个红苹果", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (32, 32)
    card = (export / "README.md").read_text()
    assert "library_name: diffusers" in card and "cross-attention" in card and "一个红苹果" in card
    for label in ("step-000020", "final"):
        folder = main_run / "validation" / label
        assert sorted(p.name for p in folder.glob("*.png")) == ["00.png", "01.png", "02.png"]
        assert json.loads((folder / "prompts.json").read_text()) == PROMPTS


def test_an_interrupted_export_leaves_the_previous_pipeline_whole(workspace, tmp_path, monkeypatch):
    """A run that dies while writing its pipeline: the earlier export stays in place, untouched, and the next run
    replaces it once its own is complete, leaving no hidden folders."""
    short = [*COMMON, "--max_train_steps", "1", "--checkpointing_steps", "0"]
    run(workspace, tmp_path, *short)
    export = tmp_path / "pipeline"
    before = {name: (export / name).read_bytes() for name in exported_files(export)}

    save_pretrained = VisCPMPaintPipeline.save_pretrained

    def dies_half_way(self, folder, **kwargs):
        save_pretrained(self, folder, **kwargs)
        (Path(folder) / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        raise RuntimeError("killed while exporting")

    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(VisCPMPaintPipeline, "save_pretrained", dies_half_way)
    with pytest.raises(RuntimeError, match="killed while exporting"):
        run(workspace, tmp_path, *short, "--learning_rate", "1e-2")
    assert {name: (export / name).read_bytes() for name in exported_files(export)} == before
    assert (tmp_path / ".pipeline.partial").is_dir()  # the torn one, under its hidden name

    monkeypatch.undo()
    AcceleratorState._reset_state(reset_partial_state=True)
    run(workspace, tmp_path, *short, "--learning_rate", "1e-2")
    after = {name: (export / name).read_bytes() for name in exported_files(export)}
    assert after.keys() == before.keys() and after != before
    assert not list(tmp_path.glob(".pipeline*"))


def test_push_to_hub_uploads_the_exported_pipeline_only(workspace, tmp_path, monkeypatch):
    """--push_to_hub is checked before training (the tiny model has no card to inherit from), then uploads
    OUTPUT_DIR/pipeline in one commit: no checkpoint, no pickle, a complete card."""
    hub = FakeHub(monkeypatch)
    with pytest.raises(SystemExit, match="would lack its base_model, license, language"):
        run(workspace, tmp_path / "out", *COMMON, "--max_train_steps", "1", "--push_to_hub", "--hub_token", "x")
    assert hub.repos == [] and not (tmp_path / "out" / "train_log.jsonl").exists()
    run(workspace, tmp_path / "out", *COMMON, "--max_train_steps", "2", "--checkpointing_steps", "1",
        "--push_to_hub", "--hub_token", "hf_secret", "--hub_model_id", "org/tiny-paint", "--base_model", "org/base",
        "--license", "apache-2.0", "--language", "en", "zh")  # fmt: skip
    export = tmp_path / "out" / "pipeline"
    assert hub.repos == [{"repo_id": "org/tiny-paint", "token": "hf_secret", "private": None, "exist_ok": True}]
    files = hub.commit["files"]
    assert files == {p.relative_to(export).as_posix(): p.read_bytes() for p in export.rglob("*") if p.is_file()}
    assert "model_index.json" in files and not [name for name in files if is_pickle(export / name)]
    assert (tmp_path / "out" / "checkpoint-2").is_dir()  # saved, never uploaded
    card = ModelCard(files["README.md"].decode())
    assert (card.data.base_model, card.data.license, card.data.language) == ("org/base", "apache-2.0", ["en", "zh"])
    assert 'VisCPMPaintPipeline.from_pretrained("org/tiny-paint")' in card.text


def test_resume_continues_the_same_trajectory(workspace, main_run, tmp_path):
    shutil.copytree(main_run / "checkpoint-20", tmp_path / "checkpoint-20")
    (tmp_path / ".checkpoint-30.partial").mkdir()  # a save cut off by the interruption: never taken as a checkpoint
    log_lines = (main_run / "train_log.jsonl").read_text().splitlines()[:24]
    (tmp_path / "train_log.jsonl").write_text("\n".join(log_lines) + '\n{"step": 25, "lo')  # a line the kill tore
    run(workspace, tmp_path, *TRAINING, "--resume_from_checkpoint", "latest")
    # Steps 1..20 kept from the log (the torn line and the records after the checkpoint dropped), 21..30 retrained.
    assert losses(tmp_path) == pytest.approx(losses(main_run), abs=1e-6)
    assert not list(tmp_path.glob(".checkpoint-*"))
    # The EMA went through the checkpoint too: the saved (averaged) weights are the uninterrupted run's.
    for component in ("transblock", "unet"):
        ours, theirs = weights(tmp_path / "pipeline", component), weights(main_run / "pipeline", component)
        assert not changed(theirs, ours), component


def test_precomputed_text_embeddings_match_and_are_reused(workspace, main_run, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    run(workspace, tmp_path / "a", *COMMON, "--max_train_steps", "10", "--checkpointing_steps", "0",
        "--precompute_text_embeddings", "--text_embedding_cache", str(cache))  # fmt: skip
    assert losses(tmp_path / "a") == pytest.approx(losses(main_run)[:10], abs=1e-5)
    assert len(list(cache.glob("shard-*.safetensors"))) == 1

    AcceleratorState._reset_state(reset_partial_state=True)
    calls = []
    forward = transformers.BertModel.forward
    monkeypatch.setattr(transformers.BertModel, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    run(workspace, tmp_path / "b", *COMMON, "--max_train_steps", "2", "--checkpointing_steps", "0",
        "--text_embedding_cache", str(cache))  # fmt: skip
    assert calls == [] and len(list(cache.glob("shard-*.safetensors"))) == 1


def test_full_unet_in_bf16_with_gradient_checkpointing(workspace, tmp_path):
    records = run(workspace, tmp_path, *COMMON, "--max_train_steps", "2", "--checkpointing_steps", "0",
                  "--train_unet", "full", "--mixed_precision", "bf16", "--gradient_checkpointing")  # fmt: skip
    assert len(records) == 2 and all(np.isfinite(r["loss"]) for r in records)
    model = workspace / "model"
    export = tmp_path / "pipeline"
    unet_changed = changed(weights(model, "unet"), weights(export, "unet"))
    assert any("attn2" not in name for name in unet_changed)
    assert not changed(weights(model, "text_encoder"), weights(export, "text_encoder"))
    assert all(v.dtype == torch.float32 for v in weights(export, "unet").values())


def test_lora_rank_trains_an_adapter_that_load_lora_weights_applies(workspace, tmp_path):
    """--lora_rank: only LoRA weights train and are saved; the base pipeline loads them the diffusers way."""
    run(workspace, tmp_path, *COMMON, "--learning_rate", "1e-2", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--lora_rank", "4")  # fmt: skip
    export = tmp_path / "pipeline"
    assert exported_files(export) == ["README.md", "pytorch_lora_weights.safetensors"]  # the adapter and its card only
    saved = load_file(export / "pytorch_lora_weights.safetensors")
    assert saved and all(name.startswith("unet.") and ".attn2." in name and "lora" in name for name in saved)
    checkpoint = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert checkpoint and all("lora_" in name for name in checkpoint)  # the transblock stays as loaded
    card = (export / "README.md").read_text()
    assert "- lora" in card and "load_lora_weights" in card

    pipe = VisCPMPaintPipeline.from_pretrained(workspace / "model")
    sample = {"num_inference_steps": 3, "output_type": "np"}
    base = pipe("a red apple", generator=torch.Generator().manual_seed(0), **sample).images
    pipe.load_lora_weights(export)
    tuned = pipe("a red apple", generator=torch.Generator().manual_seed(0), **sample).images
    assert np.abs(tuned - base).max() > 1e-3  # four steps of LoRA training change the image
    off = pipe("a red apple", generator=torch.Generator().manual_seed(0), cross_attention_kwargs={"scale": 0.0}, **sample)
    np.testing.assert_array_equal(off.images, base)
    pipe.fuse_lora()
    fused = pipe("a red apple", generator=torch.Generator().manual_seed(0), **sample).images
    np.testing.assert_allclose(fused, tuned, atol=1e-4)

    # Resuming a LoRA run continues its trajectory, as a full run does.
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "checkpoint-2", resumed / "checkpoint-2")
    run(workspace, resumed, *COMMON, "--learning_rate", "1e-2", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--lora_rank", "4", "--resume_from_checkpoint", "latest")  # fmt: skip
    assert losses(resumed) == pytest.approx(losses(tmp_path)[2:], abs=1e-6)
    assert load_file(resumed / "pipeline" / "pytorch_lora_weights.safetensors").keys() == saved.keys()
    for name, value in load_file(resumed / "pipeline" / "pytorch_lora_weights.safetensors").items():
        torch.testing.assert_close(value, saved[name])


def test_a_datasets_dataset_with_other_column_names(workspace, tmp_path):
    images = [PILImage.open(workspace / "images" / f"{i}.png") for i in range(4)]
    dataset = Dataset.from_dict({"picture": images, "caption": PAINT_CAPTIONS[:4]}).cast_column("picture", Image())
    dataset.save_to_disk(tmp_path / "data")
    data = ["--dataset_name", str(tmp_path / "data"), "--image_column", "picture", "--caption_column", "caption"]
    records = run(workspace, tmp_path / "out", *COMMON, "--max_train_steps", "1", "--checkpointing_steps", "0", data=data)
    assert len(records) == 1


def test_missing_images_are_skipped_with_a_count_or_fail(workspace, tmp_path, caplog):
    folder = tmp_path / "images"
    shutil.copytree(workspace / "images", folder)
    write_metadata(folder, [(f"{i}.png", c) for i, c in enumerate(PAINT_CAPTIONS)] + [("missing.png", "lost")])
    with caplog.at_level(logging.WARNING):
        run(workspace, tmp_path / "out", *COMMON, "--max_train_steps", "1", "--checkpointing_steps", "0",
            data=["--train_data_dir", str(folder)])  # fmt: skip
    assert "Skipped 1 of 9" in caplog.text and "missing.png" in caplog.text
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(SystemExit, match=r"missing\.png.*file not found"):
        run(workspace, tmp_path / "out", "--on_missing_image", "error", data=["--train_data_dir", str(folder)])


def test_conditioning_shift_moves_each_caption_by_one_offset_and_keeps_dropped_captions():
    states = torch.randn(64, 5, 256)
    dropped = [i % 4 == 0 for i in range(64)]
    shifted = train_paint.shift_captions(states, dropped, 2.0, torch.Generator().manual_seed(0))
    offset = shifted - states
    assert torch.allclose(offset, offset[:, :1].expand_as(offset), atol=1e-6)  # the same on every token
    assert not offset[dropped].any() and offset[[not d for d in dropped]].abs().min() > 0
    norms = offset[[not d for d in dropped], 0].norm(dim=-1)
    assert abs(norms.mean().item() - 2.0) < 0.1  # the asked norm, in expectation
    assert not torch.equal(offset[1], offset[2])  # a different offset per caption


def test_conditioning_offsets_move_each_caption_by_one_drawn_row_times_the_scale():
    rows = torch.randn(7, 256)
    states = torch.randn(64, 5, 256)
    dropped = [i % 4 == 0 for i in range(64)]
    shifted = train_paint.shift_captions(states, dropped, 0.5, torch.Generator().manual_seed(0), offsets=rows)
    offset = (shifted - states)[:, 0]
    assert torch.allclose(shifted - states, (shifted - states)[:, :1].expand_as(states), atol=1e-6)
    assert not offset[dropped].any()
    kept = offset[[not d for d in dropped]]
    distance = (kept[:, None] - 0.5 * rows).norm(dim=-1)
    assert distance.min(dim=1).values.max() < 1e-5  # every kept caption moved by exactly one row, halved
    assert len(set(distance.argmin(dim=1).tolist())) > 1  # rows drawn, not one for all


def test_conditioning_offsets_files_are_checked(tmp_path):
    from safetensors.torch import save_file

    good, wrong, corrupt = tmp_path / "good.safetensors", tmp_path / "wrong.safetensors", tmp_path / "bad.safetensors"
    save_file({"offsets": torch.ones(3, 32)}, str(good))
    save_file({"shifts": torch.ones(3, 32)}, str(wrong))
    corrupt.write_bytes(b"not safetensors")
    assert train_paint.load_conditioning_offsets(str(good), 32).shape == (3, 32)
    for path, size, message in [(good, 64, r"\(3, 32\); expected \(n >= 1, 64\)"), (wrong, 32, "no tensor 'offsets'"),
                                (corrupt, 32, "not a readable safetensors file")]:  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            train_paint.load_conditioning_offsets(str(path), size)


def test_bad_inputs_say_what_to_fix(workspace, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    write_metadata(empty, [("gone.png", "nothing")])
    cases = [
        (["--train_data_dir", str(empty)], [], "No usable image-caption pairs"),
        (None, ["--caption_column", "caption"], "caption column 'caption'"),
        (None, ["--resume_from_checkpoint", str(tmp_path / "nope")], "does not exist"),
        (None, ["--resume_from_checkpoint", str(empty)], "not a train_paint.py checkpoint"),
        (["--train_data_dir", str(tmp_path / "absent")], [], "is not a folder"),
        (None, ["--caption_dropout", "1.5"], "caption_dropout"),
        (None, ["--conditioning_shift", "-1"], "conditioning_shift"),
        (None, ["--conditioning_offsets", str(tmp_path / "none.safetensors")], "is not a file"),
        (None, ["--conditioning_shift", "1", "--conditioning_offsets", __file__], "not both"),
        (None, ["--lora_rank", "0"], "--lora_rank must be at least 1"),
        (None, ["--lora_rank", "4", "--train_unet", "full"], "pass one of them"),
        (None, ["--lora_alpha", "8"], "pass --lora_rank too"),
    ]
    for data, extra, message in cases:
        AcceleratorState._reset_state(reset_partial_state=True)
        with pytest.raises(SystemExit, match=message):
            run(workspace, tmp_path / "out", *extra, data=data)


def test_processes_that_accelerate_does_not_see_are_refused(workspace, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. --multi_gpu on a machine without GPUs and without ACCELERATE_USE_CPU
    with pytest.raises(SystemExit, match="ACCELERATE_USE_CPU=1"):
        run(workspace, tmp_path, *COMMON)


def test_two_processes_with_accelerate(workspace, tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts one process unless MPI is set up; torchrun + the CPU switch
    # starts two (DDP over gloo).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29517", str(ROOT / "examples" / "train_paint.py"),
               "--pretrained_model_name_or_path", str(workspace / "model"), "--train_data_dir",
               str(workspace / "images"), "--output_dir", str(tmp_path), "--resolution", "32", "--train_batch_size", "2",
               "--max_train_steps", "3", "--checkpointing_steps", "2", "--precompute_text_embeddings"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Num processes: 2" in result.stderr + result.stdout
    assert (tmp_path / "checkpoint-2" / "random_states_1.pkl").is_file()  # both processes saved their state
    assert len(list((tmp_path / "text_embedding_cache").glob("shard-*.safetensors"))) == 2  # each encoded a share
    assert len(losses(tmp_path)) == 3
    assert isinstance(VisCPMPaintPipeline.from_pretrained(tmp_path / "pipeline"), VisCPMPaintPipeline)
