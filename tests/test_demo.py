"""The web demo in a real browser: `python -m viscpm_hf.demo` on 127.0.0.1, driven by Debian's chromium through
Playwright (never a browser Playwright downloads; `.ci/run` installs chromium with apt-get).

The page must show what `model.chat` answers for the same default model and questions, over two turns (the second
reuses the image features in the history), and the Paint tab must draw from a Chinese prompt.
Set VISCPM_DEMO_SCREENSHOTS=DIR to keep screenshots of both tabs (the README's docs/demo.png is made from them).
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


REPOSITORY = Path(__file__).resolve().parents[1]
ELEPHANT = REPOSITORY / "examples" / "assets" / "elephant.png"
QUESTIONS = ("What is shown in the image?", "图中是什么？")
PAINT_PROMPT = "汽车的表情符号"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
STARTUP_TIMEOUT_S = 240  # loads both models; about 40 s on 2 cores with the pivots cached
STEP_TIMEOUT_MS = 120_000


def find_chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_served(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo exited with {server.returncode} before serving:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the demo did not serve {url} within {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


def expected_answers() -> list[str]:
    """What `model.chat` answers in two turns, with the loader the demo uses."""
    from PIL import Image

    from viscpm_hf.demo import load_chat_model

    model, processor = load_chat_model()
    first, history = model.chat(Image.open(ELEPHANT).convert("RGB"), QUESTIONS[0], processor)
    second, _ = model.chat(None, QUESTIONS[1], processor, history=history)
    return [first, second]


@pytest.mark.slow  # the demo server loads both default models (and this process the chat one) before a browser drives it
def test_chat_and_paint_in_chromium(tmp_path):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no chromium found (CHROMIUM, PATH, /usr/bin/chromium): apt-get install -y chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason='Playwright is not installed: pip install -e ".[dev]"')

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tmp_path / "demo.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    env["GRADIO_TEMP_DIR"] = str(tmp_path / "gradio")  # uploads and drawn images
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "viscpm_hf.demo", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        expected = expected_answers()  # while the server loads
        assert all(expected), expected
        wait_until_served(url, server, log)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900},
            )  # fmt: skip
            try:
                drive_the_page(sync_api, browser, url, expected)
            finally:
                browser.close()
    finally:
        stop(server)


def drive_the_page(sync_api, browser, url: str, expected: list[str]) -> None:
    expect = sync_api.expect
    outside = []

    def only_the_demo(route):  # offline: the page may load nothing but the app itself
        if route.request.url.startswith(url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    browser.route("**/*", only_the_demo)
    page = browser.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(url)
    screenshots = os.environ.get("VISCPM_DEMO_SCREENSHOTS")

    # Chat: upload, ask, then ask again about the same image (its features come from the history).
    page.locator("#chat-image input[type=file]").set_input_files(str(ELEPHANT))
    page.locator("#chat-image img").first.wait_for()
    bot = page.locator('#chatbot [data-testid="bot"]')
    for turn, (question, answer) in enumerate(zip(QUESTIONS, expected)):
        page.locator("#question textarea").fill(question)
        page.locator("#question textarea").press("Enter")
        expect(bot).to_have_count(turn + 1, timeout=STEP_TIMEOUT_MS)
        expect(bot.nth(turn)).to_have_text(answer, timeout=STEP_TIMEOUT_MS)
    expect(page.locator('#chatbot [data-testid="user"]')).to_have_text(list(QUESTIONS))
    if screenshots:
        page.screenshot(path=str(Path(screenshots) / "demo_chat.png"))

    # Paint: a Chinese prompt; the defaults draw 32x32, shown enlarged to 256.
    page.get_by_role("tab", name="Paint").click()
    page.locator("#prompt textarea").fill(PAINT_PROMPT)
    page.locator("#paint").click()
    images = page.locator("#gallery img")
    expect(images).to_have_count(4, timeout=STEP_TIMEOUT_MS)
    for i in range(4):
        expect(images.nth(i)).to_have_js_property("complete", True)
        assert images.nth(i).evaluate("img => img.naturalWidth") == 256
    if screenshots:
        page.screenshot(path=str(Path(screenshots) / "demo_paint.png"))
    assert not outside, f"the page tried to load from outside the demo: {outside}"


@pytest.mark.parametrize("flag", ["--chat_model", "--paint_model"])
def test_missing_defaults_name_the_flag(monkeypatch, tmp_path, flag):
    # As installed from a wheel: no examples/ beside the package.
    from viscpm_hf import demo

    monkeypatch.setattr(demo, "REPOSITORY", tmp_path)
    monkeypatch.setattr(demo, "DEFAULT_CHAT", tmp_path / "examples" / "mpm" / "default" / "chat")
    monkeypatch.setattr(demo, "DEFAULT_PAINT", tmp_path / "examples" / "mpm" / "default" / "paint")
    load = demo.load_chat_model if flag == "--chat_model" else demo.load_paint_pipeline
    with pytest.raises(SystemExit, match=f"pass {flag} FOLDER"):
        load()
    with pytest.raises(SystemExit, match=f"{flag} {tmp_path / 'nowhere'} is not a folder"):
        load(tmp_path / "nowhere")


def test_chat_tab_shows_what_chat_answers(tmp_path, chat_model, processor, image):
    # A plain VisCPM-Chat folder loads with the Auto classes. With one beam the tab streams, then shows chat()'s own
    # answer; its second turn sends no image (the features come from the history). With the paper's 3 beams (the
    # folder's default) nothing streams and the answer is the same as chat()'s.
    from viscpm_hf.demo import ChatTab, load_chat_model

    chat_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model, loaded_processor = load_chat_model(tmp_path)
    for num_beams in (1, None):
        kwargs = {"max_new_tokens": 6, "num_beams": num_beams}
        tab = ChatTab(model, loaded_processor, **kwargs)
        assert tab.streams == (num_beams == 1)
        kwargs = {name: value for name, value in kwargs.items() if value is not None}
        history, messages, expected_history = None, [], None
        for turn, question in enumerate(("What is shown?", "And the colour?")):
            first_image = image if turn == 0 else None
            expected, expected_history = model.chat(
                first_image, question, loaded_processor, history=expected_history, **kwargs
            )
            shown = list(tab.respond(question, image, history, messages))
            textbox, messages, history = shown[-1]
            assert textbox == "" and messages[-1] == {"role": "assistant", "content": expected}
            # the question alone, then the answer: growing with one beam, whole with beams
            assert shown[0][1][-1]["content"] == ""
            assert len(shown) > 2 if tab.streams and expected else len(shown) == 2
        assert [m["content"] for m in messages[::2]] == ["What is shown?", "And the colour?"]
        assert history.image_features.shape[0] == 1  # one image, through the tower once
        assert len(history.messages) == 4
