import pytest

from fam.testing import tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny SDXL pipeline saved as a diffusers folder (for the CLI tests)."""
    path = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl_pipeline().save_pretrained(str(path))
    return str(path)
