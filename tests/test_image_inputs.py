import base64
import functools
import http.server
import io
import threading

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


# --- pixel depth and range ------------------------------------------------------------------------------------


GRADIENT = np.linspace(0, 1, 12, dtype=np.float64).reshape(3, 4)  # 0 .. 1 in 12 steps
EXPECTED_8BIT = np.round(GRADIENT * 255).astype(np.uint8)


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(np.round(GRADIENT * 65535).astype(np.uint16)),  # I;16, as a 16-bit PNG opens
        Image.fromarray(np.round(GRADIENT * 65535).astype(np.int32)),  # I, 16-bit data
        Image.fromarray(np.round(GRADIENT * (2**31 - 1)).astype(np.int32)),  # I, full 32-bit data
        Image.fromarray(GRADIENT.astype(np.float32)),  # F in [0, 1]
        Image.fromarray((GRADIENT * 255).astype(np.float32)),  # F in [0, 255]
    ],
    ids=["I;16", "I-16bit", "I-32bit", "F-unit", "F-255"],
)
def test_deep_grayscale_is_scaled_to_8_bits_not_clipped(image):
    rgb = load_image(image)
    assert rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(rgb)[..., 0], EXPECTED_8BIT)
    assert np.all(np.asarray(rgb)[..., 0] == np.asarray(rgb)[..., 2])


def test_a_16_bit_png_file_keeps_its_gray_levels(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(path)  # 32896 / 257 = 128
    assert load_image(path).getpixel((0, 0)) == (128, 128, 128)


def test_8_bit_values_in_a_wider_mode_stay_as_they_are():
    image = Image.new("L", (2, 2), 200)
    for mode in ("I;16", "I"):
        assert load_image(image.convert(mode)).getpixel((0, 0)) == (200, 200, 200)


@pytest.mark.parametrize("scale", [1, 255])
def test_float_arrays_in_unit_or_byte_range_become_uint8(scale):
    array = np.stack([GRADIENT] * 3, -1) * scale
    for image in (array.astype(np.float32), torch.from_numpy(array).permute(2, 0, 1).float()):
        loaded = load_image(image)
        assert isinstance(loaded, np.ndarray) and loaded.dtype == np.uint8
        channel = loaded[..., 0] if loaded.shape[-1] == 3 else loaded[0]
        np.testing.assert_array_equal(channel, EXPECTED_8BIT)


def test_wide_integer_arrays_are_scaled_by_their_depth():
    np.testing.assert_array_equal(load_image(np.round(GRADIENT * 65535).astype(np.uint16))[..., 1], EXPECTED_8BIT)
    assert load_image(torch.full((3, 2, 2), 200))[0, 0, 0] == 200  # int64 holding 8-bit values


@pytest.mark.parametrize("values", [np.array([[-1.0, 1.0]]), np.array([[0.0, 300.0]]), np.array([[-5, 3]])])
def test_out_of_range_values_are_refused(values):
    with pytest.raises(ValueError, match=r"pixels must be in \[0, 1\] or \[0, 255\]"):
        load_image(values)


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_image(np.array([[0.5, np.nan]]))


# --- strings: paths, URLs, data URIs, base64 ------------------------------------------------------------------


def png_bytes(color=(10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_data_uri_and_raw_base64_are_decoded():
    encoded = base64.b64encode(png_bytes()).decode()
    for source in (f"data:image/png;base64,{encoded}", encoded, base64.encodebytes(png_bytes()).decode()):
        image = load_image(source)
        assert image.size == (3, 2) and image.getpixel((0, 0)) == (10, 20, 30)


NOT_AN_IMAGE = base64.b64encode(b"not an image at all, just some text").decode()


@pytest.mark.parametrize("source", [f"data:image/png;base64,{NOT_AN_IMAGE}", "data:image/png;base64,@@@@", NOT_AN_IMAGE])
def test_data_that_is_no_image_is_a_value_error(source):
    with pytest.raises(ValueError, match="corrupt or not an image|not valid base64"):
        load_image(source)


def test_file_urls_are_paths(tmp_path):
    path = tmp_path / "a b.png"
    path.write_bytes(png_bytes())
    assert load_image(path.as_uri()).getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image((tmp_path / "missing.png").as_uri())


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(str(tmp_path / "nope.png"))


@pytest.fixture
def http_root(tmp_path, monkeypatch):
    """A server on 127.0.0.1 for tmp_path, in a thread; proxies bypassed so nothing leaves the machine."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 5
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_http_urls_are_downloaded(http_root):
    folder, url = http_root
    (folder / "cat.png").write_bytes(png_bytes((1, 2, 3)))
    (folder / "junk.png").write_bytes(b"not an image")
    assert load_image(f"{url}/cat.png").getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(FileNotFoundError, match="HTTP 404.*gone.png"):
        load_image(f"{url}/gone.png")
    with pytest.raises(ValueError, match="junk.png.*corrupt or not an image"):
        load_image(f"{url}/junk.png")
