"""TensorFlow's error messages cut to the one line our own errors quote after the file they name."""

from __future__ import annotations

import re


def tf_reason(error: BaseException) -> str:
    """The first line of a TensorFlow error's message without what eager ops wrap it in: the
    `{{function_node ...}}` prefix and the ` [Op:IteratorGetNext] name: ` suffix; e.g.
    'corrupted record at 23121' or 'Checksum does not match: ...'."""
    message = (getattr(error, "message", None) or str(error)).strip()
    message = re.sub(r"^\{\{.*?\}\}\s*", "", message)
    line = message.splitlines()[0] if message else type(error).__name__
    return re.sub(r"\s*\[Op:\w+\].*$", "", line)
