"""What the tests of the examples/ scripts share: the scripts as modules (they are not a package), a killable
subprocess run of one, the accelerate configs and the FSDP units they give, the image-chat data and the tiny
VisCPM-Paint workspace."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image


ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
PAINT_CAPTIONS = ["a red apple", "a blue house", "a green tree", "a yellow sun", "a black cat", "a white dog",
                  "a pink flower", "an orange car"]  # fmt: skip


def load_example(name: str):
    """examples/`name`.py, imported once per test session."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


# A held run: the modules the script imports at its top (most of a run's start-up) first, then, once the go file
# exists, the script itself, as `python SCRIPT ARGS...` runs it. Never released, it gives up after 10 minutes.
HELD = """
import ast, importlib, os, runpy, sys, time
go, script, *argv = sys.argv[1:]
sys.path[0] = os.path.dirname(script)
for node in ast.parse(open(script, encoding="utf-8").read()).body:
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
    names += [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # the script, once released, says what is missing
deadline = time.monotonic() + 600
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("never released")
    time.sleep(0.003)
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


class Run:
    """An example script in a subprocess (one thread, offline), output to a log file, killable.

    `command` is `[python, SCRIPT, *ARGS]`. With `held=True` the process imports what the script imports, then waits
    for `release()`: a test that runs the script several times in a row starts the next run's imports on the idle
    core while the current run works (the script itself runs once, unchanged, as `__main__`, when released)."""

    def __init__(self, command: list[str], log: Path, held: bool = False):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        self.log = log
        self.go = None
        if held:
            python, script, *argv = command
            self.go = log.with_name(log.name + ".go")
            command = [python, "-c", HELD, str(self.go), script, *argv]
        with open(log, "w") as file:
            self.process = subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, env=env)

    def release(self) -> "Run":
        if self.go is not None:
            self.go.touch()
        return self

    def wait_until(self, condition, timeout: float = 240) -> bool:
        """Polls `condition` every few ms while the process runs; False when the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if condition():
                return True
            time.sleep(0.003)
        self.kill()
        raise AssertionError(f"timed out after {timeout}s; log: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)

    def finish(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


def accelerate_config(name: str) -> dict:
    """examples/configs/`name` as a dict."""
    return yaml.safe_load((CONFIGS / name).read_text())


def wrapped_classes(model, names: list[str] | None) -> set[str]:
    """The classes accelerate's TRANSFORMER_BASED_WRAP makes FSDP units of (it raises for a name the model lacks)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=names)  # fmt: skip
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    return {type(module).__name__ for module in model.modules() if policy(module)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_unsharded_and_sharded(worker: Path, tmp_path: Path, arguments: list[str], env: dict, timeout: float,
                              extra: list[str] = ()) -> tuple[dict, list[dict]]:  # fmt: skip
    """Runs `worker ARGUMENTS OUT EXTRA` as one process (OUT = tmp_path/one) beside a `torch.distributed.run` pair
    (tmp_path/two), the single one mostly importing while the pair works; returns the rank files: `(one, [rank0,
    rank1])`. Each run has `timeout` seconds; a failure shows its log's end."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with open(tmp_path / "one.log", "w") as log:
        single = subprocess.Popen([sys.executable, str(worker), *arguments, str(tmp_path / "one"), *extra],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        sharded = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             str(worker), *arguments, str(tmp_path / "two"), *extra],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
        assert single.wait(timeout=timeout) == 0, (tmp_path / "one.log").read_text()[-3000:]
    finally:
        single.kill()
        single.wait()
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    return one, [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]


def write_chat_data(root: Path, first_answers: list[str]) -> Path:
    """`root/images` (one random image per answer), `conversations.json` (two turns per image: "What is it?" answered
    by `first_answers[i]`, then its colour) and `captions.json`."""
    from tiny_models import random_image

    (root / "images").mkdir(parents=True)
    conversations = []
    for i, answer in enumerate(first_answers):
        random_image(i).save(root / "images" / f"{i}.png")
        turns = [("human", "<image>\nWhat is it?"), ("gpt", answer), ("human", "And its color?"),
                 ("gpt", "Red." if i % 2 else "Blue.")]  # fmt: skip
        conversations.append({"image": f"{i}.png", "conversations": [{"from": f, "value": v} for f, v in turns]})
    (root / "conversations.json").write_text(json.dumps(conversations, ensure_ascii=False))
    captions = [{"image": f"{i}.png", "caption": f"a picture number {i}"} for i in range(len(first_answers))]
    (root / "captions.json").write_text(json.dumps(captions))
    return root


def write_metadata(folder: Path, rows, key: str = "text") -> None:
    """metadata.jsonl of an image folder: (file name, caption) rows."""
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, key: c}) + "\n" for f, c in rows))


def build_paint_workspace(root: Path) -> Path:
    """`root/model` (the tiny VisCPM-Paint of tests/paint) and `root/images`: 8 distinct 32 x 32 images, one caption
    each."""
    from tiny_paint import tiny_pipeline

    tiny_pipeline().save_pretrained(root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for index in range(len(PAINT_CAPTIONS)):
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[..., index % 3] = 40 + 25 * index
        pixels[8:24, 8:24] = rng.integers(0, 255, 3)
        Image.fromarray(pixels).save(images / f"{index}.png")
    write_metadata(images, [(f"{i}.png", c) for i, c in enumerate(PAINT_CAPTIONS)])
    return root
