"""Model cards and uploads to the Hugging Face Hub, for every folder the project writes.

A card is a README.md whose YAML header comes from `huggingface_hub.ModelCardData`, so that the Hub can list,
filter and attribute the model: library, task, licence, the languages it was evaluated in, what it was converted
or trained from, tags and, where measured, results (model-index). `push_to_hub` uploads a folder only after
checking what would go up: no pickled file (they run code when loaded) and a card with that metadata.
"""

import os
import zipfile
from pathlib import Path

import yaml
from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.utils import validate_repo_id


CARD_NAME = "README.md"
REQUIRED_METADATA = ("library_name", "pipeline_tag", "license", "language", "base_model", "tags")
# What a derived model takes from the card of the model it was trained from (see `derived_metadata`).
INHERITED_METADATA = ("base_model", "license", "license_name", "license_link", "language")
# Formats that unpickle when loaded (torch.save, pickle, joblib); a Hub folder holds safetensors instead.
PICKLE_SUFFIXES = (".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib")


def write_card(path: str | os.PathLike, data: ModelCardData, body: str) -> None:
    """Writes a model card, under a temporary name renamed when complete: a reader (or an upload) sees the old card
    or the whole new one.

    Args:
        path: the card's file (a folder's README.md).
        data: the metadata, written as the YAML header.
        body: the markdown below it.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(f"---\n{data.to_yaml()}\n---\n\n{body.lstrip()}", encoding="utf-8")
    os.replace(partial, path)


def missing_metadata(data: ModelCardData) -> list[str]:
    """The names of `REQUIRED_METADATA` that `data` lacks."""
    return [name for name in REQUIRED_METADATA if not getattr(data, name, None)]


def load_card(path: str | os.PathLike) -> ModelCard:
    """The card at `path`, checked: its YAML header parses and holds every `REQUIRED_METADATA` field.

    Args:
        path: the card's file (a README.md).

    Returns:
        `ModelCard`.

    Raises:
        ValueError: naming the file, what is wrong and how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"No model card: {path} does not exist. Every folder uploaded needs a README.md with a YAML header "
            f"({', '.join(REQUIRED_METADATA)}); the scripts of viscpm-hf write one into the folders they make."
        )
    try:
        card = ModelCard.load(path)
    except (ValueError, yaml.YAMLError) as error:
        raise ValueError(
            f"The YAML header of the model card {path} does not parse ({error}); fix the block between its first two "
            "'---' lines."
        ) from error
    missing = missing_metadata(card.data)
    if missing:
        raise ValueError(
            f"The model card {path} lacks {', '.join(missing)} in its YAML header; add them (between its first two "
            "'---' lines; https://huggingface.co/docs/hub/model-cards) before uploading."
        )
    return card


def derived_metadata(
    name_or_path: str, *, base_model: str | None = None, license: str | None = None, language: list[str] | None = None
) -> dict:
    """The card metadata of a model trained from `name_or_path`.

    Args:
        name_or_path: the starting model, a Hub id or a local folder.
        base_model: the base model; default: inherited (a Hub id is its own; a local folder passes on the one its
            card names).
        license: the licence; default: the starting card's (with its name and link).
        language: the languages; default: the starting card's.

    Returns:
        Only what is known: a folder without a card gives nothing, an unreachable Hub gives the id only.
    """
    local = Path(name_or_path).exists()
    metadata = {} if local else {"base_model": name_or_path}
    try:
        data = ModelCard.load(Path(name_or_path, CARD_NAME) if local else name_or_path).data
        metadata = {name: getattr(data, name) for name in INHERITED_METADATA if getattr(data, name, None)} | metadata
    except (OSError, ValueError, yaml.YAMLError):  # no card, no network, or one that does not parse
        pass
    if license:  # a licence of one's own replaces the inherited one, its name and link included
        metadata = {key: value for key, value in metadata.items() if not key.startswith("license")} | {"license": license}
    return metadata | {key: value for key, value in (("base_model", base_model), ("language", language)) if value}


def check_hub_target(repo_id: str, token: str | None = None, derived: dict | None = None) -> None:
    """Refuses an upload that would fail, before any long conversion or training.

    Args:
        repo_id: the repo to upload to.
        token: the token (default: the login's).
        derived: the `derived_metadata` of a model to train, if one is.

    Raises:
        ValueError: a malformed repo id, a missing login, or a model card that would lack its base model, licence or
            languages.
    """
    validate_repo_id(repo_id)  # a ValueError naming the id
    if token is None and get_token() is None:
        raise ValueError(
            f"Uploading to {repo_id!r} needs a Hugging Face token with write access: log in with `hf auth login`, or "
            "pass the token (--hub_token, or the HF_TOKEN environment variable)."
        )
    unknown = [name for name in ("base_model", "license", "language") if derived is not None and name not in derived]
    if unknown:
        raise ValueError(
            f"The model card would lack its {', '.join(unknown)}: the starting model's card does not give them; pass "
            + " / ".join(f"--{name}" for name in unknown) + "."
        )


def is_pickle(path: Path) -> bool:
    """Whether a file is pickled: by name, or by content whatever the name (a pickle stream of protocol 2 or later,
    or torch.save's zip).

    Args:
        path: the file.

    Returns:
        True for a pickled file.
    """
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    if path.suffix == ".safetensors":  # read by safetensors only; a header length may begin like a pickle
        return False
    with path.open("rb") as file:
        head = file.read(2)
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head != b"PK" or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(".pkl") for name in archive.namelist())


def files_to_upload(folder: str | os.PathLike) -> list[str]:
    """What `push_to_hub` would upload.

    Args:
        folder: the folder.

    Returns:
        The files under `folder` as sorted relative paths, hidden ones (`.git`, `.cache`, partial files) left out.

    Raises:
        ValueError: a file is pickled, or the model card is missing, does not parse or lacks metadata.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Nothing to upload: {folder} is not a folder.")
    files = [
        path.relative_to(folder).as_posix()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    pickles = [name for name in files if is_pickle(folder / name)]
    if pickles:
        raise ValueError(
            f"{folder} holds pickled files, which run code when they are loaded: {', '.join(pickles)}. Save them as "
            "safetensors (save_pretrained writes safetensors by default; safetensors.torch.save_file) or remove them."
        )
    load_card(folder / CARD_NAME)
    return files


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload with viscpm-hf",
) -> CommitInfo:
    """Uploads `files_to_upload(folder)`, checked first, to the model repo `repo_id` in one commit.

    Files already in the repo and not in the folder stay.

    Args:
        folder: the folder to upload.
        repo_id: the repo; created if needed (a name without a namespace goes under the token's user).
        token: the token (default: the login's).
        private: the visibility of a repo created now.
        commit_message: the commit's message.

    Returns:
        `CommitInfo` (`.commit_url`, `.oid`, `.repo_url.repo_id`).

    Raises:
        ValueError: a refused folder (see `files_to_upload`).
        OSError: a failed upload; the message says how to retry it.
    """
    files = files_to_upload(folder)
    api = HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=Path(folder, name)) for name in files]
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        return api.create_commit(repo.repo_id, operations, commit_message=commit_message)
    except OSError as error:  # the Hub's HTTP and connection errors are OSErrors
        raise OSError(
            f"Uploading to {repo_id} failed ({error}). {folder} is complete: upload it later with "
            f"`hf upload {repo_id} {folder}`."
        ) from error
