"""`viscpm-serve` (transformers' own `transformers serve`) answers OpenAI chat completions with VisCPM-Chat folders,
and reads no more than its flags allow.

Each server is a subprocess on 127.0.0.1 and a free port, ready once `/health` answers, always ended; they start
together, through the console script `viscpm-serve` or `python -m viscpm_hf.serving`. Their answers, streamed or not,
must equal `generate` on the same messages and decoding: for a tiny Qwen2-based VisCPM-Chat (the image as a data URI,
raw base64, a local path, a file:// URI and an http URL, on a server started with the flags that allow them) and for
the converted CPM-Bee one (a data URI: the image forms are the processor's, the same for both). Servers with the
default flags, and with remote images but no private addresses, refuse what they must with OpenAI's error JSON; image
URLs lead to an `ImageHost` on 127.0.0.1, never further.
"""

import base64
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from parity import PARITY_DIR, json_file, require_parity
from test_image_inputs import ImageHost, png_header
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

READY_TIMEOUT_S = 240  # importing torch, transformers and viscpm_hf, then loading the model, 4 servers on 2 busy cores
REQUEST_TIMEOUT_S = 60
MAX_TOKENS = 6
QUESTION = "What is in the image?"
IMAGE_FORMS = ["data_uri", "base64", "path", "file_uri", "http"]
CASES = [("generic", form) for form in IMAGE_FORMS] + [("cpmbee", "data_uri")]
NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}  # image URLs stay on this machine


def console_script() -> list[str]:
    """`viscpm-serve` as pip installed it for this interpreter."""
    script = shutil.which("viscpm-serve", path=sysconfig.get_path("scripts"))
    assert script, "no viscpm-serve console script: install the project (pip install -e '.[serve]')"
    return [script]


class Server:
    """`launcher FOLDER` (`viscpm-serve FOLDER` or the like) on a free port of 127.0.0.1, its output in `log`. Without a
    folder it loads no model: enough for requests the server refuses before it looks for one."""

    def __init__(self, launcher: list[str], folder: Path | None, log: Path, flags: tuple[str, ...] = ()):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{port}", log
        model = [] if folder is None else [str(folder)]
        command = [*launcher, *model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *flags]
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **NO_PROXY}
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
    folder: Path | None  # None: no model (see `servers`)
    model: object = None
    processor: object = None
    greedy: dict | None = None  # the greedy decoding, as the request's `generation_config` and as `generate` kwargs


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
def image_host():
    host = ImageHost()
    yield host
    host.close()


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, image_host):
    """The test image, in the folder the open server reads, and at `/image.png` of the image host."""
    path = tmp_path_factory.mktemp("images") / "image.png"
    random_image(0).save(path)
    image_host.add("/image.png", path.read_bytes())
    return path


SLOW_IMAGE_S = 10  # how long the slow image source waits before it answers (see the load test)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, image_file):
    """All the servers, started together (each spends most of its start importing); stopped whatever happens.

    'generic' (the tiny Qwen2 folder) reads images from everywhere: files in `image_file`'s folder only, any URL.
    'cpmbee' (the converted folder) has the default flags: inline images only. 'closed' (the defaults) and 'remote'
    (--allow-remote-images, public addresses only) load no model: the requests sent to them are refused before serve
    looks for one, and a server without a model starts in one import, not two (5.25 spawns a model's process)."""
    parent = tmp_path_factory.mktemp("served")
    python_m = [sys.executable, "-m", "viscpm_hf.serving"]
    open_flags = ["--allow-local-images", str(image_file.parent), "--allow-remote-images", "--allow-private-addresses"]
    setups = {  # name: launcher, (folder, greedy decoding) or None, flags
        "generic": (console_script(), generic_folder(parent), [*open_flags, "--image-timeout", str(4 * SLOW_IMAGE_S)]),
        "closed": (console_script(), None, []),
        "remote": (python_m, None, ["--allow-remote-images"]),
    }
    if PARITY_DIR.is_dir():
        setups["cpmbee"] = (python_m, cpmbee_folder(parent), [])
    started = {}
    try:
        for name, (launcher, folder, flags) in setups.items():
            started[name] = Server(launcher, folder and folder[0], parent / f"{name}.log", flags)
        loaded = {}
        for name, (_, folder, _) in setups.items():  # loaded here while the servers load theirs
            if folder is None:
                loaded[name] = Served(started[name], None)
                continue
            model = AutoModelForImageTextToText.from_pretrained(folder[0]).eval()
            loaded[name] = Served(started[name], folder[0], model, AutoProcessor.from_pretrained(folder[0]), folder[1])
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


