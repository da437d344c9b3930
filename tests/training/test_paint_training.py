"""viscpm_hf.training.paint: data checks, pixels, caption states, the on-disk cache, the trained part."""

import json
import logging
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, Image
from PIL import Image as PILImage
from tiny_paint import tiny_pipeline

from viscpm_hf import VisCPMPaintPipeline, build_byte_level_tokenizer
from viscpm_hf.training.paint import (
    CaptionEncoder,
    EpochSampler,
    PaintDenoiser,
    PaintTrainDataset,
    TextEmbeddingCache,
    collate_paint,
    load_image_captions,
    mark_trainable,
    pad_text_states,
    prepare_image,
)


CAPTIONS = ["a red apple", "一个红苹果", "ein roter Apfel", "a much longer caption about a small house by the sea"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def make_folder(root, names=("0.png", "1.png", "2.png"), listed=None):
    root.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        ramp = np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None]  # a horizontal ramp: crops and flips show
        PILImage.fromarray(np.broadcast_to(ramp, (24, 40, 3)).copy() // (index + 1)).save(root / name)
    listed = listed if listed is not None else names
    lines = [json.dumps({"file_name": name, "text": f"caption {i}"}) for i, name in enumerate(listed)]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_image_folder_records(tmp_path):
    records = load_image_captions(train_data_dir=str(make_folder(tmp_path)))
    assert records.column_names == ["image", "text"] and len(records) == 3
    assert records[1]["text"] == "caption 1" and records[1]["image"].size == (40, 24)


def test_missing_images_are_skipped_with_a_count_or_raise(tmp_path, caplog):
    folder = make_folder(tmp_path, listed=("0.png", "gone.png", "1.png"))
    (folder / "broken.png").write_text("not an image")
    with open(folder / "metadata.jsonl", "a") as metadata:
        metadata.write(json.dumps({"file_name": "broken.png", "text": "x"}) + "\n")
    with caplog.at_level(logging.WARNING):
        records = load_image_captions(train_data_dir=str(folder))
    assert records["text"] == ["caption 0", "caption 2"]
    assert "Skipped 2 of 4" in caplog.text and "gone.png" in caplog.text
    with pytest.raises(ValueError, match=r"gone\.png.*file not found.*--on_missing_image skip"):
        load_image_captions(train_data_dir=str(folder), on_missing_image="error")


def test_bad_folders_say_what_to_fix(tmp_path):
    with pytest.raises(ValueError, match="no metadata.jsonl"):
        load_image_captions(train_data_dir=str(tmp_path))
    folder = make_folder(tmp_path / "a")
    with pytest.raises(ValueError, match="caption column 'caption'"):
        load_image_captions(train_data_dir=str(folder), caption_column="caption")
    empty = make_folder(tmp_path / "b", listed=("nope.png",))
    with pytest.raises(ValueError, match="No usable image-caption pairs"):
        load_image_captions(train_data_dir=str(empty))
    with pytest.raises(ValueError, match="exactly one"):
        load_image_captions()


def test_datasets_sources(tmp_path):
    folder = make_folder(tmp_path / "images")
    images = [PILImage.new("RGB", (8, 8), (i, i, i)) for i in range(3)]
    saved = Dataset.from_dict({"picture": images, "caption": ["a", "b", "c"]}).cast_column("picture", Image())
    saved.save_to_disk(tmp_path / "saved")
    records = load_image_captions(dataset_name=str(tmp_path / "saved"), image_column="picture", caption_column="caption")
    assert records.column_names == ["image", "text"] and records["text"] == ["a", "b", "c"]
    assert records[2]["image"].getpixel((0, 0)) == (2, 2, 2)
    rows = [{"path": f"images/{i}.png", "text": f"t{i}"} for i in (0, 1, 9)]  # paths relative to the file
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    records = load_image_captions(dataset_name=str(tmp_path / "data.jsonl"), image_column="path")
    assert records["text"] == ["t0", "t1"] and records[0]["image"].size == (40, 24)
    with pytest.raises(ValueError, match=r"no column 'caption'.*--caption_column"):
        load_image_captions(dataset_name=str(tmp_path / "data.jsonl"), image_column="path", caption_column="caption")
    assert folder.is_dir()


def test_prepare_image_resizes_crops_and_flips():
    image = PILImage.new("RGB", (60, 30), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 30, 30))  # left half white
    center = prepare_image(image, 16, center_crop=True, flip=False, rng=random.Random(0))
    assert center.shape == (3, 16, 16) and center.dtype == torch.float32
    assert center.min() >= -1 and center.max() <= 1
    assert center[:, :, 0].mean() > 0.9 and center[:, :, -1].mean() < -0.9  # white left, black right
    flips = {prepare_image(image, 16, True, True, random.Random(seed))[0, 0, 0].item() > 0 for seed in range(20)}
    assert flips == {True, False}
    rgba = PILImage.new("RGBA", (16, 16), (0, 0, 0, 0))  # transparent -> white, as elsewhere in viscpm_hf
    assert prepare_image(rgba, 16, True, False, random.Random(0)).min() == 1


