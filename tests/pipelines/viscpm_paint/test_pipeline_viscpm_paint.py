import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_paint import tiny_pipeline
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

import viscpm_hf.pipelines.viscpm_paint.pipeline_viscpm_paint as pipeline_module
from viscpm_hf import VisCPMPaintPipeline, VisCPMPaintPipelineOutput, VisCPMTransBlock


STEPS = {"num_inference_steps": 3}


@pytest.fixture
def pipe():
    return tiny_pipeline()


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def test_output_types_and_shapes(pipe):
    for output_type, check in [
        ("pil", lambda images: isinstance(images[0], PIL.Image.Image) and images[0].size == (32, 32)),
        ("np", lambda images: isinstance(images, np.ndarray) and images.shape == (2, 32, 32, 3)),
        ("pt", lambda images: isinstance(images, torch.Tensor) and images.shape == (2, 3, 32, 32)),
        ("latent", lambda images: images.shape == (2, 4, 16, 16)),
    ]:
        out = pipe("a cat", num_images_per_prompt=2, output_type=output_type, generator=generator(), **STEPS)
        assert isinstance(out, VisCPMPaintPipelineOutput) and check(out.images), output_type
    images, nsfw = pipe("a cat", output_type="np", return_dict=False, generator=generator(), **STEPS)
    assert images.shape == (1, 32, 32, 3) and nsfw is None
    assert 0 <= images.min() and images.max() <= 1


def test_deterministic_with_a_generator(pipe):
    first = pipe("一只猫", output_type="np", generator=generator(3), **STEPS).images
    second = pipe("一只猫", output_type="np", generator=generator(3), **STEPS).images
    third = pipe("一只猫", output_type="np", generator=generator(4), **STEPS).images
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, third)


def test_save_load_round_trip_with_both_loaders(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    reference = pipe("a red house", output_type="np", generator=generator(), **STEPS).images
    for loader in (VisCPMPaintPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is VisCPMPaintPipeline
        np.testing.assert_array_equal(loaded("a red house", output_type="np", generator=generator(), **STEPS).images, reference)


def test_a_hub_repo_id_is_downloaded_first(pipe, tmp_path, monkeypatch):
    """diffusers#6563: a repo id with third-party components fails unless the snapshot is fetched first."""
    pipe.save_pretrained(tmp_path / "snapshot")
    asked = []

    def fake_snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(tmp_path / "snapshot")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    loaded = VisCPMPaintPipeline.from_pretrained("openbmb/viscpm-paint-tiny")
    assert asked == ["openbmb/viscpm-paint-tiny"] and isinstance(loaded.transblock, VisCPMTransBlock)


def test_a_batch_equals_its_items_one_by_one(pipe):
    prompts = ["a cat", "a much longer prompt about a small house by the sea"]
    batch = pipe(prompts, output_type="np", generator=[generator(1), generator(2)], **STEPS).images
    for index, (prompt, seed) in enumerate(zip(prompts, (1, 2))):
        alone = pipe(prompt, output_type="np", generator=generator(seed), **STEPS).images
        np.testing.assert_allclose(batch[index], alone[0], atol=1e-5)


def test_text_encoder_runs_once_per_call(pipe):
    calls = []
    pipe.text_encoder.register_forward_hook(lambda *args: calls.append(1))
    pipe("a cat", negative_prompt="blurry", generator=generator(), num_inference_steps=4)
    assert calls == [1]


def test_encode_prompt_in_isolation(pipe):
    embeds, negative, mask, negative_mask = pipe.encode_prompt(["a cat", "a dog on a boat"], "cpu", 2, True, None)
    assert embeds.shape[0] == negative.shape[0] == 4 and embeds.shape[-1] == 32
    assert mask.shape == embeds.shape[:2] and negative_mask.shape == negative.shape[:2]
    assert mask[0].sum() < mask[2].sum()  # shorter prompt, padded
    embeds_only, none, _, none_mask = pipe.encode_prompt("a cat", "cpu", 1, False)
    assert none is None and none_mask is None
    torch.testing.assert_close(embeds_only[0], embeds[0, : embeds_only.shape[1]])


def test_prompt_embeds_reproduce_the_prompt(pipe):
    embeds, negative, mask, negative_mask = pipe.encode_prompt("a cat", "cpu", 1, True)
    from_text = pipe("a cat", output_type="np", generator=generator(), **STEPS).images
    from_embeds = pipe(
        prompt_embeds=embeds, negative_prompt_embeds=negative, prompt_attention_mask=mask,
        negative_prompt_attention_mask=negative_mask, output_type="np", generator=generator(), **STEPS,
    ).images  # fmt: skip
    np.testing.assert_allclose(from_embeds, from_text, atol=1e-6)


def test_callbacks_see_and_can_replace_latents(pipe):
    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, int(timestep), tensors["latents"].shape, tensors["prompt_embeds"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])}

    out = pipe("a cat", output_type="latent", generator=generator(), callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **STEPS)  # fmt: skip
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (1, 4, 16, 16)
    assert torch.count_nonzero(out.images) == 0
    assert pipe.num_timesteps == 3


