"""What `transformers serve` needs to serve VisCPM folders to a network: names it looks up, and a guard on requests.

**Names.** serve's `ModelLoader` loads `getattr(transformers, config.architectures[0])`, and calls a model a VLM (the
modality that turns `image_url` parts into images) only when its class name is a value of
`MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`. Neither sees `AutoModel.register`. So `register` sets the generative
heads on the `transformers` module that loader reads, and enters the chat models in that table (a dict mutated in
place: every module that imported it sees the entry). Since transformers 5.25 the model loads in a process serve
spawns (and so do its API servers, with `--api-server-count`). Such a process re-runs the main module, which need not
import viscpm_hf (`python -c`, an import under `if __name__ == "__main__":`). So serve's loader is sent to it as a call
into this module: unpickling it imports viscpm_hf and registers there too.

**The guard.** serve reads whatever an `image_url` names (a server file, any URL), loads it where it tokenizes (on the
event loop in 5.24, in one thread shared by all requests in 5.25: one slow image stalls every client), and answers
client mistakes with a bare 500. `ServeWithImagePolicy` runs serve with a `ServerImagePolicy` installed (see
`viscpm_hf.image_inputs`) and its app built with a `ChatRequestGuard` in front of `/v1/chat/completions`, which
checks each request and loads its images in a pool of threads before serve sees it, and with handlers that answer
client errors in OpenAI's error shape. serve builds its app inside its command (`build_server`, looked up at call
time); wrapping that function is the only way in. Imported by `viscpm_hf.serving` only.
"""

import asyncio
import functools
import json
import pickle
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException
from transformers.cli.serve import Serve
from transformers.cli.serving import model_manager, server
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from ..image_inputs import (
    ImageSourceNotAllowedError,
    ImageSourcePolicy,
    ImageTooLargeError,
    image_source_policy,
    set_image_source_policy,
)
from ..models.cpmbee import CpmBeeForCausalLM
from ..models.viscpm_chat import VisCPMChatConfig, VisCPMChatForConditionalGeneration
from ..models.viscpm_chat.processing_viscpm_chat import check_conversation
from ..models.viscpm_chat_cpmbee import VisCPMChatCpmBeeConfig, VisCPMChatCpmBeeForConditionalGeneration


# The classes a saved folder names in `architectures` that serve can answer with, by model type when they are chat
# models (image-text-to-text).
CHAT_HEADS = {
    VisCPMChatConfig.model_type: VisCPMChatForConditionalGeneration,
    VisCPMChatCpmBeeConfig.model_type: VisCPMChatCpmBeeForConditionalGeneration,
}
TEXT_HEADS = (CpmBeeForCausalLM,)

CHAT_COMPLETIONS = "/v1/chat/completions"
PREFETCHED = "viscpm-prefetched:"  # an image the guard loaded, as the request serve sees names it
IMAGE_THREADS = 8  # images loading at once, all requests together; a slow source holds one


def register() -> None:
    # The module object serve's loader looks architectures up in: importing transformers.processing_utils puts a new
    # one in sys.modules["transformers"], so that may be another object if serve was imported first.
    for head in (*CHAT_HEADS.values(), *TEXT_HEADS):
        setattr(model_manager.transformers, head.__name__, head)
    for model_type, head in CHAT_HEADS.items():
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault(model_type, head.__name__)
    if hasattr(model_manager, "ModelLoader"):  # transformers >= 5.25, whose loader goes to spawned processes
        ForkingPickler.register(model_manager.ModelLoader, _reduce_loader)


def _reduce_loader(loader) -> tuple:
    """Pickles serve's loader for a spawned process as a call to `_unpickle_registered`, so the process imports us."""
    return _unpickle_registered, (pickle.dumps(loader),)


def _unpickle_registered(pickled_loader: bytes):
    register()
    return pickle.loads(pickled_loader)


