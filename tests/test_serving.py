"""`viscpm-serve` (transformers' own `transformers serve`) answers OpenAI chat completions with VisCPM-Chat folders.

Each server is a subprocess on 127.0.0.1 and a free port, ready once `/health` answers, always ended; the two start
together, one through the console script `viscpm-serve`, one through `python -m viscpm_hf.serving`. Their answers,
streamed or not, must equal `generate` on the same messages and decoding: for a tiny Qwen2-based VisCPM-Chat (the
image as a data URI, raw base64, a local path and a file:// URI) and for the converted CPM-Bee one (a data URI: the
image forms are the processor's, the same for both).
"""

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from parity import PARITY_DIR, json_file, require_parity
from tiny_models import make_chat_model, make_processor, random_image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.cli.serving import model_manager
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.utils.import_utils import is_serve_available

import viscpm_hf
from viscpm_hf.convert.chat import convert_chat
from viscpm_hf.integrations import transformers_serve


if not is_serve_available():
    pytest.skip("transformers serve needs its extras: pip install 'viscpm-hf[serve]'", allow_module_level=True)

READY_TIMEOUT_S = 120  # importing torch, transformers and viscpm_hf, then loading the model, on a slow CI machine
REQUEST_TIMEOUT_S = 60
MAX_TOKENS = 6
QUESTION = "What is in the image?"
IMAGE_FORMS = ["data_uri", "base64", "path", "file_uri"]
CASES = [("generic", form) for form in IMAGE_FORMS] + [("cpmbee", "data_uri")]


def console_script() -> list[str]:
    """`viscpm-serve` as pip installed it for this interpreter."""
    script = shutil.which("viscpm-serve", path=sysconfig.get_path("scripts"))
    assert script, "no viscpm-serve console script: install the project (pip install -e '.[serve]')"
    return [script]


