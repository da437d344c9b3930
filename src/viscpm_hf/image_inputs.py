"""Turns what users pass as images into RGB images, with errors that say what was wrong and how to fix it.

Pixel values are read by their range, not clipped: 16-bit and 32-bit images are scaled down to 8 bits, float images
may be in [0, 1] or [0, 255]. Strings may be file paths, `file://` or http(s) URLs, `data:` URIs or raw base64; images
read from them are turned upright as their EXIF orientation says, as a photo viewer shows them.

Where strings may lead is an [`ImageSourcePolicy`]. In a program (a notebook, `chat()`) the default one reads any file
and URL the program could. A server reading strings sent by its clients installs a stricter one
(`set_image_source_policy`): `viscpm-serve` reads inline images only unless told otherwise, and caps their size.
"""

import base64
import binascii
import http.client
import io
import ipaddress
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError


ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike

URL_TIMEOUT_S = 30.0
MAX_REDIRECTS = 5
# Raw base64 is told from a path by its alphabet and length (the smallest real image file encodes to > 32 chars).
_BASE64 = re.compile(r"[A-Za-z0-9+/]{32,}={0,2}")


class ImageSourceNotAllowedError(ValueError):
    """A string names an image where the image-source policy forbids reading (a file, a URL, a private address)."""


class ImageTooLargeError(ValueError):
    """An image over the policy's byte or pixel cap, refused before it is decoded."""


