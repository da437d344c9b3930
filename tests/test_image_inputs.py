import numpy as np
import pytest
import torch
from PIL import Image

from viscpm_hf.image_inputs import load_image, load_images, to_rgb


def test_rgb_is_returned_unchanged():
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(image) is image


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "LA", "P"])
def test_modes_become_rgb(mode):
    assert load_image(Image.new(mode, (4, 4))).mode == "RGB"


def test_grayscale_arrays_gain_three_channels():
    assert load_image(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert load_image(torch.zeros(5, 6)).shape == (5, 6, 3)


def test_batched_arrays_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="one image at a time"):
        load_image(np.zeros((2, 5, 6, 3), np.uint8))


def test_nesting_is_kept():
    images = load_images([[Image.new("L", (2, 2))], [Image.new("RGB", (2, 2)), Image.new("RGBA", (2, 2))]])
    assert [len(row) for row in images] == [1, 2]
    assert all(image.mode == "RGB" for row in images for image in row)


def test_files_are_read_and_closed(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (3, 3), 7).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (7, 7, 7)
