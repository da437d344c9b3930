"""Reading original VisCPM checkpoints and writing transformers/diffusers folders without holding two copies.

Original files are flat state dicts saved with `torch.save` (`.pt` / `.bin`) or safetensors. Both are memory-mapped:
pickles through `torch.load(weights_only=True, mmap=True)` (no arbitrary code runs), safetensors by reading the
header and mapping the file. Tensors are streamed in pieces of at most `CHUNK_BYTES`; the file pages read for a piece
are let go once it is written, and each written shard is synced and dropped from the page cache, so a conversion's
memory does not grow with the checkpoint.

Outputs are written into a hidden `.NAME.partial-PID` folder next to the output, locked while its process lives,
and put in place only once complete: by an atomic exchange with the old output where the system has one (Linux
`renameat2`, macOS `renamex_np`), so that the output is the old or the new one at every instant; elsewhere by two
renames that the next run completes or undoes if a process dies between them. Hidden folders that dead processes
left behind are removed (or, if that is not certain, named) by the next conversion to the same output.
"""

import ctypes
import errno
import json
import logging
import math
import mmap
import os
import pickle
import re
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


try:
    import fcntl
except ImportError:  # not POSIX: liveness falls back to the process id alone
    fcntl = None

logger = logging.getLogger("viscpm_hf.convert")

# Pieces a tensor is read, cast, checked and written in; bounds the converter's memory, whatever the tensor's size.
CHUNK_BYTES = 64 * 2**20

_LIBC = None
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except (OSError, TypeError):  # no C library to call: pages and renames use the portable paths
    pass
_madvise = getattr(_LIBC, "madvise", None)
_MADV_DONTNEED = 4


def release_pages(tensor: torch.Tensor) -> None:
    """Drops the resident pages under `tensor`'s elements, which must lie in a private, never written file mapping.

    The pages are re-read from the file if touched again, so this only lowers the resident memory of a conversion
    that walks a checkpoint bigger than RAM. Never call it on a tensor that owns its memory.
    """
    if _madvise is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    aligned = start - start % mmap.PAGESIZE
    _madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(end - aligned), _MADV_DONTNEED)


# safetensors' dtype names, for the dtypes VisCPM's weights are stored in.
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
SUPPORTED_DTYPES_HINT = (
    "VisCPM checkpoints hold float32, float16 or bfloat16 weights; convert this one with those (e.g. "
    "`tensor.to(torch.float16)`, dense and unquantized) and save it again."
)


