"""VisCPM-Paint on diffusers' pipeline contracts: cross_attention_kwargs and LoRA loading, prompt truncation, optional
components, strict loading, float32 transblock, strict input checks, and threads."""

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tiny_paint import tiny_pipeline

from viscpm_hf import PixelShuffleAutoencoder, VisCPMPaintPipeline, VisCPMTransBlock


STEPS = {"num_inference_steps": 3}
LOGGER = "viscpm_hf.pipelines.viscpm_paint.pipeline_viscpm_paint"


@pytest.fixture
def pipe():
    return tiny_pipeline()


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def image(pipe, prompt="a cat", seed=0, **kwargs):
    return pipe(prompt, output_type="np", generator=generator(seed), **{**STEPS, **kwargs}).images


# --- cross_attention_kwargs and LoRA ------------------------------------------------------------------------


class ProbeProcessor(AttnProcessor2_0):
    """Records the extra argument that cross_attention_kwargs carries to every attention layer."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, probe=None):
        self.seen.append(probe)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_cross_attention_kwargs_reach_the_attention_processors(pipe):
    reference = image(pipe)
    seen = []
    pipe.unet.set_attn_processor(ProbeProcessor(seen))
    with_probe = image(pipe, cross_attention_kwargs={"probe": "here"})
    assert seen and set(seen) == {"here"}
    assert pipe.cross_attention_kwargs == {"probe": "here"}
    np.testing.assert_allclose(with_probe, reference, atol=1e-5)  # the same attention, only the argument added


@pytest.fixture
def lora_folder(tmp_path):
    """A random (non-zero) rank-4 LoRA of the UNet's cross-attention, saved the diffusers way."""
    unet = tiny_pipeline().unet
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=r".*\.attn2\.(to_q|to_k|to_v|to_out\.0)")
    unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    VisCPMPaintPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict())
    return tmp_path


def test_a_lora_loads_scales_fuses_and_unloads_as_in_stable_diffusion(pipe, lora_folder):
    base = image(pipe)
    pipe.load_lora_weights(lora_folder, adapter_name="style")
    assert pipe.get_active_adapters() == ["style"]
    full = image(pipe)
    assert np.abs(full - base).max() > 1e-3  # the LoRA changes the image
    np.testing.assert_array_equal(image(pipe, cross_attention_kwargs={"scale": 0.0}), base)  # scale 0: the base, exactly
    half = image(pipe, cross_attention_kwargs={"scale": 0.5})
    assert 1e-4 < np.abs(half - base).max() < np.abs(full - base).max()
    np.testing.assert_array_equal(image(pipe), full)  # the scale of one call does not stay
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(image(pipe), base)
    pipe.load_lora_weights(lora_folder)
    pipe.fuse_lora()
    np.testing.assert_allclose(image(pipe), full, atol=1e-4)  # fused == unfused (up to float rounding)
    pipe.unfuse_lora()  # subtracts the update again: the base weights up to rounding
    np.testing.assert_allclose(image(pipe, cross_attention_kwargs={"scale": 0.0}), base, atol=1e-4)


# --- prompt truncation ----------------------------------------------------------------------------------------


def test_long_prompts_are_truncated_to_the_encoders_positions_with_a_count(pipe, caplog):
    """A BERT encoder reads 128 positions; a 901-token prompt is cut to them, not crashed on."""
    assert pipe.max_prompt_length == 128
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        long, *_ = pipe.encode_prompt("x" * 900, do_classifier_free_guidance=False)
    assert "is longer than the 128 tokens the text encoder reads: 773 tokens were dropped" in caplog.text
    cut, *_ = pipe.encode_prompt("x" * 127, do_classifier_free_guidance=False)  # BOS + 127 bytes = 128 tokens
    torch.testing.assert_close(long, cut)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        image(pipe, "x" * 900, num_inference_steps=1)
        image(pipe, "x" * 127, num_inference_steps=1)
    assert caplog.text.count("tokens were dropped") == 1


def test_the_tokenizers_own_limit_counts_when_it_is_lower(pipe, caplog):
    pipe.tokenizer.model_max_length = 16
    assert pipe.max_prompt_length == 16
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        embeds, negative, *_ = pipe.encode_prompt("a red house by the sea", negative_prompt="x" * 40)
    assert embeds.shape[1] == negative.shape[1] == 16
    assert "7 tokens were dropped from its end: 'the sea'" in caplog.text  # BOS + 22 bytes: the last 7 go
    assert "25 tokens were dropped" in caplog.text  # the negative prompt is truncated too


