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
        pytest.skip(
            f"golden vectors not found at {PARITY_DIR} (this checkout is outside the viscpm-hf project)",
            allow_module_level=True,
        )
    return PARITY_DIR


@cache
def tensors(name: str) -> dict:
    return load_file(require_parity() / name)


@cache
def json_file(name: str):
    return json.loads((require_parity() / name).read_text(encoding="utf-8"))