# --- the server's image policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerImagePolicy(ImageSourcePolicy):
    """An `ImageSourcePolicy` for images named by clients, closed by default: inline images only (data URIs, base64),
    at most 20 MiB and 64 million pixels each, and chat requests of at most 64 MiB.

    It also reads the images `ChatRequestGuard` loaded ahead of a request, by the key the guard put in their place
    (held until serve has tokenized the request: an unguessable key, good for that request only)."""

    local_files: bool = False
    allow_remote: bool = False
    allow_private_addresses: bool = False
    max_bytes: int | None = 20 * 2**20
    max_pixels: int | None = 64_000_000
    timeout: float = 10.0
    max_request_bytes: int = 64 * 2**20
    prefetched: dict[str, Image.Image] = field(default_factory=dict, compare=False, repr=False)

    def open(self, source: Any) -> Image.Image:
        if isinstance(source, str) and source.startswith(PREFETCHED):
            if source not in self.prefetched:
                raise ValueError(f"{source[:40]!r} names no image: send the image itself, or its URL.")
            return self.prefetched[source]
        return super().open(source)

    def hold(self, images: list[Image.Image]) -> list[str]:
        keys = [PREFETCHED + secrets.token_urlsafe(16) for _ in images]
        self.prefetched.update(zip(keys, images))
        return keys

    def release(self, keys: list[str]) -> None:
        for key in keys:
            self.prefetched.pop(key, None)


class ServeWithImagePolicy(Serve):
    """serve's command with `image_policy` installed wherever its requests are read: this process, and with
    transformers >= 5.25 and `--api-server-count N` each API server process (spawned with this object, whose `run`
    it calls)."""

    def __init__(self, image_policy: ServerImagePolicy, **serve_options: Any):
        self.image_policy = image_policy
        guard_requests(image_policy)
        super().__init__(**serve_options)

    def run(self, *args: Any, **kwargs: Any) -> None:
        guard_requests(self.image_policy)
        super().run(*args, **kwargs)


def guard_requests(policy: ServerImagePolicy) -> None:
    """Installs `policy` in this process, and has serve's `build_server` add the guard to the app it builds."""
    set_image_source_policy(policy)
    if not isinstance(server.build_server, _GuardedBuildServer):
        server.build_server = _GuardedBuildServer(server.build_server)


class _GuardedBuildServer:
    """serve's `build_server`, adding the `ChatRequestGuard` and OpenAI-shaped error handlers to its app."""

    def __init__(self, build_server):
        self.build_server = build_server
        functools.update_wrapper(self, build_server)

    def __call__(self, *args: Any, **kwargs: Any) -> FastAPI:
        app = self.build_server(*args, **kwargs)
        for error_class, (status, _) in CLIENT_ERRORS.items():
            if issubclass(error_class, ValueError):
                app.add_exception_handler(error_class, functools.partial(_error_handler, status=status))
        app.add_exception_handler(HTTPException, _http_error_handler)
        app.add_middleware(ChatRequestGuard, policy=image_source_policy())
        return app


# --- client errors ------------------------------------------------------------------------------------------------


class ClientError(ValueError):
    """A request the guard refuses, with the HTTP status and OpenAI's `param` and `code` to answer with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


# A client's mistake, most specific first: its HTTP status, and OpenAI's `code` when an image the client named raised
# it. FileNotFoundError and ConnectionError are the client's only there (the guard loads the images); elsewhere they
# stay 500s, and so the app's own handlers take the ValueErrors only.
CLIENT_ERRORS = {
    ImageSourceNotAllowedError: (403, "image_source_not_allowed"),
    ImageTooLargeError: (413, "image_too_large"),
    FileNotFoundError: (400, "image_not_found"),
    ConnectionError: (400, "image_unavailable"),
    ValueError: (400, "invalid_image"),
}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error body, which its clients read (`openai.BadRequestError.message` and the like)."""
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


async def _error_handler(_request: Request, error: Exception, status: int) -> JSONResponse:
    return error_response(status, str(error))


async def _http_error_handler(_request: Request, error: HTTPException) -> JSONResponse:
    response = error_response(error.status_code, str(error.detail))
    response.headers.update(error.headers or {})  # e.g. a 405's Allow
    return response


def image_error(error: Exception, param: str) -> ClientError:
    """The answer to an error from loading the image at `param`; an error no client causes is raised again."""
    for error_class, (status, code) in CLIENT_ERRORS.items():
        if isinstance(error, error_class):
            return ClientError(f"{param}: {error}", status, param, code)
    raise error


# --- the guard ----------------------------------------------------------------------------------------------------