def to_uint8(values: np.ndarray) -> np.ndarray:
    """8-bit pixel values of an image stored with more bits, scaled rather than clipped (clipping turns a 16-bit
    photo white). Integers are read as 8-, 16- or 32-bit data, the smallest depth that holds their maximum (8-bit
    data kept in a 16-bit container stays as it is); floats as [0, 1] when their maximum is <= 1, else [0, 255]."""
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * 255
    floating = np.issubdtype(values.dtype, np.floating)
    if not (floating or np.issubdtype(values.dtype, np.integer)):
        raise TypeError(f"Image values of dtype {values.dtype} are not pixels: pass integer or float values.")
    if values.size == 0:
        return values.astype(np.uint8)
    if floating and not np.isfinite(values).all():
        raise ValueError("The image holds NaN or infinite values: pass finite pixel values in [0, 1] or [0, 255].")
    low, high = values.min().item(), values.max().item()
    if low < 0 or (floating and high > 255):
        raise ValueError(
            f"Image values range over [{low:g}, {high:g}]; pixels must be in [0, 1] or [0, 255] (floats) or "
            "non-negative (integers). Normalized tensors (mean/std applied) cannot be read back: pass the image "
            "before normalization, or as uint8."
        )
    if floating:
        full = 1.0 if high <= 1 else 255.0
    else:
        full = 255 if high <= 255 else 65535 if high <= 65535 else np.iinfo(values.dtype).max
    return np.round(values.astype(np.float64) * (255 / full)).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB; transparent pixels are laid on white rather than turning black, and 16-bit,
    32-bit and float grayscale (modes I;16, I, F) are scaled to 8 bits (PIL's own conversion clips them)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        return Image.fromarray(to_uint8(np.asarray(image))).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """The image as its EXIF orientation says it is seen (cameras store portraits sideways and tag them)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (0, 1):
        return image
    return ImageOps.exif_transpose(image)


def decode_image(data: bytes | Path, source: str, max_pixels: int | None = None) -> Image.Image:
    """The upright RGB image in `data` (the bytes of an image file, or its path); `source` names where it came from.
    The size in the file's header is checked against `max_pixels` (else PIL's own bomb limit) before any decoding."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageTooLargeError(
                    f"The image from {source} is {width} x {height} pixels, over this server's limit of "
                    f"{max_pixels:,} (--max-image-pixels). Send a smaller image."
                )
            image.load()
            return to_rgb(upright(image))
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"The image from {source} is too large to decode safely ({error}).") from error
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(
            f"Cannot read an image from {source} ({error}). The data is corrupt or not an image; "
            "re-save it as PNG or JPEG."
        ) from error


def data_uri_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The payload of a `data:[<media type>][;base64],<data>` URI."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ValueError(f"The data URI {uri[:40]!r} has no ',' before its data: write data:image/png;base64,<data>.")
    if header.endswith(";base64"):
        return base64_bytes(payload, "the data URI", max_bytes)
    check_byte_size(len(payload), "the data URI", max_bytes)  # percent-escapes only make the data shorter
    return urllib.parse.unquote_to_bytes(payload)


def base64_bytes(text: str, source: str, max_bytes: int | None = None) -> bytes:
    text = "".join(text.split())
    check_byte_size(len(text) * 3 // 4, source, max_bytes)
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as error:
        raise ValueError(f"Cannot read an image from {source}: it is not valid base64 ({error}).") from error


def check_byte_size(size: int, source: str, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ImageTooLargeError(
            f"The image file from {source} is over this server's limit of {max_bytes:,} bytes (--max-image-bytes). "
            "Send a smaller or more compressed image."
        )


def is_base64(text: str) -> bool:
    text = "".join(text.split())
    return len(text) % 4 == 0 and _BASE64.fullmatch(text) is not None


def file_url_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r} names a file on another host ({parsed.netloc!r}): copy it here and pass its path.")
    return urllib.request.url2pathname(parsed.path)


def public_address(host: str, port: int) -> str:
    """An address `host` resolves to, checked public: every address it resolves to must be (a name that resolves to
    a public and a private address could be answered from either)."""
    addresses = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    for address in addresses:
        ip = ipaddress.ip_address(address.partition("%")[0])  # an IPv6 address may carry a zone: fe80::1%eth0
        if not ip.is_global or ip.is_multicast:
            raise ImageSourceNotAllowedError(
                f"The image host {host!r} resolves to {address}, a private, loopback or link-local address, which "
                "this server does not fetch from (it could reach services behind its firewall). Use a public URL, or "
                "start the server with --allow-private-addresses if its clients are trusted."
            )
    return addresses[0]


class _PublicAddressConnection(http.client.HTTPConnection):
    """Connects to the address `public_address` checked, not to a second lookup of the name (which could rebind)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._create_connection = self._connect_to_public_address  # the hook `connect` opens its socket with

    @staticmethod
    def _connect_to_public_address(address: tuple, timeout: float, source_address=None) -> socket.socket:
        host, port = address
        return socket.create_connection((public_address(host, port), port), timeout, source_address)


class _PublicAddressHTTPSConnection(_PublicAddressConnection, http.client.HTTPSConnection):
    pass  # the TLS handshake and certificate check still name the host


class _PublicHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, request):
        return self.do_open(_PublicAddressConnection, request)


class _PublicHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, request):
        return self.do_open(_PublicAddressHTTPSConnection, request, context=self._context)