def image_url(form: str, path: Path, host: ImageHost | None = None) -> str:
    """The image file as an OpenAI `image_url` may give it (`http`: at `host`, where `image_file` put it)."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    forms = {"data_uri": f"data:image/png;base64,{encoded}", "base64": encoded}
    forms.update(path=str(path), file_uri=path.as_uri(), http=host and f"{host.url}/{path.name}")
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
def test_greedy_answer_equals_generate(served, image_file, image_host, form, stream):
    expected, prompt_length = generated(served, **served.greedy)
    url = image_url(form, image_file, image_host)
    answer = chat(served, openai_turn(url), stream, generation_config=json.dumps(served.greedy))
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


# --- what clients can make the server read, and how it refuses ------------------------------------------------------

IMAGE_PARAM = "messages[0].content[0].image_url"


def post(server: Server, body: dict | bytes, timeout: float = REQUEST_TIMEOUT_S) -> tuple[int, dict]:
    """A chat completion's HTTP status and JSON answer, whatever the status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{server.url}/v1/chat/completions", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def asking(url: str, **fields) -> dict:
    """A request asking the question about the image at `url`."""
    return {"messages": openai_turn(url), "max_tokens": MAX_TOKENS, **fields}


def assert_refused(server: Server, body: dict | bytes, status: int, message: str, param: str | None = None) -> None:
    """The request gets `status` and OpenAI's error JSON, its message matching `message` (a regex)."""
    answer_status, answer = post(server, body)
    assert answer_status == status, f"{answer}; the server said:\n{server.output()}"
    assert list(answer) == ["error"] and answer["error"]["type"] == "invalid_request_error", answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert re.search(message, answer["error"]["message"]), answer["error"]["message"]
    assert answer["error"]["param"] == param, answer


def test_local_files_and_urls_are_refused_by_default(servers, image_file, image_host):
    closed = servers["closed"].server
    for form in ("path", "file_uri"):
        assert_refused(closed, asking(image_url(form, image_file)), 403, "--allow-local-images DIR", IMAGE_PARAM)
    url = image_url("http", image_file, image_host)
    assert_refused(closed, asking(url), 403, "--allow-remote-images", IMAGE_PARAM)
    # inline images are read by default: the cpmbee server's answers (test_greedy_answer_equals_generate)


def test_openai_clients_read_the_refusal(servers, image_file):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url=f"{servers['closed'].server.url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0
    )
    with pytest.raises(openai.PermissionDeniedError) as refusal:
        client.chat.completions.create(model="any", messages=openai_turn(str(image_file)), max_tokens=MAX_TOKENS)
    assert refusal.value.param == IMAGE_PARAM and refusal.value.code == "image_source_not_allowed"
    assert "--allow-local-images DIR" in refusal.value.message


def test_urls_to_a_loopback_address_need_private_addresses_allowed(servers, image_file, image_host):
    """Refused even with --allow-remote-images; with --allow-private-addresses too, see the 'http' answer test."""
    url = image_url("http", image_file, image_host)
    assert_refused(servers["remote"].server, asking(url), 403, r"127\.0\.0\.1.*--allow-private-addresses", IMAGE_PARAM)
    localhost = url.replace("127.0.0.1", "localhost")
    assert_refused(servers["remote"].server, asking(localhost), 403, "--allow-private-addresses", IMAGE_PARAM)


def test_local_files_are_read_from_the_allowed_folder_only(servers, image_file, tmp_path):
    generic = servers["generic"].server
    outside = tmp_path / "outside.png"
    shutil.copy(image_file, outside)
    link = image_file.parent / f"link-to-{tmp_path.name}.png"
    link.symlink_to(outside)
    for url in (str(outside), outside.as_uri(), f"../{tmp_path.name}/outside.png", link.name):
        assert_refused(generic, asking(url), 403, "outside the image folder", IMAGE_PARAM)
    assert post(generic, asking(image_file.name))[0] == 200  # relative to the folder


@pytest.mark.parametrize("width, height", [(12_000, 12_000), (20_000, 20_000)])
def test_decompression_bombs_are_refused_before_decoding(servers, width, height):
    """Over --max-image-pixels (64 million) and over PIL's own limit: 413, and the server's memory stays as it was
    (decoding would take 144 and 400 MB; the header is all there is to read)."""
    closed = servers["closed"].server
    peak = peak_memory(closed)
    bomb = base64.b64encode(png_header(width, height)).decode()
    assert_refused(
        closed, asking(f"data:image/png;base64,{bomb}"), 413, f"{width} x {height} pixels|too large", IMAGE_PARAM
    )
    assert peak_memory(closed) - peak < 50 * 2**20


