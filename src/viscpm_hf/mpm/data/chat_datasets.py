"""Chat training data as TRL's SFTTrainer reads it: a `datasets.Dataset` with `images` and `messages` columns.

Messages use the transformers chat format with an `{"type": "image"}` item where each image goes; images are file
paths decoded lazily by `datasets`. Every source is checked when the dataset is built, not deep in a data-loader
worker: a missing or unreadable image is skipped with a warning and a count, or raises, by choice.
"""

import csv
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from datasets import Dataset, Features, Image, Value, concatenate_datasets, load_dataset, load_from_disk
from PIL import Image as PILImage


logger = logging.getLogger(__name__)

OnMissing = Literal["skip", "error"]
IMAGE_TAG = "<image>"  # LLaVA's marker of where the image goes in a human turn
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
DEFAULT_CAPTION_PROMPTS = ("Describe the image briefly.",)

FEATURES = Features(
    {
        "images": [Image()],
        "messages": [{"role": Value("string"), "content": [{"type": Value("string"), "text": Value("string")}]}],
    }
)


def _check_image(path: Path, on_missing: OnMissing) -> bool:
    try:
        with PILImage.open(path) as image:
            image.verify()
        return True
    except (FileNotFoundError, PILImage.UnidentifiedImageError, OSError) as error:
        if on_missing == "error":
            raise ValueError(
                f"Image {str(path)!r} is missing or unreadable ({error}). Fix the path, or pass on_missing_image='skip'."
            ) from error
        return False


def _text_items(text: str) -> list[dict]:
    """LLaVA text with `<image>` tags -> content items (images where the tags were; text stripped around them)."""
    items = []
    for index, part in enumerate(text.split(IMAGE_TAG)):
        if index:
            items.append({"type": "image", "text": None})
        if part.strip():
            items.append({"type": "text", "text": part.strip()})
    return items


def _finish(rows: list[dict], skipped: int, source: str) -> Dataset:
    if skipped:
        logger.warning("%s: skipped %d example(s) whose image is missing or unreadable.", source, skipped)
    if not rows:
        raise ValueError(f"{source} gives no usable example (skipped {skipped}): check the file and --image_folder.")
    return Dataset.from_list(rows, features=FEATURES)


def conversation_dataset(
    path: str | os.PathLike, image_folder: str | os.PathLike | None = None, on_missing_image: OnMissing = "skip"
) -> Dataset:
    """LLaVA-style JSON: `[{"image": "a.jpg", "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}]`.

    The image goes where the first human turn says `<image>` (or before its text). Every assistant turn is kept:
    assistant-only loss then trains all of them (the original trained only the first).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Conversation file not found: {str(path)!r}.")
    records = json.loads(path.read_text(encoding="utf-8"))
    folder = Path(image_folder) if image_folder else path.parent
    rows, skipped = [], 0
    for number, record in enumerate(records):
        turns = record.get("conversations") or []
        messages = [{"role": ROLES.get(t.get("from"), t.get("from")), "content": _text_items(t["value"])} for t in turns]
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{path} example {number} has no assistant ('gpt') turn: there is nothing to learn.")
        unknown = {m["role"] for m in messages} - set(ROLES.values())
        if unknown:
            raise ValueError(f"{path} example {number} has turns from {sorted(unknown)}; use 'human' and 'gpt'.")
        images = [record["image"]] if record.get("image") else []
        first_user = next(m for m in messages if m["role"] == "user")
        if images and not any(item["type"] == "image" for m in messages for item in m["content"]):
            first_user["content"].insert(0, {"type": "image", "text": None})
        paths = [folder / image for image in images]
        if not all(_check_image(p, on_missing_image) for p in paths):
            skipped += 1
            continue
        rows.append({"images": [str(p) for p in paths], "messages": messages})
    return _finish(rows, skipped, str(path))


def caption_dataset(
    path: str | os.PathLike,
    image_folder: str | os.PathLike | None = None,
    prompts: Sequence[str] = DEFAULT_CAPTION_PROMPTS,
    on_missing_image: OnMissing = "skip",
    seed: int = 0,
) -> Dataset:
    """Image-caption pairs from JSON (`[{"image": ..., "caption": ...}]`) or CSV (columns `image`, `caption`) as
    one-turn chats: the user shows the image with a caption prompt (drawn from `prompts`), the assistant captions."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Caption file not found: {str(path)!r}.")
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as file:
            records = list(csv.DictReader(file))
    else:
        records = json.loads(path.read_text(encoding="utf-8"))
    pairs = [(r.get("image"), r.get("caption")) for r in records]
    if records and (pairs[0][0] is None or pairs[0][1] is None):
        raise ValueError(f"{path} needs 'image' and 'caption' fields; found {sorted(records[0])}.")
    return _captions(pairs, Path(image_folder) if image_folder else path.parent, prompts, on_missing_image, seed, str(path))