def test_guidance_rescale_gives_the_guided_prediction_the_spread_of_the_conditional_one(pipe):
    """At guidance_rescale=1 each image's guided prediction has the standard deviation of its conditional prediction
    (what keeps strong guidance from over-saturating); at 0 guidance is plain and the spread grows with the scale."""
    conditional, guided = [], []
    pipe.unet.register_forward_hook(lambda module, args, out: conditional.append(out[0].chunk(2)[1]))
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda prediction, *args, **kwargs: guided.append(prediction) or step(prediction, *args, **kwargs)
    spread = lambda x: x.flatten(1).std(dim=1)  # noqa: E731
    pipe(["a cat", "a dog"], guidance_scale=5.0, guidance_rescale=1.0, output_type="latent", generator=generator(), **STEPS)
    for text, prediction in zip(conditional, guided):
        torch.testing.assert_close(spread(prediction), spread(text))
    conditional.clear(), guided.clear()
    pipe(["a cat", "a dog"], guidance_scale=5.0, output_type="latent", generator=generator(), **STEPS)
    assert (spread(guided[0]) > 1.1 * spread(conditional[0])).all()


def test_caption_anchors_draw_an_unseen_prompt_as_its_nearest_caption(tmp_path):
    pipe = tiny_pipeline(sentence_token="only")
    captions = ["a cat", "a red car", "an old house", "the sun"]
    before, unconditional, _, _ = pipe.encode_prompt(captions + ["a cat!"], negative_prompt=None)
    pipe.set_caption_anchors(captions, temperature=1e-3)
    assert pipe.transblock.config.num_anchors == len(captions) + 1  # and the empty caption
    after, unconditional_after, _, _ = pipe.encode_prompt(captions + ["a cat!"], negative_prompt=None)
    torch.testing.assert_close(after[:4], before[:4], atol=1e-4, rtol=0)  # known captions stay themselves
    torch.testing.assert_close(unconditional_after, unconditional, atol=1e-4, rtol=0)  # so does ""
    states, mask = pipe.encode_text(["a cat!"], device="cpu")
    sentence = (states * mask[..., None]).sum(1) / mask.sum()
    nearest = (sentence - pipe.transblock.anchors[:4]).norm(dim=1).argmin()  # the anchors keep the captions' order
    torch.testing.assert_close(after[4], before[nearest], atol=1e-4, rtol=0)  # the unseen prompt takes its nearest
    assert not torch.allclose(before[4], before[nearest], atol=1e-2)
    images = pipe("a cat!", output_type="np", generator=generator(), **STEPS).images
    pipe.save_pretrained(tmp_path)
    loaded = VisCPMPaintPipeline.from_pretrained(tmp_path)
    np.testing.assert_allclose(loaded("a cat!", output_type="np", generator=generator(), **STEPS).images, images, atol=1e-5)
    with pytest.raises(ValueError, match="non-empty strings"):
        pipe.set_caption_anchors(["a cat", ""])
    with pytest.raises(ValueError, match="sentence_token='only'"):
        tiny_pipeline().set_caption_anchors(captions)


def test_interrupt_stops_denoising(pipe):
    unet_calls = []
    pipe.unet.register_forward_hook(lambda *args: unet_calls.append(1))

    def stop(pipeline, step, timestep, tensors):
        pipeline._interrupt = True
        return {}

    pipe("a cat", output_type="latent", generator=generator(), callback_on_step_end=stop, num_inference_steps=5)
    assert pipe.interrupt and len(unet_calls) == 1


def test_scheduler_timesteps_follow_the_original(pipe):
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [750, 500, 250, 0]
    pipe.scheduler.set_timesteps(50)
    assert pipe.scheduler.timesteps[0] == 980 and pipe.scheduler.timesteps[-1] == 0


