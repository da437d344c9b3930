"""Training VisCPM-Chat with TRL's `SFTTrainer` (MPM paper, section 3.2): what `examples/train_chat.py` builds on.

CPM-Bee, the paper's LLM, reads a structured prompt `{"image", "context", "question", "<ans>"}`: prompt tokens see
each other in both directions, answer tokens are causal. TRL's vision collator concatenates a flat prompt and
completion, and its loss projects hidden states through `lm_head.weight` alone; neither holds for CPM-Bee, so:

- `CpmBeeChatCollator`, the trainer's `data_collator`: chats whose last message is the answer -> the processor's
  structured batch (the answer follows its prompt, then `</s>`), with labels on exactly the answer tokens and that
  `</s>`, and the ext-table columns the original collater gave the batch.
- `ModelLossSFTTrainer`: `SFTTrainer` whose loss is the model's own (`forward(labels=...)`). TRL 1.16's fused LM head
  computes `hidden @ lm_head.weight`, which leaves out CPM-Bee's `1 / sqrt(hidden_size)` and its ext columns.

Labels follow transformers (shifted inside the model): the label at an answer token is that token, so the logits one
position earlier predict it. The answer's opening `<s>` keeps -100, as the original gave the prompt's last token no
target.

For any LLM:
- `CompleteCheckpoints` + `latest_complete_checkpoint`: a checkpoint counts once a manifest of its files is written
  after every process has finished it; `latest` resumes from the newest complete one, half-written ones are set aside.
"""

import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import Trainer, TrainerCallback
from trl import SFTTrainer


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ANSWER_KEY = "<ans>"
MANIFEST_NAME = "checkpoint_complete.json"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")


def is_structured_chat(processor) -> bool:
    """Whether the processor writes CPM-Bee structured prompts (a VisCPM-Chat on CPM-Bee, the paper's model)."""
    return getattr(processor.tokenizer, "prompt_format", None) == "structured"


@dataclass
class CpmBeeChatCollator:
    """Chats -> a right-padded CPM-Bee training batch for [`VisCPMChatForConditionalGeneration`].

    Each example is `{"messages": [...], "images": [...]}` (`viscpm_hf.data` builds them) whose last message is the
    assistant answer to learn; earlier turns become the prompt's context, as in `chat()`. Use
    `viscpm_hf.data.split_assistant_turns` so that every answer of a multi-turn chat is learned once.

    Returns the processor's model inputs (`input_ids`, the structural inputs, `pixel_values`) with:
    - `labels` `(batch, length)`: the answer tokens and the closing `</s>`; -100 on the prompt, the image
      placeholders, the answer's `<s>` and padding. An out-of-vocabulary answer piece (sub id > 0) is labelled with
      its ext column, `vocab_size + column`.
    - `ext_table_ids` / `ext_table_sub` `(batch, num_ext)`: one table for the whole batch, every (id, sub > 0) pair
      in token order, or the single placeholder column (0, 1) when there is none, as the original collater built it
      (its softmax, and so its loss, includes those columns).
    """

    processor: Any

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not is_structured_chat(self.processor):
            raise ValueError(
                "CpmBeeChatCollator needs a VisCPM-Chat processor on CPM-Bee (tokenizer prompt_format='structured'); "
                "for other LLMs use TRL's own collator with assistant_only_loss=True."
            )
        texts, images = [], []
        for number, example in enumerate(examples):
            messages = example["messages"]
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError(
                    f"Example {number} does not end with an assistant message: the last message is the answer that "
                    "CPM-Bee learns (split multi-turn chats with viscpm_hf.data.split_assistant_turns)."
                )
            text = self.processor.apply_chat_template(messages, tokenize=False)
            if json.loads(text)[ANSWER_KEY] == "":
                raise ValueError(f"Example {number} has an empty assistant answer: there is nothing to learn.")
            texts.append(text)
            images.extend(example.get("images") or [])
        batch = self.processor(images=images or None, text=texts, padding_side="right", return_tensors="pt")
        labels, ext_table_ids, ext_table_sub = answer_labels(batch, self.processor.tokenizer.vocab_size)
        batch["labels"] = labels
        batch["ext_table_ids"], batch["ext_table_sub"] = ext_table_ids, ext_table_sub
        return dict(batch)


def answer_labels(batch, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labels and the shared ext table of a right-padded structured batch (see `CpmBeeChatCollator`).

    Answer tokens are those with context 0 (causal) and attention 1; the first of each answer segment is its `<s>`.
    """
    ids, subs = batch["input_ids"], batch["input_id_subs"]
    valid = batch["attention_mask"].bool()
    answer = (batch["context"] == 0) & valid
    segments = batch["segment_ids"]
    continues = torch.zeros_like(answer)
    continues[:, 1:] = answer[:, :-1] & (segments[:, 1:] == segments[:, :-1])
    trained = answer & continues

    columns: dict[tuple[int, int], int] = {}
    for row, position in (valid & (subs > 0)).nonzero().tolist():
        columns.setdefault((int(ids[row, position]), int(subs[row, position])), vocab_size + len(columns))
    target = ids.clone()
    for (base, sub), column in columns.items():
        target[(ids == base) & (subs == sub)] = column
    labels = torch.where(trained, target, IGNORE_INDEX)
    empty = (~trained).all(dim=1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"Rows {empty} of the batch have no answer token to learn; check their last message.")

    pairs = list(columns) or [(0, 1)]
    ext_table_ids = torch.tensor([base for base, _ in pairs], dtype=torch.long).expand(len(ids), -1).contiguous()
    ext_table_sub = torch.tensor([sub for _, sub in pairs], dtype=torch.long).expand(len(ids), -1).contiguous()
    return labels, ext_table_ids, ext_table_sub


class ModelLossSFTTrainer(SFTTrainer):
    """`SFTTrainer` with the loss of the model's own forward, for LLMs whose logits are not `hidden @ lm_head.weight`.

    TRL computes the SFT loss with a fused LM head that projects the backbone's hidden states through the output
    embedding matrix. CPM-Bee's logits are `lm_head(hidden / sqrt(hidden_size))` followed by one column per ext-table
    entry, so that shortcut trains a different objective. Here the model runs its full forward with `labels` and
    returns its causal-LM loss (normalised by the tokens of the whole accumulated batch, as transformers' Trainer
    does); TRL's data handling, logging and saving are unchanged. The entropy and token-accuracy metrics of the fused
    head are not logged.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)


# --- crash-safe checkpoints ---------------------------------------------------------------------------------------


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
    "CpmBeeChatCollator",
    "ModelLossSFTTrainer",
    "answer_labels",
    "checkpoint_problem",
    "complete_checkpoints",
    "is_structured_chat",
    "latest_complete_checkpoint",
    "write_json_atomically",
]
