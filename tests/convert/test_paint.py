"""Converting the original VisCPM-Paint checkpoint into a diffusers folder, checked against the original's vectors."""

import json
import logging
import shutil

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from parity import PARITY_DIR, json_file, require_parity, tensors
from safetensors.torch import load_file, save_file

from viscpm_hf import CpmBeeModel, CpmBeeTokenizer, VisCPMPaintPipeline, VisCPMTransBlock
from viscpm_hf.convert.cli import main
from viscpm_hf.convert.paint import (
    MODEL_INDEX,
    build_unet,
    convert_paint,
    plan_conversion,
    text_encoder_config,
)
from viscpm_hf.models.cpmbee.prompt_cpmbee import paint_prompts


CASES = ["cat_zh_noneg", "sunset_en_neg", "astronaut_zh_emptyneg", "ext_oov", "ink_long_neg"]
COMPONENTS = {
    "text_encoder": CpmBeeModel, "transblock": VisCPMTransBlock, "unet": UNet2DConditionModel, "vae": AutoencoderKL,
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The golden vectors were made with one thread; it is also much faster for these tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_configs() -> dict:
    return {
        "llm_config": json_file("configs.json")["cpmbee_tiny"],
        "unet_config": json.loads((require_parity() / "paint_tiny" / "unet" / "config.json").read_text()),
    }


def tiny_arguments() -> tuple:
    return PARITY_DIR / "cpmbee_vocab.txt", PARITY_DIR / "paint_tiny" / "vae"


@pytest.fixture(scope="module")
def original_weights() -> dict:
    """A full paint checkpoint: the tiny paint file's unet.* and trans_block.*, the tiny chat file's llm.*."""
    require_parity()
    llm = {k: v for k, v in load_file(PARITY_DIR / "viscpm_chat_tiny.safetensors").items() if k.startswith("llm.")}
    return {**llm, **load_file(PARITY_DIR / "viscpm_paint_tiny.safetensors")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, original_weights):
    folder = tmp_path_factory.mktemp("paint")
    checkpoint = folder / "original" / "viscpm_paint_tiny.safetensors"
    checkpoint.parent.mkdir()
    save_file(original_weights, str(checkpoint))
    output = folder / "viscpm-paint-tiny"
    convert_paint(checkpoint, *tiny_arguments(), output, max_shard_size="1MB", **tiny_configs())
    return output


@pytest.fixture(scope="module")
def components(converted) -> dict:
    loaded = {name: cls.from_pretrained(converted / name).eval() for name, cls in COMPONENTS.items()}
    loaded["tokenizer"] = CpmBeeTokenizer.from_pretrained(converted / "tokenizer")
    loaded["scheduler"] = DDPMScheduler.from_pretrained(converted / "scheduler")
    return loaded


# --- the converted folder -----------------------------------------------------------------------------------


def test_folder_layout_and_model_index(converted):
    model_index = json.loads((converted / "model_index.json").read_text())
    assert model_index == {**MODEL_INDEX, "_diffusers_version": diffusers.__version__}
    assert model_index["scheduler"] == ["diffusers", "DDPMScheduler"] and model_index["reranker"] == [None, None]
    assert {p.name for p in converted.iterdir()} == {
        "model_index.json", "README.md", "conversion.json", "tokenizer", "text_encoder", "transblock", "unet", "vae",
        "scheduler",
    }  # fmt: skip
    # 1MB shards: the LLM and UNet are sharded, each with the index its library looks for.
    assert (converted / "text_encoder" / "model.safetensors.index.json").is_file()
    assert (converted / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (converted / "transblock" / "diffusion_pytorch_model.safetensors").is_file()
    assert {p.name for p in (converted / "scheduler").iterdir()} == {"scheduler_config.json"}
    assert not list(converted.rglob("*.bin")) and not list(converted.rglob("*.pt"))
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no partial folder left
    card = (converted / "README.md").read_text()
    assert "library_name: diffusers" in card and "pipeline_tag: text-to-image" in card
    assert 'VisCPMPaintPipeline.from_pretrained("viscpm-paint-tiny"' in card and "import viscpm_hf" in card
    assert "CreativeML Open RAIL++-M" in card and "non-commercial" in card


def test_components_load_with_their_own_loaders(components, original_weights):
    assert isinstance(components["tokenizer"], CpmBeeTokenizer) and components["tokenizer"].vocab_size == 86583
    text_encoder, transblock = components["text_encoder"], components["transblock"]
    assert text_encoder.config.hidden_size == 64 and text_encoder.config.use_cache is False
    assert transblock.config.in_features == 64 and transblock.config.out_features == 32
    assert transblock.config.layer_norm_eps == 1e-6 and transblock.projection.weight.dtype == torch.float32
    assert torch.equal(transblock.projection.weight, original_weights["trans_block.w_out_res.weight"])
    assert torch.equal(transblock.layer_norm.bias, original_weights["trans_block.layernorm.bias"])
    assert torch.equal(text_encoder.embed_tokens.weight, original_weights["llm.input_embedding.weight"])
    assert torch.equal(text_encoder.norm.weight, original_weights["llm.encoder.output_layernorm.weight"])
    for name in ("unet", "vae"):
        expected = load_file(PARITY_DIR / "paint_tiny" / name / "diffusion_pytorch_model.safetensors")
        state = components[name].state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state), name
    assert components["vae"].config.scaling_factor == 0.18215


def test_scheduler_reproduces_the_originals_timesteps(components):
    scheduler = components["scheduler"]
    assert scheduler.config.steps_offset == 0 and scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.prediction_type == "epsilon"
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [750, 500, 250, 0]
    assert all(case["timesteps"] == [750, 500, 250, 0] for case in json_file("paint.json")["cases"].values())
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(980, -1, -20))
    # SD-2.1's value survives a swap of scheduler (DDIM's default is True)
    assert DDIMScheduler.from_config(scheduler.config).config.set_alpha_to_one is False


