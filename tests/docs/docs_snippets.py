"""The code blocks of README.md and docs/: found, and run the way a reader would run them.

A block is a fenced block at the start of a line. Its language is one of `LANGUAGES`; `python` and `bash` blocks run
unless the last non-blank line above the fence is a marker with the reason they cannot:

    <!-- skip: needs a GPU -->

A marked block is only checked for syntax (`compile` for Python, `bash -n` for shell). The blocks of one page run in
order, in one Python namespace (as a reader pastes them into one session), in a folder that holds what the pages
name: `viscpm-chat` and `viscpm-paint` (tiny models built by `make_workspace`), and `examples/` (a link to the
repository's). Each bash command runs where it is cheap to: `python SCRIPT ...`, `python -m MODULE ...` and this
project's console scripts in the test process (no new interpreter to start), anything else in `bash`.
"""

import configparser
import contextlib
import importlib
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


REPOSITORY = Path(__file__).resolve().parents[2]
LANGUAGES = ("python", "bash", "text")
RUNNABLE = ("python", "bash")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<info>[\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*skip:\s*(?P<reason>.*?)\s*-->$")
BASH_TIMEOUT_S = 120
# Commands a test must never run (they install, need root, start servers that run until stopped, or launch
# distributed runs): a block holding one must carry a skip marker.
NEVER_RUN = ("pip", "apt-get", "sudo", "curl", "viscpm-serve", "viscpm-demo", "accelerate", "export")


def pages() -> list[Path]:
    """README.md and every Markdown page of the site."""
    return [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").rglob("*.md"))]


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None  # the marker's reason; None: the block runs

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPOSITORY)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, start = opening["fence"], i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == fence), None)
        if end is None:
            raise ValueError(f"{path.relative_to(REPOSITORY)}:{start + 1}: a fence that is never closed")
        above = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(above)
        found.append(Block(path, start + 1, opening["info"], "\n".join(lines[start + 1 : end]) + "\n",
                           marker["reason"] if marker else None))  # fmt: skip
        i = end + 1
    return found


# --- a workspace holding what the pages name ----------------------------------------------------------------------


def make_workspace(folder: Path) -> Path:
    """Tiny models under the names the pages use, and the repository's examples beside them."""
    import torch
    from tiny_models import make_chat_model, make_processor
    from tiny_paint import tiny_pipeline

    import viscpm_hf

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "examples").symlink_to(REPOSITORY / "examples", target_is_directory=True)
    tokenizer = viscpm_hf.build_byte_level_tokenizer()
    chat = make_chat_model(tokenizer)
    chat.generation_config.max_new_tokens = 8  # the paper's 512 would be noise on a random model
    chat.save_pretrained(folder / "viscpm-chat")
    make_processor(tokenizer).save_pretrained(folder / "viscpm-chat")
    tiny_pipeline().save_pretrained(folder / "viscpm-paint")
    torch.manual_seed(0)
    return folder


# --- running ----------------------------------------------------------------------------------------------------


def run_python(block: Block, namespace: dict) -> None:
    exec(compile(block.code, block.where, "exec"), namespace)


def commands(code: str) -> Iterator[str]:
    """The commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    pending = ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            yield command


def console_scripts() -> dict[str, str]:
    """This project's console scripts: name -> `module:function` (setup.cfg)."""
    config = configparser.ConfigParser()
    config.read(REPOSITORY / "setup.cfg", encoding="utf-8")
    entries = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in entry.split("=", 1)) for entry in entries)


@contextlib.contextmanager
def arguments(argv: list[str]):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def exit_code(call) -> int:
    try:
        result = call()
    except SystemExit as done:
        result = done.code
    return 0 if result is None else result if isinstance(result, int) else 1


def run_command(command: str, where: str) -> None:
    words = shlex.split(command, comments=True)
    scripts = console_scripts()
    if words[:2] == ["python", "-m"]:
        with arguments([words[2], *words[3:]]):
            code = exit_code(lambda: runpy.run_module(words[2], run_name="__main__", alter_sys=True) and None)
    elif words[0] == "python" and len(words) > 1 and words[1].endswith(".py"):
        with arguments(words[1:]):
            code = exit_code(lambda: runpy.run_path(words[1], run_name="__main__") and None)
    elif words[0] in scripts:
        module, function = scripts[words[0]].split(":")
        main = getattr(importlib.import_module(module), function)
        with arguments(words):
            code = exit_code(main)
    else:
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=BASH_TIMEOUT_S)
        code = done.returncode
        if code:
            raise AssertionError(
                f"{where}: `{command}` exited with {code}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
    if code:
        raise AssertionError(f"{where}: `{command}` exited with {code}")


def run_bash(block: Block) -> None:
    for command in commands(block.code):
        for part in re.split(r"\s*&&\s*", command):
            words = shlex.split(part, comments=True)
            program = next((w for w in words if "=" not in w), "")  # past VAR=value prefixes
            if program in NEVER_RUN:
                raise AssertionError(f"{block.where}: `{part}` must not run in a test: mark the block "
                                     "`<!-- skip: why -->`")  # fmt: skip
            run_command(part, block.where)


def check_syntax(block: Block) -> None:
    """What a marked block gets: Python compiles, shell parses (`bash -n`)."""
    if block.language == "python":
        compile(block.code, block.where, "exec")
    elif block.language == "bash":
        done = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise SyntaxError(f"{block.where}: bash -n: {done.stderr.strip()}")
