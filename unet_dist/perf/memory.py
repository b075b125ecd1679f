"""Peak resident memory of training, conversion, prediction and evaluation, each measured in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from unet_dist.perf.common import child_failed, machine

# A child that runs a command and reports the peak RSS of everything it waited for (its children and
# theirs): RUSAGE_CHILDREN's ru_maxrss is the largest single process, in KiB on Linux.
_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")


def peak_rss_mib(cmd: list[str]) -> float:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True, env=env)
    kib, rc = out.stdout.split()[-2:]
    if rc != "0":
        raise child_failed("memory", out.stderr, int(rc))
    return int(kib) / 1024


_PREDICT_SMALL = 512  # px: the memory of a large image is measured over this one's


def _large_image_peaks(workdir: Path, image: Path, mask: Path, sizes: list[int], tmp: Path) -> dict:
    """Peak RSS of `predict --mode tile` (mask and overlay, no --tta), of the same with --no-overlay
    (the mask alone) and of `evaluate --images --mode tile` (every analysis: objects, their growth,
    outlines) of one square image of each size
    (`image` and its trimap `mask` resized: the content matters to the PNG encoder and the objects),
    and the bytes each grows by per pixel of image from the first size to the last: what a large
    image costs."""
    from PIL import Image

    out = {}
    for size in sizes:
        folder = tmp / f"large{size}"  # an oxford-pet layout of one image, for evaluate
        path, trimap = folder / "images" / "image.png", folder / "annotations" / "trimaps" / "image.png"
        path.parent.mkdir(parents=True)
        trimap.parent.mkdir(parents=True)
        Image.open(image).convert("RGB").resize((size, size), Image.BICUBIC).save(path)
        Image.open(mask).resize((size, size), Image.NEAREST).save(trimap)
        for name, module, args in (
                ("predict", "predict", [str(path), "--out", str(folder / "out")]),
                ("predict_no_overlay", "predict", [str(path), "--out", str(folder / "masks"), "--no-overlay"]),
                ("evaluate", "evaluate", ["--images", str(folder), "--out", str(folder / "eval.json")])):
            key = f"{name}_{size}x{size}_peak_rss_mib"
            out[key] = peak_rss_mib([sys.executable, "-m", f"unet_dist.{module}", "--workdir", str(workdir), *args,
                                     "--mode", "tile"])
            print(f"bench memory: {name} {size}x{size}: {out[key]:.0f} MiB", file=sys.stderr)
    small, large = sizes[0], sizes[-1]
    for name in ("predict", "predict_no_overlay", "evaluate"):
        grown = out[f"{name}_{large}x{large}_peak_rss_mib"] - out[f"{name}_{small}x{small}_peak_rss_mib"]
        out[f"{name}_bytes_per_pixel"] = grown * 2**20 / (large**2 - small**2)
    return out


def run(args) -> dict:
    py = sys.executable
    res: dict = {"bench": "memory"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pets = ["--set", "data.image_size=[256, 256]"]
        # The same global batch of 32 in 4 micro-batches of 8 (train.gradient_accumulation_steps):
        # what accumulating saves.
        for name, config, extra in (("demo", "configs/demo.yaml", []), ("pets_seed", "configs/pets_seed.yaml", pets),
                                    ("pets_seed_4_micro_batches", "configs/pets_seed.yaml",
                                     [*pets, "--set", "train.gradient_accumulation_steps=4"])):
            cmd = [py, "-m", "unet_dist.train", "--config", config, "--data", str(args.data), "--workdir",
                   str(tmp / name), "--steps", str(args.steps), "--set", "train.eval_every_steps=1000000", *extra]
            res[f"train_{name}_peak_rss_mib"] = peak_rss_mib(cmd)
            print(f"bench memory: train {name}: {res[f'train_{name}_peak_rss_mib']:.0f} MiB", file=sys.stderr)
        for n in args.convert_sizes:
            src = tmp / f"src{n}"
            subprocess.run([py, "-m", "unet_dist.synthetic", str(src), "-n", str(n)], check=True, capture_output=True)
            res[f"convert_{n}_peak_rss_mib"] = peak_rss_mib(
                [py, "-m", "unet_dist.convert", str(src), str(tmp / f"out{n}"), "--workers", "2"])
            print(f"bench memory: convert {n}: {res[f'convert_{n}_peak_rss_mib']:.0f} MiB", file=sys.stderr)
        src = tmp / f"src{min(args.convert_sizes)}"
        image = min((src / "images").iterdir())
        res.update(_large_image_peaks(tmp / "demo", image, src / "annotations" / "trimaps" / f"{image.stem}.png",
                                      [_PREDICT_SMALL, args.predict_size], tmp))
    small, large = min(args.convert_sizes), max(args.convert_sizes)
    res["convert_growth"] = res[f"convert_{large}_peak_rss_mib"] / res[f"convert_{small}_peak_rss_mib"] - 1
    res["train_steps"] = args.steps
    return {**res, **machine()}


