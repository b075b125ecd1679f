"""Shows the training samples a config's input pipeline makes, augmented, as PNGs.

    python -m unet_dist.preview --config configs/X.yaml --data DATA --out PREVIEW [-n 16] [--set ...]

Writes PREVIEW/sample_000.png ... (image | mask | image with the mask's foreground tinted red, and
the border weight map, white the largest, where train.loss is weighted_ce) and PREVIEW/samples.png,
all of them one under the other: samples as a one-process run of this config trains on them, from
the same pipeline, seeds and augmentation; with `--set runtime.deterministic=true` exactly its first
N (a run's on any number of processes), else the first of a stream whose order varies from run to
run. For seeing what an augmentation does before training with it. Masks are shades of
gray from class 0 (black) up, unlabelled pixels (convert --ignore-value) blue; with valid padding
the image is cropped to the part the labels cover.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from unet_dist.config import ConfigError, add_config_args, load_config, writable_dir


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m unet_dist.preview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--data", type=Path, required=True, help="folder written by unet_dist.convert")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    p.add_argument("-n", type=int, default=16, help="how many samples (default 16)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"-n {args.n}: must be >= 1")
    return args


def panels(batch: dict, num_classes: int) -> np.ndarray:
    """One batch of `train_dataset` -> (B, h, 3w or 4w, 3) uint8 panels: image | mask | tinted image
    (| weight map, scaled to the batch's largest weight)."""
    from unet_dist.logs import class_shades, shown_images, tinted

    masks = batch["mask"].numpy()[..., 0]
    img = shown_images(batch["image"].numpy(), masks.shape[1:])
    parts = [img, class_shades(masks, num_classes), tinted(img, (masks > 0) & (masks < num_classes))]
    if "weight" in batch:
        w = batch["weight"].numpy()[..., 0]
        parts.append(np.repeat((w / max(float(w.max()), 1e-6) * 255).astype(np.uint8)[..., None], 3, -1))
    return np.concatenate(parts, axis=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, list(args.set))
        writable_dir(args.out, "--out")
    except ConfigError as e:
        print(f"preview: error: {e}", file=sys.stderr)
        return 2
    import tensorflow as tf
    from PIL import Image

    from unet_dist.data.augment import describe
    from unet_dist.data.pipeline import DataError, Shard, load_manifest, train_dataset, train_size
    from unet_dist.errors import tf_reason
    from unet_dist.trainer import check_data_matches

    # The trainer's batch on one process, so the samples are its first steps' (per-sample seeds:
    # the batch size changes no sample's augmentation, only which samples come first).
    batch = cfg.data.global_batch_size or cfg.data.per_replica_batch_size
    try:
        manifest = load_manifest(args.data)
        check_data_matches(cfg, manifest, args.data)
        stream = iter(train_dataset(args.data, cfg, batch, batch, Shard(0, 1), manifest=manifest))
        rows = []
        while sum(len(r) for r in rows) < args.n:
            rows.append(panels(next(stream), cfg.model.num_classes))
    except (ConfigError, DataError) as e:
        print(f"preview: error: {e}", file=sys.stderr)
        return 1
    except tf.errors.OpError as e:  # an unreadable record
        print(f"preview: error: reading the training records of {args.data}: {tf_reason(e)}", file=sys.stderr)
        return 1
    shown = np.concatenate(rows)[: args.n]
    for i, row in enumerate(shown):
        Image.fromarray(row).save(args.out / f"sample_{i:03d}.png")
    Image.fromarray(np.concatenate(list(shown))).save(args.out / "samples.png")
    h, w = train_size(cfg)
    print(f"preview: data.augment: {describe(cfg.data.augment)}")
    print(f"preview: wrote {len(shown)} training samples ({h}x{w}, augmented as training augments them) to "
          f"{args.out}/sample_*.png, and all of them in {args.out / 'samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