class OriginalCheckpoint:
    """Lazy, read-only view of a flat `{name: tensor}` checkpoint.

    Opening it checks every key is a string and every tensor a dense, unquantized tensor of a dtype in
    `SAFETENSORS_DTYPES`, and raises one ValueError listing all that are not.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"Checkpoint not found: {str(self.path)!r}.")
        if self.path.suffix == ".safetensors":
            self._tensors, self._mapping = self._map_safetensors()
        else:
            self._tensors, self._mapping = self._load_pickle(), None

    def _map_safetensors(self) -> tuple[dict, mmap.mmap]:
        """Header entries checked against the file size, and the file mapped copy-on-write (never written)."""
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as file:
                (header_size,) = struct.unpack("<Q", file.read(8))
                if not 0 < header_size <= size - 8:
                    raise ValueError(f"header of {header_size} bytes in a file of {size}")
                header = json.loads(file.read(header_size))
                mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            header.pop("__metadata__", None)
            tensors, data_start = {}, 8 + header_size
            for key, entry in header.items():
                begin, end = entry["data_offsets"]
                shape = tuple(int(n) for n in entry["shape"])
                if not (0 <= begin <= end <= size - data_start) or not isinstance(entry["dtype"], str):
                    raise ValueError(f"{key!r} lies outside the file or has no dtype name")
                tensors[key] = (entry["dtype"], shape, data_start + begin, end - begin)
        except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
            raise ValueError(f"{str(self.path)!r} is not a readable safetensors file ({error}).") from error
        problems = []
        for key, (dtype_name, shape, _, nbytes) in tensors.items():
            dtype = DTYPES_BY_NAME.get(dtype_name)
            if dtype is None:
                problems.append(f"{key}: dtype {dtype_name}")
            elif nbytes != math.prod(shape) * dtype.itemsize:
                problems.append(f"{key}: {nbytes} bytes for shape {shape} of {dtype_name}")
        self._raise_unsupported(problems)
        return tensors, mapping

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
        not_strings = [key for key in state if not isinstance(key, str)]
        if not_strings:
            listed = ", ".join(f"{key!r} ({type(key).__name__})" for key in not_strings[:10])
            raise ValueError(
                f"{str(self.path)!r} has {len(not_strings)} keys that are not strings: {listed}. A VisCPM checkpoint "
                "names every tensor (e.g. 'llm.input_embedding.weight')."
            )
        problems = []
        for key, tensor in state.items():
            if tensor.layout != torch.strided:
                problems.append(f"{key}: {str(tensor.layout).removeprefix('torch.')} layout")
            elif tensor.is_quantized:
                problems.append(f"{key}: quantized {str(tensor.dtype).removeprefix('torch.')}")
            elif tensor.dtype not in SAFETENSORS_DTYPES:
                problems.append(f"{key}: dtype {str(tensor.dtype).removeprefix('torch.')}")
        self._raise_unsupported(problems)
        return state

    def _raise_unsupported(self, problems: list[str]) -> None:
        if problems:
            raise ValueError(
                f"{str(self.path)!r} holds {len(problems)} tensors that cannot be converted: {problems[:10]}. "
                + SUPPORTED_DTYPES_HINT
            )

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        entry = self._tensors[key]
        return entry[1] if self._mapping is not None else tuple(entry.shape)

    def dtype(self, key: str) -> torch.dtype:
        entry = self._tensors[key]
        return DTYPES_BY_NAME[entry[0]] if self._mapping is not None else entry.dtype

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: self.shape(key) for key in self.keys()}

    def _flat(self, key: str) -> torch.Tensor:
        """The tensor's elements, flat, in the file mapping (no copy)."""
        if self._mapping is None:
            return self._tensors[key].reshape(-1)  # a view: torch.load's tensors are contiguous
        dtype_name, shape, offset, nbytes = self._tensors[key]
        if nbytes == 0:
            return torch.empty(0, dtype=DTYPES_BY_NAME[dtype_name])
        return torch.frombuffer(self._mapping, dtype=DTYPES_BY_NAME[dtype_name], count=math.prod(shape), offset=offset)

    def chunks(
        self, key: str, dtype: torch.dtype | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> Iterator[torch.Tensor]:
        """The tensor's elements in row-major order, as 1-D pieces of at most `chunk_bytes`, cast to `dtype` if given.

        A piece is valid until the next one is asked for: its file pages are then let go.
        """
        if self._mapping is None and not self._tensors[key].is_contiguous():  # a view saved with its whole storage
            flat = self._tensors[key].contiguous().reshape(-1)
            yield flat if dtype in (None, flat.dtype) else flat.to(dtype)
            release_pages(self._tensors[key])
            return
        flat = self._flat(key)
        step = max(1, chunk_bytes // flat.element_size())
        for start in range(0, flat.numel(), step):
            piece = flat[start : start + step]
            yield piece if dtype in (None, piece.dtype) else piece.to(dtype)
            release_pages(piece)

    def load(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor in memory of its own (cast to `dtype` if given)."""
        pieces = [piece.clone() for piece in self.chunks(key, dtype)]
        flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype or self.dtype(key))
        return flat.reshape(self.shape(key))


def check_floating(checkpoint: OriginalCheckpoint, keys: Iterable[str]) -> None:
    """Raises a ValueError listing the keys (weights to convert) whose tensors are not floating-point."""
    wrong = [
        f"{key}: {str(checkpoint.dtype(key)).removeprefix('torch.')}"
        for key in keys
        if not checkpoint.dtype(key).is_floating_point
    ]
    if wrong:
        raise ValueError(
            f"{str(checkpoint.path)!r} stores {len(wrong)} weights as integers or booleans: {wrong[:10]}. "
            + SUPPORTED_DTYPES_HINT
        )


class FiniteCheck:
    """Counts NaN and infinite values in the pieces streamed through `watch`, and raises for them at the end."""

    def __init__(self):
        self.found: dict[str, tuple[int, int, int]] = {}

    def watch(self, key: str, pieces: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        nan = inf = total = 0
        for piece in pieces:
            if piece.is_floating_point():
                nan += int(torch.isnan(piece).sum())
                inf += int(torch.isinf(piece).sum())
            total += piece.numel()
            yield piece
        if nan or inf:
            self.found[key] = (nan, inf, total)

    def raise_if_any(self, source: str | os.PathLike, cast: torch.dtype | None = None) -> None:
        if not self.found:
            return
        listed = [f"{key}: {nan} NaN, {inf} inf of {total}" for key, (nan, inf, total) in self.found.items()]
        after = f" (after casting to {str(cast).removeprefix('torch.')})" if cast is not None else ""
        raise ValueError(
            f"--check: {len(listed)} tensors of {str(source)!r} hold non-finite values{after}: {listed[:10]}. "
            "Nothing was written. A cast overflowing float16 gives inf: keep the checkpoint's dtype or use bfloat16."
        )


def _drop_from_page_cache(file) -> None:
    """Syncs a written file and lets the kernel drop its pages, so that a 20 GB conversion does not fill the cache."""
    file.flush()
    os.fsync(file.fileno())
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def write_safetensors_shards(
    folder: Path,
    entries: list[tuple[str, tuple[int, ...], torch.dtype]],
    read: Callable[[int], Iterable[torch.Tensor]],
    max_shard_bytes: int,
    prefix: str = "model",
) -> list[str]:
    """Streams tensors into `prefix-XXXXX-of-YYYYY.safetensors` shards (plus an index), a piece at a time.

    `entries` are `(name, shape, dtype)`; `read(i)` yields entry i's elements in row-major order, in pieces of that
    dtype (`OriginalCheckpoint.chunks`). Because every shape is known up front, each shard's header is written first
    and the data follow. Returns the file names.
    """
    sizes = [math.prod(shape) * dtype.itemsize for _, shape, dtype in entries]
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
            header[entry_name] = {
                "dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + sizes[index]],
            }  # fmt: skip
            offset += sizes[index]
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with open(folder / name, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)))
            file.write(encoded)
            for index in shard:
                written = 0
                for piece in read(index):
                    if piece.dtype != entries[index][2]:
                        raise ValueError(f"{entries[index][0]}: got {piece.dtype}, planned {entries[index][2]}")
                    written += piece.numel() * piece.element_size()
                    if piece.numel():
                        file.write(piece.contiguous().view(torch.uint8).numpy().data)
                if written != sizes[index]:
                    name, shape, _ = entries[index]
                    raise ValueError(f"{name}: read {written} bytes, planned {sizes[index]} for {shape}")
            _drop_from_page_cache(file)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes)},
            "weight_map": {entries[i][0]: name for name, shard in zip(names, shards) for i in shard},
        }
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


# --- the output folder ---------------------------------------------------------------------------------------


def _identities(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of `path` and of every folder above it that exists: what a path is, whatever its spelling."""
    identities = []
    for candidate in (path, *path.parents):
        try:
            status = candidate.stat()
        except OSError:
            continue
        identities.append((status.st_dev, status.st_ino))
    return identities


def refuse_output_over_inputs(output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Raises a ValueError if writing the output folder would destroy or mix with an input: if the output is an
    input, holds one (the folder an input file is in, or one above it), or lies inside an input that is a folder.

    `--overwrite` replaces the whole output folder, so such an output would destroy what it is converted from. A new
    folder beside the input files, or inside the folder holding them, is fine: the README converts in the folder the
    release files were downloaded to. Paths are compared by what they are on disk, so symbolic links, `..` and other
    spellings are seen through.
    """
    output = Path(output).resolve()
    output_chain = _identities(output)
    output_itself = output_chain[0] if output.exists() else None
    for path in (Path(path).resolve() for path in inputs if path):
        if not path.exists():
            continue
        input_chain = _identities(path)
        if output_itself is not None and output_itself in input_chain:
            what = "is" if output_itself == input_chain[0] else "holds"
            raise ValueError(
                f"--output {str(output)!r} {what} the input {str(path)!r}: writing (or --overwrite) there would "
                "destroy it. Choose a new folder, e.g. beside the inputs."
            )
        if path.is_dir() and input_chain[0] in output_chain:
            raise ValueError(
                f"--output {str(output)!r} lies inside the input folder {str(path)!r}: the conversion would be mixed "
                "into it. Choose a new folder outside it."
            )


def _check_output_path(output: Path) -> None:
    for parent in output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"--output {str(output)!r} cannot be created: {str(parent)!r} is a file.")
            break
    if output.exists() and not output.is_dir():
        raise FileExistsError(
            f"--output {str(output)!r} is a file, not a folder: choose another --output (--overwrite only replaces "
            "a folder)."
        )


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two existing paths; False where the system or the file system cannot."""
    function, flag = getattr(_LIBC, "renameat2", None), 2  # RENAME_EXCHANGE
    if function is not None:
        result = function(-100, os.fsencode(a), -100, os.fsencode(b), ctypes.c_uint(flag))  # AT_FDCWD
    elif (function := getattr(_LIBC, "renamex_np", None)) is not None:
        result = function(os.fsencode(a), os.fsencode(b), ctypes.c_uint(2))  # RENAME_SWAP
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"cannot put the new output in place: {os.strerror(code)}", str(b))


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _fsync_folder(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # not possible everywhere (Windows); durability then rests on the system
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _lock(folder: Path) -> int | None:
    """A descriptor holding an exclusive lock on `folder`, released by the system when the process ends."""
    if fcntl is None:
        return None
    descriptor = os.open(folder, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return descriptor


def _is_locked(folder: Path) -> bool:
    if fcntl is None or folder.is_symlink():
        return False
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # also releases the lock just taken
    return False


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not converting to this output yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clean_leftovers(output: str | os.PathLike) -> list[str]:
    """Completes or undoes what dead conversions to `output` left next to it; returns what it did, in words.

    `.NAME.previous-PID` (a process died between the two renames of an overwrite) is put back as the output if the
    output is missing, and removed otherwise; `.NAME.partial-PID` (an unfinished output, or after an exchange the
    old one) is removed. A folder whose process may still run is left in place and named.
    """
    output = Path(output)
    if not output.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(output.name)}\.(partial|previous)-(\d+)")
    found = [(m.group(1), int(m.group(2)), p) for p in output.parent.iterdir() if (m := pattern.fullmatch(p.name))]
    # Previous outputs first, newest first: one of them may have to become the output again.
    found.sort(key=lambda item: (item[0] != "previous", -item[2].lstat().st_mtime))
    notes = []
    for kind, pid, path in found:
        if _is_locked(path):
            notes.append(f"{path} belongs to a conversion still running (process {pid}); left in place")
            continue
        if _process_alive(pid):
            notes.append(f"{path} may belong to the running process {pid}; left in place: remove it if it is not")
            continue
        try:
            if kind == "previous" and not output.exists():
                path.rename(output)
                notes.append(f"restored {output} from {path.name}, left by a conversion that died while replacing it")
                continue
            _remove(path)
        except OSError as error:
            notes.append(f"could not clean {path} ({error}), left by process {pid}: remove it by hand")
            continue
        notes.append(f"removed {path.name}, left by a conversion that did not finish (process {pid})")
    for note in notes:
        logger.warning(note)
    return notes


def prepare_output(output: str | os.PathLike, overwrite: bool = False) -> None:
    """Checks that `output` can become the output folder, after cleaning what dead conversions left next to it.

    Raises NotADirectoryError / FileExistsError with what to do when `output` (or a folder above it) is a file, or
    when it is a folder that is not empty and `overwrite` is not set.
    """
    output = Path(output)
    _check_output_path(output)
    clean_leftovers(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{str(output)!r} exists and is not empty: choose another --output or pass --overwrite.")


@contextmanager
def atomic_output_folder(output: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a hidden folder next to `output` that replaces `output` only once the block completes.

    If the block raises, or the process dies at any point, the previous output is what stays (or, after a death
    between the two renames of the portable path, what the next call restores).
    """
    output = Path(output)
    prepare_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.parent / f".{output.name}.partial-{os.getpid()}"
    if partial.exists() or partial.is_symlink():
        _remove(partial)
    partial.mkdir()
    lock = None
    try:
        lock = _lock(partial)
        yield partial
        _fsync_folder(partial)
        if not output.exists():
            os.rename(partial, output)
        elif _exchange(partial, output):
            _fsync_folder(output.parent)
            _remove(partial)  # now the old output
        else:
            previous = output.parent / f".{output.name}.previous-{os.getpid()}"
            os.rename(output, previous)
            try:
                os.rename(partial, output)
            except BaseException:
                os.rename(previous, output)
                raise
            _fsync_folder(output.parent)
            _remove(previous)
        _fsync_folder(output.parent)
    except BaseException:
        # Whatever the step that failed, the hidden folder holds nothing that is needed: an unfinished output, the
        # new one whose rename failed (the old is back in place, or is restored by the next run), or, after the
        # exchange, the old output that was being removed.
        try:
            if partial.exists() or partial.is_symlink():
                _remove(partial)
        except OSError as error:
            logger.warning(f"could not remove {partial} ({error}); the next conversion to {output} removes it")
        raise
    finally:
        if lock is not None:
            os.close(lock)


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
