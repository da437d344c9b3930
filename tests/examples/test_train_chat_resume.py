"""Crash-safe resume of examples/train_chat.py: `latest` takes only complete checkpoints, and a run killed with SIGKILL
at random points (during saves too) and resumed each time ends with the loss trajectory of an uninterrupted run."""

import json
import logging
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from example_scripts import ROOT, Run, load_example

from viscpm_hf.training.checkpoints import MANIFEST_NAME, checkpoint_problem, latest_complete_checkpoint


train_chat = load_example("train_chat")
CPU = ["--use_cpu", "--report_to", "none", "--bf16", "false", "--logging_steps", "1", "--per_device_train_batch_size",
       "2", "--seed", "0", "--dataloader_num_workers", "0"]  # fmt: skip


def arguments(model: Path, workspace: Path, output: Path, *extra: str) -> list[str]:
    """Stage 1 on captions with the bridge alone trained: the cheapest CPM-Bee run that still saves whole checkpoints."""
    return ["--model_name_or_path", str(model), "--stage", "pretrain", "--data", str(workspace / "captions.json"),
            "--image_folder", str(workspace / "images"), "--tune_vision", "false", "--learning_rate", "1e-2",
            "--output_dir", str(output), *CPU, *extra]  # fmt: skip


def losses(output: Path) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in json.loads((output / "train_log.json").read_text())}


def damage(source: Path, step: int, how) -> Path:
    """A copy of a complete checkpoint as checkpoint-`step` (manifest renumbered), then broken by `how`."""
    target = source.with_name(f"checkpoint-{step}")
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    (target / MANIFEST_NAME).write_text(json.dumps({**manifest, "global_step": step}))
    how(target)
    return target


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_latest_resumes_from_the_newest_complete_checkpoint_and_sets_the_others_aside(
    cpmbee_chat, chat_workspace, tmp_path, caplog
):
    out = tmp_path / "run"
    constant = ["--lr_scheduler_type", "constant", "--save_strategy", "steps", "--save_steps", "1"]
    train_chat.main(arguments(cpmbee_chat, chat_workspace, out, "--max_steps", "2", *constant))
    good = out / "checkpoint-2"
    assert checkpoint_problem(good) is None and checkpoint_problem(out / "checkpoint-1") is None

    # What a crash can leave: a save stopped before its manifest; files cut short; a deletion stopped half-way.
    damage(good, 3, lambda c: (c / MANIFEST_NAME).unlink())
    damage(good, 4, lambda c: truncate(c / "optimizer.pt"))
    damage(good, 5, lambda c: (c / "trainer_state.json").unlink())
    def torn_rng(c):  # cut short, and a manifest that (wrongly) agrees: the zip check still tells
        truncate(c / "rng_state.pth")
        manifest = json.loads((c / MANIFEST_NAME).read_text())
        manifest["files"]["rng_state.pth"] = (c / "rng_state.pth").stat().st_size
        (c / MANIFEST_NAME).write_text(json.dumps(manifest))
    damage(good, 6, torn_rng)
    problems = {step: checkpoint_problem(out / f"checkpoint-{step}") for step in (3, 4, 5, 6)}
    assert "no checkpoint_complete.json" in problems[3]
    assert "optimizer.pt has" in problems[4] and "trainer_state.json is missing" in problems[5]
    assert "rng_state.pth is not a whole torch file" in problems[6]
    with pytest.raises(SystemExit, match="checkpoint-4 is not a complete checkpoint: optimizer.pt has"):
        train_chat.main(arguments(cpmbee_chat, chat_workspace, out, "--resume_from_checkpoint", str(out / "checkpoint-4")))

    with caplog.at_level(logging.WARNING, logger="viscpm_hf.training.checkpoints"):
        assert latest_complete_checkpoint(out) == good
    assert sorted(p.name for p in out.glob(".checkpoint-*.incomplete")) == [f".checkpoint-{s}.incomplete" for s in (3, 4, 5, 6)]
    assert caplog.text.count("Skipped") == 4 and "optimizer.pt has" in caplog.text

    damage(good, 3, lambda c: (c / MANIFEST_NAME).unlink())  # torn again: resuming sets it aside and saves anew
    train_chat.main(arguments(cpmbee_chat, chat_workspace, out, "--max_steps", "3", "--resume_from_checkpoint", "latest", *constant))
    assert checkpoint_problem(out / "checkpoint-3") is None
    train_chat.main(arguments(cpmbee_chat, chat_workspace, tmp_path / "straight", "--max_steps", "3", *constant))
    assert losses(out) == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    assert sorted(losses(out)) == [1, 2, 3]


