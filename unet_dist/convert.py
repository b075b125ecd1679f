"""Converts a folder of images and masks to sharded TFRecords and a manifest.

    python -m unet_dist.convert SRC OUT [--layout oxford-pet|folders] [--image-size H[xW]]
        [--shards N] [--val-fraction F] [--seed S] [--workers K] [--classes binary|trimap|multiclass|instances]
        [--num-classes N] [--mask-suffix S] [--fold I/K] [--split-by auto|file|page] [--group REGEX]
        [--ignore-value V] [--image-format auto|png|jpeg] [--colors FILE] [--list FILE] [--val-list FILE]
        [--channels C] [--intensity image|dataset|window [--window LO HI ...]]

Layouts: oxford-pet = SRC/images/*.jpg + SRC/annotations/trimaps/*.png (binary: pet vs the rest,
or the 3 trimap classes); folders = SRC/images/* + SRC/masks/* with matching stems (mask values are
class ids 0..N-1, or 0/255 when --classes binary; --num-classes N when some ids do not occur in the
masks; --mask-suffix _mask when the mask of X.jpg is X_mask.png). Bad files are skipped and listed in manifest.json.
--classes instances (folders): the masks are instance label images, as the cell tracking challenge
and the Data Science Bowl 2018 give them (0 the background, each object its own id: 16- or 32-bit
PNG or TIFF, or .npy; or an RGB image of a colour per object, black the background). They become
two classes, object and background, with a gap one pixel wide wherever two objects touch (drawn
after any --image-size), so that touching cells stay apart, as the 2015 U-Net's membranes keep them:
with --border-distances and train.loss weighted_ce the model learns to part them, and `predict
--instances` numbers them again. A mask whose ids are each many separate objects (a binary or class
mask) is skipped, saying so: its cells would be one object.
A multi-page TIFF (an EM or microscopy stack) and its mask stack give one sample per page, X_p000, X_p001, ...
The pages of a stack stay in one split (--split-by file, the default where SRC has two image files
or more): neighbouring slices are nearly the same image. --split-by page splits them like separate
images, as it must for a data set that is one stack. --group REGEX keeps the files whose stems give
the same match (its first group, if it has one) in one split: --group '^(patient[0-9]+)_' keeps each
patient's slices together.
--ignore-value V: mask pixels of value V are not labelled (the Pet trimaps' border, 3, with --classes
binary; a void 255): training's loss and every metric leave them out, as mmsegmentation's ignore_index.
--image-format: records store the images as PNG, pixel for pixel, unless every source image is a JPEG
(then as JPEG at quality 95, in fewer bytes: a fifth for the demo's); png or jpeg chooses. Grayscale images
are stored as one channel either way.
--colors FILE: masks coded by colour (as labelling tools export them, and CamVid): FILE lists the
classes' colours in class order, one a line, 'R G B [name]' or 'R,G,B [name]', or is CVAT's
labelmap.txt ('name:R,G,B::'). A mask pixel of another colour skips its sample, named.
--val-list FILE replaces --val-fraction with a data set's own split: the val images are those FILE
names, one a line by its stem or file name (the first word of the line counts: VOC's
ImageSets/Segmentation/val.txt, the Pet set's annotations/test.txt), the others train.
--list FILE converts only the images FILE names (read the same way): the Pet set's
annotations/trainval.txt, keeping its test images out for `evaluate --images SRC --list test.txt`.
--channels C: the images' channels, which training's model takes (model.in_channels). 3 (the default)
reads every image as RGB; 1 as grayscale, the natural input for EM and most microscopy; 4 RGBA
files. Any C comes from numpy arrays, SRC/images/X.npy of shape (H, W, C) (fluorescence stains,
satellite bands), of uint8 or of wider values scaled to 8 bits channel by channel; a mask may be
an .npy array of class ids (H, W) too.
--intensity: how images of 16 bits or floats (CT, microscopy) come to the 8 bits records hold.
image (the default) scales each by its own 1st and 99.8th percentiles; dataset maps one window in
every image, the 0.5th to 99.5th percentile of the training images' foreground values (classes
above 0), as nnU-Net normalises CT, so that a value (a Hounsfield unit) means the same everywhere;
window maps --window LO HI (e.g. --window -160 240, an abdominal CT window; or LO HI for each
channel). Either window maps every image, 8-bit ones too. Prediction maps new images with the run's
window.
--fold I/K replaces --val-fraction with k-fold cross-validation: the K conversions (I = 0..K-1, one
--seed) validate on every image once; train a run on each and `predict --workdir RUN0 --workdir
RUN1 ...` averages them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unet_dist.data.convert import (
    CLASS_MODES,
    IMAGE_FORMATS,
    INTENSITY_MODES,
    LAYOUTS,
    SPLIT_UNITS,
    ConvertError,
    census_changes,
    convert,
)


def parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: expected H or HxW, e.g. 256 or 256x320") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: expected H or HxW with positive sizes")
    return (parts[0], parts[-1])


def parse_fold(text: str) -> tuple[int, int]:
    try:
        i, k = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fold {text!r}: expected I/K, e.g. 0/5 (fold 0 of 5)") from None
    return i, k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unet_dist.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--layout", choices=LAYOUTS, default="oxford-pet")
    p.add_argument("--classes", choices=CLASS_MODES, default="binary")
    p.add_argument("--num-classes", type=int, default=None,
                   help="multiclass: the number of classes (default: the highest id in the masks + 1)")
    p.add_argument("--ignore-value", type=int, metavar="V",
                   help="mask pixels of value V are not labelled: no loss or metric counts them (e.g. 3, the Pet "
                        "trimaps' border, with --classes binary; 255, VOC's void)")
    p.add_argument("--mask-suffix", default="", help="the mask of image X.* is X<suffix>.* (e.g. _mask)")
    p.add_argument("--image-size", type=parse_size, default=None, help="resize to H[xW]; default keeps sizes")
    p.add_argument("--shards", type=int, default=8, help="training shards (val gets up to as many)")
    p.add_argument("--list", type=Path, metavar="FILE",
                   help="convert only the images FILE names, one a line (as --val-list): a data set's trainval "
                        "list, its test images kept out")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.2)
    split.add_argument("--fold", type=parse_fold, metavar="I/K",
                       help="k-fold cross-validation: fold I of K is the val split (run I = 0..K-1)")
    split.add_argument("--val-list", type=Path, metavar="FILE",
                       help="the val split is the images FILE names, one a line (stem or file name; the first "
                            "word counts): a data set's own split, such as VOC's val.txt")
    p.add_argument("--split-by", choices=SPLIT_UNITS, default="auto",
                   help="keep a stack's pages in one split (file) or split them (page); auto: file where "
                        "SRC has two image files or more")
    p.add_argument("--group", metavar="REGEX",
                   help="files whose stems give the same match (its first group) stay in one split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--colors", type=Path, metavar="FILE",
                   help="colour-coded masks: the classes' colours, one a line in class order ('R G B [name]', or "
                        "CVAT's labelmap.txt)")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="auto",
                   help="how records store the images: png (lossless) or jpeg (quality 95); auto: jpeg when every "
                        "source image is a JPEG, else png")
    p.add_argument("--border-distances", action="store_true",
                   help="store each training mask's distances to its two nearest objects, from which training "
                        "with train.loss weighted_ce takes the 2015 U-Net's border weights instead of computing "
                        "them per sample (many touching objects, as in EM slices)")
    p.add_argument("--channels", type=int, default=3, metavar="C",
                   help="the images' channels: 3 reads every image as RGB, 1 as grayscale (EM, most microscopy), "
                        "4 RGBA files; any C from .npy arrays (H, W, C), such as stains or satellite bands")
    p.add_argument("--intensity", choices=INTENSITY_MODES, default="image",
                   help="16-bit and float images to 8 bits: each by its own percentiles (image), by one window "
                        "from the training images' foreground (dataset, nnU-Net's CT rule), or by --window")
    p.add_argument("--window", type=float, nargs="+", metavar="V",
                   help="--intensity window: LO HI mapped to 0 and 255 in every channel, or LO HI for each channel")
    p.add_argument("--overwrite", action="store_true", help="replace an existing conversion in OUT")
    args = p.parse_args(argv)
    try:
        m = convert(args.src, args.out, layout=args.layout, classes=args.classes, image_size=args.image_size,
                    shards=args.shards, val_fraction=args.val_fraction, seed=args.seed, workers=args.workers,
                    overwrite=args.overwrite, num_classes=args.num_classes, mask_suffix=args.mask_suffix,
                    fold=args.fold, split_by=args.split_by, group=args.group, ignore_value=args.ignore_value,
                    image_format=args.image_format, colors=args.colors, val_list=args.val_list,
                    only=args.list, border_distances=args.border_distances, channels=args.channels,
                    intensity=args.intensity, window=args.window)
    except ConvertError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Shards and the manifest are renamed into place only when complete: OUT is as it was.
        print(f"convert: interrupted; {args.out} is as it was before", file=sys.stderr)
        return 130
    if m["skipped"]:
        first = m["skipped"][0]
        print(f"convert: skipped {len(m['skipped'])} files (see {args.out}/manifest.json); first: "
              f"{first['file']}: {first['reason']}", file=sys.stderr)
    records = {s: m[s]["records"] for s in ("train", "val")}
    # Where files were kept together (groups, or stacks that gave several records a file), say so.
    if m["groups"]:
        files = f" (split by group: {m['groups']['train']} and {m['groups']['val']} groups)"
    else:
        files = "" if records == m["files"] else (f" (split by {m['split_by']}: from {m['files']['train']} and "
                                                  f"{m['files']['val']} image files)")
    if m["val_list"]:
        files += f" (val: the images {m['val_list']} names)"
    left_out = "" if m["ignore_value"] is None else (f" ({m['ignored_pixel_fraction']:.1%} of the pixels left out: "
                                                     f"mask value {m['ignore_value']})")
    channels = "" if m["channels"] == 3 else f" of {m['channels']} channel{'s' * (m['channels'] > 1)}"
    # Training's model must take as many: say the key here, where the number is decided.
    if m["channels"] != 3:
        channels += f" (train with model.in_channels={m['channels']})"
    print(f"convert: {records['train']} train and {records['val']} val records{files}, "
          f"{m['num_classes']} classes{left_out}, images{channels} as {m['image_format'].upper()} "
          f"({m['image_format_why']}), in {args.out}")
    for line in data_lines(m):
        print(line, file=sys.stderr if line.startswith("convert: warning") else sys.stdout)
    window = m["intensity"]["window"]
    if window:  # the values that became 0 and 255, which prediction maps the same way
        shown = window[:1] if all(w == window[0] for w in window) else window
        print(f"convert: --intensity {m['intensity']['mode']}: values {', '.join(f'{lo:g} to {hi:g}' for lo, hi in shown)}"
              f" stored as 0 to 255{' (each channel its own)' if len(shown) > 1 else ''}; predict maps new images so")
    return 0


def data_lines(m: dict) -> list[str]:
    """What the manifest `m` says of the images' own sizes and their objects: a line of each, and a
    warning for each class whose objects --image-size merged or broke apart (a tenth or more of
    them; `data.convert.object_census`), with what keeps them."""
    lo, hi, mean = m["own_size"]["min"], m["own_size"]["max"], m["own_size"]["mean"]
    sizes = f"{lo[1]}x{lo[0]}" if lo == hi else f"{lo[1]}x{lo[0]} to {hi[1]}x{hi[0]}"
    names, objects = m["class_names"], m["objects"]
    lines = [f"convert: the images are {sizes} at their own size"
             + (f", stored at {m['image_size'][1]}x{m['image_size'][0]}" if m["image_size"] else "")]
    own, stored = objects["per_image_own"], objects["per_image_stored"]
    if objects["images"]:
        lines[0] += "; objects an image (8-connected, as evaluate counts them): " + ", ".join(
            f"{names[c]} {own[c]:.4g}" for c in range(1, len(own)))
    for c, verb in census_changes(own, stored) if m["image_size"] else []:
        h, w = m["image_size"]
        shrink = min(mean[0] / h, mean[1] / w)
        lines.append(f"convert: warning: --image-size {w}x{h} ({'shrinking' if shrink > 1 else 'scaling'} the "
                     f"images {shrink:.2g}x on average) {verb} "
                     f"the objects of class {c} ({names[c]}): {own[c]:.4g} an image at their own size, "
                     f"{stored[c]:.4g} as stored. Keep their size (leave out --image-size, and train with "
                     f"data.image_size at it, on patches with data.patch_size where whole images do not fit), "
                     f"or convert at a larger --image-size")
    return lines


if __name__ == "__main__":
    sys.exit(main())