def cpmbee_pipeline(pipe, max_position_embeddings=None):
    """The tiny pipeline with a CPM-Bee text encoder and its tokenizer in the caption format, as the converter saves it."""
    from parity import PARITY_DIR, require_parity

    from viscpm_hf import CpmBeeConfig, CpmBeeModel, CpmBeeTokenizer

    require_parity()
    tokenizer = CpmBeeTokenizer(vocab_file=str(PARITY_DIR / "cpmbee_vocab.txt"), prompt_format="caption")
    torch.manual_seed(0)
    config = CpmBeeConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          head_dim=8, intermediate_size=64, max_position_embeddings=max_position_embeddings)  # fmt: skip
    return VisCPMPaintPipeline(**{**pipe.components, "tokenizer": tokenizer, "text_encoder": CpmBeeModel(config).eval()})


def test_cpmbee_prompts_keep_their_structure_and_lose_caption_tokens_only(pipe, caplog):
    prompt = "a watercolor painting of a lighthouse at dawn, with gulls over the waves " * 3
    unlimited = cpmbee_pipeline(pipe)
    assert unlimited.max_prompt_length == 3000  # the caption limit: the encoder's relative positions set none
    limited = cpmbee_pipeline(pipe, max_position_embeddings=40)
    full = limited.tokenizer([prompt])["input_ids"][0]
    assert len(full) > 40
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        embeds, *_ = limited.encode_prompt(prompt, do_classifier_free_guidance=False)
    assert embeds.shape[1] == 40
    assert f"{len(full) - 40} tokens were dropped from its end: ' with gulls over the waves a watercolor" in caplog.text
    # What the text encoder read: the tokenizer's truncated caption prompt, whose structure stays.
    hidden, mask = limited.encode_text([prompt], device="cpu")
    inputs = limited.tokenizer([prompt], truncation=True, max_length=40, return_tensors="pt")
    assert inputs["input_ids"][0, -6:].tolist() == full[-6:]  # </s> of the caption, then the 'objects' segments
    expected = limited.text_encoder(**{k: inputs[k] for k in limited.tokenizer.model_input_names}).last_hidden_state
    torch.testing.assert_close(hidden, expected)
    assert mask.tolist() == [[1] * 40]


