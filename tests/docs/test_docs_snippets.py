"""Every code block of README.md and docs/ runs, on tiny models built here; a block marked with the reason it cannot
run (a GPU, the Hub, a release download, a long run, a server) is checked for syntax only. See docs_snippets.py."""

import os

import pytest
from docs_snippets import LANGUAGES, RUNNABLE, blocks, check_syntax, make_workspace, pages, run_bash, run_python


PAGES = pages()
RUNNING_PAGES = [page for page in PAGES if any(b.language in RUNNABLE and b.skip is None for b in blocks(page))]
MARKED_PAGES = [page for page in PAGES if any(b.language in RUNNABLE and b.skip is not None for b in blocks(page))]


def page_id(page) -> str:
    return page.name if page.parent.name != "api" else f"api/{page.name}"


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("docs-workspace"))


@pytest.fixture
def one_thread():
    """The tiny models gain nothing from threads, and lose much when other work shares the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_block_names_its_language_and_every_mark_its_reason():
    problems = []
    for page in PAGES:
        for block in blocks(page):
            if block.language not in LANGUAGES:
                problems.append(f"{block.where}: language {block.language!r}, not one of {LANGUAGES}")
            elif block.skip is not None and block.language not in RUNNABLE:
                problems.append(f"{block.where}: a {block.language} block is never run; drop its skip marker")
            elif block.skip is not None and len(block.skip) < 10:
                problems.append(f"{block.where}: the skip marker must say why the block cannot run: {block.skip!r}")
    assert not problems, "\n".join(problems)


def test_the_readme_and_the_pages_have_blocks_that_run():
    assert len(RUNNING_PAGES) >= 5, [page_id(page) for page in RUNNING_PAGES]
    readme = blocks(PAGES[0])
    assert sum(b.language == "python" and b.skip is None for b in readme) >= 2  # Chat and Paint


@pytest.mark.parametrize("page", RUNNING_PAGES, ids=page_id)
def test_the_blocks_of_a_page_run_in_order(page, workspace, monkeypatch, one_thread):
    monkeypatch.chdir(workspace)
    namespace = {"__name__": "__docs__"}  # one session per page, as a reader pastes its blocks
    for block in blocks(page):
        if block.skip is not None or block.language not in RUNNABLE:
            continue
        try:
            run_python(block, namespace) if block.language == "python" else run_bash(block)
        except Exception as error:
            raise AssertionError(
                f"{block.where}: the {block.language} block failed: {type(error).__name__}: {error}"
            ) from error


@pytest.mark.parametrize("page", MARKED_PAGES, ids=page_id)
def test_the_marked_blocks_of_a_page_parse(page):
    for block in blocks(page):
        if block.skip is not None:
            check_syntax(block)


def test_the_fresh_machine_commands_are_the_same_in_the_readme_and_the_quickstart():
    def commands(page):
        return {line for b in blocks(page) if b.language == "bash" for line in b.code.splitlines()
                if line.startswith("pip install torch==")}  # fmt: skip

    readme, quickstart = commands(PAGES[0]), commands(next(p for p in PAGES if p.name == "quickstart.md"))
    assert len(readme) == 2 and readme <= quickstart, (readme, quickstart)


def test_the_snippets_see_no_hub():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