def peak_memory(server: Server) -> int:
    """The most memory the server's process has held so far, in bytes (where its images are read)."""
    status = Path(f"/proc/{server.process.pid}/status")
    if not status.exists():
        pytest.skip("reads the peak memory of a process from /proc (Linux)")
    return 1024 * int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM")))


QUESTION_TOO_LONG = "Why? " * 200  # 1000 tokens of the byte-level tokenizer; the tiny model takes 256
TEXT = {"type": "text", "text": QUESTION}


@pytest.mark.parametrize(
    "body, message, param",
    [
        ({"messages": QUESTION}, "`messages` is .*send a list of messages", "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}]}, "has no text", "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}, "Hi"]}]},
            "item 1",
            "messages",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}, TEXT]}]},
            "no URL",
            IMAGE_PARAM,
        ),
        ({"messages": [{"role": "user", "content": QUESTION_TOO_LONG}]}, r"\d+ tokens.* 256", None),
        ({"messages": [{"role": "user", "content": QUESTION}], "stop": ["."]}, "`stop` is not supported", "stop"),
        (b"{not json", "not JSON", None),
    ],
    ids=["messages-a-string", "no-question", "item-no-dict", "image-without-url", "too-long", "stop", "not-json"],
)
def test_client_mistakes_are_400s_that_say_what_to_fix(servers, body, message, param):
    assert_refused(servers["generic"].server, body, 400, message, param)


def test_a_slow_image_source_holds_up_no_other_client(servers, image_file, image_host):
    """One client's image URL answers after SLOW_IMAGE_S seconds; meanwhile three clients send 4 requests each
    (inline images). serve loads images where it tokenizes (on its event loop in transformers 5.24, in one thread
    shared by all requests in 5.25): unguarded, none of theirs would be answered before the slow image arrives.
    Here each client has its first answer long before, and most of them theirs before the slow one (on busy cores
    the last few may come after it)."""
    served = servers["generic"]
    greedy = json.dumps(served.greedy)
    slow_url = image_host.add("/slow.png", image_file.read_bytes(), delay=SLOW_IMAGE_S)
    inline = asking(image_url("data_uri", image_file), generation_config=greedy)

    def answered_at(body: dict) -> float:
        status, answer = post(served.server, body)
        assert status == 200, answer
        return time.monotonic()

    def client(requests: int) -> list[float]:
        return [answered_at(inline) for _ in range(requests)]

    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        slow = pool.submit(answered_at, asking(slow_url, generation_config=greedy))
        while "/slow.png" not in image_host.requested and time.monotonic() < start + REQUEST_TIMEOUT_S:
            time.sleep(0.02)  # the slow request is being served
        fast = [pool.submit(client, 4) for _ in range(3)]
        fast_answered = [future.result(timeout=2 * REQUEST_TIMEOUT_S) for future in fast]
        slow_answered = slow.result(timeout=2 * REQUEST_TIMEOUT_S)
    times = [[round(at - start, 2) for at in answers] for answers in fast_answered], round(slow_answered - start, 2)
    assert slow_answered - start >= SLOW_IMAGE_S, times
    assert all(answers[0] < start + SLOW_IMAGE_S - 2 for answers in fast_answered), times
    assert sum(at < slow_answered for answers in fast_answered for at in answers) >= 6, times


def test_an_adapter_folder_is_refused_in_one_line_that_says_how_to_serve_it(tmp_path):
    """The shipped MPM chat default is a PEFT adapter (no weights of its own, no processor): serve would fail deep in
    its loader; viscpm-serve says what the folder is and the command that writes a servable one."""
    adapter = tmp_path / "adapter"
    shutil.copytree(Path(__file__).parents[1] / "examples" / "mpm" / "default" / "chat", adapter)
    run = subprocess.run(
        [*console_script(), str(adapter)], capture_output=True, text=True, timeout=REQUEST_TIMEOUT_S * 2,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    message = " ".join(run.stderr.replace("\u2502", " ").split())  # typer's box, its borders and line breaks
    assert "is a PEFT adapter (adapter_config.json), not a model folder" in message
    assert "python -m viscpm_hf.mpm.chat_models" in message and "then viscpm-serve OUTPUT" in message
    (adapter / "preprocessor_config.json").write_text("{}")  # an adapter saved with its processor is serve's to load
    from viscpm_hf.serving import check_model_folder

    check_model_folder(str(adapter))
