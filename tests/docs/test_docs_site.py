"""The documentation site builds with `mkdocs build --strict` (no broken link or anchor, no page outside the nav, no
reference mkdocstrings cannot resolve), and the README keeps its contracts: the test command `.ci/run` reads, links
that land on the pages, its length."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from docs_snippets import REPOSITORY


BUILD_TIMEOUT_S = 180
README = REPOSITORY / "README.md"


def test_the_site_builds_strictly(tmp_path):
    missing = [name for name in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
               if importlib.util.find_spec(name) is None]  # fmt: skip
    if missing:
        pytest.skip(f'{", ".join(missing)} not installed: pip install -e ".[docs]" (the README test command does)')
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's banner about its successor
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPOSITORY / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    chat_page = (tmp_path / "site" / "chat" / "index.html").read_text(encoding="utf-8")
    assert "VisCPMChatForConditionalGeneration" in chat_page
    reference = (tmp_path / "site" / "api" / "chat" / "index.html").read_text(encoding="utf-8")
    assert 'id="viscpm_hf.VisCPMChatForConditionalGeneration.chat"' in reference  # docstrings were rendered


def test_the_api_reference_covers_every_public_name():
    import viscpm_hf

    documented = set()
    for page in (REPOSITORY / "docs" / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: viscpm_hf\.(\w+)\s*$", page.read_text(encoding="utf-8"), re.MULTILINE))
    assert set(viscpm_hf.__all__) <= documented, sorted(set(viscpm_hf.__all__) - documented)


def test_the_readme_holds_the_test_command_that_ci_runs():
    """`.ci/run` runs the one README line matching `^pip install .*python -m pytest`, cut at `&& HF_HUB_OFFLINE=1
    python -m pytest` for its install step; it must install the docs extra, or the site test skips in CI."""
    lines = [
        line
        for line in README.read_text(encoding="utf-8").splitlines()
        if re.match(r"^pip install .*python -m pytest", line)
    ]
    assert len(lines) == 1, lines
    install, separator, _ = lines[0].partition(" && HF_HUB_OFFLINE=1 python -m pytest")
    assert separator, lines[0]
    extras = re.search(r'-e "\.\[([\w,]+)\]"', install)
    assert extras and {"dev", "docs"} <= set(extras[1].split(",")), install


def test_the_readme_stays_short_and_its_links_land():
    slugify = pytest.importorskip("markdown.extensions.toc", reason='pip install -e ".[docs]"').slugify
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    problems = []
    for target in re.findall(r"\]\(((?:docs|examples)/[^)\s]+)\)", text):
        path, _, anchor = target.partition("#")
        if not (REPOSITORY / path).exists():
            problems.append(f"{target}: no such file")
        elif anchor:
            headings = re.findall(r"^#+ (.+)$", (REPOSITORY / path).read_text(encoding="utf-8"), re.MULTILINE)
            if anchor not in {slugify(heading, "-") for heading in headings}:
                problems.append(f"{target}: no heading with that anchor")
    assert not problems, "\n".join(problems)
