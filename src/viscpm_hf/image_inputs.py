"""Turns what users pass as images into RGB images, with errors that say what was wrong and how to fix it."""

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB; transparent pixels are laid on white rather than turning black."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str | os.PathLike) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Image file not found: {str(path)!r}. Pass the path of an existing image file or a PIL.Image."
        )
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(
            f"Cannot read an image from {str(path)!r} ({error}). The file is corrupt or not an image; "
            "re-save it as PNG or JPEG."
        ) from error


def load_image(image: Any) -> Image.Image | np.ndarray | torch.Tensor:
    """One image as RGB: a PIL image (any mode), a file path, or an H x W (x C) / C x H x W array or tensor."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        return open_image(image)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if image.ndim == 2:  # grayscale
            stack = np.stack if isinstance(image, np.ndarray) else torch.stack
            return stack([image] * 3, -1)
        if image.ndim != 3 or not ({image.shape[0], image.shape[-1]} & {1, 3, 4}):
            raise ValueError(
                f"An image array must be H x W, H x W x C or C x H x W with 1, 3 or 4 channels; got shape "
                f"{tuple(image.shape)}. Pass one image at a time, or a list of images."
            )
        return image
    raise TypeError(
        f"Unsupported image type {type(image).__name__}: pass a PIL.Image.Image, a file path, "
        "a numpy array or a torch tensor."
    )


def load_images(images: Any) -> Any:
    """`load_image` over an image, a list of images, or a batch (list of lists), keeping the nesting."""
    if isinstance(images, (list, tuple)):
        return [load_images(image) for image in images]
    return load_image(images)
