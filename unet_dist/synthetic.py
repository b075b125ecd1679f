"""Writes a synthetic segmentation set in the Oxford-IIIT Pet layout (the folders layout with --instance-masks).

    python -m unet_dist.synthetic OUT -n 400 --seed 0 [--sparse | --cells [--faint-membranes] [--instance-masks] | --ct]

--sparse: small pets (about 0.5% of the pixels) on 384x384 images, for patch training
(data.patch_size) with foreground oversampling (data.foreground_oversample).
--cells: EM-like 572x572 gray slices of about 300 touching cells parted by dark membranes (the
cells the "pets"), for configs/ronneberger.yaml and its border weight map. --faint-membranes: the
membranes barely darker than the cells, so that touching cells merge unless a model learns the gaps.
--instance-masks: with --cells, instance label images in OUT/masks (16-bit PNG, each cell its own id,
touching its neighbours: no membrane) instead of trimaps, for `convert --layout folders --classes instances`.
--ct: CT-like 96x96 slices in Hounsfield units (int16 .npy arrays): an organ 30 HU above the soft
tissue, a decoy 15 HU above it, air and bone at the edges of every other slice; for `convert
--channels 1 --intensity dataset`.

OUT is new, or an earlier synthetic set, which is replaced; a folder holding other images is refused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unet_dist.config import ConfigError, writable_dir
from unet_dist.data.synthetic import write_dataset


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m unet_dist.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("-n", type=int, default=400, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--sparse", action="store_true", help="small pets on 384x384 images")
    kind.add_argument("--cells", action="store_true", help="EM-like slices of touching cells, 572x572")
    kind.add_argument("--ct", action="store_true", help="CT-like slices in Hounsfield units, 96x96 .npy arrays")
    p.add_argument("--faint-membranes", action="store_true", help="with --cells: membranes barely darker than cells")
    p.add_argument("--instance-masks", action="store_true",
                   help="with --cells: instance label images in OUT/masks instead of trimaps (folders layout)")
    args = p.parse_args(argv)
    for flag, given in (("--faint-membranes", args.faint_membranes), ("--instance-masks", args.instance_masks)):
        if given and not args.cells:
            p.error(f"{flag}: used with --cells only")
    if args.n < 1:
        p.error(f"-n must be >= 1, got {args.n}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    try:
        writable_dir(args.out, "OUT")
    except ConfigError as e:
        p.error(str(e))
    try:
        write_dataset(args.out, args.n, args.seed, args.sparse, args.cells, args.ct, args.faint_membranes,
                      args.instance_masks)
    except ValueError as e:
        p.error(f"OUT {e}")
    masks = "instance masks to {}/masks" if args.instance_masks else "trimaps to {}/annotations/trimaps"
    print(f"wrote {args.n} images to {args.out}/images and {masks.format(args.out)}")


if __name__ == "__main__":
    main()
