"""Folders of images and masks -> sharded TFRecords plus manifest.json.

Pillow decoding runs in K worker processes (no TensorFlow there); the parent process streams their
results, in order, into the shard writers, so memory does not grow with the number of images.
Shards and the manifest are written under temporary names and renamed only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
from PIL import Image

from unet_dist.atomic import atomic_write_text
from unet_dist.config import MAX_CHANNELS, ConfigError, writable_dir
from unet_dist.data.imageio import (
    IMAGE_SUFFIXES,
    BadImage,
    Sample,
    image_files,
    image_values,
    load_image,
    load_mask,
    samples_of,
)

LAYOUTS = ("oxford-pet", "folders")
SPLIT_UNITS = ("auto", "file", "page")
CLASS_MODES = ("binary", "trimap", "multiclass", "instances")
# How records store their images. JPEG at quality 95 with 4:2:0 chroma changes most pixels by a
# level or two, and colour detail a pixel wide is lost to the halved chroma; PNG keeps every value.
RECORD_FORMATS = ("png", "jpeg")  # what a manifest's "image_format" may be
IMAGE_FORMATS = ("auto", *RECORD_FORMATS)
JPEG_SUFFIXES = (".jpg", ".jpeg")
MAX_CLASSES = 256
# The class id records hold for a pixel that is not labelled (convert --ignore-value): no loss and no
# metric counts it. With it, class ids run below 255.
IGNORE = 255

# How images of wider values than 8 bits come to the 8 bits records hold (convert --intensity):
# "image", each image by its own percentiles (`imageio._to_uint8`; microscopy, whose brightness
# varies from image to image with the stain and exposure); "dataset", one window for every image,
# the 0.5th and 99.5th percentiles of the training images' labelled foreground pixels (nnU-Net's
# normalisation of CT, where a value means a tissue whatever the image); "window", one given.
INTENSITY_MODES = ("image", "dataset", "window")
INTENSITY_PERCENTILES = (0.5, 99.5)
# The most values `--intensity dataset` keeps to take the percentiles from (all channels together;
# 64 MB of float32), drawn evenly from the training images: memory does not grow with the data set.
INTENSITY_SAMPLE = 2**24

# Oxford-IIIT Pet trimaps: 1 = pet, 2 = background, 3 = border. Our class ids: 0 = background, 1 = pet, 2 = border.
TRIMAP_TO_CLASS = {1: 1, 2: 0, 3: 2}


def ignores(meta: dict) -> bool:
    """Whether the masks of a manifest (or of a run's data.json) hold IGNORE for unlabelled pixels."""
    return meta.get("ignore_value") is not None


class ConvertError(RuntimeError):
    """The whole conversion cannot proceed (bad SRC, no usable sample); one line for the user."""


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}.tfrecord"


@dataclass(frozen=True)
class Task:
    index: int
    split: str
    sample: Sample
    layout: str
    classes: str
    size: tuple[int, int] | None  # (H, W) to resize to, or None to keep
    num_classes: int | None = None  # multiclass: ids must be below it (None: any id up to 255)
    ignore_value: int | None = None  # source mask value of pixels that are not labelled -> IGNORE
    image_format: str = "jpeg"  # how the record stores the image: "png" or "jpeg"
    colors: tuple[tuple[int, int, int], ...] | None = None  # colour-coded masks: class i's colour is colors[i]
    border_distances: bool = False  # training records also store the border weights' d1 + d2 (border.py)
    channels: int = 3  # the images' channels (convert --channels)
    window: tuple[tuple[float, float], ...] | None = None  # [lo, hi] per channel (convert --intensity), or None
    sample_size: int = 0  # --intensity dataset's first pass: foreground values to draw from this image


def source_folders(src: Path, layout: str) -> tuple[Path, Path]:
    """SRC's images folder and masks folder in `layout`."""
    if layout not in LAYOUTS:
        raise ConvertError(f"--layout {layout!r}: allowed {', '.join(LAYOUTS)}")
    return src / "images", src / ("annotations/trimaps" if layout == "oxford-pet" else "masks")