class Server:
    """`launcher FOLDER` (`viscpm-serve FOLDER` or the like) on a free port of 127.0.0.1, its output in `log`."""

    def __init__(self, launcher: list[str], folder: Path, log: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{port}", log
        command = [*launcher, str(folder), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_until_ready(self) -> None:
        """The forced model is loaded before the server listens, so `/health` answers once it can answer chats."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"viscpm-serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as response:
                    if json.loads(response.read()) == {"status": "ok"}:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"viscpm-serve not ready after {READY_TIMEOUT_S}s:\n{self.output()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Served:
    server: Server
    folder: Path
    model: object
    processor: object
    greedy: dict  # the greedy decoding, as the request's `generation_config` and as `generate` kwargs


def generic_folder(parent: Path) -> tuple[Path, dict]:
    """A tiny SigLIP + Qwen2 VisCPM-Chat with the byte-level tokenizer, and its greedy decoding."""
    folder = parent / "viscpm-chat-qwen2"
    tokenizer = viscpm_hf.build_byte_level_tokenizer()
    make_chat_model(tokenizer).save_pretrained(folder)
    make_processor(tokenizer).save_pretrained(folder)
    # Greedy over printable ASCII and </s>: a byte-level model may otherwise stop inside a UTF-8 character, which a
    # stream cannot show (it waits for the rest) while a full decode shows it as U+FFFD.
    printable = {i for i in range(len(tokenizer)) if (piece := tokenizer.decode([i])).isascii() and piece.isprintable()}
    keep = (printable - set(tokenizer.all_special_ids)) | {tokenizer.eos_token_id}
    return folder, {"num_beams": 1, "do_sample": False, "suppress_tokens": sorted(set(range(len(tokenizer))) - keep)}


def cpmbee_folder(parent: Path) -> tuple[Path, dict]:
    """The tiny original VisCPM-Chat (BEiT-3 + CPM-Bee) of ../shared/parity, converted, and its greedy decoding."""
    configs = json_file("configs.json")
    folder = convert_chat(
        PARITY_DIR / "viscpm_chat_tiny.safetensors",
        PARITY_DIR / "cpmbee_vocab.txt",
        parent / "viscpm-chat-cpmbee",
        llm_config=configs["cpmbee_tiny"],
        vision_config=configs["beit3_tiny"],
    )
    return folder, {"num_beams": 1, "do_sample": False}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers, started together (each spends most of its start importing); stopped whatever happens."""
    parent = tmp_path_factory.mktemp("served")
    folders = {"generic": generic_folder(parent)}
    if PARITY_DIR.is_dir():
        folders["cpmbee"] = cpmbee_folder(parent)
    launchers = {"generic": console_script(), "cpmbee": [sys.executable, "-m", "viscpm_hf.serving"]}
    started = {}
    try:
        for name, (folder, _) in folders.items():
            started[name] = Server(launchers[name], folder, parent / f"{name}.log")
        loaded = {}
        for name, (folder, greedy) in folders.items():  # loaded here while the servers load theirs
            model = AutoModelForImageTextToText.from_pretrained(folder).eval()
            loaded[name] = Served(started[name], folder, model, AutoProcessor.from_pretrained(folder), greedy)
        for server in started.values():
            server.wait_until_ready()
        yield loaded
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def served(request, servers) -> Served:
    if request.param == "cpmbee":
        require_parity()
    return servers[request.param]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "image.png"
    random_image(0).save(path)
    return path


def image_url(form: str, path: Path) -> str:
    """The image file as an OpenAI `image_url` may give it."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    forms = {"data_uri": f"data:image/png;base64,{encoded}", "base64": encoded}
    forms.update(path=str(path), file_uri=path.as_uri())
    return forms[form]


def openai_turn(url: str) -> list[dict]:
    image = {"type": "image_url", "image_url": {"url": url}}
    return [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}]


def chat(served: Served, messages: list, stream: bool, **fields) -> dict:
    """One chat completion: the answer's text, finish reason and usage (the chunks joined when streamed)."""
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "stream": stream, **fields}
    if stream:  # OpenAI's way to get the usage of a stream (transformers 5.25 sends it only then; 5.24 always does)
        body["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(
        f"{served.server.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            payload = response.read().decode()
    except urllib.error.HTTPError as error:
        pytest.fail(f"HTTP {error.code} {error.read().decode()[-500:]}; the server said:\n{served.server.output()}")
    if not stream:
        answer = json.loads(payload)
        choice = answer["choices"][0]
        text, finish_reason, usage = choice["message"]["content"], choice["finish_reason"], answer["usage"]
        return {"text": text, "finish_reason": finish_reason, "usage": usage}
    chunks = [json.loads(line.removeprefix("data: ")) for line in payload.splitlines() if line.startswith("data: {")]
    errors = [chunk["error"] for chunk in chunks if "error" in chunk]
    assert not errors, f"{errors}; the server said:\n{served.server.output()}"
    choices = [chunk["choices"][0] for chunk in chunks if chunk["choices"]]  # the usage chunk may have none
    assert choices[0]["delta"]["role"] == "assistant"
    text = "".join(choice["delta"].get("content") or "" for choice in choices)
    return {"text": text, "finish_reason": choices[-1]["finish_reason"], "usage": chunks[-1]["usage"]}


def generated(served: Served, **decoding) -> tuple[str, int]:
    """What `generate` answers to the question about the image (given as a PIL image), and the prompt's length."""
    image = {"type": "image", "image": random_image(0)}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": QUESTION}]}]
    inputs = served.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    output = served.model.generate(**inputs, max_new_tokens=MAX_TOKENS, **decoding)
    prompt_length = inputs["input_ids"].shape[1]
    return served.processor.decode(output[0, prompt_length:], skip_special_tokens=True), prompt_length


# --- registration -------------------------------------------------------------------------------------------


def test_serve_finds_the_chat_model_by_name_and_as_an_image_text_to_text_model():
    """What serve looks up instead of the Auto classes: `getattr(transformers, architecture)` and the VLM table."""
    transformers_serve.register()  # as importing viscpm_hf.serving does
    transformers_module = model_manager.transformers  # the module serve's loader looks architectures up in
    assert transformers_module.VisCPMChatForConditionalGeneration is viscpm_hf.VisCPMChatForConditionalGeneration
    assert transformers_module.CpmBeeForCausalLM is viscpm_hf.CpmBeeForCausalLM
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES["viscpm_chat"] == "VisCPMChatForConditionalGeneration"


def test_a_converted_folder_names_its_architecture(servers):
    """An architecture serve finds by name (see test above)."""
    require_parity()
    config = json.loads((servers["cpmbee"].folder / "config.json").read_text())
    assert config["architectures"] in [[head.__name__] for head in transformers_serve.CHAT_HEADS.values()]


# --- answers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("served, form", CASES, indirect=["served"])
def test_greedy_answer_equals_generate(served, image_file, form, stream):
    expected, prompt_length = generated(served, **served.greedy)
    answer = chat(served, openai_turn(image_url(form, image_file)), stream, generation_config=json.dumps(served.greedy))
    assert expected and answer["text"] == expected
    assert answer["usage"]["prompt_tokens"] == prompt_length  # the same prompt, image placeholders included
    assert answer["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("served", ["generic", "cpmbee"], indirect=True)
def test_the_folders_own_decoding_when_the_request_sets_none(served, image_file, stream):
    """Without a `generation_config`, serve decodes as the folder's generation_config.json says (3 beams, and for
    CPM-Bee the original's rules). Streamed, the beam answer comes when it is known and the stream closes."""
    assert served.model.generation_config.num_beams == 3
    expected, _ = generated(served)
    if stream and served.model.config.model_type == "viscpm_chat":
        # transformers' own beam search cannot stream: refused before any work, with how to stream, and closed
        body = {"messages": openai_turn(image_url("data_uri", image_file)), "max_tokens": MAX_TOKENS, "stream": True}
        request = urllib.request.Request(
            f"{served.server.url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            payload = response.read().decode()
        assert "num_beams` is set to 1" in payload
        return
    answer = chat(served, openai_turn(image_url("data_uri", image_file)), stream=stream)
    assert expected and answer["text"] == expected


def test_the_openai_client(servers, image_file):
    """The README's client call: `openai.OpenAI(base_url=...)`, the server's model name, greedy through extra_body."""
    openai = pytest.importorskip("openai")
    served = servers["generic"]
    client = openai.OpenAI(
        base_url=f"{served.server.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
    )
    request = dict(
        model=str(served.folder),
        messages=openai_turn(image_url("data_uri", image_file)),
        max_tokens=MAX_TOKENS,
        extra_body={"generation_config": json.dumps(served.greedy)},
    )
    expected, _ = generated(served, **served.greedy)
    assert client.chat.completions.create(**request).choices[0].message.content == expected
    chunks = client.chat.completions.create(**request, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == expected


def test_a_program_that_imports_viscpm_hf_serving_only_when_run(servers, image_file, tmp_path):
    """transformers 5.25 loads the model in a spawned process, which re-runs the main module but not its
    `if __name__ == "__main__":` block: the model's process must know viscpm_hf all the same."""
    program = tmp_path / "serve.py"
    program.write_text('if __name__ == "__main__":\n    from viscpm_hf.serving import main\n\n    main()\n')
    served = servers["generic"]
    server = Server([sys.executable, str(program)], served.folder, tmp_path / "serve.log")
    try:
        server.wait_until_ready()
        expected, _ = generated(served, **served.greedy)
        answer = chat(replace(served, server=server), openai_turn(image_url("data_uri", image_file)), stream=False,
                      generation_config=json.dumps(served.greedy))  # fmt: skip
        assert expected and answer["text"] == expected
    finally:
        server.stop()
