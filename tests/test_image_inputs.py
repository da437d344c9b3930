import base64
import contextlib
import http.server
import io
import struct
import threading
import time
import zlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from viscpm_hf import image_inputs
from viscpm_hf.image_inputs import (
    ImageSourceNotAllowedError,
    ImageSourcePolicy,
    ImageTooLargeError,
    image_source_policy,
    load_image,
    load_images,
    set_image_source_policy,
    to_rgb,
)


def test_rgb_is_returned_unchanged():
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(image) is image


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "LA", "P"])
def test_modes_become_rgb(mode):
    assert load_image(Image.new(mode, (4, 4))).mode == "RGB"


def test_grayscale_arrays_gain_three_channels():
    for array in (np.zeros((5, 6), np.uint8), torch.zeros(5, 6), np.zeros((5, 6, 1), np.uint8)):
        image = load_image(array)
        assert image.mode == "RGB" and image.size == (6, 5)


def test_batched_arrays_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="one image at a time"):
        load_image(np.zeros((2, 5, 6, 3), np.uint8))


STRIP = np.zeros((3, 50, 3), np.uint8)  # a strip 3 pixels tall and 50 wide: red on top, then green, then blue
STRIP[0, :, 0] = STRIP[1, :, 1] = STRIP[2, :, 2] = 255


def test_an_array_whose_both_ends_could_be_channels_is_height_width_channels():
    """numpy's convention, as PIL and OpenCV give images (the processor alone would read 3 x 50 x 3 channels-first)."""
    image = load_image(STRIP)
    assert image.size == (50, 3)
    assert [image.getpixel((25, row)) for row in range(3)] == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


def test_a_tensor_whose_both_ends_could_be_channels_is_channels_first():
    """torch's convention (torchvision): transpose an H x W x C tensor, or pass it as a numpy array."""
    assert load_image(torch.from_numpy(STRIP)).size == (3, 50)
    assert load_image(torch.from_numpy(STRIP).permute(2, 0, 1)).size == (50, 3)


@pytest.mark.parametrize("library", [np.asarray, torch.from_numpy])
def test_the_channel_axis_is_where_only_it_can_be(library):
    hwc = np.zeros((5, 7, 3), np.uint8)
    hwc[..., 0] = 9
    for array in (hwc, np.moveaxis(hwc, -1, 0), hwc[..., :1], np.moveaxis(hwc[..., :1], -1, 0)):
        image = load_image(library(np.ascontiguousarray(array)))
        assert image.size == (7, 5) and image.getpixel((0, 0))[0] == 9


def test_four_channels_are_rgba_laid_on_white():
    rgba = np.zeros((2, 5, 4), np.uint8)  # transparent black
    assert load_image(rgba).getpixel((0, 0)) == (255, 255, 255)


def upright_test_image(orientation: int) -> bytes:
    """A 40 x 20 JPEG, left half red and right half blue, tagged with an EXIF `orientation`."""
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    """Orientation 6: the camera was turned right, the viewer turns the picture 90 degrees clockwise, so the left
    half is on top."""
    data = upright_test_image(6)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    for source in (path, f"data:image/jpeg;base64,{base64.b64encode(data).decode()}", Image.open(io.BytesIO(data))):
        image = load_image(source)
        assert image.size == (20, 40)
        red, blue = image.getpixel((10, 5)), image.getpixel((10, 35))
        assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0], (red, blue)
    assert load_image(Image.open(io.BytesIO(upright_test_image(1)))).size == (40, 20)  # 1: as stored


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
def test_float_arrays_in_unit_or_byte_range_become_8_bit_images(scale):
    array = np.stack([GRADIENT] * 3, -1) * scale
    for image in (array.astype(np.float32), torch.from_numpy(array).permute(2, 0, 1).float()):
        loaded = load_image(image)
        assert loaded.mode == "RGB" and loaded.size == (4, 3)
        np.testing.assert_array_equal(np.asarray(loaded)[..., 0], EXPECTED_8BIT)


