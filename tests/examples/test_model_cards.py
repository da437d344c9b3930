"""Every model card the project writes or ships loads with `huggingface_hub.ModelCard` and has the Hub's metadata;
the committed cards are what the code writes (they cannot drift from it)."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from example_scripts import ROOT, load_example
from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id
from parity import PARITY_DIR, json_file, require_parity
from safetensors.torch import load_file, save_file

from viscpm_hf.convert.model_card import RELEASES, write_release_cards
from viscpm_hf.convert.paint import convert_paint
from viscpm_hf.hub import load_card, write_card


sys.path.insert(0, str(ROOT / "examples" / "mpm"))
GENERAL_MODEL_LICENSE = {"license": "other", "license_name": "general-model-license"}
CHAT = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "language": ["en", "zh"]}
PAINT = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "language": ["en", "zh"]}
PAINT_BASES = ["openbmb/VisCPM-Paint", "stabilityai/stable-diffusion-2-1-base"]
EXPECTED = {
    **{f"model_cards/{name}": {**(CHAT if kind == "chat" else PAINT), **GENERAL_MODEL_LICENSE, "base_model":
       "openbmb/VisCPM-Chat" if kind == "chat" else PAINT_BASES, "results": 4 if kind == "chat" else 1}
       for name, (kind, _, _) in RELEASES.items()},
    "examples/mpm/default/chat": {
        "library_name": "peft", "pipeline_tag": "image-text-to-text", "license": "cc-by-sa-4.0",
        "language": ["zh", "en", "de", "fr"], "base_model": "google/gemma-3-270m", "results": 3,
    },
    "examples/mpm/default/paint": {
        "library_name": "diffusers", "pipeline_tag": "text-to-image", "license": "cc-by-sa-4.0",
        "language": ["en", "zh", "de", "fr", "es", "ja", "it"], "base_model": "intfloat/multilingual-e5-small",
        "results": 3,
    },
    "viscpm-convert chat": {**CHAT, **GENERAL_MODEL_LICENSE, "base_model": "openbmb/VisCPM-Chat"},
    "viscpm-convert paint": {**PAINT, **GENERAL_MODEL_LICENSE, "base_model": PAINT_BASES},
    # Trained from a converted folder: its base model, licence and languages carry over.
    "train_chat.py": {**CHAT, **GENERAL_MODEL_LICENSE, "base_model": "openbmb/VisCPM-Chat"},
    "train_paint.py": {**PAINT, "license": "apache-2.0", "language": ["en"], "base_model": "org/tiny-paint-base"},
}  # fmt: skip
# The folders the code writes, by fixture; the others are committed, under ROOT.
WRITTEN = {"viscpm-convert chat": "cpmbee_chat", "viscpm-convert paint": "converted_paint", "train_chat.py": "trained_chat",
           "train_paint.py": "trained_paint"}


@pytest.fixture(scope="module")
def converted_paint(tmp_path_factory) -> Path:
    """The tiny original paint checkpoint (the tiny chat file's llm.*, the paint file's unet.* and trans_block.*)."""
    require_parity()
    folder = tmp_path_factory.mktemp("paint")
    checkpoint = folder / "original" / "paint.safetensors"  # not beside the output: the converter refuses that
    checkpoint.parent.mkdir()
    llm = {k: v for k, v in load_file(PARITY_DIR / "viscpm_chat_tiny.safetensors").items() if k.startswith("llm.")}
    save_file({**llm, **load_file(PARITY_DIR / "viscpm_paint_tiny.safetensors")}, str(checkpoint))
    tiny = PARITY_DIR / "paint_tiny"
    output = folder / "viscpm-paint-tiny"
    convert_paint(checkpoint, PARITY_DIR / "cpmbee_vocab.txt", tiny / "vae", output,
                  llm_config=json_file("configs.json")["cpmbee_tiny"],
                  unet_config=json.loads((tiny / "unet" / "config.json").read_text()))  # fmt: skip
    return output


@pytest.fixture(scope="module")
def trained_chat(cpmbee_chat, chat_workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_chat") / "run"
    load_example("train_chat").main([
        "--model_name_or_path", str(cpmbee_chat), "--data", str(chat_workspace / "conversations.json"),
        "--image_folder", str(chat_workspace / "images"), "--output_dir", str(out), "--max_steps", "1", "--use_cpu",
        "--report_to", "none", "--bf16", "false", "--save_strategy", "no", "--per_device_train_batch_size", "2",
        "--dataloader_num_workers", "0",
    ])  # fmt: skip
    return out / "model"


@pytest.fixture(scope="module")
def trained_paint(paint_workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_paint") / "run"
    load_example("train_paint").main([
        "--pretrained_model_name_or_path", str(paint_workspace / "model"), "--train_data_dir",
        str(paint_workspace / "images"), "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "4",
        "--max_train_steps", "1", "--checkpointing_steps", "0", "--base_model", "org/tiny-paint-base",
        "--license", "apache-2.0", "--language", "en",
    ])  # fmt: skip
    return out / "pipeline"


@pytest.mark.parametrize("source", list(EXPECTED))
def test_every_card_loads_and_has_the_hubs_metadata(source, request):
    folder = request.getfixturevalue(WRITTEN[source]) if source in WRITTEN else ROOT / source
    path = folder / "README.md"
    data = ModelCard.load(path).data
    expected = dict(EXPECTED[source])
    results = expected.pop("results", 0)
    assert {key: getattr(data, key) for key in expected} == expected
    assert load_card(path).data == data  # what push_to_hub checks: every required field is there
    assert {"viscpm", "mpm"} <= set(data.tags)
    for base in [data.base_model] if isinstance(data.base_model, str) else data.base_model:
        validate_repo_id(base)
        assert "/" in base  # a Hub id with its namespace, not a local path
    if data.license == "other":
        assert data.license_link.startswith("https://github.com/OpenBMB/General-Model-License/")
    # Measured (or, for the releases, reported) results: `results` metrics in each language of the card.
    evaluated = data.eval_results or []
    assert len(evaluated) == results * len(data.language)
    assert all(r.dataset_config in data.language and isinstance(r.metric_value, float | int) for r in evaluated)


def test_the_release_cards_are_what_the_converter_writes(tmp_path):
    """model_cards/ is `write_release_cards`'s output, with the released configs' sizes and OpenBMB's results."""
    write_release_cards(tmp_path)
    committed = ROOT / "model_cards"
    assert sorted(p.name for p in committed.iterdir()) == sorted(RELEASES)
    for name in RELEASES:
        assert (committed / name / "README.md").read_text() == (tmp_path / name / "README.md").read_text(), (
            f"model_cards/{name} is stale: regenerate with python -c \"from viscpm_hf.convert.model_card import "
            "write_release_cards; write_release_cards('model_cards')\""
        )
    card = (committed / "viscpm-chat-zhplus" / "README.md").read_text()
    assert "CPM-Bee (48 layers, width 4096)" in card and "| zh | 90.3 | 81.4 | 92.1 | 88.2 |" in card
    assert ModelCard.load(committed / "viscpm-paint-balance" / "README.md").data.eval_results[1].metric_value == 10.9