def test_cpmbee_pairs_condition_on_their_pad_rows_and_a_batch_equals_its_items(pipe):
    """As the original: a prompt and its negative are padded with <pad> to the longer of the two, and the UNet sees
    those rows; padding a batch adds beyond that is hidden, so each item conditions as it does alone."""
    bee = cpmbee_pipeline(pipe)
    prompts, negatives = ["a cat", "a much longer prompt about a small house by the sea"], ["blurry, dark", ""]
    embeds, negative, mask, negative_mask = bee.encode_prompt(prompts, "cpu", 1, True, negatives)
    for index in range(2):
        alone, alone_negative, alone_mask, alone_negative_mask = bee.encode_prompt(
            prompts[index], "cpu", 1, True, negatives[index]
        )
        length = alone.shape[1]
        assert bool(alone_mask.all()) and bool(alone_negative_mask.all())  # every padded row reaches the UNet
        assert mask[index].tolist() == negative_mask[index].tolist() == [1] * length + [0] * (mask.shape[1] - length)
        torch.testing.assert_close(embeds[index, :length], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(negative[index, :length], alone_negative[0], atol=1e-5, rtol=1e-5)


def test_a_tokenizer_without_conditioning_mask_keeps_its_attention_mask(pipe):
    """Generic tokenizers (BERT, e5, CLIP): padding never conditions, with or without negative prompts."""
    prompts, negatives = ["a cat", "a much longer prompt"], ["", "blurry"]
    expected = pipe.tokenizer(prompts + negatives, padding=True, return_tensors="pt")
    assert "conditioning_mask" not in expected
    _, mask = pipe.encode_text(prompts, negatives, device="cpu")
    assert torch.equal(mask, expected["attention_mask"])
    _, mask = pipe.encode_text(prompts, device="cpu")
    assert torch.equal(mask, expected["attention_mask"][:2, : mask.shape[1]])


def test_a_20000_character_prompt_reaches_the_text_encoder_bounded(pipe, caplog):
    class Stop(Exception):
        pass

    def stop(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        raise Stop

    shapes = []
    bee = cpmbee_pipeline(pipe)
    bee.text_encoder.register_forward_pre_hook(stop, with_kwargs=True)
    text = ("一只可爱的猫 a lighthouse at dawn 🐱 " * 1000)[:20000]
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(Stop):
        bee.encode_prompt(text, "cpu", 1, True, text[::-1])
    assert shapes == [(2, 3000)]
    assert caplog.text.count("is longer than the 3000 tokens the text encoder reads") == 2


def test_the_pipeline_knows_no_tokenizer_by_name():
    """What CPM-Bee's prompts need lives with CPM-Bee: the pipeline only calls its tokenizer."""
    from viscpm_hf import pipelines

    for path in Path(pipelines.__file__).parent.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        words = ("cpmbee", "cpm-bee", "prompt_format", "caption_format", "hasattr(")
        found = sorted({word for word in words if word in source.lower()})
        assert not found, f"{path} names {found}"


# --- optional components ------------------------------------------------------------------------------------


def test_a_pipeline_without_text_encoder_denoises_from_prompt_embeds(pipe, tmp_path):
    """The two-stage pattern: one pipeline encodes, another (without the LLM) denoises."""
    embeds, negative, mask, negative_mask = pipe.encode_prompt("a cat", "cpu", 1, True)
    from_text = image(pipe)
    bare = VisCPMPaintPipeline(**{**pipe.components, "text_encoder": None, "tokenizer": None})
    conditioning = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "prompt_attention_mask": mask,
                    "negative_prompt_attention_mask": negative_mask}  # fmt: skip
    from_embeds = bare(**conditioning, output_type="np", generator=generator(), **STEPS).images
    np.testing.assert_allclose(from_embeds, from_text, atol=1e-6)
    for call in (lambda: bare("a cat", **STEPS), lambda: bare.encode_prompt("a cat")):
        with pytest.raises(ValueError, match="no text_encoder and tokenizer, so it cannot encode text: pass prompt_emb"):
            call()
    bare.save_pretrained(tmp_path)
    for loaded in (VisCPMPaintPipeline.from_pretrained(tmp_path),  # null components load as None, as in diffusers
                   VisCPMPaintPipeline.from_pretrained(tmp_path, text_encoder=None, tokenizer=None)):  # fmt: skip
        assert loaded.text_encoder is None and loaded.tokenizer is None
        with pytest.raises(ValueError, match=r"cannot encode text: .*load this one with text_encoder=\.\.\., tok"):
            loaded("a cat", **STEPS)
        again = loaded(**conditioning, output_type="np", generator=generator(), **STEPS).images
        np.testing.assert_allclose(again, from_text, atol=1e-6)
    given = VisCPMPaintPipeline.from_pretrained(tmp_path, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    np.testing.assert_allclose(image(given), from_text, atol=1e-6)


def test_a_pipeline_without_unet_and_vae_encodes_prompts(pipe, tmp_path):
    """encode_prompt needs neither (the first stage of the two-stage pattern); generating says what to add."""
    encoder = VisCPMPaintPipeline(**{**pipe.components, "unet": None, "vae": None})
    expected = pipe.encode_prompt("a cat", "cpu", 1, True, "blurry")
    for got, want in zip(encoder.encode_prompt("a cat", "cpu", 1, True, "blurry"), expected):
        torch.testing.assert_close(got, want)
    message = r"has no unet and vae, so it cannot generate images .*from_pipe\(pipe, unet=\.\.\., vae=\.\.\.\)"
    with pytest.raises(ValueError, match=message):
        encoder("a cat", **STEPS)
    with pytest.raises(ValueError, match=r"has no vae, so it cannot generate images"):
        VisCPMPaintPipeline(**{**pipe.components, "vae": None})("a cat", **STEPS)
    encoder.save_pretrained(tmp_path)
    loaded = VisCPMPaintPipeline.from_pretrained(tmp_path)
    assert loaded.unet is None and loaded.vae is None
    complete = VisCPMPaintPipeline.from_pipe(loaded, unet=pipe.unet, vae=pipe.vae)
    np.testing.assert_allclose(image(complete), image(pipe), atol=1e-6)


# --- strict loading -----------------------------------------------------------------------------------------


def damage(weights: Path, missing: str | None = None, unexpected: str | None = None) -> None:
    state = load_file(weights)
    if missing:
        del state[missing]
    if unexpected:
        state[unexpected] = torch.zeros(2)
    save_file(state, str(weights))


def test_a_transblock_with_missing_or_unexpected_tensors_is_refused_at_load(pipe, tmp_path):
    """diffusers only logs both and leaves missing tensors empty: the folder would fail at the first call."""
    with torch.no_grad():
        pipe.transblock.layer_norm.bias.fill_(0.5)
    pipe.save_pretrained(tmp_path)
    damage(tmp_path / "transblock" / "diffusion_pytorch_model.safetensors", "layer_norm.bias", "extra.weight")
    message = (
        r"transblock do not match VisCPMTransBlock: missing tensors \['layer_norm.bias'\] and unexpected tensors "
        r"\['extra.weight'\]\..*pass strict=False to VisCPMTransBlock.*\(pipeline_folder, transblock=model\)"
    )
    for load in (lambda: VisCPMPaintPipeline.from_pretrained(tmp_path),
                 lambda: VisCPMTransBlock.from_pretrained(tmp_path, subfolder="transblock")):  # fmt: skip
        with pytest.raises(RuntimeError, match=message):
            load()
    # On purpose: the missing tensor starts as in a new transblock, the rest is loaded, the unexpected one ignored.
    transblock = VisCPMTransBlock.from_pretrained(tmp_path / "transblock", strict=False)
    assert torch.equal(transblock.layer_norm.bias, torch.zeros(32))
    assert torch.equal(transblock.projection.weight, pipe.transblock.projection.weight)
    partial = VisCPMPaintPipeline.from_pretrained(tmp_path, transblock=transblock)
    with torch.no_grad():
        pipe.transblock.layer_norm.bias.zero_()
    np.testing.assert_allclose(image(partial), image(pipe), atol=1e-6)


def test_a_pixel_space_vae_with_an_unexpected_tensor_is_refused_at_load(tmp_path):
    PixelShuffleAutoencoder(factor=2).save_pretrained(tmp_path / "vae")
    damage(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", unexpected="decoder.weight")
    with pytest.raises(RuntimeError, match=r"unexpected tensors \['decoder.weight'\].*vae=model"):
        PixelShuffleAutoencoder.from_pretrained(tmp_path / "vae")
    assert PixelShuffleAutoencoder.from_pretrained(tmp_path / "vae", strict=False).config.factor == 2


# --- dtype ------------------------------------------------------------------------------------------------------


def test_to_dtype_keeps_the_transblock_in_float32_as_loading_does(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = VisCPMPaintPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for arguments in [(torch.bfloat16,), ("cpu", torch.bfloat16), {"dtype": torch.bfloat16}]:
        fresh = VisCPMPaintPipeline.from_pretrained(tmp_path)
        moved = fresh.to(**arguments) if isinstance(arguments, dict) else fresh.to(*arguments)
        assert moved.unet.dtype == moved.text_encoder.dtype == torch.bfloat16
        assert moved.transblock.dtype == torch.float32
        np.testing.assert_array_equal(image(moved, num_inference_steps=2), image(loaded, num_inference_steps=2))
    assert pipe.transblock.half().dtype == torch.float16  # an explicit cast of the transblock itself still applies


# --- strict input checks --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_inference_steps": -3}, r"num_inference_steps must be a positive integer, got -3"),
        ({"num_inference_steps": 0}, r"num_inference_steps must be a positive integer, got 0"),
        ({"num_inference_steps": 2.5}, r"num_inference_steps must be a positive integer"),
        ({"timesteps": []}, r"timesteps must be a non-empty list of integers"),
        ({"height": 0}, r"height must be a positive integer \(a multiple of 2\), got 0"),
        ({"height": -32}, r"height must be a positive integer"),
        ({"width": 32.0}, r"width must be a positive integer"),
        ({"guidance_scale": -5}, r"guidance_scale must be a finite number >= 0 .*got -5"),
        ({"guidance_scale": float("nan")}, r"guidance_scale must be a finite number >= 0 .*got nan"),
        ({"guidance_scale": float("inf")}, r"guidance_scale must be a finite number"),
        ({"guidance_rescale": float("nan")}, r"guidance_rescale .* must be in \[0, 1\]"),
        ({"output_type": "bogus"}, r"output_type must be one of \('pil', 'np', 'pt', 'latent'\), got 'bogus'"),
        ({"num_images_per_prompt": 0}, r"num_images_per_prompt must be a positive integer, got 0"),
        ({"num_images_per_prompt": -1}, r"num_images_per_prompt must be a positive integer, got -1"),
        ({"eta": -1.0}, r"eta .* must be a finite number >= 0"),
        ({"latents": torch.full((1, 4, 16, 16), float("nan"))}, r"latents contain NaN or infinite values"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, r"latents have shape \(1, 4, 8, 8\), expected \(1, 4, 16, 16\)"),
        ({"num_images_per_prompt": 2, "generator": [torch.Generator()]}, r"Got 1 generators for 2 images"),
        ({"generator": 0}, r"generator must be a torch.Generator .*got 0: .*=torch.Generator\(\).manual_seed\(0\)"),
        ({"generator": [7]}, r"generator must be a torch.Generator or a list of them .*manual_seed\(0\)"),
        ({"latents": torch.zeros(1, 4, 16, 16, dtype=torch.long)}, r"latents must be a floating-point tensor"),
        ({"cross_attention_kwargs": {"scale": float("nan")}}, r"cross_attention_kwargs\['scale'\] .* finite number"),
        ({"cross_attention_kwargs": "scale=1"}, r"cross_attention_kwargs must be a dict"),
        ({"callback_on_step_end": "print"}, r"callback_on_step_end must be callable"),
        ({"prompt_attention_mask": torch.ones(1, 3)}, r"Attention masks go with prompt_embeds"),
        ({"negative_prompt_embeds": torch.zeros(1, 3, 32)}, r"negative_prompt_embeds go with prompt_embeds"),
        ({"rerank": 0}, r"rerank must be a positive number"),
    ],
)
def test_bad_input_is_refused_before_any_work(pipe, kwargs, message):
    calls = []
    for module in (pipe.text_encoder, pipe.transblock, pipe.unet, pipe.vae):
        module.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=message):
        pipe(**{"prompt": "a cat", **STEPS, **kwargs})
    assert calls == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_embeds": torch.zeros(1, 3)}, r"prompt_embeds must be a \(batch, length, 32\) tensor .* got \(1, 3\)"),
        ({"prompt_embeds": torch.zeros(1, 3, 48)}, r"cross_attention_dim 32\), got \(1, 3, 48\)"),
        ({"prompt_embeds": torch.full((1, 3, 32), float("inf"))}, r"prompt_embeds contain NaN or infinite values"),
        ({"prompt_embeds": torch.zeros(1, 3, 32), "prompt_attention_mask": torch.ones(1, 4)},
         r"attention mask of prompt_embeds must have shape \(1, 3\), got \(1, 4\)"),
        ({"prompt_embeds": torch.zeros(1, 3, 32), "negative_prompt": "blurry"}, r"negative_prompt is text"),
        ({"prompt_embeds": torch.zeros(1, 3, 32), "negative_prompt_attention_mask": torch.ones(1, 3)},
         r"negative_prompt_attention_mask goes with negative_prompt_embeds"),
    ],
)  # fmt: skip
def test_bad_embeddings_are_refused(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs, guidance_scale=1.0, **STEPS)


