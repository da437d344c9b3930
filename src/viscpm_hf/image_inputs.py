"""Turns what users pass as images into RGB images, with errors that say what was wrong and how to fix it.

Pixel values are read by their range, not clipped: 16-bit and 32-bit images are scaled down to 8 bits, float images
may be in [0, 1] or [0, 255]. Strings may be file paths, `file://` or http(s) URLs, `data:` URIs or raw base64.
"""

import base64
import binascii
import io
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike

URL_TIMEOUT_S = 30.0
# Raw base64 is told from a path by its alphabet and length (the smallest real image file encodes to > 32 chars).
_BASE64 = re.compile(r"[A-Za-z0-9+/]{32,}={0,2}")


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


def decode_image(data: bytes | Path, source: str) -> Image.Image:
    """The RGB image in `data` (the bytes of an image file, or its path); `source` names where it came from."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(
            f"Cannot read an image from {source} ({error}). The data is corrupt or not an image; "
            "re-save it as PNG or JPEG."
        ) from error


def download(url: str, timeout: float = URL_TIMEOUT_S) -> bytes:
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "viscpm-hf"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        if error.code in (404, 410):
            raise FileNotFoundError(f"Image URL not found (HTTP {error.code}): {url!r}. Check the address.") from error
        raise ConnectionError(f"Cannot download the image {url!r} (HTTP {error.code} {error.reason}).") from error
    except (urllib.error.URLError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(
            f"Cannot download the image {url!r} ({reason}). Check the URL and the network, or download the file "
            "and pass its path."
        ) from error


def data_uri_bytes(uri: str) -> bytes:
    """The payload of a `data:[<media type>][;base64],<data>` URI."""
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ValueError(f"The data URI {uri[:40]!r} has no ',' before its data: write data:image/png;base64,<data>.")
    if header.endswith(";base64"):
        return base64_bytes(payload, "the data URI")
    return urllib.parse.unquote_to_bytes(payload)


def base64_bytes(text: str, source: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error as error:
        raise ValueError(f"Cannot read an image from {source}: it is not valid base64 ({error}).") from error


def is_base64(text: str) -> bool:
    text = "".join(text.split())
    return len(text) % 4 == 0 and _BASE64.fullmatch(text) is not None


def file_url_path(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"{url!r} names a file on another host ({parsed.netloc!r}): copy it here and pass its path.")
    return urllib.request.url2pathname(parsed.path)


def open_image(source: str | os.PathLike) -> Image.Image:
    """An image file's path, a `file://` or http(s) URL, a `data:` URI or raw base64, as RGB.

    Raises `FileNotFoundError` naming a missing file, `ValueError` for data that is not an image, and
    `ConnectionError` for a download that failed.
    """
    if isinstance(source, str):
        if source.startswith(("http://", "https://")):
            return decode_image(download(source), f"the URL {source!r}")
        if source.startswith("data:"):
            return decode_image(data_uri_bytes(source), "the data URI")
        if source.startswith("file:"):
            source = file_url_path(source)
        elif not os.path.exists(source) and is_base64(source):
            label = f"the string {source[:40]!r} (no such file; read as base64)"
            return decode_image(base64_bytes(source, label), label)
    path = Path(source)
    if not os.path.isfile(path):  # unlike Path.is_file, never raises (a long base64 string is no file name)
        raise FileNotFoundError(
            f"Image file not found: {str(path)!r}. Pass the path of an existing image file, a URL, a data URI, "
            "or a PIL.Image."
        )
    return decode_image(path, repr(str(path)))


def load_image(image: Any) -> Image.Image | np.ndarray | torch.Tensor:
    """One image as RGB: a PIL image (any mode), a string (see `open_image`) or path, or an H x W (x C) / C x H x W
    array or tensor. Arrays and tensors that are not uint8 come back as uint8 arrays (see `to_uint8`), so the image
    processor's rescaling by 1/255 is right for them."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if image.ndim not in (2, 3) or (image.ndim == 3 and not ({image.shape[0], image.shape[-1]} & {1, 3, 4})):
            raise ValueError(
                f"An image array must be H x W, H x W x C or C x H x W with 1, 3 or 4 channels; got shape "
                f"{tuple(image.shape)}. Pass one image at a time, or a list of images."
            )
        if isinstance(image, torch.Tensor) and image.dtype != torch.uint8:
            image = image.detach().cpu()
            image = (image.float() if image.is_floating_point() else image).numpy()
        if isinstance(image, np.ndarray):
            image = to_uint8(image)
        if image.ndim == 2:  # grayscale
            stack = np.stack if isinstance(image, np.ndarray) else torch.stack
            return stack([image] * 3, -1)
        return image
    raise TypeError(
        f"Unsupported image type {type(image).__name__}: pass a PIL.Image.Image, a file path or URL, "
        "a numpy array or a torch tensor."
    )


def load_images(images: Any) -> Any:
    """`load_image` over an image, a list of images, or a batch (list of lists), keeping the nesting."""
    if isinstance(images, (list, tuple)):
        return [load_images(image) for image in images]
    return load_image(images)
