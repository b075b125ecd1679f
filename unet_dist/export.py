"""Exports a trained workdir (or several, averaged) as a SavedModel for serving.

    python -m unet_dist.export --workdir RUN [--workdir RUN2 ...] --out EXPORT [--mode auto|tile|resize]
        [--tile N --overlap P] [--tta none|flip] [--precision float32|mixed_float16|mixed_bfloat16]

Signature `serve`: uint8 images (B, H, W, C) of any size (C: the run's model.in_channels, 3 for
RGB) -> {"mask": uint8 (B, H, W), "probabilities": float32 (B, H, W, U)}, and "colors": uint8
(B, H, W, 3) when the training masks were coded by colour (convert --colors): each pixel its
class's colour, as predict writes them. For a run whose images were mapped to 8 bits by one window
(convert --intensity dataset or window), a second signature `serve_values` takes the images' own
values, float32 (B, H, W, C) (CT's Hounsfield units), and maps them by that window first.
Load with tf.saved_model.load(EXPORT).serve(images).
It predicts the way `predict` does with the same --mode, --tile, --overlap and --tta (the same TF
function): auto resizes each image to data.image_size and the result back, unless every training
image already was data.image_size, and then cuts overlap tiles at the images' own pixel scale.
It prints which mode it took and why. With several runs (the folds of `convert --fold`), the
SavedModel holds every model and serves the average of their probabilities.
--precision is the Keras policy the served models compute in: float32 (the default, whatever
precision training used), or a mixed policy for the hardware that will serve it (mixed_float16 for
a GPU with tensor cores, mixed_bfloat16 for a CPU with native bfloat16), named here because the
machine that exports is often not the one that serves. The probabilities stay float32 either way;
they differ from float32's by the rounding of 16-bit activations, as predict's do under
--set runtime.precision.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unet_dist.atomic import atomic_path
from unet_dist.config import ConfigError, add_workdir_args, writable_dir
from unet_dist.predict import add_mode_args, predictor_options

# What tf.saved_model writes into its folder.
SAVED_MODEL_FILES = {"saved_model.pb", "variables", "assets", "fingerprint.pb"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unet_dist.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir_args(p, many=True)
    p.add_argument("--out", type=Path, required=True)
    add_mode_args(p)
    p.add_argument("--precision", choices=("float32", "mixed_float16", "mixed_bfloat16"), default="float32",
                   help="the policy the served models compute in (default float32): name the serving hardware's")
    args = p.parse_args(argv)
    from unet_dist.checkpoint import CheckpointError
    from unet_dist.inference import export_saved_model, load_predictor

    out = args.out
    try:
        # OUT is new, empty, or an earlier export (a SavedModel and nothing else), which is replaced;
        # anything else stays untouched.
        if out.is_file() or (out.is_dir() and not {p.name for p in out.iterdir()} <= SAVED_MODEL_FILES):
            what = "a file" if out.is_file() else "a folder holding more than an earlier export"
            raise ConfigError(f"--out {out}: {what}; give a new or empty folder")
        writable_dir(out.parent, "--out")
        predictor = load_predictor(args.workdir, **predictor_options(args), precision=args.precision)
    except (ConfigError, CheckpointError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    # Written beside OUT and moved into place when complete: an interrupted export leaves OUT as it was.
    with atomic_path(out) as tmp:
        export_saved_model(predictor.models, predictor.fn, tmp, predictor.colors, predictor.cfg.model.in_channels,
                           predictor.window)
    print(f"export: SavedModel ({predictor.summary()}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