def test_float64_latents_are_cast_to_the_unets_dtype(pipe):
    """As drawn noise is: numpy's float64 noise gives the image of its float32 values."""
    noise = torch.randn(1, 4, 16, 16, generator=generator(5), dtype=torch.float64)
    np.testing.assert_array_equal(image(pipe, latents=noise), image(pipe, latents=noise.float()))


def test_a_callback_that_returns_nothing_replaces_nothing(pipe):
    steps = []
    watched = image(pipe, callback_on_step_end=lambda pipeline, step, timestep, tensors: steps.append(step))
    np.testing.assert_array_equal(watched, image(pipe))
    assert steps == [0, 1, 2]


@pytest.mark.parametrize(
    "returned, error, message",
    [
        ([], TypeError, r"callback_on_step_end must return a dict of the tensors it replaces .*got list"),
        ({"noise": torch.zeros(1)}, ValueError, r"returned 'noise', which it cannot replace: .* \['latents'"),
        ({"latents": torch.zeros(1, 4, 8, 8)}, ValueError, r"returned latents of shape \(1, 4, 8, 8\); it must keep"),
        ({"negative_prompt_embeds": torch.zeros(1, 6, 32)}, ValueError, r"does not have \(no guidance\)"),
    ],
)  # fmt: skip
def test_what_a_callback_returns_is_checked(pipe, returned, error, message):
    with pytest.raises(error, match=message):
        image(pipe, guidance_scale=1.0, callback_on_step_end=lambda *args: returned)


