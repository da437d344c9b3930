"""Fixtures of the training-script tests: the paper's model (a CPM-Bee VisCPM-Chat converted from the tiny original),
a small image-chat workspace, and the tiny VisCPM-Paint workspace."""

from pathlib import Path

import pytest
import torch
from example_scripts import build_paint_workspace, write_chat_data
from parity import PARITY_DIR, json_file, require_parity


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread(request):
    """The tiny models these tests train in this process, on one thread, as their subprocesses (OMP_NUM_THREADS=1).
    Two threads are about 10% faster on 2 idle cores, but several times slower as soon as other work shares the cores
    (each of the thousands of tiny ops waits for both threads: a 20-step train_paint.py run took 3.2 s with 2 threads
    and 3.6 s with 1 on idle cores, 17.5 s and 6.0 s beside two busy processes). A module that runs bigger models in
    this process (the MPM experiments) sets `TORCH_THREADS = None` to keep torch's default."""
    if getattr(request.module, "TORCH_THREADS", 1) is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    answers = [f"Shape {i}." for i in range(3)] + ["A 𠀀 and a 龘 <here>."]
    return write_chat_data(tmp_path_factory.mktemp("chat_data"), answers)


@pytest.fixture(scope="session")
def paint_workspace(tmp_path_factory) -> Path:
    """A tiny VisCPM-Paint (`model/`) and 8 captioned 32 x 32 images (`images/`)."""
    return build_paint_workspace(tmp_path_factory.mktemp("train_paint"))
