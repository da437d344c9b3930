import json

import pytest

from viscpm_hf.mpm.pivots import build_once
from viscpm_hf.mpm.pivots.cache import PROVENANCE_FILE, package_dir, read_provenance


def _writer(text, calls):
    def build(folder):
        calls.append(folder)
        (folder / "weights.txt").write_text(text)

    return build


def test_builds_once_and_rebuilds_when_the_source_changes(tmp_path):
    calls = []
    folder = tmp_path / "cache"
    assert build_once(folder, _writer("v1", calls), {"source_version": "1"}) == folder
    build_once(folder, _writer("v1", calls), {"source_version": "1"})
    assert len(calls) == 1 and (folder / "weights.txt").read_text() == "v1"
    build_once(folder, _writer("v2", calls), {"source_version": "2"})
    assert len(calls) == 2 and (folder / "weights.txt").read_text() == "v2"
    assert read_provenance(folder) == {"source_version": "2"}
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # no temporary or stale folder left


def test_a_failed_build_keeps_the_previous_cache(tmp_path):
    folder = tmp_path / "cache"
    build_once(folder, _writer("good", []), {"source_version": "1"})

    def crash(out):
        (out / "weights.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(folder, crash, {"source_version": "2"})
    assert (folder / "weights.txt").read_text() == "good"
    assert json.loads((folder / PROVENANCE_FILE).read_text()) == {"source_version": "1"}
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_missing_package_names_the_install_command():
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps some-dist"):
        package_dir("surely_not_installed_pkg", "some-dist", "pip install --no-deps some-dist")