class ChatRequestGuard:
    """ASGI middleware in front of serve's `/v1/chat/completions`.

    Before serve sees a request it checks what serve would crash on or misread (a body that is not a JSON object,
    `messages` that are not a list of messages, a user turn without a question, `stop`), then loads its images
    through `policy` in a pool of threads, so that neither a slow image source nor a large image holds up other
    clients, and hands serve the request with each image replaced by a key into `policy.prefetched`. A refused
    request gets a 4xx in OpenAI's error shape, naming the field (`param`) and the fix.
    """

    def __init__(self, app, policy: ServerImagePolicy):
        self.app, self.policy = app, policy
        self.image_threads = ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="images")

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_COMPLETIONS:
            await self.app(scope, receive, send)
            return
        keys: list[str] = []
        try:
            body = await self.read_body(scope, receive)
            if body is None:  # the client left
                return
            request = parse_request(body)
            keys = await self.load_images(request["messages"])
        except ClientError as error:
            await error_response(error.status, str(error), error.param, error.code)(scope, receive, send)
            return
        body = json.dumps(request).encode()
        headers = [(name, value) for name, value in scope["headers"] if name != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def receive_body() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # a disconnect, which serve watches for
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_releasing_images(message: dict) -> None:
            if message["type"] == "http.response.start":  # serve has tokenized the request: the images are in it
                self.policy.release(keys)
            await send(message)

        try:
            await self.app(scope, receive_body, send_releasing_images)
        finally:
            self.policy.release(keys)

    async def read_body(self, scope: dict, receive) -> bytes | None:
        limit = self.policy.max_request_bytes
        too_large = ClientError(
            f"The request is over this server's limit of {limit:,} bytes (--max-request-bytes): send fewer or "
            "smaller images.",
            status=413,
            code="request_too_large",
        )
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def load_images(self, messages: list[dict]) -> list[str]:
        """Loads the request's images in the image threads, all at once, and puts keys to them in their place."""
        parts = [
            (f"messages[{m}].content[{p}].image_url", part)
            for m, message in enumerate(messages)
            if isinstance(message.get("content"), list)
            for p, part in enumerate(message["content"])
            if part["type"] == "image_url"
        ]
        images = await asyncio.gather(*(self.load_image(image_url(part, param), param) for param, part in parts))
        keys = self.policy.hold(list(images))
        for (_, part), key in zip(parts, keys):
            part["image_url"] = {**part["image_url"], "url": key} if isinstance(part["image_url"], dict) else key
        return keys

    async def load_image(self, url: str, param: str) -> Image.Image:
        loop = asyncio.get_running_loop()
        try:  # the policy's own sources, not the keys of other requests
            return await loop.run_in_executor(self.image_threads, ImageSourcePolicy.open, self.policy, url)
        except Exception as error:
            raise image_error(error, param) from error


def parse_request(body: bytes) -> dict:
    """The request as JSON, checked for what serve would answer with a 500 or run wrong."""
    try:
        request = json.loads(body)
    except ValueError as error:
        raise ClientError(f"The request body is not JSON ({error}): send a JSON object.") from error
    if not isinstance(request, dict):
        raise ClientError(f"The request body is a JSON {type(request).__name__}: send a JSON object.")
    messages = request.get("messages")
    if not isinstance(messages, list) or not all(isinstance(message, dict) for message in messages):
        raise ClientError(
            f"`messages` is {json.dumps(messages)[:80]}: send a list of messages, such as "
            '[{"role": "user", "content": [{"type": "text", "text": "What is in the image?"}, '
            '{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}].',
            param="messages",
        )
    try:
        check_conversation(messages)
    except (TypeError, ValueError) as error:
        raise ClientError(f"`messages`: {error}", param="messages") from error
    if request.get("stop") is not None:
        # serve gives `generate` the processor where stop strings need the tokenizer: every such request fails
        raise ClientError(
            "`stop` is not supported by viscpm-serve yet (transformers serve cannot match stop strings with a "
            "multimodal processor): leave it out, and cut the answer at your stop sequence in the client.",
            param="stop",
            code="unsupported_parameter",
        )
    return request


def image_url(part: dict, param: str) -> str:
    """The URL of an OpenAI `image_url` part: `{"url": ...}`, or the bare string some clients send."""
    url = part.get("image_url")
    url = url.get("url") if isinstance(url, dict) else url
    if not isinstance(url, str) or not url:
        raise ClientError(
            f"{param} has no URL: give it as {{'url': 'data:image/png;base64,...'}}.", param=param, code="invalid_image"
        )
    return url
