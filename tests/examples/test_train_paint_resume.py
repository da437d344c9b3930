"""Crash-safe runs of examples/train_paint.py: killed with SIGKILL inside a checkpoint save, at a random moment and
inside the export, and resumed with `--resume_from_checkpoint latest` each time, a run ends with the losses and the
exported weights of an uninterrupted run, and `latest` only ever takes a complete checkpoint."""

import json
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from example_scripts import ROOT, Run
from safetensors.torch import load_file


STEPS = 10
SCRIPT = [sys.executable, str(ROOT / "examples" / "train_paint.py")]


def command(workspace: Path, output: Path) -> list[str]:
    """8 images, 4 per micro-batch, 2 micro-batches per step, EMA; a checkpoint every 2 steps, the newest 2 kept."""
    return [*SCRIPT, "--pretrained_model_name_or_path", str(workspace / "model"), "--train_data_dir",
            str(workspace / "images"), "--output_dir", str(output), "--resolution", "32", "--train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--seed", "0", "--use_ema",
            "--max_train_steps", str(STEPS), "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
            "--resume_from_checkpoint", "latest"]  # fmt: skip


def losses(output: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


def complete_checkpoints(output: Path) -> set[int]:
    """Steps of the checkpoint-N folders that hold their progress file (written before the folder gets its name)."""
    return {int(p.name.split("-")[1]) for p in output.glob("checkpoint-*") if (p / "training_progress.json").is_file()}


def saving(output: Path):
    """True while a checkpoint is being written (its hidden folder exists)."""
    return lambda: any(output.glob(".checkpoint-*.partial"))


def exporting(output: Path):
    return lambda: (output / ".pipeline.partial").exists()


def completed(output: Path, step: int):
    return lambda: (output / f"checkpoint-{step}").is_dir()


def resumed_from(log: Path) -> int | None:
    found = re.findall(r"Resumed from (\S+) at step (\d+)", log.read_text())
    if not found:
        return None
    (path, step), = found
    assert Path(path).name == f"checkpoint-{step}", path  # a finished checkpoint's name, never a hidden one
    return int(step)


@pytest.mark.timeout(240)
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(paint_workspace, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "killed"
    reference = Run(command(paint_workspace, straight), tmp_path / "straight.log")

    rng = random.Random(17)
    plan = [("inside a save", saving(out)), ("at random", completed(out, 6)), ("inside the export", exporting(out))]
    complete_at_kill, left_behind = [], []
    logs = [tmp_path / f"killed-{number}.log" for number in range(len(plan))] + [tmp_path / "final.log"]
    upcoming = Run(command(paint_workspace, out), logs[0])
    try:
        for number, (where, condition) in enumerate(plan):
            run = upcoming.release()  # the previous run is dead: this one starts from what it left
            upcoming = Run(command(paint_workspace, out), logs[number + 1], held=True)  # imports while this one runs
            assert run.wait_until(condition, timeout=120), f"run {number} ended before {where}: {run.log.read_text()[-3000:]}"
            if where == "at random":  # but early enough that the last kill still finds the export to land in
                deadline = time.monotonic() + rng.uniform(0.0, 0.5)
                assert run.wait_until(lambda: time.monotonic() >= deadline or completed(out, 8)())
            run.kill()
            assert run.process.returncode == -signal.SIGKILL
            complete_at_kill.append(complete_checkpoints(out))
            left_behind.append(sorted(p.name for p in out.glob(".*.partial")))
        final = upcoming.release()
        assert final.finish(timeout=120) == 0, final.log.read_text()[-3000:]
        assert reference.finish(timeout=120) == 0, reference.log.read_text()[-3000:]
    finally:
        for process in (upcoming, reference):
            if process.process.poll() is None:  # a failed assertion above: no process outlives the test
                process.kill()

    # The kills landed where planned: a hidden checkpoint, then a hidden export, were left behind.
    assert any(name.startswith(".checkpoint-") for name in left_behind[0]), left_behind
    assert ".pipeline.partial" in left_behind[2], left_behind
    # Each resume took the newest checkpoint that was complete when the previous run died.
    logs = [tmp_path / f"killed-{number}.log" for number in (1, 2)] + [final.log]
    for log, complete in zip(logs, complete_at_kill):
        assert resumed_from(log) == max(complete, default=None), (log.name, complete)
    assert resumed_from(tmp_path / "final.log") == STEPS  # killed inside the export: only the export was left to do

    assert sorted(losses(out)) == list(range(1, STEPS + 1))
    assert losses(out) == pytest.approx(losses(straight), rel=1e-6, abs=1e-9)
    assert complete_checkpoints(out) == {STEPS - 2, STEPS} and not list(out.glob(".*"))
    for component in ("transblock", "unet"):  # the exported (EMA) weights went through every kill unchanged
        ours, theirs = (load_file(next((o / "pipeline" / component).glob("*.safetensors"))) for o in (out, straight))
        assert ours.keys() == theirs.keys()
        for name in ours:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-8)
