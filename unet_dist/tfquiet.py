"""Applies TF_CPP_MIN_LOG_LEVEL to what TensorFlow's C++ logs while `import tensorflow` runs.

TF 2.21 logs through absl, and at import, before absl is initialised and the level is read, it
writes absl's banner ("WARNING: All log messages before absl::InitializeLog() ...") and its INFO
notices (oneDNN's, twice; the CPU-feature one) to stderr whatever TF_CPP_MIN_LOG_LEVEL says
(tensorflow/tensorflow#100442, open). Every command, on every rank, began with them. `install()`
makes the first `import tensorflow` run with file descriptor 2 going to a temporary file, and then
writes back to stderr every line but those below the level (and the banner, when anything is held
back), so warnings, errors and anything else printed during the import still show, in order. It
loads nothing itself: `convert`'s workers, which never import TensorFlow, are unaffected.
`horovodrun` itself still prints them once per job: its launcher imports TensorFlow in a child
process of its own to check Horovod's build, outside unet_dist.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile

# absl's prefix: severity letter, MMDD, time; TF_CPP_MIN_LOG_LEVEL 1 drops I, 2 also W, 3 also E.
_PREFIX = re.compile(r"^([IWEF])\d{4} ")
_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# Lines that continue a multi-line notice (the CPU-feature one's second line).
_CONTINUATIONS = ("To enable the following instructions",)


def filter_lines(text: str, level: int) -> str:
    """`text` (what the import wrote to stderr) less the absl lines of a severity below `level` with
    their known continuation lines, and less the banner when level >= 1."""
    dropped = "IWE"[: max(0, min(level, 3))]
    kept, dropping = [], False
    for line in text.splitlines(keepends=True):
        if (m := _PREFIX.match(line)) is not None:
            dropping = m.group(1) in dropped
        elif line.rstrip("\n") == _BANNER:
            dropping = level >= 1
        elif not (dropping and line.startswith(_CONTINUATIONS)):
            dropping = False  # printed by something else: kept
        if not dropping:
            kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def filtered_stderr(level: int):
    """File descriptor 2 (C++ and Python alike) goes to a temporary file inside the block; what it
    held is written back, filtered by `filter_lines`, when the block ends (also on an error)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = filter_lines(held.read().decode(errors="replace"), level)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()


class _Filtered:
    """A module loader that runs the real one's exec_module under `filtered_stderr`."""

    def __init__(self, loader, level: int):
        self._loader, self._level = loader, level

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            with filtered_stderr(self._level):
                self._loader.exec_module(module)
        finally:  # the module keeps the real loader (importlib.resources and others read it)
            module.__loader__ = module.__spec__.loader = self._loader


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` once, through the other finders, with a `_Filtered` loader."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once, and not for the lookup just below
        spec = importlib.util.find_spec(name)
        if spec is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Filtered(spec.loader, _level())
        return spec


def _level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def install() -> None:
    """Filters the first `import tensorflow` of this process (nothing where it was imported already,
    or where TF_CPP_MIN_LOG_LEVEL asks for every line)."""
    if "tensorflow" in sys.modules or _level() < 1 or any(isinstance(f, _QuietImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietImport())
