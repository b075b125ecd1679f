"""Files and folders written whole or not at all: beside their place, then renamed into it.

No TensorFlow here, so conversion, prediction and export can all use it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yields a path beside `path` to write a file or a folder at; renamed into place when the block
    ends without an error, removed otherwise: a kill or an error mid-write leaves the earlier file or
    folder whole. A folder replaces an earlier folder at `path` (os.replace alone refuses a
    non-empty one), so the earlier one is gone only once the new one is complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes beside `path` and renames into place (`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
