"""Reading original VisCPM checkpoints and writing transformers/diffusers folders without holding two copies.

Original files are flat state dicts saved with `torch.save` (`.pt` / `.bin`) or safetensors. Pickles are opened
with `torch.load(weights_only=True, mmap=True)`: no arbitrary code runs, and tensors are paged in on demand.
Outputs are written into a hidden temporary folder that is renamed into place only once complete, so an
interrupted conversion never leaves a folder that looks finished.
"""

import ctypes
import json
import math
import mmap
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


_MADV_DONTNEED = 4
try:
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
except (OSError, AttributeError):  # not Linux: pages are simply left to the kernel
    _madvise = None


def release_mapped_pages(tensor: torch.Tensor) -> None:
    """Drops the resident pages of a tensor that lives in a private read-only file mapping.

    The pages are re-read from the file if touched again, so this only lowers the resident memory of a conversion
    that walks a checkpoint bigger than RAM. Never call it on a tensor that owns its memory.
    """
    if _madvise is None:
        return
    storage = tensor.untyped_storage()
    start, length = storage.data_ptr(), storage.nbytes()
    aligned = start - start % mmap.PAGESIZE
    _madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length + start - aligned), _MADV_DONTNEED)


# safetensors' dtype names.
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


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

    def dtype(self, key: str) -> torch.dtype:
        if self._safetensors is not None:
            return DTYPES_BY_NAME[self._safetensors.get_slice(key).get_dtype()]
        return self._state_dict[key].dtype

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor in memory of its own (cast to `dtype` if given); the file pages read for it are let go."""
        if self._safetensors is not None:
            tensor = self._safetensors.get_tensor(key)
            return tensor if dtype is None else tensor.to(dtype)
        mapped = self._state_dict[key]
        tensor = mapped.to(dtype or mapped.dtype, copy=True)
        release_mapped_pages(mapped)
        return tensor


def write_safetensors_shards(
    folder: Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    load: Callable[[int], torch.Tensor],
    max_shard_bytes: int,
    prefix: str = "model",
) -> list[str]:
    """Streams tensors into `prefix-XXXXX-of-YYYYY.safetensors` shards (plus an index), one tensor in memory at a time.

    `entries` are `(name, shape, dtype)`; `load(i)` returns entry i's tensor. Because every shape is known up front,
    each shard's header is written first and the tensors follow as they are loaded. Returns the file names.
    """
    sizes = [math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in entries]
    shards, current, current_bytes = [], [], 0
    for index, size in enumerate(sizes):
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(index)
        current_bytes += size
    if current:
        shards.append(current)
    names = (
        [f"{prefix}.safetensors"]
        if len(shards) == 1
        else [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for index in shard:
            entry_name, shape, dtype = entries[index]
            header[entry_name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + sizes[index]]}
            offset += sizes[index]
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with open(folder / name, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)))
            file.write(encoded)
            for index in shard:
                tensor = load(index).contiguous()
                if tuple(tensor.shape) != tuple(entries[index][1]) or tensor.dtype != entries[index][2]:
                    raise ValueError(f"{entries[index][0]}: got {tuple(tensor.shape)} {tensor.dtype}, planned {entries[index][1:]}")
                file.write(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
                del tensor
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": {entries[i][0]: name for name, shard in zip(names, shards) for i in shard},
        }
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


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