class _CheckedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only (each connection is checked again), at most `MAX_REDIRECTS`."""

    max_redirections = MAX_REDIRECTS

    def redirect_request(self, request, fp, code, msg, headers, new_url):
        if urllib.parse.urlparse(new_url).scheme not in ("http", "https"):
            raise ImageSourceNotAllowedError(
                f"The image URL {request.full_url!r} redirects to {new_url!r}; only http(s) redirects are followed."
            )
        return super().redirect_request(request, fp, code, msg, headers, new_url)


@dataclass(frozen=True)
class ImageSourcePolicy:
    """Where an image named by a string may be read from, and how large it may be.

    The default reads whatever the program could (files, any URL, through the environment's proxies): right for a
    program whose strings come from its own user. A server whose strings come from clients narrows it: local files
    only under `local_root` (symlinks and `..` resolved first; relative paths are relative to it), remote URLs only
    with `allow_remote`, and then only to public addresses (each address a name resolves to is checked, redirects
    included, and the connection goes to the checked address, not through proxies) unless `allow_private_addresses`.

    Args:
        local_files: Whether strings may name local files (paths, `file://` URIs).
        local_root: With `local_files`, the folder they must be in; `None`: anywhere.
        allow_remote: Whether http(s) URLs are fetched.
        allow_private_addresses: Whether URLs may lead to loopback, private and link-local addresses.
        max_bytes: The largest image file (download, local file or inline data), in bytes; `None`: no cap.
        max_pixels: The most pixels an image may have, read from its header before decoding; `None`: PIL's own
            decompression-bomb limit.
        timeout: Seconds a download may wait at each step (connecting, each read); past them in all, the transfer
            is abandoned at its next read.
    """

    local_files: bool = True
    local_root: Path | None = None
    allow_remote: bool = True
    allow_private_addresses: bool = True
    max_bytes: int | None = None
    max_pixels: int | None = None
    timeout: float = URL_TIMEOUT_S

    def open(self, source: str | os.PathLike) -> Image.Image:
        """The image `source` names, as RGB: see `open_image`."""
        if isinstance(source, str):
            if source.startswith(("http://", "https://")):
                return self.decode(self.download(source), f"the URL {source!r}")
            if source.startswith("data:"):
                return self.decode(data_uri_bytes(source, self.max_bytes), "the data URI")
            if source.startswith("file:"):
                return self.open_file(file_url_path(source))
            # A string that names no readable file but reads as base64 is base64 (a server only looks in its folder)
            if not self.names_allowed_file(source) and is_base64(source):
                label = f"the string {source[:40]!r} (no such file; read as base64)"
                return self.decode(base64_bytes(source, label, self.max_bytes), label)
        return self.open_file(source)

    def open_file(self, source: str | os.PathLike) -> Image.Image:
        path = self.local_path(source)
        if not os.path.isfile(path):  # unlike Path.is_file, never raises (a long base64 string is no file name)
            raise FileNotFoundError(
                f"Image file not found: {str(source)!r}. Pass the path of an existing image file, a URL, a data URI, "
                "or a PIL.Image."
            )
        check_byte_size(os.path.getsize(path), repr(str(source)), self.max_bytes)
        return self.decode(path, repr(str(source)))

    def names_allowed_file(self, source: str) -> bool:
        try:
            return os.path.isfile(self.local_path(source))
        except (ValueError, OSError):  # a refused path, or no path at all (a NUL byte, a name too long)
            return False

    def local_path(self, source: str | os.PathLike) -> Path:
        """The file `source` names, if the policy lets it be read."""
        if not self.local_files:
            raise ImageSourceNotAllowedError(
                f"{str(source)[:80]!r} names a file on the server, and this server reads no local files. Send the "
                "image inline (a data: URI or base64), or start the server with --allow-local-images DIR to serve "
                "the images in DIR."
            )
        if self.local_root is None:
            return Path(source)
        root = self.local_root.resolve()
        path = (root / source).resolve()  # symlinks and `..` resolved; an absolute `source` replaces the root
        if not path.is_relative_to(root):
            raise ImageSourceNotAllowedError(
                f"{str(source)[:80]!r} is outside the image folder this server reads ({str(root)!r}, "
                "--allow-local-images). Name a file in that folder, or send the image inline."
            )
        return path

    def download(self, url: str) -> bytes:
        """The bytes at `url`, within `max_bytes` and `timeout`, from where the policy allows."""
        if not self.allow_remote:
            raise ImageSourceNotAllowedError(
                f"This server does not fetch image URLs ({url[:80]!r}). Send the image inline (a data: URI or base64), "
                "or start the server with --allow-remote-images."
            )
        deadline = time.monotonic() + self.timeout
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "viscpm-hf"})
            with self.opener().open(request, timeout=self.timeout) as response:
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit():
                    check_byte_size(int(length), repr(url), self.max_bytes)
                chunks, size = [], 0
                while chunk := response.read1(1 << 16):
                    size += len(chunk)
                    check_byte_size(size, repr(url), self.max_bytes)
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the download took over {self.timeout:g} s")
                    chunks.append(chunk)
                return b"".join(chunks)
        except urllib.error.HTTPError as error:
            if error.code in (404, 410):
                raise FileNotFoundError(
                    f"Image URL not found (HTTP {error.code}): {url!r}. Check the address."
                ) from error
            raise ConnectionError(f"Cannot download the image {url!r} (HTTP {error.code} {error.reason}).") from error
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise ConnectionError(
                f"Cannot download the image {url!r} ({reason}). Check the URL and the network, or download the file "
                "and pass its path."
            ) from error

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib with only http(s); when private addresses are refused, connections go to checked public addresses
        directly (a proxy would hide where they lead)."""
        if self.allow_private_addresses:
            handlers = [urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler()]
        else:
            handlers = [_PublicHTTPHandler(), _PublicHTTPSHandler()]
        opener = urllib.request.OpenerDirector()
        for handler in (
            *handlers,
            _CheckedRedirectHandler(),
            urllib.request.UnknownHandler(),
            urllib.request.HTTPDefaultErrorHandler(),
            urllib.request.HTTPErrorProcessor(),
        ):
            opener.add_handler(handler)
        return opener

    def decode(self, data: bytes | Path, source: str) -> Image.Image:
        return decode_image(data, source, self.max_pixels)


_policy = ImageSourcePolicy()


def set_image_source_policy(policy: ImageSourcePolicy) -> None:
    """Makes `policy` the one `open_image` (and so the processors) follows in this process, from now on: a server
    sets it once, before it takes requests."""
    global _policy
    _policy = policy


def image_source_policy() -> ImageSourcePolicy:
    return _policy


def open_image(source: str | os.PathLike) -> Image.Image:
    """An image file's path, a `file://` or http(s) URL, a `data:` URI or raw base64, as RGB, as far as the process's
    `ImageSourcePolicy` allows.

    Raises `FileNotFoundError` naming a missing file, `ValueError` for data that is not an image, `ConnectionError`
    for a download that failed, and (both `ValueError`s) `ImageSourceNotAllowedError` for a source the policy forbids
    and `ImageTooLargeError` for an image over its caps.
    """
    return _policy.open(source)


def array_to_image(image: np.ndarray | torch.Tensor) -> Image.Image:
    """An H x W, H x W x C or C x H x W array or tensor (C = 1, 3 or 4) as an RGB image.

    The layout is read from where the channel axis can be: last (and not first) is H x W x C, first (and not last) is
    C x H x W. When both ends could be channels (a 3 x 50 x 3 strip, a 4 x 4 x 4 patch), an array follows its
    library's convention: numpy arrays are H x W x C (as PIL and OpenCV give images), torch tensors C x H x W (as
    torchvision does). Transpose the other kind before passing it.
    """
    if image.ndim not in (2, 3) or (image.ndim == 3 and not ({image.shape[0], image.shape[-1]} & {1, 3, 4})):
        raise ValueError(
            f"An image array must be H x W, H x W x C or C x H x W with 1, 3 or 4 channels; got shape "
            f"{tuple(image.shape)}. Pass one image at a time, or a list of images."
        )
    channels_first = image.ndim == 3 and (
        image.shape[-1] not in (1, 3, 4) or (image.shape[0] in (1, 3, 4) and isinstance(image, torch.Tensor))
    )
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        image = (image.float() if image.is_floating_point() else image).numpy()
    values = to_uint8(np.moveaxis(image, 0, -1) if channels_first else image)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(values)))


def load_image(image: Any) -> Image.Image:
    """One image as an upright RGB PIL image: a PIL image (any mode), a string (see `open_image`) or path, or an array
    or tensor (see `array_to_image`). Arrays and tensors that are not uint8 are scaled to 8 bits (see `to_uint8`);
    the image becomes a PIL image so that no later step has to guess its layout."""
    if isinstance(image, Image.Image):
        return to_rgb(upright(image))
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return array_to_image(image)
    raise TypeError(
        f"Unsupported image type {type(image).__name__}: pass a PIL.Image.Image, a file path or URL, "
        "a numpy array or a torch tensor."
    )


def load_images(images: Any) -> Any:
    """`load_image` over an image, a list of images, or a batch (list of lists), keeping the nesting."""
    if isinstance(images, (list, tuple)):
        return [load_images(image) for image in images]
    return load_image(images)