def test_a_callback_replaces_the_conditioning_of_the_remaining_steps(pipe):
    """As in Stable Diffusion: a callback that swaps prompt_embeds after step 0 draws the remaining steps as that
    prompt does from the same latents."""
    dog, negative, *_ = pipe.encode_prompt("a dog", "cpu", 1, True)
    after_first = {}

    def swap(pipeline, step, timestep, tensors):
        after_first.setdefault("latents", tensors["latents"])
        return {"prompt_embeds": dog, "negative_prompt_embeds": negative} if step == 0 else {}

    inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    swapped = image(pipe, "a cat", callback_on_step_end=swap, callback_on_step_end_tensor_inputs=inputs)
    as_dog = image(pipe, "a dog", callback_on_step_end=lambda p, step, t, tensors: after_first if step == 0 else {})
    np.testing.assert_allclose(swapped, as_dog, atol=1e-6)


def test_a_missing_local_folder_says_it_is_missing(tmp_path):
    for path in (tmp_path / "nope", str(tmp_path / "nope"), "./paint-typo", "runs/paint/final"):
        with pytest.raises(FileNotFoundError, match="does not exist|neither a local folder nor a Hub repo"):
            VisCPMPaintPipeline.from_pretrained(path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is a file"):
        VisCPMPaintPipeline.from_pretrained(tmp_path / "weights.bin")


# --- threads ---------------------------------------------------------------------------------------------------


def run_in_threads(*calls, timeout=120):
    results, errors = [None] * len(calls), []

    def run(index, call):
        try:
            results[index] = call()
        except BaseException as error:  # noqa: BLE001  (reported to the test below)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, call), daemon=True) for i, call in enumerate(calls)]
    [thread.start() for thread in threads]
    [thread.join(timeout=timeout) for thread in threads]
    assert not any(thread.is_alive() for thread in threads), f"a thread did not finish within {timeout} s"
    if errors:
        raise errors[0]
    return results


def test_two_threads_with_their_own_scheduler_match_sequential_calls(pipe):
    """The documented way: a pipeline per request via from_pipe (shared models) with a fresh scheduler."""
    settings = [
        {"prompt": "a cat", "guidance_scale": 6.0, "num_inference_steps": 3, "seed": 1},
        {"prompt": "a red house", "guidance_scale": 1.0, "num_inference_steps": 5, "seed": 2},
    ]
    sequential = [image(pipe, **s) for s in settings]
    together = threading.Barrier(2, timeout=60)  # both are inside the denoising loop at once

    def request(setting):
        worker = VisCPMPaintPipeline.from_pipe(pipe, scheduler=pipe.scheduler.from_config(pipe.scheduler.config))
        assert worker.unet is pipe.unet and worker.scheduler is not pipe.scheduler

        def meet(pipeline, step, timestep, tensors):
            if step == 0:
                together.wait()
            return {}

        return image(worker, **setting, callback_on_step_end=meet)

    concurrent = run_in_threads(*(lambda s=s: request(s) for s in settings))
    for alone, threaded in zip(sequential, concurrent):
        np.testing.assert_allclose(threaded, alone, atol=1e-6)


def test_a_second_call_on_a_busy_scheduler_is_refused_and_the_first_is_unharmed(pipe):
    reference = image(pipe, num_inference_steps=4)
    started, release = threading.Event(), threading.Event()

    def hold(pipeline, step, timestep, tensors):
        if step == 0:
            started.set()
            assert release.wait(timeout=60), "the main thread never released the first call"
        return {}

    def second():
        assert started.wait(timeout=60), "the first call never started"
        try:
            with pytest.raises(RuntimeError, match="already denoising in another call.*from_pipe"):
                image(pipe, guidance_scale=2.0, num_inference_steps=2)
        finally:
            release.set()

    first, _ = run_in_threads(lambda: image(pipe, num_inference_steps=4, callback_on_step_end=hold), second)
    np.testing.assert_array_equal(first, reference)

    def fail(pipeline, step, timestep, tensors):
        raise KeyError("stop")

    with pytest.raises(KeyError):
        image(pipe, callback_on_step_end=fail)
    np.testing.assert_array_equal(image(pipe, num_inference_steps=4), reference)  # a failed call frees the scheduler