def image_text_dataset(
    dataset_path: str | os.PathLike,
    image_column: str = "image",
    caption_column: str = "caption",
    prompts: Sequence[str] = DEFAULT_CAPTION_PROMPTS,
    split: str = "train",
    seed: int = 0,
) -> Dataset:
    """Any local `datasets` dataset (saved with `save_to_disk`, or a folder `load_dataset` reads) with an image and
    a text column, as one-turn caption chats."""
    try:
        source = load_from_disk(str(dataset_path))
    except FileNotFoundError:
        source = load_dataset(str(dataset_path))
    if hasattr(source, "keys"):  # a DatasetDict
        if split not in source:
            raise ValueError(f"{dataset_path} has splits {list(source)}, not {split!r}.")
        source = source[split]
    missing = [c for c in (image_column, caption_column) if c not in source.column_names]
    if missing:
        raise ValueError(
            f"{dataset_path} has no column {missing}; its columns are {source.column_names}. Pass --image_column / "
            "--caption_column."
        )
    rng = random.Random(seed)
    rows = [
        {
            "images": [example[image_column]],
            "messages": _caption_messages(rng.choice(list(prompts)), example[caption_column]),
        }
        for example in source
    ]
    if not rows:
        raise ValueError(f"{dataset_path} is empty.")
    return Dataset.from_list(rows, features=FEATURES)


def _caption_messages(prompt: str, caption: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]},
    ]


def _captions(pairs, folder: Path, prompts, on_missing_image, seed: int, source: str) -> Dataset:
    rng = random.Random(seed)
    rows, skipped = [], 0
    for image, caption in pairs:
        if not _check_image(folder / image, on_missing_image):
            skipped += 1
            continue
        rows.append({"images": [str(folder / image)], "messages": _caption_messages(rng.choice(list(prompts)), caption)})
    return _finish(rows, skipped, source)


def split_assistant_turns(dataset: Dataset) -> Dataset:
    """One example per assistant turn: the k-th holds the chat up to and including its k-th answer.

    For LLMs that learn one answer per sequence, such as CPM-Bee, whose prompt puts the earlier turns in its context and
    predicts only the final answer: each answer is then trained once, with the turns before it as the original's
    `chat()` would show them. Images stay where they are (in the first user turn). Chats with one answer are unchanged.
    """

    def split(batch: dict) -> dict:
        rows = {"images": [], "messages": []}
        for images, messages in zip(batch["images"], batch["messages"]):
            for end, message in enumerate(messages, start=1):
                if message["role"] == "assistant":
                    rows["images"].append(images)
                    rows["messages"].append(messages[:end])
        return rows

    undecoded = dataset.cast_column("images", [Image(decode=False)])  # images move as paths or bytes, not pixels
    split_rows = undecoded.map(split, batched=True, remove_columns=undecoded.column_names, desc="one per answer")
    return split_rows.cast(FEATURES)


def mix_languages(pivot: Dataset, target: Dataset, target_ratio: float, seed: int = 0) -> Dataset:
    """The MPM mixture: all pivot-language examples plus target-language examples making up `target_ratio` of the
    result (the paper: 0.1% already gives the right answer language >80% of the time), drawn and shuffled with `seed`."""
    if not 0 <= target_ratio < 1:
        raise ValueError(f"target_language_ratio must be in [0, 1), got {target_ratio}.")
    wanted = round(target_ratio / (1 - target_ratio) * len(pivot))
    if wanted > len(target):
        raise ValueError(
            f"A target_language_ratio of {target_ratio} needs {wanted} target-language examples; there are only "
            f"{len(target)}. Lower the ratio or add data."
        )
    chosen = target.shuffle(seed=seed).select(range(wanted))
    return concatenate_datasets([pivot, chosen]).shuffle(seed=seed)
