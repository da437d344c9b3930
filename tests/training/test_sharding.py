"""The refusal of a DeepSpeed config where it cannot run (no GPU, --use_cpu, ACCELERATE_USE_CPU), from the launch
environment alone: it needs no DeepSpeed installed."""

import pytest
import torch

from viscpm_hf.training.sharding import deepspeed_problem


@pytest.fixture
def deepspeed_launch(monkeypatch):
    """The environment `accelerate launch --config_file examples/configs/deepspeed_zero3_chat.yaml` gives a process."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    return monkeypatch


def on(monkeypatch, device: str | None) -> None:
    accelerator = None if device is None else torch.device(device)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args, **kwargs: accelerator)


@pytest.mark.parametrize("device", [None, "cpu", "mps"])
def test_deepspeed_without_a_gpu_is_refused_naming_the_config_and_what_to_use(deepspeed_launch, device):
    on(deepspeed_launch, device)
    problem = deepspeed_problem()
    assert problem.startswith(
        "the accelerate config (--config_file) asks for DeepSpeed ZeRO-3 (examples/configs/deepspeed_zero3*.yaml), "
        "which needs GPUs, but this machine has no GPU for it."
    )
    assert "examples/configs/cpu.yaml" in problem and "examples/configs/fsdp*.yaml" in problem and "python" in problem


def test_deepspeed_with_use_cpu_or_accelerate_use_cpu_is_refused_on_a_gpu_machine(deepspeed_launch):
    on(deepspeed_launch, "cuda")
    assert deepspeed_problem() is None
    assert "but --use_cpu was given" in deepspeed_problem(use_cpu=True)
    deepspeed_launch.setenv("ACCELERATE_USE_CPU", "1")
    assert "but ACCELERATE_USE_CPU is set" in deepspeed_problem()


def test_a_launch_without_deepspeed_has_no_problem(deepspeed_launch):
    deepspeed_launch.delenv("ACCELERATE_USE_DEEPSPEED")
    deepspeed_launch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    on(deepspeed_launch, None)
    assert deepspeed_problem(use_cpu=True) is None


def test_a_deepspeed_launch_without_a_stage_still_names_deepspeed(deepspeed_launch):
    deepspeed_launch.delenv("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    on(deepspeed_launch, None)
    assert deepspeed_problem().startswith("the accelerate config (--config_file) asks for DeepSpeed, which needs GPUs")
