"""Training the released VisCPM-Chat (CPM-Bee) with TRL's `SFTTrainer` (MPM paper, section 3.2), as
`examples/train_chat.py` does.

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
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer
from trl import SFTTrainer

from ..models.viscpm_chat_cpmbee import VisCPMChatCpmBeeProcessor


IGNORE_INDEX = -100
ANSWER_KEY = "<ans>"


@dataclass
class CpmBeeChatCollator:
    """Chats -> a right-padded CPM-Bee training batch for [`VisCPMChatForConditionalGeneration`].

    Each example is `{"messages": [...], "images": [...]}` (`viscpm_hf.mpm.data` builds them) whose last message is the
    assistant answer to learn; earlier turns become the prompt's context, as in `chat()`. Use
    `viscpm_hf.mpm.data.split_assistant_turns` so that every answer of a multi-turn chat is learned once.

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
        if not isinstance(self.processor, VisCPMChatCpmBeeProcessor):
            raise ValueError(
                "CpmBeeChatCollator needs the processor of a VisCPM-Chat on CPM-Bee (VisCPMChatCpmBeeProcessor); "
                "for other LLMs use TRL's own collator with assistant_only_loss=True."
            )
        texts, images = [], []
        for number, example in enumerate(examples):
            messages = example["messages"]
            if not messages or messages[-1]["role"] != "assistant":
                raise ValueError(
                    f"Example {number} does not end with an assistant message: the last message is the answer that "
                    "CPM-Bee learns (split multi-turn chats with viscpm_hf.mpm.data.split_assistant_turns)."
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


__all__ = ["CpmBeeChatCollator", "ModelLossSFTTrainer", "answer_labels"]
