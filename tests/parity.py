"""Access to the golden vectors of the original VisCPM in ../shared/parity (see its README).

Tests that need them skip with a clear message when the folder is absent (a checkout outside this project);
inside the project they always run.
"""

import json
from functools import cache
from pathlib import Path

import pytest
from safetensors.torch import load_file


PARITY_DIR = Path(__file__).resolve().parents[2] / "shared" / "parity"


def require_parity() -> Path:
    if not PARITY_DIR.is_dir():
        pytest.skip(f"golden vectors not found at {PARITY_DIR} (this checkout is outside the viscpm-hf project)")
    return PARITY_DIR


@cache
def tensors(name: str) -> dict:
    return load_file(require_parity() / name)


@cache
def json_file(name: str):
    return json.loads((require_parity() / name).read_text(encoding="utf-8"))


def tiny_cpmbee_config_kwargs() -> dict:
    original = json_file("configs.json")["cpmbee_tiny"]
    return dict(
        vocab_size=original["vocab_size"],
        hidden_size=original["dim_model"],
        num_attention_heads=original["num_heads"],
        head_dim=original["dim_head"],
        intermediate_size=original["dim_ff"],
        num_hidden_layers=original["num_layers"],
        rms_norm_eps=original["eps"],
        position_bias_num_buckets=original["position_bias_num_buckets"],
        position_bias_num_segment_buckets=original["position_bias_num_segment_buckets"],
        position_bias_max_distance=original["position_bias_max_distance"],
    )
