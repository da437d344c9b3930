"""Training VisCPM-Paint the MPM way (paper section 3.3): the LLM and the VAE stay frozen, the transblock and the
UNet's cross-attention learn from image-caption pairs.

- `load_image_captions`: an image folder with `metadata.jsonl`, or a `datasets` dataset, checked up front (missing
  or unreadable images are skipped with a count, or raise) into a `Dataset` with an `image` and a `text` column.
- `PaintTrainDataset` + `EpochSampler` + `collate_paint`: pixels in [-1, 1] and captions; crops, flips and the
  shuffled order depend only on (seed, epoch, index), so a resumed run sees what an uninterrupted one sees.
- `CaptionEncoder`: captions -> the frozen LLM's final hidden states, one tensor per caption (the transblock's input).
- `TextEmbeddingCache`: those hidden states on disk as safetensors shards; building it again encodes only what is
  missing. The transblock still trains on top of them.
- `PaintDenoiser`: the trained part (transblock, then UNet) as one module, as DDP, FSDP and DeepSpeed want it.
"""

import hashlib
import json
import logging
import os
import random
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from datasets import Dataset, DatasetDict, Image, load_dataset, load_from_disk
from PIL import Image as PILImage
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import Sampler

from ..image_inputs import to_rgb
from ..pipelines.viscpm_paint.pipeline_viscpm_paint import VisCPMPaintPipeline


logger = logging.getLogger(__name__)

OnMissing = Literal["skip", "error"]
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# 1. Image-caption records


def _unreadable(path: str) -> str | None:
    """Why `path` cannot be used as an image (None when it can); reads the header only, not the pixels."""
    if not os.path.isfile(path):
        return "file not found"
    try:
        with PILImage.open(path):
            return None
    except (PILImage.UnidentifiedImageError, OSError) as error:
        return f"not an image ({error})"


def _keep_readable(paths: Sequence[str | None], on_missing: OnMissing, source: str) -> list[int]:
    """Indices of the usable images; the rest are skipped with a warning and a count, or raise."""
    keep, skipped = [], []
    for index, path in enumerate(paths):
        reason = None if path is None else _unreadable(path)
        if reason is None:
            keep.append(index)
        elif on_missing == "error":
            raise ValueError(
                f"Image {path!r} of {source} cannot be used: {reason}. Fix the path or the file, or skip such "
                "examples with on_missing_image='skip' (train_paint.py: --on_missing_image skip)."
            )
        else:
            skipped.append(f"{path} ({reason})")
    if skipped:
        logger.warning(
            "Skipped %d of %d examples of %s whose image is missing or unreadable, e.g. %s",
            len(skipped), len(paths), source, "; ".join(skipped[:3]),
        )  # fmt: skip
    return keep


def _image_folder_records(folder: Path, caption_column: str, on_missing: OnMissing) -> Dataset:
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise ValueError(
            f"{folder} has no metadata.jsonl: write one line per image, e.g. "
            '{"file_name": "0001.png", "text": "a red apple"}.'
        )
    paths, captions = [], []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"Line {number} of {metadata} is not JSON ({error}).") from error
        if "file_name" not in row or caption_column not in row:
            raise ValueError(
                f"Line {number} of {metadata} has the keys {sorted(row)}, but every line needs 'file_name' and the "
                f"caption column {caption_column!r} (set --caption_column to the key that holds the caption)."
            )
        if not isinstance(row[caption_column], str):
            raise ValueError(f"Line {number} of {metadata} has the caption {row[caption_column]!r}: it must be a string.")
        paths.append(str(folder / row["file_name"]))
        captions.append(row[caption_column])
    keep = _keep_readable(paths, on_missing, str(metadata))
    records = Dataset.from_dict({"image": [paths[i] for i in keep], "text": [captions[i] for i in keep]})
    return records.cast_column("image", Image())


def _load_datasets_source(source: str) -> tuple[Dataset, Path]:
    path = Path(source)
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        dataset = load_from_disk(str(path))
    elif path.is_file() and path.suffix in DATA_FILE_BUILDERS:
        dataset = load_dataset(DATA_FILE_BUILDERS[path.suffix], data_files=str(path))
        path = path.parent
    elif path.exists():
        dataset = load_dataset(str(path))
    else:
        try:
            dataset = load_dataset(source)  # a Hub dataset id
        except Exception as error:
            raise ValueError(
                f"--dataset_name {source!r} is neither a local dataset (a save_to_disk folder, a data folder, or a "
                f".json/.jsonl/.csv/.parquet file) nor a loadable Hub dataset ({error})."
            ) from error
        path = Path.cwd()
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"Dataset {source!r} has the splits {sorted(dataset)} but no 'train' split.")
        dataset = dataset["train"]
    return dataset, path


