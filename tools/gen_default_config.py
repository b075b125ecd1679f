"""Writes configs/default.yaml from the dataclasses in unet_dist/config.py, comments included.

    .venv/bin/python tools/gen_default_config.py
"""

import dataclasses
import inspect
import re
from pathlib import Path

import yaml

from unet_dist import config as C

HEADER = [
    "# Every config key, its default and what it means. Other configs override a subset of these;",
    "# `--set section.key=value` overrides one on the command line. Loaded with yaml.safe_load only.",
    "# Regenerate after changing unet_dist/config.py:  .venv/bin/python tools/gen_default_config.py",
    "",
]


def field_comments(cls) -> dict:
    src = inspect.getsource(cls)
    return {m.group(1): m.group(3) or "" for m in re.finditer(r"^\s+(\w+):[^=\n]*=[^#\n]*(#\s*(.*))?$", src, re.M)}


def emit(obj, indent: int, lines: list) -> None:
    comments = field_comments(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        pad = "  " * indent
        if dataclasses.is_dataclass(v):
            lines.append(f"{pad}{f.name}:")
            emit(v, indent + 1, lines)
        else:
            val = yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
            c = f"  # {comments[f.name]}" if comments.get(f.name) else ""
            lines.append(f"{pad}{f.name}: {val}{c}")


def render() -> str:
    lines = list(HEADER)
    cfg = C.Config()
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        lines.append(f"{f.name}:  # {(type(section).__doc__ or '').strip().splitlines()[0]}")
        emit(section, 1, lines)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    Path(__file__).resolve().parents[1].joinpath("configs/default.yaml").write_text(render())
