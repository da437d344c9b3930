"""Every size of a converted model comes from the checkpoint's shapes; config files only add what no shape says."""

import json
import shutil

import pytest
import torch
from parity import PARITY_DIR, json_file, require_parity
from safetensors.torch import load_file, save_file

from viscpm_hf import VisCPMChatForConditionalGeneration
from viscpm_hf.convert.chat import convert_chat, original_configs_from_checkpoint
from viscpm_hf.convert.paint import convert_paint
from viscpm_hf.convert.sizes import read_beit3_sizes, read_cpmbee_sizes, read_unet_sizes


@pytest.fixture(scope="module")
def chat_weights() -> dict:
    return load_file(require_parity() / "viscpm_chat_tiny.safetensors")


def released_shapes() -> dict:
    return {key: tuple(shape) for key, (shape, _) in json_file("real_checkpoint_keys.json")["chat_checkpoint"].items()}


def test_the_released_shapes_give_the_released_configs():
    configs = json_file("configs.json")
    shapes = released_shapes()
    llm = read_cpmbee_sizes(shapes)
    assert llm == {key: configs["cpmbee_real_10b"][key] for key in ("vocab_size", "dim_model", "num_heads", "dim_head", "dim_ff", "num_layers")}
    vision, queries = read_beit3_sizes(shapes)
    real = configs["beit3_real_large"]
    assert queries == configs["chat_real"]["query_num"] == 64
    assert vision == {
        "encoder_embed_dim": real["encoder_embed_dim"], "in_chans": 3, "patch_size": real["patch_size"],
        "img_size": real["img_size"], "max_source_positions": 1024, "encoder_ffn_embed_dim": real["encoder_ffn_embed_dim"],
        "encoder_layers": real["encoder_layers"],
    }  # fmt: skip
    _, vision_config, _ = original_configs_from_checkpoint(shapes)  # no config file: the heads follow the width
    assert vision_config["encoder_attention_heads"] == real["encoder_attention_heads"]


def smaller_variant(weights: dict) -> dict:
    """The tiny chat checkpoint cut down: 32 queries, one layer per tower, a 32 x 32 training image (7 positions)."""
    cut = {}
    for key, tensor in weights.items():
        if ".layers.1." in key:
            continue
        cut[key] = tensor
    cut["query"] = weights["query"][:32].clone()
    cut["vpm.beit3.encoder.embed_positions.A.weight"] = weights["vpm.beit3.encoder.embed_positions.A.weight"][:7].clone()
    return cut


def test_a_checkpoint_of_other_sizes_converts_without_config_files(tmp_path, originals, chat_weights):
    """Only BEiT-3's head count (48 wide: not the released 64-wide heads) shows in no shape."""
    weights = smaller_variant(chat_weights)
    save_file(weights, str(originals / "small.safetensors"))
    output = convert_chat(
        originals / "small.safetensors", PARITY_DIR / "cpmbee_vocab.txt", tmp_path / "out",
        vision_config={"encoder_attention_heads": 4},
    )  # fmt: skip
    config = json.loads((output / "config.json").read_text())
    assert config["num_query_tokens"] == 32
    vision, text = config["vision_config"], config["text_config"]
    assert (vision["num_query_tokens"], vision["num_hidden_layers"], vision["hidden_size"]) == (32, 1, 48)
    assert (vision["image_size"], vision["patch_size"], vision["intermediate_size"]) == (32, 16, 128)
    assert (text["num_hidden_layers"], text["hidden_size"], text["num_attention_heads"], text["head_dim"]) == (1, 64, 4, 16)
    assert text["intermediate_size"] == 128 and text["vocab_size"] == 86583
    processor = json.loads((output / "processor_config.json").read_text())
    assert processor["num_image_tokens"] == 32
    model = VisCPMChatForConditionalGeneration.from_pretrained(output)
    assert torch.equal(model.state_dict()["model.vision_tower.embeddings.query_tokens"], weights["query"])
    with torch.no_grad():
        features = model.get_image_features(torch.randn(1, 3, 32, 32)).pooler_output
    assert features.shape == (1, 32, 64)