def _datasets_records(source: str, image_column: str, caption_column: str, on_missing: OnMissing) -> Dataset:
    dataset, root = _load_datasets_source(source)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"Dataset {source!r} has no column {column!r} (its columns: {dataset.column_names}): set {flag}."
            )
    captions = dataset[caption_column]
    if any(not isinstance(c, str) for c in captions):
        row = next(i for i, c in enumerate(captions) if not isinstance(c, str))
        raise ValueError(f"Row {row} of {source!r} has the caption {captions[row]!r}: every caption must be a string.")
    # A path per example, None for embedded image bytes (always usable); paths are relative to the dataset's folder.
    paths: list[str | None] = []
    if isinstance(dataset.features[image_column], Image):
        raw = dataset.select_columns([image_column]).cast_column(image_column, Image(decode=False))
        for batch in raw.iter(batch_size=256):
            for item in batch[image_column]:
                embedded = item is not None and item.get("bytes") is not None
                paths.append(None if embedded else str(root / ((item or {}).get("path") or "<no image>")))
    else:
        paths = [str(root / (p or "<no image>")) for p in dataset[image_column]]
    keep = _keep_readable(paths, on_missing, source)
    if isinstance(dataset.features[image_column], Image):
        records = dataset.select(keep).select_columns([image_column, caption_column])
        return records.rename_columns({k: v for k, v in ((image_column, "image"), (caption_column, "text")) if k != v})
    records = Dataset.from_dict({"image": [paths[i] for i in keep], "text": [captions[i] for i in keep]})
    return records.cast_column("image", Image())


def load_image_captions(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    on_missing_image: OnMissing = "skip",
) -> Dataset:
    """Image-caption pairs as a `Dataset` with an `image` (`datasets.Image`) and a `text` column.

    `train_data_dir`: a folder with `metadata.jsonl` lines `{"file_name": ..., <caption_column>: ...}`.
    `dataset_name`: a `save_to_disk` folder, a data folder or file that `load_dataset` reads, or a Hub id; image
    columns may hold images or paths (relative to the dataset's folder). Every image is checked here, not deep in a
    data-loader worker; a missing column or an empty result raises `ValueError` saying what to fix.
    """
    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("Pass exactly one of train_data_dir (an image folder) and dataset_name (a datasets dataset).")
    if train_data_dir is not None:
        source = train_data_dir
        records = _image_folder_records(Path(train_data_dir), caption_column, on_missing_image)
    else:
        source = dataset_name
        records = _datasets_records(dataset_name, image_column, caption_column, on_missing_image)
    if len(records) == 0:
        raise ValueError(
            f"No usable image-caption pairs in {source}: check that the images exist next to the metadata "
            "(or that the dataset is not empty)."
        )
    return records


# 2. Pixels and batches


