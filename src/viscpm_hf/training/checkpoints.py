"""Crash-safe checkpoints for the Trainer-based training scripts (any LLM).

`CompleteCheckpoints` + `latest_complete_checkpoint`: a checkpoint counts once a manifest of its files is written after
every process has finished it; `latest` resumes from the newest complete one, half-written ones are set aside.
"""

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

from accelerate import PartialState
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

MANIFEST_NAME = "checkpoint_complete.json"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")


def checkpoint_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file in a checkpoint folder, the manifest left out."""
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_json_atomically(path: Path, data: Any) -> None:
    """Writes JSON under a temporary name, then renames: a reader sees the old file or the whole new one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, path)


class CompleteCheckpoints(TrainerCallback):
    """Marks each checkpoint complete once every process has finished writing it, and prunes old complete ones.

    The Trainer writes `checkpoint-N` in place (weights, optimizer, scheduler, RNG states of every process, then
    `trainer_state.json`), so a crash can leave any prefix of it. After the save, `on_save` waits for all processes,
    replaces the pickled `training_args.bin` by `training_args.json`, and writes `checkpoint_complete.json` listing
    every file with its size. `checkpoint_problem` later checks a checkpoint against that list.

    `save_total_limit` is applied here, after the new checkpoint is complete (give the Trainer none): the Trainer's
    own pruning runs before the new checkpoint is whole, and could leave no complete one after a crash.
    """

    def __init__(self, save_total_limit: int | None = None):
        self.save_total_limit = save_total_limit

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()
        if args.should_save:  # the process that wrote trainer_state.json
            folder = Path(args.output_dir, f"checkpoint-{state.global_step}")
            pickled = folder / "training_args.bin"
            if pickled.exists():
                write_json_atomically(folder / "training_args.json", json.loads(args.to_json_string()))
                pickled.unlink()
            manifest = {"global_step": state.global_step, "files": checkpoint_files(folder)}
            write_json_atomically(folder / MANIFEST_NAME, manifest)
            if self.save_total_limit:
                for old in complete_checkpoints(args.output_dir)[: -self.save_total_limit]:
                    remove_checkpoint(old)
        PartialState().wait_for_everyone()
        return control


def remove_checkpoint(folder: Path) -> None:
    """Deletes a checkpoint, its manifest first: interrupted half-way, it is incomplete, never taken for whole."""
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    shutil.rmtree(folder)


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint of this script, or None when it is.

    Complete: `checkpoint_complete.json` exists, names the folder's step, and every file it lists is there with its
    size; `trainer_state.json` parses, and the torch files (optimizer, scheduler, RNG states) are whole zip archives.
    """
    folder = Path(folder)
    match = CHECKPOINT_PATTERN.fullmatch(folder.name)
    if not folder.is_dir():
        return "it is not a folder"
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {MANIFEST_NAME} (the save did not finish, or another program wrote it)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"its {MANIFEST_NAME} is unreadable"
    if match and manifest.get("global_step") != int(match.group(1)):
        return f"its manifest is for step {manifest.get('global_step')}"
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not {size}"
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return "trainer_state.json is missing or unreadable"
    for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        if not zipfile.is_zipfile(path):
            return f"{path.name} is not a whole torch file"
    return None


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The complete `checkpoint-N` folders of a run, oldest first."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if CHECKPOINT_PATTERN.fullmatch(p.name)]
    return sorted((p for p in found if checkpoint_problem(p) is None), key=lambda p: int(p.name.split("-")[1]))


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None. Incomplete `checkpoint-N` folders are reported and
    renamed `.checkpoint-N.incomplete` (replacing an older one), out of reach of the Trainer's `checkpoint-*` scans:
    the resumed run writes `checkpoint-N` afresh. Call on every process; the main process renames first."""
    output_dir = Path(output_dir)
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and output_dir.is_dir():
            for folder in output_dir.glob("checkpoint-*"):
                problem = CHECKPOINT_PATTERN.fullmatch(folder.name) and checkpoint_problem(folder)
                if problem:
                    aside = folder.with_name(f".{folder.name}.incomplete")
                    if aside.exists():
                        shutil.rmtree(aside)
                    folder.rename(aside)
                    logger.warning("Skipped %s: %s. Moved it to %s.", folder, problem, aside)
        found = complete_checkpoints(output_dir) if output_dir.is_dir() else []
    return found[-1] if found else None


__all__ = [
    "CompleteCheckpoints",
    "checkpoint_problem",
    "complete_checkpoints",
    "latest_complete_checkpoint",
    "write_json_atomically",
]