def test_a_config_file_that_contradicts_the_shapes_is_refused_naming_both(tmp_path, originals, chat_weights):
    save_file(smaller_variant(chat_weights), str(originals / "small.safetensors"))
    configs = json_file("configs.json")
    with pytest.raises(ValueError, match=r"--llm-config does not describe .*num_layers: --llm-config says 2, the tensors 1"):
        convert_chat(
            originals / "small.safetensors", PARITY_DIR / "cpmbee_vocab.txt", tmp_path / "out", configs["cpmbee_tiny"],
            {"encoder_attention_heads": 4},
        )  # fmt: skip
    with pytest.raises(ValueError, match="encoder_attention_heads"):  # 48 wide: the head count cannot be guessed
        convert_chat(originals / "small.safetensors", PARITY_DIR / "cpmbee_vocab.txt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_misshapen_key_is_listed_only_as_misshapen(tmp_path, originals, chat_weights):
    weights = dict(chat_weights)
    weights["mapping.0.weight"] = torch.zeros(3, 3)
    save_file(weights, str(originals / "bad.safetensors"))
    configs = json_file("configs.json")
    with pytest.raises(ValueError) as error:
        convert_chat(
            originals / "bad.safetensors", PARITY_DIR / "cpmbee_vocab.txt", tmp_path / "out", configs["cpmbee_tiny"],
            configs["beit3_tiny"],
        )  # fmt: skip
    message = str(error.value)
    assert "wrong shapes (1): ['mapping.0.weight: (3, 3) (expected (64, 48))']" in message
    assert "missing" not in message and "unexpected" not in message


def test_a_vocabulary_larger_than_the_embedding_is_refused(tmp_path, originals, chat_weights):
    weights = dict(chat_weights)
    weights["llm.input_embedding.weight"] = weights["llm.input_embedding.weight"][:1000].clone()
    save_file(weights, str(originals / "small-vocab.safetensors"))
    with pytest.raises(ValueError, match=r"has 86583 entries but the embedding of .* only 1000 rows"):
        convert_chat(originals / "small-vocab.safetensors", PARITY_DIR / "cpmbee_vocab.txt", tmp_path / "out",
                     vision_config={"encoder_attention_heads": 4})  # fmt: skip


def paint_checkpoint(originals, chat_weights) -> tuple:
    weights = {k: v for k, v in chat_weights.items() if k.startswith("llm.")}
    weights.update(load_file(PARITY_DIR / "viscpm_paint_tiny.safetensors"))
    save_file(weights, str(originals / "paint.safetensors"))
    return originals / "paint.safetensors", PARITY_DIR / "cpmbee_vocab.txt", PARITY_DIR / "paint_tiny" / "vae"


def test_the_unet_config_is_read_from_its_tensors(tmp_path, originals, chat_weights):
    """Without --llm-config and with only the UNet's heads and sample size given, the converted UNet config is the
    one the tiny UNet was made with."""
    checkpoint, vocab, vae = paint_checkpoint(originals, chat_weights)
    unet_sizes = read_unet_sizes({k: tuple(v.shape) for k, v in load_file(checkpoint).items()}, prefix="unet.")
    tiny = json.loads((PARITY_DIR / "paint_tiny" / "unet" / "config.json").read_text())
    assert unet_sizes == {key: tiny[key] for key in unet_sizes} and len(unet_sizes) == 8
    output = convert_paint(checkpoint, vocab, vae, tmp_path / "out", unet_config={"attention_head_dim": [2, 4], "sample_size": 16})
    converted = json.loads((output / "unet" / "config.json").read_text())
    assert {k: v for k, v in converted.items() if not k.startswith("_")} == {k: v for k, v in tiny.items() if not k.startswith("_")}
    text = json.loads((output / "text_encoder" / "config.json").read_text())
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (64, 2, 4)


def test_unet_widths_without_a_head_count_ask_for_one(tmp_path, originals, chat_weights):
    checkpoint, vocab, vae = paint_checkpoint(originals, chat_weights)
    with pytest.raises(ValueError, match=r"blocks \[32, 64\] wide.*attention_head_dim"):
        convert_paint(checkpoint, vocab, vae, tmp_path / "out")


def test_a_vae_config_that_contradicts_its_weights_is_refused_naming_both(tmp_path, originals, chat_weights):
    checkpoint, vocab, vae = paint_checkpoint(originals, chat_weights)
    other = tmp_path / "vae"
    shutil.copytree(vae, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "block_out_channels": [32, 32]}))
    with pytest.raises(ValueError, match=r"config.json' does not describe its weights: block_out_channels: .* says \[32, 32\], the tensors \[32, 64\]"):
        convert_paint(checkpoint, vocab, other, tmp_path / "out", unet_config={"attention_head_dim": [2, 4]})