class EpochSampler(Sampler[int]):
    """Indices in a shuffled order drawn from (seed, epoch) alone: a resumed run replays the same order."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def prepare_image(
    image: PILImage.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random
) -> torch.Tensor:
    """Shorter side to `resolution` (bilinear), a square crop (centre or random), an optional mirror -> `(3, r, r)`
    float32 in [-1, 1]."""
    image = to_rgb(image)
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, PILImage.Resampling.BILINEAR)
    width, height = image.size
    if center_crop:
        left, top = round((width - resolution) / 2), round((height - resolution) / 2)
    else:
        left, top = rng.randint(0, width - resolution), rng.randint(0, height - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


class PaintTrainDataset(torch.utils.data.Dataset):
    """`{"pixel_values": (3, r, r), "caption": str}`, plus `"text_states"` (the caption's cached LLM hidden states)
    when a `TextEmbeddingCache` is given. Random crops and flips are drawn from (seed, epoch, index)."""

    def __init__(
        self,
        records: Dataset,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        seed: int = 0,
        text_cache: "TextEmbeddingCache | None" = None,
    ):
        self.records, self.resolution, self.center_crop, self.random_flip = records, resolution, center_crop, random_flip
        self.seed, self.text_cache, self.epoch = seed, text_cache, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.records[index]
        rng = random.Random(f"{self.seed}-{self.epoch}-{index}")
        example = {
            "pixel_values": prepare_image(row["image"], self.resolution, self.center_crop, self.random_flip, rng),
            "caption": row["text"],
        }
        if self.text_cache is not None:
            example["text_states"] = self.text_cache.get(row["text"])
        return example


def collate_paint(examples: list[dict]) -> dict[str, Any]:
    """Stacks pixels; captions (and cached text states, of different lengths) stay lists."""
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "captions": [e["caption"] for e in examples],
    }
    if "text_states" in examples[0]:
        batch["text_states"] = [e["text_states"] for e in examples]
    return batch


# 3. Captions -> LLM hidden states


def pad_text_states(
    states: Sequence[torch.Tensor], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-caption `(tokens_i, hidden)` states -> `(batch, longest, hidden)` right-padded with zeros and the mask
    `(batch, longest)` (1 = token) that the UNet takes as `encoder_attention_mask`."""
    longest = max(s.shape[0] for s in states)
    hidden = states[0].new_zeros(len(states), longest, states[0].shape[-1], device=device)
    mask = torch.zeros(len(states), longest, dtype=torch.long, device=device)
    for row, state in enumerate(states):
        hidden[row, : state.shape[0]] = state
        mask[row, : state.shape[0]] = 1
    return hidden, mask


class CaptionEncoder:
    """Captions -> the frozen LLM's final hidden states, one `(tokens, hidden)` tensor per caption holding its own
    tokens only: what `VisCPMPaintPipeline.encode_prompt` feeds the transblock (its `encode_text`, so prompts are built
    as the pipeline builds them). Captions longer than `max_length` (default: the pipeline's `max_prompt_length`) are
    truncated as the pipeline truncates prompts, with a warning."""

    def __init__(self, pipeline: VisCPMPaintPipeline, max_length: int | None = None):
        self.pipeline, self.tokenizer, self.text_encoder = pipeline, pipeline.tokenizer, pipeline.text_encoder
        self.max_length = max_length or pipeline.max_prompt_length

    def __call__(self, captions: Sequence[str]) -> list[torch.Tensor]:
        device = self.text_encoder.device
        hidden, mask = self.pipeline.encode_text(list(captions), device=device, max_length=self.max_length)
        keep = mask.bool()
        return [hidden[row][keep[row]] for row in range(hidden.shape[0])]

    def fingerprint(self) -> str:
        """Identifies the encoder for a cache: its config, tokenizer, truncation and a sample of every weight."""
        digest = hashlib.sha256()
        digest.update(self.text_encoder.config.to_json_string(use_diff=False).encode())
        digest.update(f"{type(self.tokenizer).__name__}|{len(self.tokenizer)}|{self.max_length}".encode())
        for name, parameter in self.text_encoder.named_parameters():
            sample = parameter.detach().flatten()[:4096].double().sum().item()
            digest.update(f"{name}:{tuple(parameter.shape)}:{sample:.10e}".encode())
        return digest.hexdigest()


# 4. The on-disk cache of LLM hidden states


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


class TextEmbeddingCache:
    """LLM hidden states of captions in `directory` as safetensors shards, one `(tokens, hidden)` tensor per caption
    named by the SHA-256 of the caption (its mask: all its tokens). `cache_info.json` records the encoder's
    fingerprint; a cache made by another encoder raises. Shards are written to a temporary name and renamed, so an
    interrupted build keeps every finished shard and `build` then encodes only the captions still missing."""

    INFO = "cache_info.json"

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        info_path = self.directory / self.INFO
        if info_path.is_file():
            recorded = json.loads(info_path.read_text())["fingerprint"]
            if recorded != fingerprint:
                raise ValueError(
                    f"The text embedding cache {self.directory} was built by a different text encoder (or tokenizer or "
                    "truncation): pass a new --text_embedding_cache folder, or delete this one."
                )
        self._handles: dict[str, Any] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-reads which captions the shards on disk hold (after another process added some)."""
        self.index: dict[str, str] = {}
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            with safe_open(shard, framework="pt") as handle:
                for key in handle.keys():
                    self.index[key] = shard.name

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, caption: str) -> bool:
        return caption_key(caption) in self.index

    def __getstate__(self) -> dict:  # open shard handles stay in their process (data-loader workers open their own)
        return {**self.__dict__, "_handles": {}}

    def missing(self, captions: Iterable[str]) -> list[str]:
        return sorted({c for c in captions if c not in self})

    def get(self, caption: str) -> torch.Tensor:
        key = caption_key(caption)
        if key not in self.index:
            raise KeyError(
                f"Caption {caption[:80]!r} is not in the text embedding cache {self.directory}: build it first."
            )
        shard = self.index[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.directory / shard, framework="pt")
        return self._handles[shard].get_tensor(key)

    def write_shard(self, states: dict[str, torch.Tensor], tag: str = "0") -> Path:
        """Writes `{caption: (tokens, hidden)}` as one shard, atomically."""
        if not (self.directory / self.INFO).is_file():
            self._write_info()
        name = f"shard-{tag}-{uuid.uuid4().hex[:12]}.safetensors"
        partial = self.directory / f".{name}.partial"
        tensors = {caption_key(c): s.detach().to("cpu").contiguous().clone() for c, s in states.items()}
        save_file(tensors, str(partial), metadata={"fingerprint": self.fingerprint})
        os.replace(partial, self.directory / name)
        for key in tensors:
            self.index[key] = name
        return self.directory / name

    def _write_info(self) -> None:
        partial = self.directory / f".{self.INFO}.{uuid.uuid4().hex[:8]}.partial"
        partial.write_text(json.dumps({"fingerprint": self.fingerprint, "format": 1}) + "\n")
        os.replace(partial, self.directory / self.INFO)

    def build(
        self,
        captions: Iterable[str],
        encoder: CaptionEncoder,
        batch_size: int = 32,
        shard_size: int = 1024,
        process_index: int = 0,
        num_processes: int = 1,
        barrier: Callable[[], None] | None = None,
        progress: bool = False,
    ) -> int:
        """Encodes this process's share of the missing captions (longest first, to fail early on memory) and writes
        a shard every `shard_size` captions. Returns how many captions this process encoded.

        With several processes, pass `barrier` (e.g. `accelerator.wait_for_everyone`): every process must see the
        same missing captions before any of them writes a shard. Call `refresh()` once every process is done."""
        todo = sorted(self.missing(captions), key=lambda c: (-len(c), c))[process_index::num_processes]
        if barrier is not None:
            barrier()
        if not todo:
            return 0
        from tqdm.auto import tqdm

        pending: dict[str, torch.Tensor] = {}
        with tqdm(total=len(todo), desc="Encoding captions", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                pending.update(zip(chunk, encoder(chunk)))
                bar.update(len(chunk))
                if len(pending) >= shard_size:
                    self.write_shard(pending, tag=str(process_index))
                    pending = {}
        if pending:
            self.write_shard(pending, tag=str(process_index))
        return len(todo)


# 5. The trained part


class PaintDenoiser(nn.Module):
    """The transblock, then the UNet: `(noisy_latents (b, c, h, w), timesteps (b,), text_states (b, tokens, llm_hidden),
    text_mask (b, tokens) or None)` -> the UNet's prediction `(b, c, h, w)`. One module, since DeepSpeed and FSDP
    prepare one model; the LLM stays outside (frozen, its states are inputs)."""

    def __init__(self, transblock: nn.Module, unet: nn.Module):
        super().__init__()
        self.transblock, self.unet = transblock, unet

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_states: torch.Tensor,
        text_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        conditioning = self.transblock(text_states, text_mask)
        return self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=conditioning,
            encoder_attention_mask=self.transblock.conditioning_mask(text_mask),
            return_dict=False,
        )[0]


def mark_trainable(
    denoiser: PaintDenoiser, train_unet: Literal["attn2", "full"] = "attn2", lora: bool = False
) -> list[str]:
    """Sets `requires_grad`: the transblock always trains; of the UNet, the cross-attention layers (parameter names
    containing `attn2`) or, with "full", everything. With `lora`, only the LoRA layers already added to the UNet
    (`unet.add_adapter`) train, and the transblock stays as loaded, so that the result is a LoRA file that
    `load_lora_weights` puts into the base pipeline. Returns the names of the trained parameters."""
    if train_unet not in ("attn2", "full"):
        raise ValueError(f"train_unet must be 'attn2' or 'full', got {train_unet!r}.")
    denoiser.requires_grad_(False)
    if lora:
        for name, parameter in denoiser.unet.named_parameters():
            parameter.requires_grad_("lora_" in name)
        trained = [name for name, parameter in denoiser.named_parameters() if parameter.requires_grad]
        if not trained:
            raise ValueError("The UNet has no LoRA layers to train: add them with unet.add_adapter(LoraConfig(...)).")
        return trained
    denoiser.transblock.requires_grad_(True)
    for name, parameter in denoiser.unet.named_parameters():
        parameter.requires_grad_(train_unet == "full" or "attn2" in name)
    trained = [name for name, parameter in denoiser.named_parameters() if parameter.requires_grad]
    if not any(name.startswith("unet.") for name in trained):
        raise ValueError("The UNet has no cross-attention ('attn2') parameters to train: use train_unet='full'.")
    return trained


__all__ = [
    "CaptionEncoder",
    "EpochSampler",
    "PaintDenoiser",
    "PaintTrainDataset",
    "TextEmbeddingCache",
    "collate_paint",
    "load_image_captions",
    "mark_trainable",
    "pad_text_states",
    "prepare_image",
]