# --- parity with the original ------------------------------------------------------------------------------


def conditioning(components, case: dict) -> dict:
    cond, uncond = paint_prompts(components["tokenizer"], case["prompt"], case["negative_prompt"])
    out = {}
    with torch.no_grad():
        for name, batch in (("cond", cond), ("uncond", uncond)):
            out[f"{name}_llm_hidden_states"] = components["text_encoder"](**batch.model_inputs()).last_hidden_state
            out[f"{name}_trans_block_out"] = components["transblock"](out[f"{name}_llm_hidden_states"])
    out["encoder_hidden_states"] = torch.cat([out["uncond_trans_block_out"], out["cond_trans_block_out"]])
    return out


@pytest.mark.parametrize("name", CASES)
def test_conditioning_matches_the_original(components, name):
    case = json_file("paint.json")["cases"][name]
    stored = tensors("paint.safetensors")
    out = conditioning(components, case)
    assert out["encoder_hidden_states"].shape == (2, case["padded_len"], 32)
    for key, value in out.items():
        torch.testing.assert_close(value, stored[f"{name}.{key}"], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", CASES)
def test_unet_steps_match_the_original(components, name):
    case = json_file("paint.json")["cases"][name]
    stored = tensors("paint.safetensors")
    encoder_hidden_states = conditioning(components, case)["encoder_hidden_states"]  # the converted models' own
    for step, timestep in enumerate(case["timesteps"]):
        with torch.no_grad():
            noise = components["unet"](stored[f"{name}.unet_inputs"][step], timestep, encoder_hidden_states).sample
        expected = stored[f"{name}.unet_outputs"][step]
        torch.testing.assert_close(noise, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_the_pipeline_loads_the_folder_and_samples_as_the_original(converted):
    """The whole original run (4 DDPM steps, guidance 7.5, 32 x 32) from the converted folder."""
    case = json_file("paint.json")["cases"]["cat_zh_noneg"]
    stored = tensors("paint.safetensors")
    assert type(DiffusionPipeline.from_pretrained(converted)) is VisCPMPaintPipeline
    pipe = VisCPMPaintPipeline.from_pretrained(converted)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        case["prompt"],
        negative_prompt=case["negative_prompt"],
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(case["generator_seed"]),
        output_type="np",
    ).images
    torch.testing.assert_close(torch.from_numpy(image), stored["cat_zh_noneg.image_float"], rtol=0, atol=1e-5)


def test_folders_converted_before_the_caption_format_encode_the_same(converted, tmp_path):
    """Earlier conversions saved the tokenizer in its plain-text format and without a limit; CPM-Bee's tokenizer loads
    a Paint folder's in its caption format, so the old folder conditions the UNet exactly as a new one, and saving it
    writes the format. A plain-text tokenizer saved anywhere else stays plain text."""
    config_path = converted / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    assert (config["prompt_format"], config["model_max_length"]) == ("caption", 3000)
    old = tmp_path / "old"
    shutil.copytree(converted, old)
    config.update(prompt_format="text", model_max_length=int(1e30))  # what the converter wrote before
    (old / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    encoder_config = json.loads((old / "text_encoder" / "config.json").read_text())
    del encoder_config["max_position_embeddings"]  # nor did it write the encoder's limit
    (old / "text_encoder" / "config.json").write_text(json.dumps(encoder_config))
    assert CpmBeeTokenizer.from_pretrained(old / "tokenizer").prompt_format == "caption"
    assert CpmBeeTokenizer.from_pretrained(old, subfolder="tokenizer").prompt_format == "caption"
    shutil.copytree(old / "tokenizer", tmp_path / "alone")
    assert CpmBeeTokenizer.from_pretrained(tmp_path / "alone").prompt_format == "text"
    new_pipe, old_pipe = VisCPMPaintPipeline.from_pretrained(converted), VisCPMPaintPipeline.from_pretrained(old)
    assert old_pipe.tokenizer.prompt_format == "caption"
    assert old_pipe.max_prompt_length == new_pipe.max_prompt_length == 3000
    for name in ("ink_long_neg", "ext_oov"):
        case = json_file("paint.json")["cases"][name]
        arguments = (case["prompt"], "cpu", 1, True, case["negative_prompt"])
        for new, before in zip(new_pipe.encode_prompt(*arguments), old_pipe.encode_prompt(*arguments)):
            assert torch.equal(new, before), name
    old_pipe.save_pretrained(tmp_path / "saved_again")
    saved = json.loads((tmp_path / "saved_again" / "tokenizer" / "tokenizer_config.json").read_text())
    assert saved["prompt_format"] == "caption"


def test_a_20000_character_prompt_reaches_the_text_encoder_cut_to_its_limit(converted, caplog):
    """The converted encoder knows its limit (the original LLM's 3000 prompt tokens), so a prompt and a negative prompt
    of 20,000 characters cost what two legal 3000-token prompts cost, caption structure kept, whatever the tokenizer's
    own limit."""
    assert text_encoder_config().max_position_embeddings == 3000
    assert json.loads((converted / "text_encoder" / "config.json").read_text())["max_position_embeddings"] == 3000
    pipe = VisCPMPaintPipeline.from_pretrained(converted)
    pipe.tokenizer.model_max_length = int(1e30)  # a tokenizer that sets no limit: the encoder's still holds
    assert pipe.max_prompt_length == 3000

    class Stop(Exception):
        pass

    def stop(module, args, kwargs):
        read.append(kwargs["input_ids"])
        raise Stop

    read = []
    pipe.text_encoder.register_forward_pre_hook(stop, with_kwargs=True)
    text = ("一只可爱的猫 a lighthouse at dawn 🐱 " * 1000)[:20000]
    with caplog.at_level(logging.WARNING), pytest.raises(Stop):
        pipe.encode_prompt(text, "cpu", 1, True, text[::-1])
    assert read[0].shape == (2, 3000)
    suffix = pipe.tokenizer(["a cat"])["input_ids"][0][-len(pipe.tokenizer.suffix_tokens) :]
    assert read[0][:, -len(suffix) :].tolist() == [suffix, suffix]  # the caption's end and the 'objects' segments
    assert caplog.text.count("is longer than the 3000 tokens the text encoder reads") == 2


class RealKeyLayout:
    """The released paint checkpoint's names and shapes (no tensors): llm.* and trans_block.* from the parity data,
    unet.* from SD-2.1-base's UNet."""

    path = PARITY_DIR / "real_checkpoint_keys.json"

    def __init__(self):
        layout = json_file("real_checkpoint_keys.json")["paint_checkpoint_without_unet"]
        self.shapes = {key: tuple(shape) for key, (shape, _) in layout.items()}
        self.shapes.update({f"unet.{k}": tuple(v.shape) for k, v in build_unet().state_dict().items()})

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]


def test_the_released_checkpoint_layout_converts_completely():
    layout = RealKeyLayout()
    unet = build_unet()
    config = text_encoder_config()
    with torch.device("meta"):
        text_encoder = CpmBeeModel(config)
        transblock = VisCPMTransBlock(config.hidden_size, unet.config.cross_attention_dim)
    plan = plan_conversion(layout, {"text_encoder": text_encoder, "transblock": transblock, "unet": unet})
    assert sum(len(pairs) for pairs in plan.values()) == len(layout.keys())
    assert len(plan["transblock"]) == 3 and len(plan["text_encoder"]) == 435
    assert unet.num_parameters() == 865_910_724  # Stable Diffusion 2.x's UNet


# --- other inputs ------------------------------------------------------------------------------------------


def write_json(folder, name, data):
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def test_pickled_checkpoint_converts_alike_through_the_cli(tmp_path, originals, original_weights, converted):
    path = originals / "viscpm_paint_balance_checkpoint.pt"
    torch.save({k: v.half() if k.startswith("llm.") else v for k, v in original_weights.items()}, path)  # as released
    vocab, vae = tiny_arguments()
    configs = tiny_configs()
    output = tmp_path / "from-pt"
    assert main(["paint", "--checkpoint", str(path), "--vocab", str(vocab), "--vae", str(vae), "--output", str(output),
                 "--llm-config", str(write_json(originals, "llm.json", configs["llm_config"])),
                 "--unet-config", str(write_json(originals, "unet.json", configs["unet_config"])),
                 "--dtype", "float32"]) == 0  # fmt: skip
    for name, cls in COMPONENTS.items():
        a = cls.from_pretrained(output / name).state_dict()
        b = cls.from_pretrained(converted / name).state_dict()
        assert a.keys() == b.keys(), name
        if name == "text_encoder":  # went through float16
            assert all(torch.equal(a[k], b[k].half().float()) for k in a)
        else:
            assert all(torch.equal(a[k], b[k]) for k in a), name
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # 1GB shards: one file


def test_float16_llm_is_kept_unless_cast(tmp_path, originals, original_weights):
    path = originals / "paint.safetensors"
    save_file({k: v.half() if k.startswith("llm.") else v for k, v in original_weights.items()}, str(path))
    output = convert_paint(path, *tiny_arguments(), tmp_path / "out", **tiny_configs())
    assert json.loads((output / "text_encoder" / "config.json").read_text())["dtype"] == "float16"
    assert CpmBeeModel.from_pretrained(output / "text_encoder", dtype="auto").dtype == torch.float16
    transblock = load_file(output / "transblock" / "diffusion_pytorch_model.safetensors")
    assert transblock["projection.weight"].dtype == torch.float32
    assert load_file(output / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].dtype == torch.float32


def test_a_file_that_is_not_a_checkpoint(tmp_path, originals):
    bogus = originals / "model.pt"
    bogus.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        convert_paint(bogus, *tiny_arguments(), tmp_path / "out", **tiny_configs())
    assert not (tmp_path / "out").exists()


def test_missing_files(tmp_path, originals, original_weights):
    path = originals / "paint.safetensors"
    save_file(original_weights, str(path))
    vocab, vae = tiny_arguments()
    with pytest.raises(FileNotFoundError, match="Checkpoint not found"):
        convert_paint(originals / "nope.pt", vocab, vae, tmp_path / "out", **tiny_configs())
    with pytest.raises(FileNotFoundError, match="Vocabulary not found"):
        convert_paint(path, tmp_path / "bee.txt", vae, tmp_path / "out", **tiny_configs())
    with pytest.raises(FileNotFoundError, match="VAE folder not found.*stable-diffusion-2-1-base"):
        convert_paint(path, vocab, tmp_path / "no-vae", tmp_path / "out", **tiny_configs())
    assert not (tmp_path / "out").exists()


def test_bad_vae_folders(tmp_path, originals, original_weights):
    path = originals / "paint.safetensors"
    save_file(original_weights, str(path))
    vocab, vae = tiny_arguments()
    pickled = tmp_path / "sd21" / "vae"  # a Stable Diffusion repo root is accepted: its vae/ is used
    pickled.mkdir(parents=True)
    shutil.copy(vae / "config.json", pickled)
    torch.save(load_file(vae / "diffusion_pytorch_model.safetensors"), pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights only"):
        convert_paint(path, vocab, tmp_path / "sd21", tmp_path / "out", **tiny_configs())

    other_scale = tmp_path / "other-scale"
    other_scale.mkdir()
    shutil.copy(vae / "diffusion_pytorch_model.safetensors", other_scale)
    write_json(other_scale, "config.json", {**json.loads((vae / "config.json").read_text()), "scaling_factor": 0.13025})
    with pytest.raises(ValueError, match="scaling_factor is 0.13025"):
        convert_paint(path, vocab, other_scale, tmp_path / "out", **tiny_configs())

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    shutil.copy(vae / "config.json", truncated)
    weights = load_file(vae / "diffusion_pytorch_model.safetensors")
    del weights["decoder.conv_in.bias"]
    save_file(weights, str(truncated / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \(1.*vae: decoder.conv_in.bias"):
        convert_paint(path, vocab, truncated, tmp_path / "out", **tiny_configs())
    assert not (tmp_path / "out").exists()


def test_old_vae_attention_names_are_renamed(tmp_path, originals, original_weights):
    """VAEs saved by diffusers < 0.14 (SD-2.1's own files) name the mid-block attention query/key/value/proj_attn."""
    path = originals / "paint.safetensors"
    save_file(original_weights, str(path))
    vocab, vae = tiny_arguments()
    old = tmp_path / "old-vae"
    old.mkdir()
    shutil.copy(vae / "config.json", old)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    weights = load_file(vae / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for key, value in weights.items():
        for new, legacy in renames.items():
            key = key.replace(new, legacy) if ".attentions." in key else key
        renamed[key] = value
    assert renamed.keys() != weights.keys()
    save_file(renamed, str(old / "diffusion_pytorch_model.safetensors"))
    output = convert_paint(path, vocab, old, tmp_path / "out", **tiny_configs())
    assert load_file(output / "vae" / "diffusion_pytorch_model.safetensors").keys() == weights.keys()


def test_missing_unexpected_and_misshapen_keys_are_all_reported(tmp_path, originals, original_weights):
    broken = dict(original_weights)
    del broken["trans_block.layernorm.bias"]
    del broken["llm.encoder.layers.1.ffn.ffn.w_out.weight"]
    broken["unet.extra.weight"] = torch.zeros(1)
    broken["vpm.beit3.something"] = torch.zeros(1)
    broken["unet.conv_in.weight"] = torch.zeros(3, 3)
    path = originals / "broken.safetensors"
    save_file(broken, str(path))
    with pytest.raises(ValueError) as error:
        convert_paint(path, *tiny_arguments(), tmp_path / "out", **tiny_configs())
    message = str(error.value)
    assert "transblock: layer_norm.bias" in message and "text_encoder: layers.1.mlp.down_proj.weight" in message
    assert "unet.extra.weight" in message and "vpm.beit3.something" in message
    assert "unet.conv_in.weight: (3, 3)" in message and "unet: conv_in.weight" not in message
    assert "VisCPM-Paint checkpoint" in message
    assert not (tmp_path / "out").exists()


def test_a_chat_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"missing keys .*unet: .*unexpected keys .*'query'.*viscpm-convert chat"):
        convert_paint(
            PARITY_DIR / "viscpm_chat_tiny.safetensors", *tiny_arguments(), tmp_path / "out", **tiny_configs()
        )


def test_existing_output_is_kept_unless_overwrite(tmp_path, originals, original_weights, converted):
    path = originals / "paint.safetensors"
    save_file(original_weights, str(path))
    vocab, vae = tiny_arguments()
    output = tmp_path / "existing"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_paint(path, vocab, vae, output, **tiny_configs())
    assert (output / "keep.txt").read_text() == "user data"
    convert_paint(path, vocab, vae, output, overwrite=True, **tiny_configs())
    assert not (output / "keep.txt").exists() and (output / "model_index.json").is_file()
