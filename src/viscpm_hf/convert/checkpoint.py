"""Reading original VisCPM checkpoints and writing transformers/diffusers folders without holding two copies.

Original files are flat state dicts saved with `torch.save` (`.pt` / `.bin`) or safetensors. Pickles are opened
with `torch.load(weights_only=True, mmap=True)`: no arbitrary code runs, and tensors are paged in on demand.
Outputs are written into a hidden temporary folder that is renamed into place only once complete, so an
interrupted conversion never leaves a folder that looks finished.
"""

import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class OriginalCheckpoint:
    """Lazy, read-only view of a flat `{name: tensor}` checkpoint."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Checkpoint not found: {str(self.path)!r}.")
        self._safetensors = None
        self._state_dict = None
        if self.path.suffix == ".safetensors":
            try:
                self._safetensors = safe_open(str(self.path), framework="pt")
            except (SafetensorError, OSError) as error:
                raise ValueError(f"{str(self.path)!r} is not a readable safetensors file ({error}).") from error
        else:
            self._state_dict = self._load_pickle()

    def _load_pickle(self) -> dict:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as error:
            raise ValueError(
                f"{str(self.path)!r} is not a PyTorch checkpoint that can be loaded safely ({error}). Pass the "
                "original .pt/.bin file saved with torch.save, or a .safetensors file."
            ) from error
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{str(self.path)!r} does not hold a flat state dict of tensors.")
        return state

    def keys(self) -> list[str]:
        return list(self._safetensors.keys()) if self._safetensors is not None else list(self._state_dict)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._safetensors is not None:
            return tuple(self._safetensors.get_slice(key).get_shape())
        return tuple(self._state_dict[key].shape)

    def __getitem__(self, key: str) -> torch.Tensor:
        if self._safetensors is not None:
            return self._safetensors.get_tensor(key)
        return self._state_dict[key]


class ShardedSafetensorsWriter:
    """Writes tensors into `model-XXXXX-of-YYYYY.safetensors` shards plus an index, one shard in memory at a time."""

    def __init__(self, folder: Path, max_shard_bytes: int, prefix: str = "model"):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self.shard: dict[str, torch.Tensor] = {}
        self.shard_bytes = 0
        self.shard_files: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.shard and self.shard_bytes + size > self.max_shard_bytes:
            self.flush()
        self.shard[name] = tensor.contiguous()
        self.shard_bytes += size
        self.total_bytes += size
        self.weight_map[name] = len(self.shard_files)

    def flush(self) -> None:
        if not self.shard:
            return
        path = self.folder / f"{self.prefix}-part-{len(self.shard_files):05d}.safetensors"
        save_file(self.shard, str(path), metadata={"format": "pt"})
        self.shard_files.append(path)
        self.shard, self.shard_bytes = {}, 0

    def close(self) -> None:
        """Names the shards (`-of-` needs the count) and writes the index; a single shard needs no index."""
        self.flush()
        count = len(self.shard_files)
        if count == 1:
            self.shard_files[0].rename(self.folder / f"{self.prefix}.safetensors")
            return
        names = [f"{self.prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for path, name in zip(self.shard_files, names):
            path.rename(self.folder / name)
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {key: names[shard] for key, shard in sorted(self.weight_map.items())},
        }
        (self.folder / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@contextmanager
def atomic_output_folder(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary folder next to `output` that becomes `output` only if the block completes."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(output)!r} exists and is not empty: choose another --output or pass --overwrite.")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if output.exists():
        previous = output.parent / f".{output.name}.previous-{os.getpid()}"
        output.rename(previous)
        partial.rename(output)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        partial.rename(output)


def parse_size(size: str | int) -> int:
    """`"2GB"` -> bytes (decimal units, as transformers' `max_shard_size`)."""
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)
