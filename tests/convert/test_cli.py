"""`viscpm-convert` as a user runs it: what it refuses, what it reports, and that it never destroys an input."""

import json
import shutil

import pytest
import torch
from fake_hub import FakeHub
from huggingface_hub import HfApi, ModelCard
from parity import PARITY_DIR, json_file, require_parity
from safetensors.torch import load_file, save_file

from viscpm_hf.convert.cli import main
from viscpm_hf.hub import is_pickle


@pytest.fixture(scope="module")
def chat_weights() -> dict:
    return load_file(require_parity() / "viscpm_chat_tiny.safetensors")


@pytest.fixture
def release(tmp_path):
    """A folder as a user downloads it: the checkpoint, its configs and a file of theirs."""
    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(PARITY_DIR / "viscpm_chat_tiny.safetensors", folder / "viscpm_chat.safetensors")
    configs = json_file("configs.json")
    (folder / "llm.json").write_text(json.dumps(configs["cpmbee_tiny"]))
    (folder / "vision.json").write_text(json.dumps(configs["beit3_tiny"]))
    (folder / "notes.txt").write_text("user data")
    return folder


def chat_args(checkpoint, output, *extra, configs=None) -> list[str]:
    configs = configs or checkpoint.parent
    return ["chat", "--checkpoint", str(checkpoint), "--vocab", str(PARITY_DIR / "cpmbee_vocab.txt"), "--output",
            str(output), "--llm-config", str(configs / "llm.json"), "--vision-config", str(configs / "vision.json"),
            *extra]  # fmt: skip


def contents(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["the checkpoint's folder", "a folder above it", "a link to it"])
def test_overwrite_onto_the_folder_holding_the_checkpoint_is_refused_and_deletes_nothing(tmp_path, release, capsys, where):
    output = {"the checkpoint's folder": release, "a folder above it": tmp_path, "a link to it": tmp_path / "link"}[where]
    (tmp_path / "link").symlink_to(release)
    before = contents(release)
    assert main(chat_args(release / "viscpm_chat.safetensors", output, "--overwrite")) == 1
    assert "holds the input" in capsys.readouterr().err
    assert contents(release) == before


