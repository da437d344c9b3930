import pytest


@pytest.fixture
def originals(tmp_path):
    """A folder for the original files a test writes; outputs go beside it, in `tmp_path`."""
    folder = tmp_path / "originals"
    folder.mkdir()
    return folder
