"""Predicts masks for images of any size and mode with a trained workdir.

    python -m unet_dist.predict --workdir RUN [--workdir RUN2 ...] IMAGE_OR_FOLDER... --out PRED [--tile 256 --overlap 32]
        [--mode auto|tile|resize] [--tta none|flip] [--postprocess none|largest[:C,...]|min-size:N[:C,...]|grow:N[:C,...]]
        [--probabilities] [--instances [--instance-classes C,...]] [--no-overlay] [--continue] [--strategy ...]
        [--set runtime.KEY=VALUE ...]
    horovodrun -np 4 python -m unet_dist.predict --workdir RUN FOLDER --out PRED    # or srun, mpirun, TF_CONFIG

A folder stands for the image files directly in it (.jpg, .png, .bmp, .tif, ...; not its subfolders),
less what an earlier predict wrote there (X_mask.png with X_overlay.png, X_probs.tif, X_instances.tif,
X_mask.tif stacks) and masks kept beside their images (X_mask.* beside X.*).

Writes PRED/<stem>_mask.png (class ids as palette indices, same size as the input after EXIF
orientation) and PRED/<stem>_overlay.png (image | mask | image * mask); for page 7 of a multi-page
TIFF, <stem>_p007_mask.png and <stem>_p007_overlay.png, and once every page is done, PRED/<stem>_mask.tif:
the page masks as one stack, one file per volume as the input was. --no-overlay writes no overlays:
the masks alone (and what the flags below add), for many or very large images.
--probabilities also writes PRED/<stem>_probs.tif: the probabilities the mask was taken from (averaged
over the runs and mirror images), float32, the same size: one page, the foreground's, for a model of
two classes; else one page per class, class k's on page k.
For a stack, PRED/<stem>_probs.tif then holds every page's, in page order.
--instances also writes PRED/<stem>_instances.tif: each connected object of the mask numbered (a
label image, 0 on the background; 16-bit, as the cell tracking challenge takes them), so that cells
the model parted come out as cells (`objects.instances`); a stack's holds its pages', each numbered alone.
It also writes PRED/<stem>_objects.csv, a row per object: its label, class, area in pixels, centroid,
bounding box and mean probability of its class (`objects.measured`); a stack's lists its pages', each
row after its page number. PRED/objects.csv has every image's rows in one table, after its path
and page. The line predict ends with counts the objects numbered.
--instance-classes 1 numbers the objects of class 1 alone (not those of a class 2 of cell borders).
--postprocess largest keeps only the largest connected component of each class but the background in
the masks (largest:1,3: of those classes), as nnU-Net does where it helps; min-size:N (min-size:N:1,3)
removes their components of fewer than N pixels (specks, fragments of cells), and min-size:N+largest
does both; with --instances, grow:N (grow:N:1,3) grows the numbered objects by up to N pixels over
the background, each background pixel to its nearest object, the mask staying as predicted: for
cells that touch, which a model trained to part them predicts a few pixels short of their edges
(`unet_dist/postprocess.py`; `evaluate --images` says for which classes each helps, and which N);
--probabilities are written as predicted.
--continue leaves out the images whose files are all in PRED already: it finishes a predict that was
stopped (every file is written beside and renamed into place, so one that is there is whole).
--mode auto predicts at the scale training saw, which resized every image to data.image_size: resize
mode, unless every training image already was data.image_size (then overlap-tile at the images' own
pixel scale, for images of any size). It prints which mode and why. Tiles of a model trained on whole
images lie inside the image (one pass where the image is the training size); a model trained on
patches, or with valid padding, gets mirrored context at the image's borders.
Images are read as the run's data was converted: its channels, and its intensity window (convert
--intensity dataset or window) where it had one.
--workdir repeated for several runs (the folds of `convert --fold`): their probabilities are averaged.
Started as N processes, each predicts its share of the images, on its own GPU where the node has them
(the backend follows how predict was started, or --strategy, as in training). The shares are split by
image size, so that the processes finish about together, and the first to finish waits for the others
at most runtime.stall_shutdown_seconds of the run's config; --set runtime.KEY=VALUE changes such a
runtime key (a longer wait, threads) for this command only.
Prediction computes in float32, whatever precision training used, unless --set runtime.precision
says otherwise: auto takes this machine's mixed policy (mixed_float16 on a GPU with tensor cores,
mixed_bfloat16 on a CPU with native bfloat16), which is faster; its probabilities differ from
float32's by the rounding of 16-bit activations (README: measured on a demo run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from unet_dist import atomic
from unet_dist.config import ConfigError, add_runtime_set_arg, add_strategy_arg, add_workdir_args, writable_dir

PALETTE = [0, 0, 0, 255, 255, 255, 230, 25, 75, 60, 180, 75, 255, 225, 25, 0, 130, 200, 245, 130, 48, 145, 30, 180]
# What predict writes for an image STEM (a stack's page: STEM_pNNN), and for a stack STEM once its
# pages are written: STEM + STACK_MASK and, with --probabilities and --instances, STEM + PROBS and
# STEM + INSTANCES with STEM + OBJECTS.
MASK, OVERLAY, PROBS, INSTANCES, STACK_MASK = "_mask.png", "_overlay.png", "_probs.tif", "_instances.tif", "_mask.tif"
OBJECTS = "_objects.csv"  # with --instances: a row per object (`objects.measured`); a stack's has its pages'
ALL_OBJECTS = "objects.csv"  # with --instances: every image's rows in one table (`objects_table`)


def _save(image: Image.Image, path: Path, **params) -> None:
    """`image.save(**params)` beside `path`, then renamed into place: an interrupted run leaves an
    earlier prediction whole. Encoded straight into the file, not into memory first: the overlay of
    an 8192x8192 image is 69 MB of PNG."""
    with atomic.atomic_path(path) as tmp:
        image.save(tmp, **params)


def _save_tiff(pages: list[Image.Image], path: Path) -> None:
    """One TIFF of `pages` (one or more), deflate-compressed."""
    _save(pages[0], path, format="TIFF", save_all=True, append_images=pages[1:], compression="tiff_adobe_deflate")


def probability_pages(probs: np.ndarray) -> list[Image.Image]:
    """(H, W, U) probabilities -> the float32 pages of STEM_probs.tif: the foreground's alone for a
    binary model (a sigmoid's one unit, or class 1 of a softmax over two), else one per class."""
    units = probs.shape[-1]
    keep = [units - 1] if units <= 2 else range(units)
    return [Image.fromarray(np.ascontiguousarray(probs[..., k], np.float32), "F") for k in keep]


def palette(colors: list | None) -> list[int]:
    """The masks' 256-colour palette: the training masks' own class colours (convert --colors), so
    a predicted mask shown or read as RGB is coded as they were, else PALETTE."""
    flat = [v for c in colors for v in c] if colors else PALETTE
    return flat + [128] * (768 - len(flat))


def objects_csv(rows: list[tuple]) -> str:
    """STEM_objects.csv: a header of `objects.MEASURES` and a row per object (`objects.measured`)."""
    from unet_dist.objects import MEASURES

    def text(v):  # centroids and probabilities to 4 decimals; no probability: empty
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    return "".join(",".join(map(text, row)) + "\n" for row in [MEASURES, *rows])


def save_outputs(image: np.ndarray | None, classes: np.ndarray, out: Path, stem: str, probs: np.ndarray | None = None,
                 colors: list | None = None, instances: tuple[int, ...] | None = None,
                 grows: tuple[int, ...] | None = None, write_probs: bool = True) -> int:
    """OUT/STEM_mask.png (class ids as palette indices, in `colors` when given), given the image
    (H, W, 3) uint8 OUT/STEM_overlay.png (image | mask | image * mask; None: no overlay), given
    probs (H, W, U) and `write_probs` OUT/STEM_probs.tif (`probability_pages`), and given the
    classes `instances` OUT/STEM_instances.tif
    (`objects.instances` of the mask, its objects grown by `grows`, --postprocess grow:N) and
    OUT/STEM_objects.csv, each object's class, size, place and mean probability (`objects.measured`;
    the probability column empty without probs). Returns the objects numbered (0 without `instances`).
    Thread-safe: Pillow's encoders and the file writes release the GIL."""
    mask = Image.fromarray(classes.astype(np.uint8), "P")
    mask.putpalette(palette(colors))
    _save(mask, out / f"{stem}{MASK}", format="PNG")
    if image is not None:
        _save_overlay(image, classes, mask, out / f"{stem}{OVERLAY}")
    if probs is not None and write_probs:
        _save_tiff(probability_pages(probs), out / f"{stem}{PROBS}")
    if instances is None:
        return 0
    from unet_dist.objects import instances as label
    from unet_dist.objects import measured

    labels = label(classes, instances, grows)
    _save_tiff([Image.fromarray(labels)], out / f"{stem}{INSTANCES}")
    rows = measured(labels, classes, probs)
    atomic.atomic_write_text(out / f"{stem}{OBJECTS}", objects_csv(rows))
    return len(rows)


def _save_overlay(image: np.ndarray, classes: np.ndarray, mask: Image.Image, path: Path) -> None:
    """The panel image | mask | image * (mask > 0), (H, 3W) RGB, as a PNG."""
    # Assembled in Pillow, pasting each part where it goes: copies through numpy took twice the
    # memory (28 bytes a pixel of the image, on top of it, for an 8192x8192 image).
    h, w = classes.shape
    shown, panel = Image.fromarray(image), Image.new("RGB", (3 * w, h))
    panel.paste(shown, (0, 0))
    panel.paste(mask, (w, 0))
    panel.paste(shown, (2 * w, 0), Image.fromarray(classes > 0).convert("L"))  # image * (mask > 0)
    del shown
    # zlib level 1: photos barely compress losslessly (a 486x403 overlay: 374 KiB against 362 at the
    # default level 6), and it encodes in half the time (30 against 58 ms).
    _save(panel, path, format="PNG", compress_level=1)


class Writer:
    """Writes predictions (`save_outputs`) on background threads while the next image is predicted:
    on a CPU the PNG encoding took longer than the demo model's prediction (2.1 against 1.7 s for
    48 images), and on a GPU it is nearly all of the time. At most 2 * threads images wait, and
    images of more than `pixels` pixels together only while they are one (encoding an image takes
    about 22 bytes a pixel, its overlay most, and the probabilities 4 a class), which bounds the
    memory held. The first error (a full disk) is raised by `put` or `close`. `objects` counts the
    objects numbered (--instances) in the images written so far. probabilities: write the probs
    `put` is given as STEM_probs.tif (else they only measure the objects)."""

    def __init__(self, out: Path, threads: int = 2, colors: list | None = None, pixels: int = 2**26,
                 instances: tuple[int, ...] | None = None, grows: tuple[int, ...] | None = None,
                 probabilities: bool = True):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.out, self.limit, self.pixels, self.colors = out, 2 * threads, pixels, colors
        self.instances, self.grows, self.probabilities, self.objects = instances, grows, probabilities, 0
        self.pool, self.pending = ThreadPoolExecutor(threads, thread_name_prefix="predict-writer"), deque()

    def put(self, image: np.ndarray | None, classes: np.ndarray, stem: str, probs: np.ndarray | None = None) -> None:
        future = self.pool.submit(save_outputs, image, classes, self.out, stem, probs, self.colors, self.instances,
                                  self.grows, self.probabilities)
        self.pending.append((future, classes.size))
        while len(self.pending) > self.limit or (
                len(self.pending) > 1 and sum(n for _, n in self.pending) > self.pixels):
            self.objects += self.pending.popleft()[0].result()

    def close(self) -> None:
        """Waits for every write; the first error is raised after the others have finished."""
        try:
            while self.pending:
                self.objects += self.pending.popleft()[0].result()
        finally:
            self.pool.shutdown(wait=True)


def named_output_of(name: str) -> str | None:
    """The X whose output or mask a file name says it is: X_overlay.png, X_probs.tif,
    X_instances.tif, X_mask.<any suffix> (predict's X_mask.png and X_mask.tif stacks, and masks
    kept beside their images, as Kaggle's LGG MRI set keeps X_mask.tif beside X.tif); else None."""
    for kind in (OVERLAY, PROBS, INSTANCES):
        if name.endswith(kind) and len(name) > len(kind):
            return name[: -len(kind)]
    stem = name.rpartition(".")[0]
    return stem.removesuffix("_mask") if stem.endswith("_mask") and len(stem) > len("_mask") else None


def expand_folders(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """(the paths given, with each folder replaced by the image files directly in it (sorted by name,
    hidden files left out), less the outputs of an earlier predict into it and masks kept beside
    their images: each file named as an output or mask of X (`named_output_of`) where X is an
    image of the folder, or a page of one (X = STEM_pNNN beside STEM.tif), and, whatever the
    folder holds, X_overlay.png with the X_mask.png, X_probs.tif and X_instances.tif beside it,
    and a stack's X_mask.tif, X_probs.tif and X_instances.tif beside X_p000_overlay.png:
    predicting into the input folder and then predicting that folder again must not predict the
    masks; a line for each folder with such files).
    Raises ConfigError for a folder without any image."""
    import re

    from unet_dist.data.imageio import IMAGE_SUFFIXES, image_files

    out: list[Path] = []
    notes: list[str] = []
    for path in paths:
        if not path.is_dir():
            out.append(path)
            continue
        found = image_files(path)
        names, earlier = {p.name for p in found}, set()
        named = {name: x for name in names if (x := named_output_of(name)) is not None}
        images = {Path(name).stem for name in names - named.keys()}
        for name, x in named.items():
            page = re.fullmatch(r"(.+)_p\d{3,}", x)  # a stack's page: samples_of's names
            if x in images or (page and page[1] in images):
                earlier.add(name)
        for name in names:
            stem = name.removesuffix(OVERLAY)
            if stem != name and f"{stem}{MASK}" in names:  # a mask PNG alone may be the user's own image
                earlier |= {name, f"{stem}{MASK}", f"{stem}{PROBS}", f"{stem}{INSTANCES}"}
                volume = stem.removesuffix("_p000")
                if volume != stem:  # a stack's first page: the stacks of its masks, probabilities and instances
                    earlier |= {f"{volume}{STACK_MASK}", f"{volume}{PROBS}", f"{volume}{INSTANCES}"}
        earlier &= names
        if earlier:
            notes.append(f"predict: {path}: leaving out {len(earlier)} files of earlier predictions and masks "
                         "(X_mask.png with X_overlay.png; X_mask.*, X_overlay.png, X_probs.tif and X_instances.tif "
                         "beside an image X; X_mask.tif stacks)")
        found = [p for p in found if p.name not in earlier]
        if not found:
            raise ConfigError(f"{path}: a folder without image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        out += found
    return out, notes


def _frames(path: Path) -> list[Image.Image]:
    """Every page of an image file, read into memory."""
    with Image.open(path) as image:
        return [frame.copy() for frame in ImageSequence.Iterator(image)]


def write_stack(path: Path, pages: list, failed: int, out: Path, probabilities: bool = False,
                instances: bool = False) -> tuple[str, bool]:
    """Writes OUT/STEM_mask.tif, the page masks (STEM_pNNN_mask.png, from every process) as one
    multi-page TIFF of palette class ids, with `probabilities` OUT/STEM_probs.tif, the pages'
    STEM_pNNN_probs.tif pages in page order, and with `instances` OUT/STEM_instances.tif, likewise,
    and OUT/STEM_objects.csv, the pages' rows after their page number; returns (predict's line
    about them, whether all were written).
    Not written when pages were skipped, or when a page's file is not in OUT (processes on other
    nodes wrote into a folder of their own, not a shared one). Holds one stack at a time in memory
    (masks one byte a pixel, probabilities four a page, instances two or four). Raises OSError when
    a write fails."""
    kinds = ([(MASK, STACK_MASK)] + [(PROBS, PROBS)] * probabilities
             + [(INSTANCES, INSTANCES), (OBJECTS, OBJECTS)] * instances)
    targets = [out / f"{path.stem}{stacked}" for _, stacked in kinds]  # kinds: (a page's file, the stack's)
    names = " and ".join(t.name for t in targets)
    if failed:
        return f"predict: {names} not written: {failed} of the {len(pages)} pages of {path} were skipped", False
    for (kind, _), target in zip(kinds, targets, strict=True):
        frames, rows = [], []
        for page in pages:
            file = out / f"{page.name}{kind}"
            try:
                if kind == OBJECTS:  # text: each row after its page's number
                    head, *lines = file.read_text().splitlines()
                    rows += [f"{page.page},{line}\n" for line in lines]
                else:
                    frames += _frames(file)
            except (OSError, ValueError) as e:  # ValueError: an empty file, no header to take
                return (f"predict: {target.name} not written: {file.name} unreadable in {out} ({e}); with several "
                        "nodes, --out must be a folder they share"), False
        if kind == OBJECTS:
            atomic.atomic_write_text(target, "".join([f"page,{head}\n", *rows]))
        else:
            _save_tiff(frames, target)
    extras = [f"their {what} in {t.name}" for what, t in zip(
        ["probabilities"] * probabilities + ["instances", "objects"] * instances, targets[1:], strict=True)]
    also = f" ({', '.join(extras)})" if extras else ""
    return f"predict: {targets[0]}: the {len(pages)} page masks of {path} as one stack{also}", True


def objects_table(samples: list, out: Path) -> tuple[str, bool]:
    """Writes OUT/objects.csv: the rows of every image's STEM_objects.csv in OUT (from every
    process, and from an earlier predict that --continue finished), in the order of `samples`,
    each after its image's path and page (empty but for a stack's page), so that a folder's
    objects are one table to read. Returns (predict's line about it, whether every image had its
    table). Raises OSError when the write fails."""
    import csv
    import io

    from unet_dist.objects import MEASURES

    rows, missing, images = [], 0, 0
    for sample in samples:
        try:
            _, *lines = (out / f"{sample.name}{OBJECTS}").read_text().splitlines()
        except (OSError, ValueError):  # ValueError: empty, no header
            missing += 1
            continue
        where = io.StringIO()  # the path quoted where it holds a comma or a quote, as csv readers expect
        csv.writer(where, lineterminator="").writerow([sample.image, sample.page if sample.stacked else ""])
        rows += [f"{where.getvalue()},{line}\n" for line in lines]
        images += 1
    atomic.atomic_write_text(out / ALL_OBJECTS, "".join([",".join(("image", "page", *MEASURES)) + "\n", *rows]))
    said = f"predict: {out / ALL_OBJECTS}: the {len(rows):,} objects of {images} images in one table"
    if missing:
        said += (f"; no X{OBJECTS} in {out} for {missing} of the {len(samples)} images (skipped, or predicted on a "
                 "node that does not share --out)")
    return said, not missing


def add_mode_args(p: argparse.ArgumentParser) -> None:
    """predict's and export's --mode, --tile, --overlap and --tta (see `inference.prediction_fn`)."""
    p.add_argument("--mode", choices=("auto", "tile", "resize"), default="auto",
                   help="auto: the scale training saw (resize, unless every training image was data.image_size)")
    p.add_argument("--tile", type=int, help="tile size (default: the training image size)")
    p.add_argument("--overlap", type=int, help="context pixels per tile side, same padding (default tile/8)")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="flip: average over the image and its 3 mirror images (4x the compute)")


def add_postprocess_arg(p: argparse.ArgumentParser) -> None:
    """predict's and evaluate --images' --postprocess (`unet_dist.postprocess`)."""
    p.add_argument("--postprocess", default="none", metavar="none|largest[:C,...]|min-size:N[:C,...]|grow:N[:C,...]",
                   help="largest: keep only the largest connected component of each class but the background "
                        "(largest:1,3: of those classes), the rest of it becoming background, as nnU-Net does "
                        "where it helps; min-size:N: remove their components of fewer than N pixels; grow:N: "
                        "grow their objects by up to N pixels over the background (the objects --instances "
                        "numbers and evaluate scores; the mask stays as predicted); several: "
                        "min-size:N+largest+grow:M; evaluate --images says for which classes each helps")


def predictor_options(args: argparse.Namespace) -> dict:
    """`inference.load_predictor`'s keyword arguments from the --checkpoint and `add_mode_args` flags."""
    return {"which": args.checkpoint, "mode": args.mode, "overlap": args.overlap, "tta": args.tta,
            "tile": (args.tile, args.tile) if args.tile is not None else None}


def header_sizes(samples: list, shard) -> np.ndarray:
    """(len(samples), 2) float64: each sample's (height, width) from its file's header, for the files
    that process `shard.index` of `shard.count` reads (every count-th, a stack's pages with their
    file); zeros elsewhere, and for a file that cannot be read (its reading later says why). Summed
    over the processes, every sample's size, each header read once."""
    from unet_dist.data.imageio import page_sizes

    files = list(dict.fromkeys(s.image for s in samples))
    mine = {path: page_sizes(path) for path in files[shard.index :: shard.count]}
    out = np.zeros((len(samples), 2))
    for i, s in enumerate(samples):
        pages = mine.get(s.image, [])
        if s.page < len(pages):
            out[i] = pages[s.page]
    return out


def my_share(samples: list, cost, runtime) -> list[int]:
    """The indices of `samples` (imageio.Sample) that this process of `runtime` predicts: split by
    what each costs, cost((H, W)) of its size from the image headers (`Predictor.cost`; evaluate
    --predictions: its pixels), so that the processes finish about together and the first to finish waits at most about one image for the others,
    however the image sizes mix. Each process reads 1/N of the headers (`header_sizes`), and one
    collective gives every process all the sizes: on a shared file system a header read can take
    milliseconds, and with every process reading every header the start-up would not shrink with N."""
    shard = runtime.process_shard
    if shard.count == 1 or not samples:  # the same samples on every process: all skip the sum alike
        return list(range(len(samples)))
    sizes = runtime.sum_shares(header_sizes(samples, shard), "reading their image headers")
    return shard.balanced([cost((int(h), int(w))) for h, w in sizes])


def page_files(probabilities: bool, instances: bool, overlay: bool = True) -> tuple[str, ...]:
    """What predict writes for each image (a stack's page): after STEM, in `out`."""
    return (MASK,) + (OVERLAY,) * overlay + (PROBS,) * probabilities + (INSTANCES, OBJECTS) * instances


def left_to_predict(samples: list, out: Path, kinds: tuple[str, ...], runtime) -> list[int]:
    """--continue: the indices of `samples` whose files (`kinds`, from `page_files`) are not all in
    `out` yet. Every process gets the chief's view, taken before any process writes (the others
    wait for it in the sum): a process that looked later would see new files and split the rest
    otherwise. Raises CollectiveError."""
    done = np.array([all((out / f"{s.name}{kind}").exists() for kind in kinds) for s in samples], np.float64)
    done = runtime.sum_shares(done * runtime.is_chief, "loading the model") > 0
    return [i for i in range(len(samples)) if not done[i]]


def sum_over_processes(runtime, counts: list[np.ndarray]) -> list[np.ndarray]:
    """`Runtime.sum_shares_each` of predict's (and evaluate --images') counts, once every image of
    this process's share is done."""
    return runtime.sum_shares_each(counts, "their images", hint=" (an image that takes longer than that to "
                                   "predict needs a larger limit: --set runtime.stall_shutdown_seconds=N)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unet_dist.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir_args(p, many=True)
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", type=Path, required=True)
    add_mode_args(p)
    add_postprocess_arg(p)
    p.add_argument("--probabilities", action="store_true",
                   help="also write STEM_probs.tif: float32 probabilities (the foreground's for two classes, "
                        "else one page per class)")
    p.add_argument("--instances", action="store_true",
                   help="also write STEM_instances.tif: the mask's connected objects numbered 1, 2, ... (16-bit "
                        "label image, 0 on the background), each class's after the one before, and "
                        "STEM_objects.csv: each object's class, area, centroid, box and mean probability")
    p.add_argument("--instance-classes", metavar="C,...",
                   help="with --instances: number the objects of these classes only (default: every class but "
                        "the background)")
    p.add_argument("--no-overlay", dest="overlay", action="store_false",
                   help="write no STEM_overlay.png (image | mask | masked image, three times the image's pixels "
                        "to encode): for many images or very large ones, where the masks are what is needed")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="leave out the images whose outputs are all in --out already: finishes a predict that "
                        "was stopped (each file is written whole or not at all)")
    add_strategy_arg(p, "the backend (default: auto, from how predict was started)")
    add_runtime_set_arg(p)
    args = p.parse_args(argv)
    if args.instance_classes is not None and not args.instances:
        p.error("--instance-classes: used with --instances only")
    from unet_dist.data.imageio import samples_of, stacks_of

    try:
        images, notes = expand_folders(args.images)
    except ConfigError as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    samples = [s for path in images for s in samples_of(path)]  # each page of a TIFF stack is an image
    # Outputs are named by the image's stem: two images with one stem would overwrite each other.
    first: dict[str, Path] = {}
    for s in samples:
        if first.setdefault(s.name, s.image) != s.image:
            print(f"predict: error: {first[s.name]} and {s.image} would both write {s.name}{MASK} in "
                  f"{args.out}; predict them into separate --out folders", file=sys.stderr)
            return 2

    from tqdm import tqdm

    from unet_dist.checkpoint import CheckpointError
    from unet_dist.config import load_workdir_config
    from unet_dist.data.imageio import BadImage, load_image, rgb_view
    from unet_dist.distribute import CollectiveError, make_trained_run_runtime
    from unet_dist.inference import PredictionError, load_predictor
    from unet_dist.logs import chief_progress
    from unet_dist.postprocess import class_list

    try:
        runtime = make_trained_run_runtime(load_workdir_config(args.workdir[0]), args.strategy, args.runtime_set)
        writable_dir(args.out, "--out")
        predictor = load_predictor(args.workdir, **predictor_options(args), precision=runtime.cfg.runtime.precision,
                                   postprocess=args.postprocess)
        numbered = class_list(f"--instance-classes {args.instance_classes!r}", args.instance_classes or "",
                              predictor.cfg.model.num_classes) if args.instances else None
        if predictor.postprocess.grown and not args.instances:
            raise ConfigError(f"--postprocess {args.postprocess!r}: grow is used with --instances only (it grows "
                              "the numbered objects; the mask stays as predicted)")
    except (ConfigError, CheckpointError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        runtime.print(note, file=sys.stderr)
    todo = list(range(len(samples)))
    if args.resume:
        try:
            todo = left_to_predict(samples, args.out, page_files(args.probabilities, args.instances, args.overlay),
                                   runtime)
        except CollectiveError as e:
            print(f"predict: error: {e}", file=sys.stderr)
            return 1
        runtime.print(f"predict: leaving out {len(samples) - len(todo)} of {len(samples)} images, predicted in "
                      f"{args.out} already (--continue)", file=sys.stderr)
    try:
        share = [todo[j] for j in my_share([samples[i] for i in todo], predictor.cost, runtime)]
    except CollectiveError as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 1
    stacks = stacks_of(samples)
    stack_index = {path: i for i, path in enumerate(stacks)}
    # [images skipped, 1 if a write failed, objects numbered, then the pages skipped of each stack]:
    # summed over processes
    counts, unwritten = np.zeros(3 + len(stacks)), None
    # Masks coded by colour come out in those colours.
    writer = Writer(args.out, colors=predictor.colors, instances=numbered,
                    grows=predictor.postprocess.grows(predictor.cfg.model.num_classes),
                    probabilities=args.probabilities)
    try:
        for i in chief_progress(runtime, "predict", "img", share):  # no two processes write one file
            sample = samples[i]
            try:
                image = load_image(sample.image, sample.page, predictor.cfg.model.in_channels, predictor.window)
                probs = predictor(image).numpy()
            except (BadImage, OSError, PredictionError) as e:
                tqdm.write(f"predict: skipping {sample.where}: {e}", file=sys.stderr)
                counts[0] += 1
                if sample.stacked:
                    counts[3 + stack_index[sample.image]] += 1
                continue
            writer.put(rgb_view(image) if args.overlay else None, predictor.mask(probs), sample.name,  # None: no overlay
                       probs if args.probabilities or args.instances else None)  # instances: their confidence
    except OSError as e:  # a write failed (a full disk): the next images would fail the same way
        unwritten = e
    finally:
        try:
            writer.close()
        except OSError as e:
            unwritten = unwritten or e
    counts[2] = writer.objects
    if unwritten:
        print(f"predict: error: writing into {args.out}: {unwritten}; the masks written before it are whole",
              file=sys.stderr)
        counts[1] = 1
    # Every process takes part in the sum, also one that stopped: the others would wait for it.
    try:
        (counts,) = sum_over_processes(runtime, [counts])
    except CollectiveError as e:
        print(f"predict: error: {e}; the masks written in {args.out} are whole", file=sys.stderr)
        return 1
    if counts[1]:
        return 1
    failed = int(counts[0])
    processes = f" on {runtime.world_size} processes" * (runtime.world_size > 1)
    numbered_line = f"; {int(counts[2]):,} objects numbered (STEM{INSTANCES}, STEM{OBJECTS})" * bool(args.instances)
    runtime.print(f"predict: {len(todo) - failed} images{processes} ({predictor.summary()}) -> {args.out}"
                  f"{numbered_line}")
    if runtime.is_chief:  # after the sum: every process's pages are written
        for path, pages in stacks.items():
            try:
                said, whole = write_stack(path, [samples[i] for i in pages], int(counts[3 + stack_index[path]]),
                                          args.out, args.probabilities, args.instances)
            except OSError as e:
                print(f"predict: error: writing into {args.out}: {e}; the page masks are whole", file=sys.stderr)
                return 1
            print(said, file=sys.stdout if whole else sys.stderr)
        if args.instances:
            try:
                said, whole = objects_table(samples, args.out)
            except OSError as e:
                print(f"predict: error: writing into {args.out}: {e}; the masks are whole", file=sys.stderr)
                return 1
            print(said, file=sys.stdout if whole else sys.stderr)
    return 1 if todo and failed == len(todo) else 0


if __name__ == "__main__":
    sys.exit(main())