# --- killing real runs ------------------------------------------------------------------------------------------


def checkpoint_folders(output: Path) -> list[Path]:
    return [p for p in output.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]


def saving(output: Path, at_least: int):
    """True while some checkpoint-N (N >= at_least) exists without its manifest: the Trainer is writing it."""
    return lambda: any(int(p.name.split("-")[1]) >= at_least and not (p / MANIFEST_NAME).exists() for p in checkpoint_folders(output))


def completed(output: Path, step: int):
    return lambda: (output / f"checkpoint-{step}" / MANIFEST_NAME).exists()


@pytest.mark.timeout(900)
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_trajectory(cpmbee_chat, chat_workspace, tmp_path):
    steps = 6
    options = ["--max_steps", str(steps), "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "2",
               "--resume_from_checkpoint", "latest"]  # fmt: skip
    script = [sys.executable, str(ROOT / "examples" / "train_chat.py")]
    # The uninterrupted run, beside the killed ones (each process has one thread; the machine two cores).
    reference = Run([*script, *arguments(cpmbee_chat, chat_workspace, tmp_path / "straight", *options)], tmp_path / "straight.log")

    out = tmp_path / "killed"
    command = [*script, *arguments(cpmbee_chat, chat_workspace, out, *options)]
    rng = random.Random(17)
    # Kill points: inside a save (a checkpoint folder without its manifest), at a random moment after a complete
    # checkpoint (mid-step, or mid-save), and inside a later save.
    plan = [("during a save", saving(out, 2)), ("at random", completed(out, 3)), ("during a save", saving(out, 5))]
    kills, left_incomplete = [], []
    logs = [tmp_path / f"killed-{number}.log" for number in range(len(plan))] + [tmp_path / "final.log"]
    upcoming = Run(command, logs[0])
    try:
        for number, (where, condition) in enumerate(plan):
            run = upcoming.release()  # the previous run is dead: this one starts from what it left
            upcoming = Run(command, logs[number + 1], held=True)  # imports while this one runs, starts when released
            assert run.wait_until(condition), f"run {number} ended before the kill point: {run.log.read_text()[-3000:]}"
            if where == "at random":  # but early enough that the last kill still finds a save to land in
                deadline = time.monotonic() + rng.uniform(0.0, 1.5)
                assert run.wait_until(lambda: time.monotonic() >= deadline or completed(out, 4)())
            run.kill()
            kills.append((where, run.process.returncode))
            left_incomplete += [p.name for p in checkpoint_folders(out) if checkpoint_problem(p) is not None]
        final = upcoming.release()
        assert final.finish() == 0, final.log.read_text()[-3000:]
        assert reference.finish() == 0, reference.log.read_text()[-3000:]
    finally:
        for process in (upcoming, reference):
            if process.process.poll() is None:  # a failed assertion above: no process outlives the test
                process.kill()

    assert [code for _, code in kills] == [-signal.SIGKILL] * len(plan)
    assert left_incomplete, "no kill landed inside a save"
    assert {p.name for p in out.glob(".checkpoint-*.incomplete")} >= {f".{name}" + ".incomplete" for name in left_incomplete[-1:]}
    assert "Skipped" in (tmp_path / "killed-1.log").read_text() + (tmp_path / "killed-2.log").read_text() + final.log.read_text()
    assert sorted(losses(out)) == list(range(1, steps + 1))
    assert losses(out) == losses(tmp_path / "straight")  # the same numbers, step for step
    remaining = checkpoint_folders(out)
    assert len(remaining) == 2 and all(checkpoint_problem(p) is None for p in remaining)
    assert (out / "model" / "model.safetensors").is_file()
