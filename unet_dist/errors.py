"""TensorFlow's error messages cut to the one line our own errors quote after the file they name."""

from __future__ import annotations

import re

# What a tf.function's error wraps its reason in: a header and the failed op's Python call stack.
_GRAPH_WRAPPING = ("Graph execution error", "Detected at node", "File ")


def tf_reason(error: BaseException) -> str:
    """The first line of a TensorFlow error's message (with the next when it ends in a colon)
    without what eager ops and tf.functions wrap it in: the `{{function_node ...}}` prefix, the
    ` [Op:IteratorGetNext] name: ` and ` [[{{node ...}}]]` suffixes, a function's "Graph execution
    error:" header and the op's call stack; e.g. 'corrupted record at 23121' or 'Collective ops is
    aborted by: ... The following tasks are unhealthy (stopped sending heartbeats): /job:worker/...'."""
    message = (getattr(error, "message", None) or str(error)).strip()
    message = re.sub(r"^\{\{.*?\}\}\s*", "", message)
    lines = [line.strip() for line in message.splitlines()]
    lines = [line for line in lines if line and not line.startswith(_GRAPH_WRAPPING)] or [type(error).__name__]
    line = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return re.sub(r"\s*(\[Op:\w+\]|\[\[).*$", "", line)
