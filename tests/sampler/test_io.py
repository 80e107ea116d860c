"""fam._io: atomic output never leaves a half-written or temporary file."""

import os

import pytest

from fam._io import atomic_open


def test_atomic_open_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    with atomic_open(str(target), "w", newline="") as f:
        f.write("a,b\n")
        assert not target.exists()  # nothing visible until the block ends
    assert target.read_text() == "a,b\n"
    assert os.listdir(target.parent) == ["table.csv"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600


def test_atomic_open_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_open(str(target), "w") as f:
            f.write("half of the new")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["table.csv"]
