"""`viscpm-serve`'s command line and server image policy, without a server (tests/test_serving.py runs them)."""

import json

import pytest
from PIL import Image
from transformers.utils.import_utils import is_serve_available


if not is_serve_available():
    pytest.skip("transformers serve needs its extras: pip install 'viscpm-hf[serve]'", allow_module_level=True)

from viscpm_hf import serving
from viscpm_hf.image_inputs import ImageSourceNotAllowedError
from viscpm_hf.integrations.transformers_serve import PREFETCHED, ServerImagePolicy, parse_request


def run_command(capsys, *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit:
        serving.main(list(argv))
    captured = capsys.readouterr()
    return exit.value.code, captured.out + captured.err


def test_the_help_gives_serves_options_and_the_image_options_with_their_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, text = run_command(capsys, "--help")
    assert code == 0
    for option in ("--port", "--device", "--allow-local-images", "--allow-remote-images", "--allow-private-addresses"):
        assert option in text
    for option, default in [("--max-image-pixels", "64000000"), ("--max-image-bytes", "20971520"),
                            ("--max-request-bytes", "67108864"), ("--image-timeout", "10.0")]:  # fmt: skip
        assert option in text and f"[default: {default}]" in text


def test_private_addresses_without_remote_images_is_a_usage_error(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    code, text = run_command(capsys, "some/folder", "--allow-private-addresses")
    assert code == 2 and "add --allow-remote-images" in text


def test_the_server_policy_reads_inline_images_only_by_default():
    policy = ServerImagePolicy()
    assert not (policy.local_files or policy.allow_remote or policy.allow_private_addresses)
    assert (policy.max_pixels, policy.max_bytes) == (64_000_000, 20 * 2**20)
    with pytest.raises(ImageSourceNotAllowedError, match="--allow-local-images"):
        policy.open("/etc/hosts")


def test_images_loaded_ahead_are_read_by_their_key_while_held():
    policy, image = ServerImagePolicy(), Image.new("RGB", (2, 2))
    [key] = policy.hold([image])
    assert key.startswith(PREFETCHED) and policy.open(key) is image
    policy.release([key])
    with pytest.raises(ValueError, match="names no image"):
        policy.open(key)


def test_requests_are_checked_before_serve_sees_them():
    turn = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
    assert parse_request(json.dumps({"messages": [turn]}).encode())["messages"] == [turn]
    for body, message in [
        (b"[]", "JSON list: send a JSON object"),
        (b'{"messages": "Hi"}', '`messages` is "Hi"'),
        (b'{"messages": [[]]}', "send a list of messages"),
        (b'{"messages": [{"role": "bot", "content": "Hi"}]}', "role 'bot'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_request(body)