def find_pairs(src: Path, layout: str, mask_suffix: str = "") -> tuple[list[Sample], list[dict]]:
    """Lists the labelled samples in SRC and the files skipped while pairing. The mask of image X.* is
    X{mask_suffix}.* in the masks folder (many data sets name it X_mask.png or X_mask.gif). A
    multi-page TIFF and its mask, which must have as many pages, give one sample per page."""
    images_dir, masks_dir = source_folders(src, layout)
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise ConvertError(f"{src} is not in the --layout {layout} layout: {d} is missing")
    masks: dict[str, Path] = {}
    for p in image_files(masks_dir):
        masks.setdefault(p.stem, p)
    samples, skipped = [], []
    seen: set[str] = set()
    for p in sorted(images_dir.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append({"file": str(p), "reason": f"not an image file ({p.suffix or 'no extension'})"})
        elif p.stem in seen:
            skipped.append({"file": str(p), "reason": "another image has the same stem"})
        elif p.stem + mask_suffix not in masks:
            skipped.append({"file": str(p), "reason": f"no mask named {p.stem}{mask_suffix}.* in {masks_dir}"})
        else:
            seen.add(p.stem)
            try:
                samples += samples_of(p, masks[p.stem + mask_suffix])
            except BadImage as e:
                skipped.append({"file": str(p), "reason": str(e)})
    return samples, skipped


def split_units(samples: list[Sample], split_by: str, group: str | None,
                split: bool) -> tuple[str, list, str]:
    """(split_by resolved: "file", "page" or "group"; each sample's unit, the key it is dealt into
    train or val by; what the units are called in messages). split: whether there is a val split
    to make (a file cannot be split by file when it is the only one). Raises ConvertError."""
    if group is not None:
        if split_by == "page":
            raise ConvertError(f"--group {group!r} keeps files together; it cannot be used with --split-by page")
        try:
            pattern = re.compile(group)
        except re.error as e:
            raise ConvertError(f"--group {group!r}: not a regular expression ({e})") from None
        found = [pattern.search(s.image.stem) for s in samples]
        missing = [s.image for s, m in zip(samples, found, strict=True) if m is None]
        if missing:
            raise ConvertError(f"--group {group!r}: {len(set(missing))} image file(s) do not match it, such as "
                               f"{missing[0].name}; every file needs a group")
        units = [m.group(1) if pattern.groups else m.group(0) for m in found]
        if split and len(set(units)) < 2:
            raise ConvertError(f"--group {group!r}: every file is in one group ({units[0]!r}); a val split needs "
                               "two groups or more")
        return "group", units, "groups"
    files = len({s.image for s in samples})
    if split_by == "auto":
        split_by = "file" if files >= 2 else "page"
    if split_by == "file" and files < 2 and split:
        raise ConvertError(f"--split-by file: SRC has one image file ({samples[0].image.name}), which cannot be "
                           "split by file; --split-by page splits its pages")
    # Files, or samples (pages). Named "images" where each is one.
    units = [s.image for s in samples] if split_by == "file" else list(range(len(samples)))
    return split_by, units, "images" if len(set(units)) == len(samples) else "files"


def instance_classes(labels: np.ndarray) -> np.ndarray:
    """An instance label image (H, W) (0 background, each object its own positive id) -> uint8 class
    ids: 1 on the objects, 0 on the background and on a gap one pixel wide wherever two objects
    touch (the pixels of the one with the higher id that touch, at a side or a corner, one with a
    lower id). The 2015 U-Net's cells come so, parted by their membranes: their 8-connected
    components are the objects again (`objects.components`, `predict --instances`), and the border
    weights (`border.distance_sum`) see each as its own."""
    from scipy import ndimage

    lower = ndimage.minimum_filter(np.where(labels > 0, labels, labels.max(initial=0) + 1), size=3, mode="nearest")
    return ((labels > 0) & (lower >= labels)).astype(np.uint8)


def _check_instances(ids: np.ndarray, objects: np.ndarray) -> None:
    """BadImage where instance label image `ids` (H, W) holds at least twice as many separate
    objects (8-connected components of `instance_classes`' `objects`) as ids, and three or more: a
    binary or class mask passed as instances (each of its ids many cells), whose objects would all
    be one, with no gap drawn between touching ones, and score as one object an image. An object in
    two pieces (a cell cut by the image's edge and back) passes."""
    from scipy import ndimage

    _, pieces = ndimage.label(objects, structure=np.ones((3, 3), bool))
    n = np.unique(ids[ids > 0]).size
    if pieces >= max(3, 2 * n):
        raise BadImage(f"its {n} id{'s' * (n != 1)} {'are' if n != 1 else 'is'} {pieces} separate objects: "
                       "not an instance label image (an id per object) but a binary or class mask; convert it "
                       "with --classes binary or multiclass, or label its objects first")


def _class_ids(mask: np.ndarray, layout: str, classes: str, num_classes: int | None = None,
               ignore_value: int | None = None) -> np.ndarray:
    """(H, W) source mask values -> uint8 class ids as --layout and --classes say; pixels of value
    `ignore_value` become IGNORE, and the other values must be the layout's (BadImage otherwise)."""
    if classes == "instances":
        ignored = mask == ignore_value if ignore_value is not None else np.zeros(mask.shape, bool)
        ids = np.where(ignored, 0, mask)
        objects = instance_classes(ids)
        _check_instances(ids, objects)
        return np.where(ignored, np.uint8(IGNORE), objects).astype(np.uint8)
    if ignore_value is None:
        return _labelled_ids(mask, np.unique(mask), layout, classes, num_classes)
    ignored = mask == ignore_value
    values = np.unique(mask[~ignored])
    if values.size and int(values[-1]) >= IGNORE and classes == "multiclass":
        raise BadImage(f"class id {int(values[-1])}: with --ignore-value, class ids run below {IGNORE}")
    ids = _labelled_ids(mask, values, layout, classes, num_classes)
    return np.where(ignored, np.uint8(IGNORE), ids).astype(np.uint8)


def _labelled_ids(mask: np.ndarray, values: np.ndarray, layout: str, classes: str,
                  num_classes: int | None) -> np.ndarray:
    """`_class_ids` of the pixels whose values are `values` (the others' ids are any)."""
    if layout == "oxford-pet":
        bad = [int(v) for v in values if int(v) not in TRIMAP_TO_CLASS]
        if bad:
            raise BadImage(f"trimap values {bad} are not 1 (pet), 2 (background) or 3 (border)")
        if classes == "binary":  # the paper: pet vs the rest (background and border)
            return (mask == 1).astype(np.uint8)
        lut = np.zeros(256, np.uint8)
        for k, v in TRIMAP_TO_CLASS.items():
            lut[k] = v
        return lut[mask]
    if classes == "binary":
        if set(values.tolist()) <= {0, 1}:
            return mask
        if set(values.tolist()) <= {0, 255}:
            return (mask == 255).astype(np.uint8)
        raise BadImage(f"binary mask values must be 0/1 or 0/255, found {values.tolist()[:8]}")
    if num_classes is not None and values.size and int(values[-1]) >= num_classes:
        raise BadImage(f"class ids {[int(v) for v in values if v >= num_classes][:8]} are not below "
                       f"--num-classes {num_classes}")
    return mask


def _check_class_ids(present: list[int], num_classes: int | None) -> int:
    """multiclass: the number of classes, from the ids found in the masks (sorted) or as given.
    Ids must run 0..N-1, as nnU-Net requires: a gap is far more often a mask format (0/255 for two
    classes would make a 256-class model) than classes missing from the data, which --num-classes states.
    """
    if num_classes is not None:
        return num_classes
    n = present[-1] + 1 if present else 2
    missing = sorted(set(range(n)) - set(present))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
        hint = " (0/255 masks are two classes: --classes binary)" if present == [0, 255] else ""
        raise ConvertError(f"the masks hold class ids {present[:8]}{' ...' if len(present) > 8 else ''} but "
                           f"never {shown}: multiclass ids run 0..N-1{hint}; if those classes are only absent "
                           f"from these images, pass --num-classes {n}")
    return max(n, 2)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    """uint8 (H, W) or (H, W, C) -> PNG or JPEG bytes. An RGB image whose three channels are equal
    (a grayscale source, read as RGB) is stored as one channel: a third of the bytes to encode, store
    and decode, and the same RGB image again from decode_png/decode_jpeg(channels=3). An image of
    another number of channels C is stored as a grayscale PNG of (H, W * C), each row its pixels'
    channels one after the other as in memory (no image format holds any C; `pipeline.parse_record`
    reshapes it back). Measured against its C planes one under the other, a (C * H, W) PNG, for
    5-channel 256x256 images: the same bytes, decoded in 2.1 against 3.2 ms with the transpose back."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[2] != 3:
        arr = arr.reshape(arr.shape[0], -1)
    elif arr.ndim == 3 and (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all():
        arr = arr[..., 0]
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    else:
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_format_of(samples: list[Sample], image_format: str, channels: int = 3) -> tuple[str, str]:
    """(the records' image format, why) for --image-format. auto keeps JPEG sources JPEG, such as the
    Pet photos: lossless copies of lossy images buy nothing and took 5x the bytes for the demo's. It
    stores everything else lossless, since records are what training sees: PNG, TIFF and BMP
    sources (microscopy, EM, medical, aerial images) stay exact to the pixel, as predict reads them.
    Images of other than 1 or 3 channels are PNG: JPEG holds no other number."""
    if image_format != "auto":
        if image_format == "jpeg" and channels not in (1, 3):
            raise ConvertError(f"--image-format jpeg with --channels {channels}: JPEG holds 1 or 3 channels; "
                               "--image-format png")
        return image_format, "--image-format"
    if channels in (1, 3) and all(s.image.suffix.lower() in JPEG_SUFFIXES for s in samples):
        return "jpeg", "auto: every source image is a JPEG"
    return "png", "auto: not every source image is a JPEG, so none is stored lossy"


_COLOR_LINE = re.compile(r"\s*(\d+)\s*[,\s]\s*(\d+)\s*[,\s]\s*(\d+)(?:\s+(.*))?")


def read_colors(path: Path) -> tuple[list[tuple[int, int, int]], list[str] | None]:
    """The classes of colour-coded masks, one a line in class-id order: `R G B [name]` or `R,G,B [name]`
    (CamVid's label_colors.txt), or CVAT's labelmap.txt (`name:R,G,B:parts:actions`). Blank lines
    and # comments are passed over. Returns (colours, names, or None when some line has none).
    Raises ConvertError naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"--colors {path}: cannot read it ({e})") from None
    colors, names = [], []
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.split(":")
        cvat = len(parts) >= 2 and _COLOR_LINE.fullmatch(parts[1].strip())
        found = _COLOR_LINE.fullmatch(text) if not cvat else None
        if not (cvat or found):
            raise ConvertError(f"--colors {path} line {n}: {text[:60]!r} is neither 'R G B [name]' nor CVAT's "
                               "'name:R,G,B::'")
        rgb = tuple(int(v) for v in (cvat or found).groups()[:3])
        if max(rgb) > 255:
            raise ConvertError(f"--colors {path} line {n}: {rgb} is not a colour (0-255 each)")
        if rgb in colors:
            raise ConvertError(f"--colors {path} line {n}: {rgb} is class {colors.index(rgb)}'s colour already")
        colors.append(rgb)
        names.append(parts[0].strip() if cvat else (found.group(4) or "").strip())
    if len(colors) < 2:
        raise ConvertError(f"--colors {path}: {len(colors)} colours; a class each, at least 2")
    if len(colors) > IGNORE:
        raise ConvertError(f"--colors {path}: {len(colors)} colours; at most {IGNORE} classes")
    return colors, names if all(names) else None


def read_image_list(path: Path, flag: str) -> set[str]:
    """The image stems a list file names: the first word of each line (VOC's ImageSets val.txt,
    the Pet set's test.txt: 'Abyssinian_201 1 1 1'), a file name or path taken by its stem; blank
    lines and lines starting with # are passed over. Raises ConvertError naming `flag` and the file."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{flag} {path}: cannot be read ({e})") from None
    stems = set()
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        name = PurePath(words[0])
        stems.add(name.stem if name.suffix.lower() in IMAGE_SUFFIXES else name.name)
    if not stems:
        raise ConvertError(f"{flag} {path}: names no image (one a line: its stem or file name)")
    return stems


def listed_samples(samples: list[Sample], skipped: list[dict], listed: set[str], named: str,
                   where: str = "SRC") -> tuple[list[Sample], list[dict]]:
    """(the samples (every page of a stack), the skipped files) of the image files whose stems are
    `listed` (`read_image_list`). Raises ConvertError starting with `named` (the flag and the list's
    file) when it names an image not among `samples` and `skipped` (`where`: a list for another data
    set, or a typo), or none that has a mask."""
    present = {s.image.stem for s in samples} | {PurePath(k["file"]).stem for k in skipped}
    missing = sorted(listed - present)
    if missing:
        raise ConvertError(f"{named}: {len(missing)} of its {len(listed)} images are not in {where}, "
                           f"such as {missing[0]!r}")
    chosen = [s for s in samples if s.image.stem in listed]
    if not chosen:
        raise ConvertError(f"{named}: none of its {len(listed)} images has a mask in {where}")
    return chosen, [k for k in skipped if PurePath(k["file"]).stem in listed]


def load_pair(image_path: str | Path, mask_path: str | Path, layout: str, classes: str,
              num_classes: int | None = None, page: int = 0, ignore_value: int | None = None,
              colors: list[tuple[int, int, int]] | None = None, channels: int = 3,
              window: list | None = None, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One labelled image (page `page` of a stack) at its own size: (uint8 (H, W, channels) image,
    uint8 (H, W) class ids), the mask's values mapped to class ids as --layout and --classes say, and
    pixels of value `ignore_value` to IGNORE. colors: colour-coded masks, each colour's index its
    value. window: the intensity window (`imageio.load_image`). size: the mask resized to (H, W)
    (`load_labels`; the image is left at its size). Raises BadImage saying what is wrong (naming the
    mask file when it is the mask)."""
    image = load_image(image_path, page, channels, window)
    return image, load_labels(mask_path, image.shape[:2], layout, classes, num_classes, page, ignore_value, colors,
                              size)


def load_labels(mask_path: str | Path, shape: tuple[int, ...], layout: str, classes: str,
                num_classes: int | None = None, page: int = 0, ignore_value: int | None = None,
                colors: list[tuple[int, int, int]] | None = None, size: tuple[int, int] | None = None) -> np.ndarray:
    """An image's mask as uint8 (H, W) class ids (`load_pair`), which must be of the image's
    `shape` (H, W); with `size`, resized to it (nearest neighbour) before its values become class
    ids: the same ids as resizing them, except for instances, whose gaps where objects touch are
    drawn at the new size and so stay one pixel wide. Raises BadImage naming the mask file."""
    mask = _read_mask(mask_path, page, colors, wide=classes == "instances", shape=shape)
    return _labels(mask, mask_path, layout, classes, num_classes, ignore_value, size)


def _labels(mask: np.ndarray, mask_path: str | Path, layout: str, classes: str, num_classes: int | None,
            ignore_value: int | None, size: tuple[int, int] | None = None) -> np.ndarray:
    """`load_labels` of a mask read already (`_read_mask`)."""
    if size is not None:
        h, w = size
        mask = np.asarray(Image.fromarray(mask if mask.dtype == np.uint8 else mask.astype(np.int32))
                          .resize((w, h), Image.NEAREST))
    try:
        return _class_ids(mask, layout, classes, num_classes, ignore_value)
    except BadImage as e:
        raise BadImage(f"mask {mask_path}: {e}") from None


def _read_mask(mask_path: str | Path, page: int, colors: list | None = None, wide: bool = False,
               shape: tuple[int, ...] | None = None) -> np.ndarray:
    """`imageio.load_mask`, its BadImage naming the mask file; given the image's `shape` (H, W),
    a mask of another size is refused."""
    try:
        mask = load_mask(mask_path, page, colors, wide)
    except BadImage as e:
        raise BadImage(f"mask {mask_path}: {e}") from None
    if shape is not None and mask.shape != tuple(shape):
        raise BadImage(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}")
    return mask


def load_instance_pair(image_path: str | Path, mask_path: str | Path, page: int = 0, ignore_value: int | None = None,
                       channels: int = 3, window: list | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An image with an instance mask (--classes instances), the mask read once: `load_pair`'s
    (image, class ids) and the mask's objects as int64 (H, W) ids 0 (none, and `ignore_value`'s
    pixels) to n, numbered in the order of their own ids: what `evaluate --images` matches predicted
    objects against (`objects.matched_objects`). Raises BadImage naming the mask file."""
    image = load_image(image_path, page, channels, window)
    ids = _read_mask(mask_path, page, wide=True, shape=image.shape[:2])
    try:
        classes = _class_ids(ids, "folders", "instances", ignore_value=ignore_value)
    except BadImage as e:
        raise BadImage(f"mask {mask_path}: {e}") from None
    if ignore_value is not None:
        ids = np.where(ids == ignore_value, 0, ids)
    values, numbered = np.unique(ids, return_inverse=True)
    numbered = numbered.reshape(ids.shape)
    return image, classes, numbered if values[0] == 0 else numbered + 1


def foreground_values(task: Task) -> np.ndarray | None:
    """Worker, `--intensity dataset`'s first pass: up to task.sample_size values (k, channels) float32
    of the image's own (unscaled) values at its labelled foreground pixels (class id above 0), drawn
    at random (seeded by the task's index); None for an image that cannot be read, which the
    conversion itself then skips, saying why. Runs without TensorFlow."""
    sample = task.sample
    try:
        values = image_values(sample.image, sample.page, task.channels)
        mask = load_labels(sample.mask, values.shape[:2], task.layout, task.classes, task.num_classes, sample.page,
                           task.ignore_value, task.colors)
    except BadImage:
        return None
    where = np.flatnonzero((mask > 0) & (mask != IGNORE))
    where = np.random.default_rng(task.index).choice(where, min(task.sample_size, where.size), replace=False)
    values = values.reshape(-1, values.shape[2])[where].astype(np.float32)
    return np.repeat(values, task.channels, axis=1) if values.shape[1] != task.channels else values


def object_census(own: np.ndarray, stored: np.ndarray) -> np.ndarray | None:
    """(2, MAX_CLASSES) int64: the objects (8-connected components, `objects.components`) of each
    class id but 0 and IGNORE in a mask at the image's own size (`own`, (H, W) class ids) and as
    stored (`stored`, (h, w): resized by --image-size, or `own` itself), counting only those of at
    least 4 stored pixels (own: 4 / scale^2): the objects that should survive the resize, so that
    fewer stored than own means that resizing merged them (the gaps between touching cells
    closed). None for a mask over 2^26 pixels, whose labels would take 4 bytes a pixel."""
    from unet_dist.objects import components

    if own.size > 2**26:
        return None
    out = np.zeros((2, MAX_CLASSES), np.int64)
    least = 4 * own.size / stored.size  # stored pixels -> own pixels
    for c in np.unique(own):
        if c == 0 or c == IGNORE:
            continue
        for row, (mask, smallest) in enumerate(((own, least), (stored, 4))):
            if row and stored is own:
                out[1, c] = out[0, c]
                continue
            labels, n = components(mask, c)
            out[row, c] = int((np.bincount(labels.ravel(), minlength=n + 1)[1:] >= smallest).sum()) if n else 0
    return out


def census_changes(own: list, stored: list) -> list[tuple[int, str]]:
    """The classes whose objects a resize merged or broke apart: (class id, 'merges' or 'breaks
    apart') for each class id >= 1 whose count `stored` (a list by class id: per image, summed,
    or None) differs from `own` by a tenth of it or more (`object_census`'s two rows)."""
    return [(c, "merges" if stored[c] < own[c] else "breaks apart") for c in range(1, len(own))
            if own[c] and abs(stored[c] - own[c]) >= 0.1 * own[c]]


def process(task: Task) -> tuple[Task, dict | None, str | None]:
    """Worker: (task, record fields, None) or (task, None, reason). Runs without TensorFlow."""
    sample = task.sample
    try:
        image = load_image(sample.image, sample.page, task.channels, task.window)
        raw = _read_mask(sample.mask, sample.page, task.colors, wide=task.classes == "instances",
                         shape=image.shape[:2])
        own = _labels(raw, sample.mask, task.layout, task.classes, task.num_classes, task.ignore_value)
        mask = own if task.size is None else _labels(raw, sample.mask, task.layout, task.classes, task.num_classes,
                                                     task.ignore_value, task.size)
        del raw
    except BadImage as e:
        return task, None, f"page {sample.page}: {e}" if sample.stacked else str(e)
    objects = object_census(own, mask)
    own_size = own.shape
    del own
    if task.size is not None:
        h, w = task.size
        # Pillow resamples (H, W, 3) images whole and other channel counts plane by plane, alike.
        planes = [image] if image.shape[2] == 3 else [image[..., c] for c in range(image.shape[2])]
        planes = [np.asarray(Image.fromarray(p).resize((w, h), Image.BILINEAR)) for p in planes]
        image = planes[0] if image.shape[2] == 3 else np.stack(planes, axis=-1)
    counts = np.bincount(mask.ravel(), minlength=MAX_CLASSES)
    rec = {
        "image": _encode(image, task.image_format),
        "mask": _encode(mask, "png"),
        "height": image.shape[0],
        "width": image.shape[1],
        "stem": task.sample.name,
        "counts": counts,
        "own_size": own_size,
        "objects": objects,
    }
    if task.border_distances and task.split == "train":  # evaluation has no weights
        from unet_dist.data.border import stored_distances

        rec["border"] = _encode(stored_distances(mask), "png")
    return task, rec, None


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: the parent stops the conversion, and the workers
    # finish the image they hold instead of dying mid-write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def in_order(pool: ProcessPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """fn(item) for each item, computed on `pool`, yielded in order, with at most `ahead` submitted
    and not yet taken: the workers run ahead of the consumer by that much, so memory stays bounded
    however slow it is. When the consumer stops (an error, Ctrl-C), what was not started is cancelled
    and the pool's shutdown waits for at most the few images in progress. (multiprocessing.Pool's
    terminate() could hang forever here: a worker killed while writing its result holds the result
    queue's lock, which the pool's own task thread then waits for.)"""
    items = iter(items)
    pending = deque(pool.submit(fn, item) for item in itertools.islice(items, ahead))
    try:
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(fn, item) for item in itertools.islice(items, 1))
            yield result
    finally:
        for future in pending:
            future.cancel()


@contextlib.contextmanager
def on_workers(fn: Callable, items: list, workers: int, label: str, progress: bool) -> Iterator[Iterator]:
    """fn(item) for each item, on `workers` processes (`in_order`), with a progress bar named
    `label`. spawn: never fork a process that has TensorFlow loaded. A worker that dies raises
    BrokenProcessPool, which the caller turns into its own one-line error."""
    from unet_dist.progress import progress as show_progress

    with (ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool,
          contextlib.closing(in_order(pool, fn, items, ahead=4 * workers)) as results):
        # A bar on a terminal, a line a minute in a log file; none where progress is False.
        yield show_progress(results, len(items), label, "img", shown=progress)


def _example(rec: dict) -> bytes:
    import tensorflow as tf  # parent process only: workers stay free of TensorFlow

    def b(v: bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    def i(v: int):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[v]))

    feat = {
        "image": b(rec["image"]),
        "mask": b(rec["mask"]),
        "height": i(rec["height"]),
        "width": i(rec["width"]),
        "stem": b(rec["stem"].encode()),
    }
    if "border" in rec:
        feat["border"] = b(rec["border"])
    return tf.train.Example(features=tf.train.Features(feature=feat)).SerializeToString()


def _intensity_window(intensity: str, window: list[float] | None, channels: int) -> list[list[float]] | None:
    """convert's --intensity and --window checked: [[lo, hi]] * channels for "window", else None."""
    if intensity not in INTENSITY_MODES:
        raise ConvertError(f"--intensity {intensity!r}: allowed {', '.join(INTENSITY_MODES)}")
    if intensity != "window":
        if window is not None:
            raise ConvertError(f"--window is for --intensity window (this is --intensity {intensity})")
        return None
    if not window:
        raise ConvertError("--intensity window needs --window LO HI (one pair for every channel, or one a channel)")
    text = " ".join(f"{v:g}" for v in window)
    if len(window) not in (2, 2 * channels):
        each = "" if channels == 1 else f" for every channel, or {2 * channels} values, LO HI for each of the {channels} channels"
        raise ConvertError(f"--window {text}: {len(window)} values; give LO HI{each}")
    pairs = [[float(window[i]), float(window[i + 1])] for i in range(0, len(window), 2)]
    if not all(np.isfinite(lo) and np.isfinite(hi) and lo < hi for lo, hi in pairs):
        raise ConvertError(f"--window {text}: each LO must be below its HI, both finite numbers")
    return pairs * (channels // len(pairs))


def _dataset_window(tasks: list[Task], workers: int, progress: bool) -> tuple[list[list[float]], int]:
    """--intensity dataset: ([lo, hi] per channel, the count of values they were taken from), the
    INTENSITY_PERCENTILES of the training images' foreground values, per channel, drawn evenly
    from every training image (`foreground_values`; at most INTENSITY_SAMPLE values in all)."""
    train = [t for t in tasks if t.split == "train"]
    channels = train[0].channels
    each = max(1, INTENSITY_SAMPLE // (channels * len(train)))
    parts = []
    try:
        with on_workers(foreground_values, [dataclasses.replace(t, sample_size=each) for t in train], workers,
                        "intensity", progress) as results:
            for values in results:
                if values is not None and len(values):
                    parts.append(values)
    except BrokenProcessPool:
        raise ConvertError(f"a worker process died (out of memory?) reading the {len(train)} training images' "
                           "intensities; try fewer --workers") from None
    if not parts:
        raise ConvertError("--intensity dataset: no training mask has a foreground pixel (a class above 0) to take "
                           "the intensities from; give the window itself, --intensity window --window LO HI")
    values = np.concatenate(parts)
    window = []
    for c in range(channels):
        finite = values[:, c][np.isfinite(values[:, c])]
        lo, hi = np.percentile(finite, INTENSITY_PERCENTILES) if finite.size else (0.0, 0.0)
        if hi <= lo and finite.size:
            lo, hi = finite.min(), finite.max()
        if hi <= lo:
            raise ConvertError(f"--intensity dataset: channel {c} of the training images' foreground has the one "
                               f"value {lo:g}; give the window itself, --intensity window --window LO HI")
        window.append([float(lo), float(hi)])
    return window, len(values)


def _shards_named_in(manifest_path: Path) -> set[str]:
    """The shard file names an existing manifest lists (none if it is missing or unreadable)."""
    try:
        manifest = json.loads(manifest_path.read_text())
        return {Path(n).name for split in ("train", "val") for n in manifest[split]["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def convert(
    src: Path,
    out: Path,
    layout: str = "oxford-pet",
    classes: str = "binary",
    image_size: tuple[int, int] | None = None,
    shards: int = 8,
    val_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    num_classes: int | None = None,
    mask_suffix: str = "",
    fold: tuple[int, int] | None = None,
    split_by: str = "auto",
    group: str | None = None,
    ignore_value: int | None = None,
    image_format: str = "auto",
    colors: Path | None = None,
    val_list: Path | None = None,
    only: Path | None = None,
    border_distances: bool = False,
    channels: int = 3,
    intensity: str = "image",
    window: list[float] | None = None,
) -> dict:
    """Converts SRC to shards in OUT and returns the manifest (also written to OUT/manifest.json).

    fold (i, k): k-fold cross-validation in place of val_fraction. The seeded permutation of the
    images is dealt into k folds and fold i is the val split, so the k conversions of one SRC and
    seed (i = 0..k-1) validate on every image exactly once, as nnU-Net's five folds do.

    split_by: what train and val are split into. "file" keeps the pages of a multi-page TIFF in one
    split: neighbouring slices of an EM or microscopy volume are nearly the same image, so a volume
    with pages on both sides scores val on what training saw (nnU-Net splits by case for this
    reason). "page" splits pages like separate images, for a data set that is one stack (ISBI 2012's
    30 training slices). "auto" is "file" when SRC has two image files or more, else "page". For
    files of one image each, the two are the same split.
    group: a regular expression; files whose stems give the same match (its first group, if it has
    one) stay in one split, such as the slices of one patient, `^(patient[0-9]+)_`.
    ignore_value: the source mask value (0..255) of pixels that are not labelled (the Pet trimaps'
    border, 3; the void 255 of VOC-style masks): the records hold IGNORE there, and no loss or
    metric counts those pixels. The manifest says so ("ignore_value").
    image_format: how records store the images, "png" (lossless), "jpeg" (quality 95) or "auto"
    (jpeg when every source image is a JPEG, else png); the manifest's "image_format" says which.
    colors: a file listing the colours of colour-coded masks, a class a line (`read_colors`): class
    i is the i-th colour, with the file's names. Layout folders; the manifest records "colors".
    val_list: a file naming the val split's images (`read_image_list`), in place of val_fraction: a
    data set's own split (VOC's val.txt, the Pet set's test.txt), so that scores compare with
    published ones. Every other image is training's; a listed stack is val with every page.
    only: a file naming the images to convert (read the same way); SRC's others are passed over, not
    skipped: a data set's trainval list, its test images kept out for `evaluate --images --list`.
    border_distances: training records also store d1 + d2 of each mask (`border.stored_distances`),
    from which the pipeline takes the 2015 U-Net's border weights (train.loss weighted_ce) instead of
    computing them per sample; the manifest's "border_distances" gives their units.
    channels: the images' channels (`imageio.load_image`): 3 reads every image as RGB, 1 as
    grayscale (EM and most microscopy: a third of the first convolution's inputs), 4 RGBA files or
    .npy arrays of 4 channels, and any other number .npy arrays (H, W, C) only. An image of another
    number is skipped, saying so. The manifest records "channels"; training's model takes as many.
    intensity: how images of wider values than 8 bits (16-bit, floats) come to 8 bits
    (`INTENSITY_MODES`): "image" scales each by its own percentiles; "dataset" maps the 0.5th to
    99.5th percentile of the training images' foreground values (a first pass over them, the
    masks' classes above 0) to 0..255 in every image, channel by channel; "window" maps `window`
    [lo, hi] (one pair for every channel, or a pair per channel) so. With either window every
    image's values are mapped, 8-bit ones included. The manifest's "intensity" records the mode
    and window, and prediction maps new images with the same window (the run's data.json).
    """
    import tensorflow as tf

    from unet_dist.data.border import MAX_STEP, STEPS_PER_PX  # it takes IGNORE from here

    src, out = Path(src), Path(out)
    if classes not in CLASS_MODES:
        raise ConvertError(f"--classes {classes!r}: allowed {', '.join(CLASS_MODES)}")
    if classes == "trimap" and layout != "oxford-pet":
        raise ConvertError("--classes trimap needs --layout oxford-pet")
    if classes in ("multiclass", "instances") and layout != "folders":
        raise ConvertError(f"--classes {classes} needs --layout folders")
    if num_classes is not None and classes != "multiclass":
        raise ConvertError(f"--num-classes is for --classes multiclass; {classes} has a fixed number")
    if num_classes is not None and not 2 <= num_classes <= MAX_CLASSES:
        raise ConvertError(f"--num-classes {num_classes}: must be in [2, {MAX_CLASSES}]")
    if ignore_value is not None and not 0 <= ignore_value <= 255:
        raise ConvertError(f"--ignore-value {ignore_value}: a mask value, 0 to 255")
    if ignore_value is not None and classes == "trimap" and ignore_value in TRIMAP_TO_CLASS:
        raise ConvertError(f"--ignore-value {ignore_value} with --classes trimap: that trimap value is one of its "
                           "three classes; --classes binary --ignore-value 3 leaves the border out of pet vs the rest")
    if ignore_value is not None and num_classes is not None and num_classes > IGNORE:
        raise ConvertError(f"--num-classes {num_classes}: with --ignore-value, at most {IGNORE} classes (id {IGNORE} "
                           "marks the pixels left out)")
    if shards < 1:
        raise ConvertError(f"--shards {shards}: must be >= 1")
    if not 1 <= channels <= MAX_CHANNELS:
        raise ConvertError(f"--channels {channels}: must be in [1, {MAX_CHANNELS}]")
    window = _intensity_window(intensity, window, channels)
    if not 0 <= val_fraction < 1:
        raise ConvertError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if fold is not None and not (fold[1] >= 2 and 0 <= fold[0] < fold[1]):
        raise ConvertError(f"--fold {fold[0]}/{fold[1]}: fold I of K needs K >= 2 and 0 <= I < K")
    if val_list is not None and (fold is not None or group is not None or split_by == "page"):
        other = "--fold" if fold is not None else "--group" if group is not None else "--split-by page"
        raise ConvertError(f"--val-list {val_list} names the val images itself; it cannot be used with {other}")
    # Read before any other work: a list that cannot be read stops the conversion at once.
    only_stems = read_image_list(only, "--list") if only is not None else None
    val_stems = read_image_list(val_list, "--val-list") if val_list is not None else None
    color_list, color_names = read_colors(Path(colors)) if colors is not None else (None, None)
    if color_list is not None:
        if layout != "folders" or classes in ("trimap", "instances"):
            raise ConvertError("--colors needs --layout folders and --classes multiclass (or binary, of 2 colours)")
        if classes == "binary" and len(color_list) != 2:
            raise ConvertError(f"--colors {colors}: {len(color_list)} colours with --classes binary, which has 2; "
                               "--classes multiclass")
        if num_classes is not None and num_classes != len(color_list):
            raise ConvertError(f"--num-classes {num_classes}: --colors {colors} lists {len(color_list)} classes")
        # A colour to leave out (VOC's void) is the file's last: its index is no class.
        left_out = ignore_value is not None
        if left_out and ignore_value != len(color_list) - 1:
            raise ConvertError(f"--ignore-value {ignore_value} with --colors: list the colour to leave out last "
                               f"(line {len(color_list)} of the colours) and give --ignore-value {len(color_list) - 1}")
        if classes == "multiclass":
            num_classes = len(color_list) - left_out  # a colour no mask uses is a class all the same
        if color_names and left_out:
            color_names = color_names[:-1]
    if image_format not in IMAGE_FORMATS:
        raise ConvertError(f"--image-format {image_format!r}: allowed {', '.join(IMAGE_FORMATS)}")
    if split_by not in SPLIT_UNITS:
        raise ConvertError(f"--split-by {split_by!r}: allowed {', '.join(SPLIT_UNITS)}")
    if workers < 1:
        raise ConvertError(f"--workers {workers}: must be >= 1")
    if seed < 0:
        raise ConvertError(f"--seed {seed}: must be >= 0")
    if image_size is not None and min(image_size) < 1:
        raise ConvertError(f"--image-size {image_size}: must be positive")
    if not src.is_dir():
        raise ConvertError(f"SRC {src} is not a folder")
    if ("/" in mask_suffix or mask_suffix.startswith(".")
            or Path("x" + mask_suffix).suffix.lower() in IMAGE_SUFFIXES):
        raise ConvertError(f"--mask-suffix {mask_suffix!r}: the end of a file stem, such as _mask (no folder, "
                           "no extension)")
    samples, skipped = find_pairs(src, layout, mask_suffix)
    if not samples:
        raise ConvertError(f"no image with a mask found in {src} (layout {layout}); {len(skipped)} files skipped")
    if only is not None:
        samples, skipped = listed_samples(samples, skipped, only_stems, f"--list {only}")
    image_format, format_why = image_format_of(samples, image_format, channels)
    if val_list is not None:
        split_by, units = "file", [s.image for s in samples]
        where = "SRC" if only is None else f"--list {only}"
        val_units = {s.image for s in listed_samples(samples, skipped, val_stems, f"--val-list {val_list}", where)[0]}
        if len(val_units) == len(set(units)):
            raise ConvertError(f"--val-list {val_list} names every image with a mask in {where}; nothing is left "
                               "to train on")
    else:
        split_by, units, unit_word = split_units(samples, split_by, group, fold is not None or val_fraction > 0)
    n_units = len(set(units))
    if fold is not None and n_units < fold[1]:
        hint = "; --split-by page deals their pages" if unit_word == "files" else ""
        raise ConvertError(f"--fold {fold[0]}/{fold[1]}: {n_units} {unit_word} cannot fill {fold[1]} folds{hint}")
    inside = [d for d in source_folders(src, layout) if d.resolve() == out.resolve()]
    if inside:  # the shards and manifest would be written among the files they are made from
        raise ConvertError(f"OUT {out} is SRC's {inside[0].relative_to(src)} folder; convert into a folder of its own")
    if (out / "manifest.json").exists() and not overwrite:
        raise ConvertError(f"{out} already holds a converted data set (manifest.json); pass --overwrite to replace it")
    try:
        writable_dir(out, "OUT")
    except ConfigError as e:
        raise ConvertError(str(e)) from None

    # Deterministic split: a seeded permutation of the sorted samples; the units (files or samples)
    # are taken in the order their first sample comes in it. With one sample per unit this is the
    # permutation itself, so a data set of single images splits as it did before --split-by.
    n = len(samples)
    order = np.random.default_rng(seed).permutation(n)
    unit_order = list(dict.fromkeys(units[k] for k in order))
    unit_size = Counter(units)
    if fold is not None:
        val_units = {u for j, u in enumerate(unit_order) if j % fold[1] == fold[0]}  # dealt like cards
    elif val_list is None:
        n_val = int(round(n * val_fraction))
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        # Whole units up to n_val samples: a unit that would overshoot is passed over. Where none
        # fits, the smallest unit is val (split_units saw to two units or more, so one is left).
        val_units, taken = set(), 0
        for u in unit_order:
            if taken + unit_size[u] <= n_val:
                val_units.add(u)
                taken += unit_size[u]
        if n_val and not val_units:
            val_units.add(min(unit_order, key=lambda u: unit_size[u]))
    in_val = [units[k] in val_units for k in order]
    n_val = sum(in_val)
    if fold is not None or val_list is not None:
        val_fraction = n_val / n
    tasks = [
        Task(j, "val" if in_val[j] else "train", samples[k], layout, classes, image_size, num_classes, ignore_value,
             image_format, tuple(color_list) if color_list else None, border_distances, channels)
        for j, k in enumerate(order)
    ]
    sampled = None
    if intensity == "dataset":
        window, sampled = _dataset_window(tasks, workers, progress)
    if window is not None:
        tasks = [dataclasses.replace(t, window=tuple(map(tuple, window))) for t in tasks]
    n_shards = {"train": shards, "val": max(1, min(shards, n_val))}
    tmp = {s: [out / f".{shard_name(s, i, n)}.tmp-{os.getpid()}" for i in range(n)] for s, n in n_shards.items()}
    writers = {s: [tf.io.TFRecordWriter(str(p)) for p in paths] for s, paths in tmp.items()}
    written = {"train": 0, "val": 0}
    files_in = {"train": set(), "val": set()}  # the image files with a record in each split
    # The smallest and largest (height, width) of the records: whether the images share one pixel
    # scale (predict --mode auto). Running bounds, so memory does not grow with the data set.
    size_min, size_max = np.full(2, np.iinfo(np.int64).max), np.zeros(2, np.int64)
    # The images' own sizes (before --image-size), and their objects own and stored (`object_census`).
    own_min, own_max, own_sum = np.full(2, np.iinfo(np.int64).max), np.zeros(2, np.int64), np.zeros(2, np.int64)
    objects, objects_images = np.zeros((2, MAX_CLASSES), np.int64), 0
    per_shard = {s: [0] * n for s, n in n_shards.items()}
    counts = {"train": np.zeros(MAX_CLASSES, np.int64), "val": np.zeros(MAX_CLASSES, np.int64)}
    try:
        with on_workers(process, tasks, workers, "convert", progress) as results:
            for task, rec, reason in results:
                if rec is None:
                    skipped.append({"file": str(task.sample.image), "reason": reason})
                    continue
                s = task.split
                writers[s][written[s] % n_shards[s]].write(_example(rec))
                per_shard[s][written[s] % n_shards[s]] += 1
                written[s] += 1
                files_in[s].add(task.sample.image)
                counts[s] += rec["counts"]
                size_min = np.minimum(size_min, (rec["height"], rec["width"]))
                size_max = np.maximum(size_max, (rec["height"], rec["width"]))
                own_min, own_max = np.minimum(own_min, rec["own_size"]), np.maximum(own_max, rec["own_size"])
                own_sum += rec["own_size"]
                if rec["objects"] is not None:
                    objects += rec["objects"]
                    objects_images += 1
        for ws in writers.values():
            for w in ws:
                w.close()
        if written["train"] + written["val"] == 0:
            raise ConvertError(f"no sample in {src} could be converted; {len(skipped)} skipped, first: "
                               f"{skipped[0]['file']}: {skipped[0]['reason']}")
        if written["train"] == 0:
            hint = "fix the files" if val_list is not None else "lower --val-fraction or fix the files"
            raise ConvertError(f"every training sample in {src} was skipped; {hint}")
        if ignore_value is not None:  # left-out pixels are no class: kept apart from the class counts
            ignored = {s: int(c[IGNORE]) for s, c in counts.items()}
            for c in counts.values():
                c[IGNORE] = 0
            # A split with no labelled pixel trains on nothing, or scores NaN at every evaluation.
            for s in ("train", "val"):
                if written[s] and not counts[s].any():
                    raise ConvertError(f"--ignore-value {ignore_value}: every mask pixel of the {written[s]} {s} "
                                       f"images in {src} has that value; nothing is labelled")
        total = counts["train"] + counts["val"]
        fixed = {"binary": 2, "trimap": 3, "instances": 2}.get(classes)
        num_classes = fixed or _check_class_ids(np.nonzero(total)[0].tolist(), num_classes)
        # Round robin fills the shards in order, so with fewer records than shards (small sets, files
        # skipped) the empty ones are the last: they are dropped, and every shard holds records.
        kept = {s: min(n, written[s]) for s, n in n_shards.items()}
        names = {s: [shard_name(s, i, n) for i in range(n)] for s, n in kept.items()}
        manifest = {
            "format": 1,
            "source": str(src.resolve()),
            "layout": layout,
            "classes": classes,
            "num_classes": num_classes,
            "class_names": color_names or {
                "binary": ["rest", "pet"] if layout == "oxford-pet" else ["background", "foreground"],
                "trimap": ["background", "pet", "border"], "instances": ["background", "object"]}.get(classes, [str(c) for c in range(num_classes)]),
            "colors": [list(c) for c in color_list] if color_list else None,
            "image_size": list(image_size) if image_size else None,
            "image_format": image_format,
            "image_format_why": format_why,
            "channels": channels,
            "intensity": {"mode": intensity, "window": window, **({"percentiles": list(INTENSITY_PERCENTILES),
                                                                   "sampled_values": sampled} if sampled else {})},
            "seed": seed,
            "val_fraction": val_fraction,
            "fold": list(fold) if fold else None,
            "val_list": str(Path(val_list).resolve()) if val_list is not None else None,
            "list": str(Path(only).resolve()) if only is not None else None,
            "split_by": split_by,
            "group": group,
            "groups": {"train": n_units - len(val_units), "val": len(val_units)} if group is not None else None,
            "files": {s: len(f) for s, f in files_in.items()},
            "train": {"records": written["train"], "shards": names["train"]},
            "val": {"records": written["val"], "shards": names["val"]},
            "skipped": skipped,
            "record_size": {"min": size_min.tolist(), "max": size_max.tolist()},
            "own_size": {"min": own_min.tolist(), "max": own_max.tolist(),
                         "mean": (own_sum / max(1, written["train"] + written["val"])).round(1).tolist()},
            # Per image (of those under 2^26 pixels), each class's objects of 4 stored pixels or more
            # at the images' own size and as stored: fewer stored means --image-size merged them.
            "objects": {"images": objects_images, **{
                key: [None, *(objects[row, 1:num_classes] / max(1, objects_images)).round(2).tolist()]
                for row, key in enumerate(("per_image_own", "per_image_stored"))}},
            # Of the labelled pixels: the pipeline's class-balancing weights (weighted_ce) need them to sum to 1.
            "class_pixel_fraction": (counts["train"][:num_classes] / max(1, counts["train"].sum())).round(6).tolist(),
            "ignore_value": ignore_value,
            "border_distances": {"steps_per_px": STEPS_PER_PX, "max_step": MAX_STEP} if border_distances else None,
            "ignored_pixel_fraction": None if ignore_value is None else round(
                (ignored["train"] + ignored["val"]) / max(1, total.sum() + ignored["train"] + ignored["val"]), 6),
        }
        for s, paths in tmp.items():
            # Byte sizes let the pipeline tell a truncated or replaced shard before training.
            manifest[s]["bytes"] = [p.stat().st_size for p in paths[: kept[s]]]
            manifest[s]["records_per_shard"] = per_shard[s][: kept[s]]
            for p, name in zip(paths[: kept[s]], names[s], strict=True):  # the empty ones: unlinked below
                os.replace(p, out / name)
        old_shards = _shards_named_in(out / "manifest.json")
        atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
        # --overwrite: the earlier set's shards that the new one did not replace go, now that the
        # new set is complete (until here the earlier set was still whole).
        for name in old_shards - set(names["train"]) - set(names["val"]):
            (out / name).unlink(missing_ok=True)
        return manifest
    except BrokenProcessPool:
        # The kernel's OOM killer, most often: one image too large for --workers copies at once.
        done = len(skipped) + sum(written.values())
        raise ConvertError(f"a conversion worker process died (out of memory?) after {done} of {len(tasks)} "
                           "images; try fewer --workers") from None
    finally:
        for paths in tmp.values():
            for p in paths:
                p.unlink(missing_ok=True)