def test_wide_integer_arrays_are_scaled_by_their_depth():
    np.testing.assert_array_equal(
        np.asarray(load_image(np.round(GRADIENT * 65535).astype(np.uint16)))[..., 1], EXPECTED_8BIT
    )
    assert load_image(torch.full((3, 2, 2), 200)).getpixel((0, 0)) == (200, 200, 200)  # int64 holding 8-bit values


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


@pytest.mark.parametrize(
    "source", [f"data:image/png;base64,{NOT_AN_IMAGE}", "data:image/png;base64,@@@@", NOT_AN_IMAGE]
)
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


def png_header(width: int, height: int) -> bytes:
    """A PNG file whose header says `width` x `height`, with a few bytes of pixel data: small to send, and enormous
    to decode (a decompression bomb reads the same up to its header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


class ImageHost:
    """An HTTP server on 127.0.0.1, in a thread, answering each path added with `add` (after its delay)."""

    def __init__(self):
        self.routes: dict[str, tuple] = {}
        self.requested: set[str] = set()  # the paths asked for so far
        routes, requested = self.routes, self.requested

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requested.add(self.path)
                delay, status, headers, body = routes.get(self.path, (0, 404, {}, b"not found"))
                time.sleep(delay)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                with contextlib.suppress(ConnectionError):  # a client that gave up
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # a handler still sleeping does not hold up `close`
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes = b"", delay: float = 0.0, status: int = 200, headers=None) -> str:
        self.routes[path] = (delay, status, headers or {}, body)
        return self.url + path

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def image_host(monkeypatch):
    """An `ImageHost`; proxies bypassed for it, so nothing leaves the machine."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    host = ImageHost()
    yield host
    host.close()


def test_http_urls_are_downloaded(image_host):
    assert load_image(image_host.add("/cat.png", png_bytes((1, 2, 3)))).getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(FileNotFoundError, match="HTTP 404.*gone.png"):
        load_image(f"{image_host.url}/gone.png")
    with pytest.raises(ValueError, match="junk.png.*corrupt or not an image"):
        load_image(image_host.add("/junk.png", b"not an image"))


# --- image-source policies: what a server lets its clients name -----------------------------------------------------

CLOSED = ImageSourcePolicy(local_files=False, allow_remote=False, allow_private_addresses=False)


@pytest.fixture
def policy():
    """Installs a policy for one test (`policy(...)`), and the program's default again after it."""
    yield lambda **fields: set_image_source_policy(replace(CLOSED, **fields))
    set_image_source_policy(ImageSourcePolicy())


def test_the_default_policy_reads_what_the_program_can():
    assert image_source_policy() == ImageSourcePolicy()
    assert ImageSourcePolicy().local_files and ImageSourcePolicy().allow_private_addresses


def test_a_closed_policy_reads_inline_images_only(policy, tmp_path, image_host):
    policy()
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes())
    encoded = base64.b64encode(png_bytes()).decode()
    for source in (f"data:image/png;base64,{encoded}", encoded):
        assert load_image(source).getpixel((0, 0)) == (10, 20, 30)
    for source in (path, str(path), path.as_uri(), "cat.png"):
        with pytest.raises(ImageSourceNotAllowedError, match="--allow-local-images DIR"):
            load_image(source)
    with pytest.raises(ImageSourceNotAllowedError, match="--allow-remote-images"):
        load_image(image_host.add("/cat.png", png_bytes()))


def test_local_files_are_read_from_the_allowed_folder_only(policy, tmp_path):
    folder, outside = tmp_path / "images", tmp_path / "secret.png"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "cat.png").write_bytes(png_bytes())
    outside.write_bytes(png_bytes((1, 1, 1)))
    (folder / "link.png").symlink_to(outside)
    policy(local_files=True, local_root=folder)
    for source in (
        folder / "sub" / "cat.png",
        (folder / "sub" / "cat.png").as_uri(),
        "sub/cat.png",
        "sub/../sub/cat.png",
    ):
        assert load_image(source).getpixel((0, 0)) == (10, 20, 30)
    for source in (outside, outside.as_uri(), "../secret.png", "link.png", "sub/../../secret.png", "/etc/passwd"):
        with pytest.raises(ImageSourceNotAllowedError, match="outside the image folder"):
            load_image(source)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image("missing.png")


