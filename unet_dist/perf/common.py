"""Shared pieces of the benchmarks: the paper's input code (for comparison), timing, machine facts."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def paper_generator(image_paths: list[Path], mask_dir: Path, batch: int, size: int):
    """The seed paper's input path, reproduced for comparison: PIL open + resize + numpy, one by one."""
    from PIL import Image

    while True:
        for i in range(0, len(image_paths) - batch + 1, batch):
            xs, ys = [], []
            for p in image_paths[i : i + batch]:
                img = Image.open(p).convert("RGB").resize((size, size))
                tri = Image.open(mask_dir / f"{p.stem}.png").resize((size, size), Image.NEAREST)
                xs.append(np.asarray(img, np.float32) / 255.0)
                ys.append((np.asarray(tri) == 1).astype(np.float32)[..., None])
            yield np.stack(xs), np.stack(ys)


def source_pairs(manifest: dict, source: Path | None) -> tuple[list[Path], Path]:
    src = Path(source or manifest["source"])
    masks = src / "annotations" / "trimaps"
    images = sorted(p for p in (src / "images").iterdir() if p.suffix in (".jpg", ".png")
                    and (masks / f"{p.stem}.png").exists()) if (src / "images").is_dir() else []
    if not images:
        raise SystemExit(f"bench: no Oxford-Pet layout images with trimaps under {src}")
    return images, masks


def child_failed(bench: str, stderr: str, returncode: int) -> SystemExit:
    """The error for a benchmark whose child (the trainer, the converter) failed: the child's own
    last line, which for our entry points is its one-line error naming the bad file or key."""
    lines = stderr.strip().splitlines() or [f"exit {returncode}"]
    return SystemExit(f"bench {bench}: a child process failed: {lines[-1]}")


# The CPU features that decide what a bfloat16 step can reach (the matmul peak, oneDNN's kernels):
# the same model name ("Intel(R) Xeon(R) Processor") has come with and without them on these VMs.
_MATRIX_FLAGS = ("avx512_bf16", "amx_bf16")


def machine() -> dict:
    cpu, flags = "", []
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
        flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "cpu_flags": [f for f in _MATRIX_FLAGS if f in flags],
            "machine": platform.machine(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            **_gpus()}


def _gpus() -> dict:
    """{"gpus": [device names]} where the benchmark computed on GPUs, else {} (a CPU run's results
    keep their keys). Only asks TensorFlow if this process has imported it already."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return {}
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return {}
    return {"gpus": [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus],
            "tensorflow": tf.__version__}


def time_iter(it, n: int, warmup: int) -> float:
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return time.perf_counter() - t