def test_a_config_file_inside_the_output_is_protected_too(tmp_path, release, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("llm.json", "vision.json"):
        shutil.move(release / name, configs / name)
    assert main(chat_args(release / "viscpm_chat.safetensors", configs, "--overwrite", configs=configs)) == 1
    assert "holds the input" in capsys.readouterr().err and (configs / "llm.json").is_file()


def test_the_readmes_command_converts_in_the_folder_holding_the_downloaded_files(
    release, chat_weights, monkeypatch, capsys
):
    """`viscpm-convert chat --checkpoint viscpm_chat_balance_checkpoint.pt --vocab bee.txt --output
    viscpm-chat-balance`, run where both files were downloaded (plus the tiny model's configs, which the released
    model does not need): a new folder beside the inputs destroys nothing and mixes with nothing."""
    torch.save(chat_weights, release / "viscpm_chat_balance_checkpoint.pt")
    shutil.copy(PARITY_DIR / "cpmbee_vocab.txt", release / "bee.txt")
    before = contents(release)
    monkeypatch.chdir(release)
    args = ["chat", "--checkpoint", "viscpm_chat_balance_checkpoint.pt", "--vocab", "bee.txt", "--output",
            "viscpm-chat-balance", "--llm-config", "llm.json", "--vision-config", "vision.json"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert (release / "viscpm-chat-balance" / "model.safetensors").is_file()
    # Deeper in a new folder is as fine; the release folder itself is still refused, even with --overwrite.
    assert main([*args[:6], "converted/viscpm-chat-balance", *args[7:]]) == 0
    assert (release / "converted" / "viscpm-chat-balance" / "model.safetensors").is_file()
    assert main([*args[:6], ".", *args[7:], "--overwrite"]) == 1
    assert "holds the input" in capsys.readouterr().err
    assert {name: data for name, data in contents(release).items() if name in before} == before


def test_paint_converts_beside_its_inputs_in_their_folder(tmp_path, chat_weights, monkeypatch, capsys):
    release = tmp_path / "release"
    release.mkdir()
    weights = {k: v for k, v in chat_weights.items() if k.startswith("llm.")}
    save_file({**weights, **load_file(PARITY_DIR / "viscpm_paint_tiny.safetensors")}, release / "paint.safetensors")
    shutil.copy(PARITY_DIR / "cpmbee_vocab.txt", release / "bee.txt")
    shutil.copytree(PARITY_DIR / "paint_tiny" / "vae", release / "vae")
    monkeypatch.chdir(release)
    unet_config = PARITY_DIR / "paint_tiny" / "unet" / "config.json"
    args = ["paint", "--checkpoint", "paint.safetensors", "--vocab", "bee.txt", "--vae", "vae", "--output",
            "viscpm-paint-balance", "--unet-config", str(unet_config)]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert (release / "viscpm-paint-balance" / "model_index.json").is_file()


def test_an_output_that_is_a_file_is_an_error_not_a_traceback(tmp_path, release, capsys):
    (tmp_path / "notes.txt").write_text("user data")
    assert main(chat_args(release / "viscpm_chat.safetensors", tmp_path / "notes.txt", "--overwrite")) == 1
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(chat_args(release / "viscpm_chat.safetensors", tmp_path / "notes.txt" / "out")) == 1
    assert "notes.txt' is a file" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "user data"


def test_a_key_that_is_not_a_string_is_an_error_not_a_traceback(tmp_path, originals, release, chat_weights, capsys):
    torch.save({**chat_weights, 7: torch.zeros(1)}, originals / "odd.pt")
    assert main(chat_args(originals / "odd.pt", tmp_path / "out", configs=release)) == 1
    assert "1 keys that are not strings: 7 (int)" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_complex_tensor_is_an_error_not_a_traceback(tmp_path, originals, release, chat_weights, capsys):
    save_file({**chat_weights, "mapping.0.bias": torch.zeros(64, dtype=torch.complex64)}, str(originals / "odd.safetensors"))
    assert main(chat_args(originals / "odd.safetensors", tmp_path / "out", configs=release)) == 1
    assert "['mapping.0.bias: dtype C64']" in capsys.readouterr().err


def test_integer_weights_are_refused(tmp_path, originals, release, chat_weights, capsys):
    save_file({**chat_weights, "mapping.0.bias": torch.zeros(64, dtype=torch.int32)}, str(originals / "int.safetensors"))
    assert main(chat_args(originals / "int.safetensors", tmp_path / "out", configs=release)) == 1
    assert "stores 1 weights as integers or booleans: ['mapping.0.bias: int32']" in capsys.readouterr().err


def test_check_refuses_non_finite_weights_and_keeps_the_old_output(tmp_path, originals, release, chat_weights, capsys):
    weights = dict(chat_weights)
    weights["llm.encoder.layers.1.ffn.ffn.w_out.weight"] = weights["llm.encoder.layers.1.ffn.ffn.w_out.weight"].clone()
    weights["llm.encoder.layers.1.ffn.ffn.w_out.weight"][0, :3] = float("nan")
    weights["mapping.2.bias"] = torch.full((64,), float("-inf"))
    save_file(weights, str(originals / "nan.safetensors"))
    output = tmp_path / "out"
    output.mkdir()
    (output / "previous.txt").write_text("previous conversion")
    assert main(chat_args(originals / "nan.safetensors", output, "--overwrite", "--check", configs=release)) == 1
    err = capsys.readouterr().err
    assert "--check: 2 tensors" in err and "Nothing was written" in err
    assert "'llm.encoder.layers.1.ffn.ffn.w_out.weight: 3 NaN, 0 inf of 8192'" in err
    assert "'mapping.2.bias: 0 NaN, 64 inf of 64'" in err
    assert contents(output) == {"previous.txt": b"previous conversion"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # Without --check the same file converts, as any other does.
    assert main(chat_args(originals / "nan.safetensors", output, "--overwrite", configs=release)) == 0
    assert load_file(output / "model.safetensors")["model.bridge.mapping.linear_2.bias"].isinf().all()


def test_check_passes_a_finite_checkpoint(tmp_path, release, capsys):
    assert main(chat_args(release / "viscpm_chat.safetensors", tmp_path / "out", "--check")) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'out'}"


def test_the_leftovers_of_a_dead_run_are_cleaned_and_said(tmp_path, release, capsys):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    partial = tmp_path / f".out.partial-{pid}"
    partial.mkdir()
    (partial / "model-00001-of-00009.safetensors").write_bytes(b"\0" * 100)
    assert main(chat_args(release / "viscpm_chat.safetensors", tmp_path / "out")) == 0
    assert f"note: removed .out.partial-{pid}, left by a conversion that did not finish (process {pid})" in capsys.readouterr().err
    assert not partial.exists()


def test_paint_refuses_an_output_inside_the_vae_folder(tmp_path, capsys):
    vae = tmp_path / "vae"
    shutil.copytree(PARITY_DIR / "paint_tiny" / "vae", vae)
    args = ["paint", "--checkpoint", str(PARITY_DIR / "viscpm_paint_tiny.safetensors"), "--vocab",
            str(PARITY_DIR / "cpmbee_vocab.txt"), "--vae", str(vae), "--output", str(vae / "pipeline")]  # fmt: skip
    assert main(args) == 1
    assert "lies inside the input folder" in capsys.readouterr().err and not (vae / "pipeline").exists()


def test_paint_check_names_the_non_finite_unet_and_vae_tensors(tmp_path, originals, chat_weights, capsys):
    weights = {k: v for k, v in chat_weights.items() if k.startswith("llm.")}
    weights.update(load_file(PARITY_DIR / "viscpm_paint_tiny.safetensors"))
    weights["unet.conv_in.bias"] = torch.full_like(weights["unet.conv_in.bias"], float("nan"))
    save_file(weights, str(originals / "paint.safetensors"))
    vae = tmp_path / "vae"
    shutil.copytree(PARITY_DIR / "paint_tiny" / "vae", vae)
    vae_weights = load_file(vae / "diffusion_pytorch_model.safetensors")
    vae_weights["decoder.conv_out.bias"] = torch.full_like(vae_weights["decoder.conv_out.bias"], float("inf"))
    save_file(vae_weights, str(vae / "diffusion_pytorch_model.safetensors"))
    args = ["paint", "--checkpoint", str(originals / "paint.safetensors"), "--vocab", str(PARITY_DIR / "cpmbee_vocab.txt"),
            "--vae", str(vae), "--output", str(tmp_path / "out"), "--unet-config",
            str(PARITY_DIR / "paint_tiny" / "unet" / "config.json"), "--check"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--check: 2 tensors" in err and "'unet.conv_in.bias: 32 NaN, 0 inf of 32'" in err
    assert "'diffusion_pytorch_model.safetensors: decoder.conv_out.bias: 0 NaN, 3 inf of 3'" in err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- --push_to_hub, up to the Hub's API ---------------------------------------------------------------------------


def test_push_to_hub_uploads_the_converted_folder_byte_for_byte_with_its_card(tmp_path, release, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    output = tmp_path / "viscpm-chat-tiny"
    args = ["--push_to_hub", "--hub_model_id", "org/viscpm-chat-tiny", "--hub_token", "hf_secret"]
    assert main(chat_args(release / "viscpm_chat.safetensors", output, *args)) == 0
    assert hub.repos == [{"repo_id": "org/viscpm-chat-tiny", "token": "hf_secret", "private": None, "exist_ok": True}]
    assert hub.commit["repo_id"] == "org/viscpm-chat-tiny" and hub.commit["token"] == "hf_secret"
    assert hub.commit["message"] == "viscpm-convert chat of viscpm_chat.safetensors"
    files = hub.commit["files"]
    assert files == contents(output) and {"model.safetensors", "config.json", "README.md", "vocab.txt"} <= set(files)
    assert not [name for name in files if is_pickle(output / name)]
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == "openbmb/VisCPM-Chat" and card.data.license_name == "general-model-license"
    assert 'AutoModelForImageTextToText.from_pretrained("org/viscpm-chat-tiny")' in card.text  # where it now lives
    out = capsys.readouterr().out
    assert f"wrote {output}\nuploaded to https://huggingface.co/org/viscpm-chat-tiny/commit/" in out


def test_push_to_hub_without_a_login_is_refused_before_converting(tmp_path, release, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)
    monkeypatch.setattr("viscpm_hf.hub.get_token", lambda: None)
    assert main(chat_args(release / "viscpm_chat.safetensors", tmp_path / "out", "--push-to-hub")) == 1
    err = capsys.readouterr().err
    assert "needs a Hugging Face token" in err and "hf auth login" in err
    assert not (tmp_path / "out").exists() and hub.repos == []
    assert main(chat_args(release / "viscpm_chat.safetensors", tmp_path / "out", "--push_to_hub", "--hub_model_id",
                          "a/b/c", "--hub_token", "hf_secret")) == 1  # fmt: skip
    assert "Repo id must" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_failed_upload_keeps_the_folder_and_says_how_to_upload_it(tmp_path, release, monkeypatch, capsys):
    hub = FakeHub(monkeypatch)

    def refuse(api, repo_id, operations, **kwargs):
        raise OSError("403 Forbidden: no write access")

    monkeypatch.setattr(HfApi, "create_commit", refuse)
    output = tmp_path / "viscpm-chat-tiny"
    args = ["--push-to-hub", "--hub-token", "hf_secret", "--hub-private-repo"]  # the converter's own spelling
    assert main(chat_args(release / "viscpm_chat.safetensors", output, *args)) == 1
    # The repo defaults to the output folder's name; --hub-private-repo asks for a private one.
    assert hub.repos == [{"repo_id": "viscpm-chat-tiny", "token": "hf_secret", "private": True, "exist_ok": True}]
    err = capsys.readouterr().err
    assert "Uploading to viscpm-chat-tiny failed (403 Forbidden: no write access)" in err
    assert f"upload it later with `hf upload viscpm-chat-tiny {output}`" in err and (output / "model.safetensors").is_file()
