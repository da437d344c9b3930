"""Shared fixtures. Tests run offline: nothing may reach the Hub."""

import os


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# transformers 5.25 kernelizes models in from_pretrained, fetching kernels from the Hub: never here.
os.environ["USE_HUB_KERNELS"] = "NO"

import pytest
from tiny_models import make_chat_config, make_chat_model, make_processor, random_image

import viscpm_hf


@pytest.fixture(scope="session")
def tokenizer():
    return viscpm_hf.build_byte_level_tokenizer()


@pytest.fixture(scope="session")
def chat_config(tokenizer):
    return make_chat_config(tokenizer)


@pytest.fixture
def chat_model(tokenizer):
    return make_chat_model(tokenizer)


@pytest.fixture(scope="session")
def processor(tokenizer):
    return make_processor(tokenizer)


@pytest.fixture
def image():
    return random_image(0)
