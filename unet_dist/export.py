"""Exports a trained workdir as a SavedModel for serving.

    python -m unet_dist.export --workdir RUN --out EXPORT

Signature `serve`: uint8 images (B, H, W, 3) of any size -> {"mask": uint8 (B, H, W),
"probabilities": float32 (B, H, W, U)}. Load with tf.saved_model.load(EXPORT).serve(images).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unet_dist.config import ConfigError, add_workdir_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unet_dist.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir_args(p)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    from unet_dist.checkpoint import CheckpointError
    from unet_dist.inference import export_saved_model, load_trained

    try:
        model, cfg, ckpt = load_trained(args.workdir, args.checkpoint)
    except (ConfigError, CheckpointError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    export_saved_model(model, cfg, args.out)
    print(f"export: SavedModel from {ckpt} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
