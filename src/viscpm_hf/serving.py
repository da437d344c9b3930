"""`viscpm-serve`: transformers' own `transformers serve` (OpenAI-compatible), in a process that knows viscpm_hf,
closed by default to what clients could make a server read.

`transformers serve` has no plugin mechanism (no entry points, no option naming a module to import): its server only
knows the classes of the packages imported in its process. This command takes all of serve's arguments, and hands
them to serve's command after importing viscpm_hf and `integrations.transformers_serve`:

    viscpm-serve path/to/viscpm-chat --host 127.0.0.1 --port 8000
    python -m viscpm_hf.serving path/to/viscpm-chat --port 8000     # the same, without the console script

Images in requests (`image_url` parts) are read as the options below allow; everything else is serve's:

    (default)                      inline images only: `data:` URIs and raw base64
    --allow-local-images DIR       also paths and `file://` URIs of files in DIR (symlinks and `..` resolved first;
                                   relative paths are relative to DIR); anything outside DIR is refused
    --allow-remote-images          also http(s) URLs, if every address their host resolves to is public (no loopback,
                                   private or link-local address, redirects included)
    --allow-private-addresses      with --allow-remote-images: any address (only for trusted clients)
    --image-timeout 10             seconds a download may wait at each step, and about in all
    --max-image-bytes 20971520     the largest image file (download, local file or inline data), 20 MiB
    --max-image-pixels 64000000    the most pixels an image may have, read from its header before decoding
    --max-request-bytes 67108864   the largest chat request body, 64 MiB

Chat requests are checked before serve sees them, and their images loaded in a pool of threads, so that a slow image
source or a large image holds up no other client. A refused request gets OpenAI's error JSON,
`{"error": {"message", "type": "invalid_request_error", "param", "code"}}`: 400 for a bad value (no question,
`messages` not a list, an image that is no image, a prompt longer than the model takes), 403 for an image source the
server does not read, 413 for an image or request over its caps. `stop` is refused (400): serve cannot match stop
strings for processor-backed models yet.

Since transformers 5.25 the model runs in a process of its own, started with `spawn`: `transformers_serve.register()`
makes that process import viscpm_hf and register too, whatever main module started the server; with
`--api-server-count N` each API server process gets the image policy as well. It needs transformers' serving extras
(`pip install "viscpm-hf[serve]"`: FastAPI, Uvicorn, openai).
"""

import inspect
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from transformers.utils.import_utils import is_serve_available


if not is_serve_available():
    raise ImportError("viscpm-serve needs transformers' serving extras: pip install 'viscpm-hf[serve]'")

from .integrations import hub_kernels, transformers_serve  # after the check: it needs the extras


hub_kernels.disable_hub_kernels_when_offline()
transformers_serve.register()

DEFAULTS = transformers_serve.ServerImagePolicy()


def image_policy(
    allow_local_images: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Also read images named by a path or file:// URI, from files in DIR only (symlinks and '..' are "
            "resolved first; relative paths are relative to DIR). Off by default: only inline images are read.",
            exists=True,
            file_okay=False,
            resolve_path=True,
        ),
    ] = None,
    allow_remote_images: Annotated[
        bool,
        typer.Option(
            help="Also download images named by an http(s) URL, from public addresses only (every address the host "
            "resolves to is checked, redirects included)."
        ),
    ] = False,
    allow_private_addresses: Annotated[
        bool,
        typer.Option(
            help="With --allow-remote-images: also from loopback, private and link-local addresses, which can reach "
            "services behind the server's firewall. Only for trusted clients."
        ),
    ] = False,
    image_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds an image download may wait at each step, and about in all.")
    ] = DEFAULTS.timeout,
    max_image_bytes: Annotated[
        int, typer.Option(min=1, help="The largest image file (download, local file or inline data), in bytes.")
    ] = DEFAULTS.max_bytes,
    max_image_pixels: Annotated[
        int,
        typer.Option(
            min=1,
            help="The most pixels an image may have (64 million: 8000 x 8000), read from its header before it is "
            "decoded. PIL's own decompression-bomb limit (about 179 million) applies too.",
        ),
    ] = DEFAULTS.max_pixels,
    max_request_bytes: Annotated[
        int, typer.Option(min=1, help="The largest chat request body, inline images included, in bytes.")
    ] = DEFAULTS.max_request_bytes,
) -> transformers_serve.ServerImagePolicy:
    """The server's image policy from the command line's options (see the module's docstring)."""
    if allow_private_addresses and not allow_remote_images:
        raise typer.BadParameter(
            "only applies to image URLs: add --allow-remote-images", param_hint="--allow-private-addresses"
        )
    return transformers_serve.ServerImagePolicy(
        local_files=allow_local_images is not None,
        local_root=allow_local_images,
        allow_remote=allow_remote_images,
        allow_private_addresses=allow_private_addresses,
        max_bytes=max_image_bytes,
        max_pixels=max_image_pixels,
        timeout=image_timeout,
        max_request_bytes=max_request_bytes,
    )


IMAGE_OPTIONS = inspect.signature(image_policy).parameters


def check_model_folder(model: str | None) -> None:
    """Refuses, in one line, a PEFT adapter folder without a processor: serve would fail deep in its loader."""
    folder = Path(model) if model else None
    if folder is None or not (folder / "adapter_config.json").is_file():
        return
    if any((folder / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        return
    raise typer.BadParameter(
        f"{folder} is a PEFT adapter (adapter_config.json), not a model folder: serve a model folder with its processor. "
        f"Merge the adapter into its base model and save both (PeftModel.merge_and_unload(), then save_pretrained of "
        f"the model and processor); for an MPM chat adapter such as examples/mpm/default/chat: "
        f"python -m viscpm_hf.mpm.chat_models {folder} OUTPUT, then viscpm-serve OUTPUT.",
        param_hint="MODEL",
    )


def serve(**options: Any) -> None:
    """`transformers serve`, with images read as the image options say (see `viscpm-serve --help`)."""
    check_model_folder(options.get("force_model"))
    policy = image_policy(**{name: options.pop(name) for name in IMAGE_OPTIONS})
    transformers_serve.ServeWithImagePolicy(policy, **options)


# typer reads a command's options from its signature: serve's own, then ours
serve.__signature__ = inspect.signature(transformers_serve.Serve).replace(
    parameters=[*inspect.signature(transformers_serve.Serve).parameters.values(), *IMAGE_OPTIONS.values()]
)
serve.__doc__ = f"""{transformers_serve.Serve.__doc__}
Images in requests are read from inline data only (data: URIs, base64), unless --allow-local-images DIR or
--allow-remote-images say otherwise; each is capped by --max-image-bytes and --max-image-pixels. Client errors are
answered in OpenAI's error JSON (400, 403 for a refused image source, 413 for a too large image or request).
"""


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False)
    app.command()(serve)
    app(sys.argv[1:] if argv is None else argv, prog_name="viscpm-serve")


if __name__ == "__main__":
    main()
