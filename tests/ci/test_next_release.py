""".ci/next_release.py, the next-release canary of .ci/run, without the network: setup.cfg's caps, pip's version
lists, which releases lie above the caps, the lines the canary prints, and the plugin that records failing tests."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version


CI = Path(__file__).resolve().parents[2] / ".ci"
spec = importlib.util.spec_from_file_location("next_release", CI / "next_release.py")
next_release = importlib.util.module_from_spec(spec)
spec.loader.exec_module(next_release)

SETUP_CFG = """\
[metadata]
name = something

[options]
python_requires = >=3.10
install_requires =
    torch>=2.13,<2.14
    transformers>=5.24,<5.26
    # a comment between requirements, as setup.cfg has
    diffusers>=0.42,<0.43  # and one after a requirement
    Accelerate >= 1.15, <= 1.16
    peft~=0.21.0
    trl>=1.16
    numpy>=2.0,<2.5; python_version >= "3.10"

[options.extras_require]
dev =
    transformers<9
"""


def test_the_caps_are_the_upper_bounds_of_install_requires():
    caps = next_release.parse_caps(SETUP_CFG)
    assert list(caps) == ["transformers", "diffusers", "accelerate", "peft", "trl"]
    assert caps["transformers"] == SpecifierSet("<5.26") and caps["diffusers"] == SpecifierSet("<0.43")
    assert caps["accelerate"] == SpecifierSet("<=1.16")  # any spelling of the name, spaces around the operators
    assert caps["peft"] == SpecifierSet("~=0.21.0") and caps["trl"] is None  # ~= caps; a lower bound alone does not
    assert next_release.parse_caps(SETUP_CFG, ("numpy",)) == {"numpy": SpecifierSet("<2.5")}  # markers are no cap
    with pytest.raises(KeyError, match="no gradio"):
        next_release.parse_caps(SETUP_CFG, ("transformers", "gradio"))  # extras do not count


def test_the_projects_setup_cfg_caps_every_canary_name():
    caps = next_release.parse_caps((CI.parent / "setup.cfg").read_text())
    assert set(caps) == set(next_release.CANARY_NAMES) and all(cap is not None for cap in caps.values())


def test_the_newest_version_in_pips_index_output():
    output = (
        "WARNING: pip index is currently an experimental command. It may be removed/changed in a future release.\n"
        "transformers (5.26.0)\n"
        "Available versions: 5.26.0, 5.25.0, 5.24.1, 5.24.0, 4.57.1\n"
        "  INSTALLED: 5.25.0\n"
        "  LATEST:    5.26.0\n"
    )
    assert next_release.parse_index_versions(output, "transformers") == Version("5.26.0")
    # Versions are compared as versions, not strings, and the list is enough without the heading.
    assert next_release.parse_index_versions("Available versions: 0.9.0, 0.10.0, 0.42.1\n", "diffusers") == Version("0.42.1")
    assert next_release.parse_index_versions("optimum_quanto (0.2.7)\n", "optimum-quanto") == Version("0.2.7")
    assert next_release.parse_index_versions("ERROR: No matching distribution found for nothing\n", "nothing") is None


@pytest.mark.parametrize(
    "cap, version, above",
    [
        ("<5.26", "5.25.0", False),
        ("<5.26", "5.25.9", False),
        ("<5.26", "5.26.0", True),
        ("<5.26", "6.0.0", True),
        ("<5.26", "5.26.0rc1", False),  # a pre-release of the cap is below it
        ("<=1.16", "1.16.0", False),
        ("<=1.16", "1.16.1", True),
        ("~=0.21.0", "0.21.4", False),
        ("~=0.21.0", "0.22.0", True),
        ("==5.25.*", "5.25.3", False),
        ("==5.25.*", "5.26.0", True),
        ("<5.26,!=5.25.1", "5.25.1", False),  # an excluded release inside the range is not above it
        (None, "99.0", False),  # no cap: nothing is above it
    ],
)
def test_above_the_cap(cap, version, above):
    assert next_release.above_cap(Version(version), SpecifierSet(cap) if cap else None) is above


def test_the_plan_pins_exactly_the_releases_above_their_caps():
    caps = next_release.parse_caps(SETUP_CFG)
    newest = {"transformers": Version("5.26.0"), "diffusers": Version("0.42.1"), "accelerate": Version("1.17.0"),
              "peft": None, "trl": Version("9.0")}  # fmt: skip
    assert next_release.plan(caps, newest) == ["transformers==5.26.0", "accelerate==1.17.0"]
    within = {**newest, "transformers": Version("5.25.0"), "accelerate": Version("1.16.0")}
    assert next_release.plan(caps, within) == []
    assert next_release.skip_line(caps, within) == (
        "NEXT-RELEASE CANARY: skipped (no release above the caps: transformers 5.25.0 <5.26, diffusers 0.42.1 <0.43, "
        "accelerate 1.16.0 <=1.16, peft not found ~=0.21.0, trl 9.0 (no cap))"
    )


def test_plan_prints_the_pins_or_the_skip_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "setup.cfg").write_text(SETUP_CFG)
    releases = {"transformers": "5.26.0", "diffusers": "0.43.0", "accelerate": "1.16.0", "peft": "0.21.1", "trl": "2.0"}
    monkeypatch.setattr(next_release, "newest_release", lambda name: Version(releases[name]))
    assert next_release.main(["plan", str(tmp_path / "setup.cfg")]) == 0
    assert capsys.readouterr().out.splitlines() == ["transformers==5.26.0", "diffusers==0.43.0"]
    assert next_release.main(["plan", str(tmp_path / "setup.cfg"), "accelerate", "peft"]) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.startswith("NEXT-RELEASE CANARY: skipped (no release above the caps: accelerate")


def test_the_report_counts_each_failing_test_once_and_says_why_a_run_stopped():
    failures = ["tests/a.py::test_x", "tests/b.py::test_y[p 1]", "tests/a.py::test_x"]  # failed, then its teardown
    assert next_release.report([], 0, 900) == ["NEXT-RELEASE CANARY: 0 failed"]
    assert next_release.report(failures, 1, 900) == [
        "NEXT-RELEASE CANARY: 2 failed", "tests/a.py::test_x", "tests/b.py::test_y[p 1]"
    ]
    stopped = next_release.report(failures[:1], 124, 900)
    assert stopped[:2] == ["NEXT-RELEASE CANARY: 1 failed", "tests/a.py::test_x"] and "time limit of 900 s" in stopped[2]
    assert "status 4" in next_release.report([], 4, 900)[1]


def test_the_plugin_records_failures_errors_and_broken_files_as_they_happen(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "@pytest.fixture\n"
        "def broken():\n"
        "    raise RuntimeError\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert False\n"
        "def test_errors(broken): pass\n"
        "@pytest.mark.parametrize('x', ['a b'])\n"
        "def test_param(x): assert x == 'c'\n"
        "@pytest.mark.skip\n"
        "def test_skipped(): assert False\n"
    )
    (tmp_path / "test_broken.py").write_text("import not_a_module_anywhere\n")
    failures = tmp_path / "failures.txt"
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # the canary's own run may set it
    env.update(PYTHONPATH=str(CI), NEXT_RELEASE_FAILURES=str(failures))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "next_release", "test_sample.py",
         "test_broken.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout[-2000:]  # a collection error interrupts the session
    assert failures.read_text().splitlines() == ["test_broken.py"]
    failures.unlink()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "next_release", "test_sample.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    assert failures.read_text().splitlines() == [
        "test_sample.py::test_fails", "test_sample.py::test_errors", "test_sample.py::test_param[a b]"
    ]
    report = subprocess.run([sys.executable, str(CI / "next_release.py"), "report", str(failures), "1", "900"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert report.stdout.splitlines()[0] == "NEXT-RELEASE CANARY: 3 failed"
    missing = subprocess.run([sys.executable, str(CI / "next_release.py"), "report", str(tmp_path / "none"), "0", "9"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert missing.stdout == "NEXT-RELEASE CANARY: 0 failed\n"