def test_dataset_and_sampler_depend_on_seed_and_epoch_only(tmp_path):
    records = load_image_captions(train_data_dir=str(make_folder(tmp_path)))
    dataset = PaintTrainDataset(records, 16, center_crop=False, random_flip=True, seed=3)
    first = dataset[1]["pixel_values"]
    torch.manual_seed(123)
    random.seed(123)
    assert torch.equal(dataset[1]["pixel_values"], first)
    later = []
    for epoch in range(1, 6):
        dataset.set_epoch(epoch)
        later.append(dataset[1]["pixel_values"])
    assert any(not torch.equal(pixels, first) for pixels in later)
    dataset.set_epoch(0)
    assert torch.equal(dataset[1]["pixel_values"], first)
    sampler = EpochSampler(10, seed=7)
    order = list(sampler)
    assert sorted(order) == list(range(10)) and list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    batch = collate_paint([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16) and batch["captions"] == ["caption 0", "caption 1"]


def test_pad_text_states():
    states = [torch.ones(2, 4), torch.full((3, 4), 2.0)]
    hidden, mask = pad_text_states(states)
    assert hidden.shape == (2, 3, 4) and mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert hidden[0, 2].abs().sum() == 0 and torch.equal(hidden[1], states[1])


def test_caption_encoder_gives_each_captions_own_states(pipe):
    encoder = CaptionEncoder(pipe)
    batch = encoder(CAPTIONS)
    for caption, states in zip(CAPTIONS, batch):
        inputs = pipe.tokenizer(caption, return_tensors="pt")
        alone = pipe.text_encoder(**inputs).last_hidden_state[0]
        assert states.shape == alone.shape
        torch.testing.assert_close(states, alone, atol=1e-5, rtol=1e-5)
    # The transblock over these states is the pipeline's conditioning.
    embeds, _, mask, _ = pipe.encode_prompt(CAPTIONS[:1], do_classifier_free_guidance=False)
    torch.testing.assert_close(pipe.transblock(batch[0])[None], embeds, atol=1e-5, rtol=1e-5)
    assert encoder.max_length == pipe.text_encoder.config.max_position_embeddings
    assert encoder(["x" * 500])[0].shape[0] == encoder.max_length  # long captions are truncated, not crashed on


def test_an_empty_caption_needs_a_token(pipe):
    no_bos = VisCPMPaintPipeline(**{**pipe.components, "tokenizer": build_byte_level_tokenizer()})
    with pytest.raises(ValueError, match="no token for ''"):
        CaptionEncoder(no_bos)(["a cat", ""])


def test_cache_round_trip_and_resumable_build(pipe, tmp_path):
    encoder = CaptionEncoder(pipe)
    cache = TextEmbeddingCache(tmp_path, encoder.fingerprint())
    assert cache.build(CAPTIONS[:2], encoder, batch_size=1, shard_size=1) == 2
    (tmp_path / ".shard-0-dead.safetensors.partial").write_bytes(b"half written")  # an interrupted write
    reopened = TextEmbeddingCache(tmp_path, encoder.fingerprint())
    assert len(reopened) == 2 and reopened.missing(CAPTIONS) == sorted(CAPTIONS[2:])
    assert reopened.build(CAPTIONS, encoder) == 2  # only the missing ones
    assert reopened.build(CAPTIONS, encoder) == 0
    for caption, states in zip(CAPTIONS, encoder(CAPTIONS)):
        torch.testing.assert_close(reopened.get(caption), states, atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="not in the text embedding cache"):
        reopened.get("never seen")
    with pytest.raises(ValueError, match="different text encoder"):
        TextEmbeddingCache(tmp_path, "another fingerprint")


def test_cache_build_shared_by_processes(pipe, tmp_path):
    """Two processes (threads here) split the missing captions; the barrier keeps their lists equal."""
    encoder = CaptionEncoder(pipe)
    barrier = threading.Barrier(2, timeout=60)  # a process that dies breaks the barrier instead of hanging
    counts = {}

    def process(index):
        cache = TextEmbeddingCache(tmp_path, encoder.fingerprint())
        counts[index] = cache.build(CAPTIONS, encoder, process_index=index, num_processes=2, barrier=barrier.wait)

    threads = [threading.Thread(target=process, args=(i,), daemon=True) for i in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert not any(t.is_alive() for t in threads), "the cache build did not finish within 120 s"
    assert counts == {0: 2, 1: 2}
    assert TextEmbeddingCache(tmp_path, encoder.fingerprint()).missing(CAPTIONS) == []
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 2


def test_denoiser_is_the_pipelines_transblock_then_unet(pipe):
    denoiser = PaintDenoiser(pipe.transblock, pipe.unet)
    states = CaptionEncoder(pipe)(CAPTIONS[:2])
    hidden, mask = pad_text_states(states)
    latents, timesteps = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    conditioning = pipe.transblock(hidden)
    expected = pipe.unet(latents, timesteps, encoder_hidden_states=conditioning, encoder_attention_mask=mask).sample
    torch.testing.assert_close(denoiser(latents, timesteps, hidden, mask), expected)


def test_mark_trainable():
    pipe = tiny_pipeline()
    denoiser = PaintDenoiser(pipe.transblock, pipe.unet)
    names = mark_trainable(denoiser, "attn2")
    unet_names = [n for n in names if n.startswith("unet.")]
    assert unet_names and all("attn2" in n for n in unet_names)
    transblock = {f"transblock.{name}" for name, _ in pipe.transblock.named_parameters()}
    assert {n for n in names if n.startswith("transblock.")} == transblock
    assert sum(p.requires_grad for p in denoiser.unet.parameters()) == len(unet_names)
    full = mark_trainable(denoiser, "full")
    assert len(full) == len(list(denoiser.parameters()))
    with pytest.raises(ValueError, match="'attn2' or 'full'"):
        mark_trainable(denoiser, "lora")


def test_caption_encoder_builds_cpmbee_prompts_as_the_pipeline(pipe):
    """With CPM-Bee (the released weights) captions take the original's structure, as `encode_prompt` builds it."""
    from parity import PARITY_DIR, require_parity

    from viscpm_hf import CpmBeeConfig, CpmBeeModel, CpmBeeTokenizer

    require_parity()
    tokenizer = CpmBeeTokenizer(vocab_file=str(PARITY_DIR / "cpmbee_vocab.txt"), prompt_format="caption")
    torch.manual_seed(0)
    config = CpmBeeConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          head_dim=8, intermediate_size=64)  # fmt: skip
    bee = VisCPMPaintPipeline(**{**pipe.components, "tokenizer": tokenizer, "text_encoder": CpmBeeModel(config).eval()})
    encoder = CaptionEncoder(bee)
    states = encoder(CAPTIONS[:2])
    assert len(encoder.fingerprint()) == 64
    for caption, caption_states in zip(CAPTIONS[:2], states):
        embeds, _, mask, _ = bee.encode_prompt(caption, do_classifier_free_guidance=False)
        assert caption_states.shape[0] == mask.shape[1] == int(mask.sum())
        torch.testing.assert_close(bee.transblock(caption_states)[None], embeds, atol=1e-5, rtol=1e-5)
    assert encoder.max_length == 3000  # the caption limit: CPM-Bee's relative positions set none


def test_paint_training_knows_no_tokenizer_by_name_and_only_the_pipelines_public_api():
    """Captions reach the text encoder through `VisCPMPaintPipeline.encode_text`, whatever the tokenizer."""
    import viscpm_hf.training.paint as paint_training

    source = Path(paint_training.__file__).read_text(encoding="utf-8")
    assert not [word for word in ("cpmbee", "prompt_format") if word in source.lower()]
    assert "pipeline._" not in source
