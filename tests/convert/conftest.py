import pytest


@pytest.fixture
def originals(tmp_path):
    """A folder for the original files a test writes. Outputs go beside it, in `tmp_path`: the converter refuses
    an output inside the folder of any input."""
    folder = tmp_path / "originals"
    folder.mkdir()
    return folder