def test_half_precision_keeps_the_transblock_in_float32(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    half = VisCPMPaintPipeline.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.transblock.dtype == torch.float32
    images = half("a cat", output_type="np", generator=generator(), num_inference_steps=2).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_to_device(pipe):
    assert pipe.to("cpu").device.type == "cpu"


def tiny_reranker():
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 260, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 4, "max_position_embeddings": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    from viscpm_hf import build_byte_level_tokenizer

    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=build_byte_level_tokenizer(),
    )
    return CLIPModel(config).eval(), processor


def test_rerank_keeps_the_best_scoring_candidate(pipe):
    pipe.reranker, pipe.reranker_processor = tiny_reranker()
    candidates = pipe("a cat", num_images_per_prompt=3, output_type="pt", generator=generator(), **STEPS).images
    scores = pipe.rerank_scores(candidates * 2 - 1, ["a cat"] * 3)
    best = pipe("a cat", rerank=3, output_type="pt", generator=generator(), **STEPS).images
    assert best.shape[0] == 1
    torch.testing.assert_close(best[0], candidates[scores.argmax()])


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": []}, "prompt list is empty"),
        ({"prompt": "a", "prompt_embeds": torch.zeros(1, 3, 32)}, "not both"),
        ({"prompt": "a", "height": 31}, "divisible by 2"),
        ({"prompt": "a", "negative_prompt": "b", "guidance_scale": 0.5}, "guidance_scale > 1"),
        ({"prompt_embeds": torch.zeros(2, 3, 32), "negative_prompt_embeds": torch.zeros(1, 3, 32)}, "batch size 2"),
        ({"prompt": "a", "rerank": 2}, "rerank needs a reranker"),
        ({"prompt": ["a", "b"], "negative_prompt": ["c"]}, "one negative prompt per prompt"),
        ({"prompt": 3}, "string or a list of strings"),
        ({"prompt": "a", "guidance_rescale": 1.5}, "guidance_rescale"),
    ],
)
def test_bad_input_is_refused_with_the_fix(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs, **STEPS)


def test_text_encoder_and_transblock_widths_must_match(pipe):
    with pytest.raises(ValueError, match="in_features"):
        VisCPMPaintPipeline(
            tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, transblock=VisCPMTransBlock(48, 32),
            unet=pipe.unet, vae=pipe.vae, scheduler=pipe.scheduler,
        )  # fmt: skip


def test_cpu_offload_is_wired(pipe):
    assert pipe.model_cpu_offload_seq.split("->") == ["text_encoder", "transblock", "unet", "vae"]
    assert all(getattr(pipe, name) is not None for name in pipe.model_cpu_offload_seq.split("->"))
    if not torch.cuda.is_available():
        pytest.skip("enable_model_cpu_offload moves components between the CPU and an accelerator; none here")
    pipe.enable_model_cpu_offload()
    assert pipe("a cat", output_type="np", **STEPS).images.shape == (1, 32, 32, 3)


def test_pipeline_module_has_no_stable_diffusion_import():
    """Importing Stable Diffusion's pipeline module warns about torchvision on every `import viscpm_hf`."""
    assert "pipeline_stable_diffusion" not in pipeline_module.__dict__


def test_diffusion_pipeline_loads_a_hub_repo_from_the_cache(pipe, tmp_path, monkeypatch):
    """`DiffusionPipeline.from_pretrained("org/repo")` through diffusers' own Hub code (offline: the HF cache)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--org--viscpm-paint-tiny"
    revision = "0" * 40
    pipe.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    loaded = DiffusionPipeline.from_pretrained("org/viscpm-paint-tiny", cache_dir=str(tmp_path))
    assert type(loaded) is VisCPMPaintPipeline


def test_hub_download_accepts_third_party_components(pipe, tmp_path):
    """The check that fails in diffusers#6563 passes once viscpm_hf is imported."""
    from diffusers.pipelines.pipeline_loading_utils import _get_custom_components_and_folders

    pipe.save_pretrained(tmp_path)
    config = VisCPMPaintPipeline.load_config(tmp_path)
    files = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()]
    custom, folders = _get_custom_components_and_folders("org/repo", config, files)
    assert custom == {} and {"transblock", "text_encoder", "tokenizer"} <= set(folders)


def test_safety_checker_flags_are_returned(pipe):
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    pipe.register_modules(
        safety_checker=StableDiffusionSafetyChecker(config).eval(),
        feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    )
    out = pipe(["a cat", "a dog"], output_type="np", generator=generator(), **STEPS)
    assert isinstance(out.nsfw_content_detected, list) and len(out.nsfw_content_detected) == 2
    flagged = [i for i, nsfw in enumerate(out.nsfw_content_detected) if nsfw]
    assert all(out.images[i].max() == 0 for i in flagged)  # flagged images are blacked out, as in Stable Diffusion