def test_remote_images_from_loopback_need_private_addresses_allowed(policy, image_host):
    url = image_host.add("/cat.png", png_bytes())
    policy(allow_remote=True)
    with pytest.raises(ImageSourceNotAllowedError, match=r"127\.0\.0\.1.*--allow-private-addresses"):
        load_image(url)
    with pytest.raises(ImageSourceNotAllowedError, match="--allow-private-addresses"):
        load_image(url.replace("127.0.0.1", "localhost"))
    policy(allow_remote=True, allow_private_addresses=True)
    assert load_image(url).getpixel((0, 0)) == (10, 20, 30)


def test_redirects_are_checked_like_the_first_address(policy, image_host, monkeypatch):
    """A public-looking first host (here one the check is told to pass) may not redirect to a private address."""
    checked = image_inputs.public_address
    monkeypatch.setattr(
        image_inputs, "public_address", lambda host, port: "127.0.0.1" if host == "x.test" else checked(host, port)
    )
    target = image_host.add("/cat.png", png_bytes())
    first = image_host.add("/redirect", status=302, headers={"Location": target}).replace("127.0.0.1", "x.test")
    image_host.add("/to-ftp", status=302, headers={"Location": "ftp://127.0.0.1/cat.png"})
    image_host.add("/to-file", status=302, headers={"Location": "file:///etc/passwd"})
    policy(allow_remote=True)
    with pytest.raises(ImageSourceNotAllowedError, match="127.0.0.1"):
        load_image(first)
    policy(allow_remote=True, allow_private_addresses=True)
    with pytest.raises(ImageSourceNotAllowedError, match="only http"):
        load_image(f"{image_host.url}/to-ftp")
    with pytest.raises(ConnectionError, match="is not allowed"):  # urllib's own refusal
        load_image(f"{image_host.url}/to-file")


def test_downloads_time_out(policy, image_host):
    policy(allow_remote=True, allow_private_addresses=True, timeout=0.5)
    url = image_host.add("/slow.png", png_bytes(), delay=3)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="timed out"):
        load_image(url)
    assert time.monotonic() - start < 2.5


@pytest.mark.parametrize("where", ["data_uri", "base64", "file", "url"])
def test_image_files_over_the_byte_cap_are_refused_before_decoding(policy, tmp_path, image_host, where):
    data = png_bytes() + b"\0" * 2000  # PIL reads past trailing bytes: a valid image of 2 KB
    path = tmp_path / "big.png"
    path.write_bytes(data)
    encoded = base64.b64encode(data).decode()
    sources = {"data_uri": f"data:image/png;base64,{encoded}", "base64": encoded, "file": str(path)}
    sources["url"] = image_host.add("/big.png", data)
    policy(local_files=True, local_root=tmp_path, allow_remote=True, allow_private_addresses=True, max_bytes=1000)
    with pytest.raises(ImageTooLargeError, match="--max-image-bytes"):
        load_image(sources[where])
    policy(local_files=True, local_root=tmp_path, allow_remote=True, allow_private_addresses=True, max_bytes=4000)
    assert load_image(sources[where]).size == (3, 2)


def test_images_over_the_pixel_cap_are_refused_from_their_header(policy):
    policy(max_pixels=10_000)
    header_only = base64.b64encode(png_header(101, 100)).decode()
    with pytest.raises(ImageTooLargeError, match="101 x 100 pixels.*--max-image-pixels"):
        load_image(header_only)  # decoding would fail: the pixel data is missing
    bomb = base64.b64encode(png_header(20_000, 20_000)).decode()
    policy(max_pixels=None)  # PIL's own limit then
    with pytest.raises(ImageTooLargeError, match="too large to decode safely"):
        load_image(bomb)
