"""Fixtures of the training-script tests: the paper's model (a CPM-Bee VisCPM-Chat converted from the tiny original),
a small image-chat workspace, and the tiny VisCPM-Paint workspace."""

import json
from pathlib import Path

import pytest
from example_scripts import build_paint_workspace
from parity import PARITY_DIR, json_file, require_parity
from tiny_models import random_image


@pytest.fixture(scope="session")
def cpmbee_chat(tmp_path_factory) -> Path:
    """A VisCPM-Chat on CPM-Bee: the tiny original checkpoint through `viscpm-convert chat`."""
    from viscpm_hf.convert.chat import convert_chat

    require_parity()
    configs = json_file("configs.json")
    output = tmp_path_factory.mktemp("cpmbee") / "viscpm-chat-tiny"
    convert_chat(
        PARITY_DIR / "viscpm_chat_tiny.safetensors",
        PARITY_DIR / "cpmbee_vocab.txt",
        output,
        llm_config=configs["cpmbee_tiny"],
        vision_config=configs["beit3_tiny"],
    )
    return output


@pytest.fixture(scope="session")
def chat_workspace(tmp_path_factory) -> Path:
    """Images and data: 4 two-turn conversations (one answer with characters outside CPM-Bee's vocabulary), captions."""
    root = tmp_path_factory.mktemp("chat_data")
    (root / "images").mkdir()
    for index in range(4):
        random_image(index).save(root / "images" / f"{index}.png")
    conversations = [
        {
            "image": f"{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": f"Shape {i}." if i != 3 else "A 𠀀 and a 龘 <here>."},
                {"from": "human", "value": "And its color?"},
                {"from": "gpt", "value": "Red." if i % 2 else "Blue."},
            ],
        }
        for i in range(4)
    ]
    (root / "conversations.json").write_text(json.dumps(conversations, ensure_ascii=False))
    captions = [{"image": f"{i}.png", "caption": f"a picture number {i}"} for i in range(4)]
    (root / "captions.json").write_text(json.dumps(captions))
    return root


@pytest.fixture(scope="session")
def paint_workspace(tmp_path_factory) -> Path:
    """A tiny VisCPM-Paint (`model/`) and 8 captioned 32 x 32 images (`images/`)."""
    return build_paint_workspace(tmp_path_factory.mktemp("train_paint"))
