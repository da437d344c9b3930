"""Offline, the entry points turn transformers' Hub kernels off, unless the user chose."""

import os

import pytest
from huggingface_hub import constants

from viscpm_hf.integrations.hub_kernels import disable_hub_kernels_when_offline


@pytest.fixture
def offline(monkeypatch):
    """Sets whether the Hub is offline as huggingface_hub read it; starts with no `USE_HUB_KERNELS` choice."""
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # conftest.py sets it for the whole test run
    return lambda value: monkeypatch.setattr(constants, "HF_HUB_OFFLINE", value)


def test_offline_turns_hub_kernels_off(offline):
    offline(True)
    disable_hub_kernels_when_offline()
    assert os.environ["USE_HUB_KERNELS"] == "NO"


def test_online_leaves_transformers_default(offline):
    offline(False)
    disable_hub_kernels_when_offline()
    assert "USE_HUB_KERNELS" not in os.environ


def test_offline_keeps_the_users_choice(offline, monkeypatch):
    offline(True)
    monkeypatch.setenv("USE_HUB_KERNELS", "YES")
    disable_hub_kernels_when_offline()
    assert os.environ["USE_HUB_KERNELS"] == "YES"
