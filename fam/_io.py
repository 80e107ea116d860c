"""Atomic file output: a reader (or a crashed run) never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator, Mapping


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file in ``path``'s folder; on a clean exit flush, fsync and
    rename it over ``path``, on an exception remove it and leave ``path`` untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_png(image, path: str, metadata: str | None = None, key: str = "fam", *,
             texts: Mapping[str, str] | None = None, **save_options) -> None:
    """Write a PIL image as PNG atomically, with ``metadata`` (text) under ``key`` and
    each of ``texts`` (key -> text) as a further text chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if metadata is not None:
        info.add_text(key, metadata)
    for name, text in (texts or {}).items():
        info.add_text(name, text)
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG", pnginfo=info, **save_options)