def table_row(text: str, label: str) -> list[str]:
    return re.search(rf"^\| {re.escape(label)} \| (.*) \|$", text, re.M).group(1).split(" | ")


def test_the_chat_default_card_is_what_chat_openmoji_writes_for_its_table(tmp_path):
    """The committed card of examples/mpm/default/chat, header included, is `default_card` of the scores in its
    table (the run behind it: the script's defaults with --export_share 0.01)."""
    chat_openmoji = pytest.importorskip("chat_openmoji")
    committed = (ROOT / "examples" / "mpm" / "default" / "chat" / "README.md").read_text()
    result = {}
    for lang in chat_openmoji.ASKED:
        correct, recognised, language = (int(cell.rstrip("%")) / 100 for cell in table_row(committed, lang))
        result[lang] = {"correct": correct, "recognised": recognised, "language": language}
    args = chat_openmoji.parse_args(["--export_share", "0.01"])
    write_card(tmp_path / "README.md", *chat_openmoji.default_card(args, result))
    assert (tmp_path / "README.md").read_text() == committed


def test_the_paint_default_card_is_what_paint_openmoji_writes_for_its_table(tmp_path):
    """The same for examples/mpm/default/paint: its model-index holds the pivot's scores with caption anchors (how
    the folder draws), read here back from the table of the card."""
    from diffusers import UNet2DConditionModel

    paint_openmoji = pytest.importorskip("paint_openmoji")
    folder = ROOT / "examples" / "mpm" / "default" / "paint"
    committed = (folder / "README.md").read_text()
    languages = table_row(committed, "encoder")
    tops = table_row(committed, "multilingual-e5-small (pivot): with caption anchors: top-1 / top-5 %")
    fids = table_row(committed, "multilingual-e5-small (pivot): with caption anchors: FID")
    scores = {}
    for lang, top, fid in zip(languages, tops, fids, strict=True):
        top1, top5 = (float(value) / 100 for value in top.split(" / "))
        scores[lang] = {"anchored": {"top1": top1, "top5": top5, "fid": float(fid)}}
    result = {"encoder": "e5", "num_emoji": 240, "languages": scores}
    table = committed[committed.index("%):\n\n") + len("%):\n\n") : committed.index("\nTraining data:")]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    card = paint_openmoji.default_card(result, table, 3600, unet.num_parameters() / 1e6, caption_anchors=0.03, guidance=1.0)
    write_card(tmp_path / "README.md", *card)
    assert (tmp_path / "README.md").read_text() == committed

