"""Reading user images and masks with Pillow into normalised numpy arrays.

Shared by conversion and prediction so both see an image the same way: EXIF orientation applied,
every mode (grayscale, palette, RGBA, CMYK, 16-bit, float) turned into 8-bit RGB. A multi-page TIFF
(an electron-microscopy or microscopy stack) is read page by page: each page is an image.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")  # GIF: e.g. Carvana's masks
# The most pixels an image may have (32768 x 32768: 3 GiB as 8-bit RGB). Pillow's own check against
# decompression bombs refuses 179 M pixels (about 13400 x 13400) with an error that is not an
# OSError, and warns above half that; the slides and aerial images overlap-tile prediction is for
# can be larger. This reader reads the user's own files and applies this limit instead, from the
# header, before decoding.
MAX_PIXELS = 2**30
Image.MAX_IMAGE_PIXELS = None

# Files whose pages are separate images. The ISBI 2012 EM data the 2015 U-Net was trained on ships as
# one 30-page TIFF of images and one of labels. (An animated GIF or WebP is not a stack of samples.)
STACK_SUFFIXES = (".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """The files directly in `folder` with an image suffix, sorted by name. Hidden files are left
    out: the real Pet set ships macOS "._*" resource forks beside its trimaps, never images."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


class BadImage(ValueError):
    """A file that cannot be used; the message is the reason, shown with the file name."""


def page_count(path: str | Path) -> int:
    """The number of images `path` holds: the pages of a multi-page TIFF, else 1. Reads the header
    only. A file that cannot be opened counts 1, so that reading it says why."""
    if Path(path).suffix.lower() not in STACK_SUFFIXES:
        return 1
    try:
        with Image.open(path) as img:
            return max(1, int(getattr(img, "n_frames", 1)))
    except Exception:  # noqa: BLE001 - any failure is reported by load_rgb/load_mask with its reason
        return 1


def page_sizes(path: str | Path) -> list[tuple[int, int]]:
    """(height, width) of each image in `path` (each page of a multi-page TIFF), from the headers,
    before EXIF orientation; [] for a file that cannot be opened, whose reading then says why.
    One pass over the pages: seeking page k from the start walks k headers."""
    try:
        with Image.open(path) as img:
            pages = range(page_count(path)) if Path(path).suffix.lower() in STACK_SUFFIXES else range(1)
            sizes = []
            for k in pages:
                img.seek(k)
                sizes.append((img.size[1], img.size[0]))
            return sizes
    except Exception:  # noqa: BLE001 - as page_count: load_rgb reports the reason
        return []


class Sample(NamedTuple):
    """One image to read: a file, or page `page` of a multi-page TIFF; with its mask when labelled."""
    name: str  # what its outputs and records are named by: the file's stem, or STEM_p007 in a stack
    image: Path
    page: int = 0
    mask: Path | None = None  # the same page of it

    @property
    def stacked(self) -> bool:
        """Whether this is a page of a multi-page TIFF."""
        return self.name != self.image.stem

    @property
    def where(self) -> str:
        """The image file, and the page of a stack: for messages."""
        return f"{self.image} (page {self.page})" if self.stacked else str(self.image)


def samples_of(image: Path, mask: Path | None = None) -> list[Sample]:
    """The images in the file `image` (with `mask`, which must have as many pages): the file itself,
    or one sample per page of a multi-page TIFF. Raises BadImage when the page counts differ."""
    pages = page_count(image)
    mask_pages = pages if mask is None else page_count(mask)
    if mask_pages != pages:
        raise BadImage(f"{pages} page(s), but its mask {mask} has {mask_pages}")
    if pages == 1:
        return [Sample(image.stem, image, 0, mask)]
    return [Sample(f"{image.stem}_p{i:03d}", image, i, mask) for i in range(pages)]


def stacks_of(samples: list[Sample]) -> dict[Path, list[int]]:
    """{multi-page TIFF: the indices in `samples` of its pages, in page order}, in the order the files came."""
    stacks: dict[Path, list[int]] = {}
    for i, s in enumerate(samples):
        if s.stacked:
            stacks.setdefault(s.image, []).append(i)
    return stacks


def _open(path: Path, page: int = 0) -> Image.Image:
    try:
        size = path.stat().st_size
    except OSError as e:  # missing, or no permission: not a corrupt image
        raise BadImage(f"cannot read ({e.strerror})") from None
    if path.is_dir():
        raise BadImage("a folder, not an image")
    if size == 0:
        raise BadImage("empty file")
    img = None
    try:
        img = Image.open(path)
        if page:
            img.seek(page)
        if img.size[0] * img.size[1] > MAX_PIXELS:
            raise BadImage(f"{img.size[0]}x{img.size[1]} pixels, more than this reader's limit of {MAX_PIXELS} "
                           "(32768x32768): cut it into smaller images")
        img.load()  # decode now, so truncated data fails here rather than later
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except EOFError:
        raise BadImage(f"no page {page} (the file has {page_count(path)})") from None
    except MemoryError:
        raise BadImage("not enough memory to decode it" + (f" ({img.size[0]}x{img.size[1]} pixels)" if img else "")) \
            from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated image ({e})") from None
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not lose the image
        return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scales one single-channel image of 16-bit, 32-bit or float values to 0..255: its 1st percentile
    to 0 and its 99.8th to 255 (StarDist's and CSBDeep's default normalisation of microscopy images),
    or its minimum and maximum where those percentiles meet (a few bright spots on black).

    Per image and from the image alone, so conversion and prediction scale an image alike. A fixed
    divisor cannot serve these files: a 12-bit camera image in a 16-bit file would use 16 of the 256
    levels, a float image in [0, 1] would be black. Values outside the range are clipped; NaN is 0.
    The percentiles of an image of more than 4 M pixels come from every k-th pixel (4 M of them)."""
    arr = arr.astype(np.float32)  # exact for 16-bit values; float64 would double a large image's memory
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return np.zeros(arr.shape, np.uint8)
    lo, hi = np.percentile(finite[:: max(1, finite.size // 2**22)], (1.0, 99.8))
    if hi <= lo:
        lo, hi = finite.min(), finite.max()
    if hi <= lo:  # one value everywhere: nothing to show
        return np.zeros(arr.shape, np.uint8)
    scaled = np.nan_to_num((arr - lo) * np.float32(255.0 / (hi - lo)) + 0.5, nan=0.0)
    return np.clip(scaled, 0, 255).astype(np.uint8)


def load_rgb(path: str | Path, page: int = 0) -> np.ndarray:
    """Reads an image (page `page` of a multi-page TIFF) as uint8 (H, W, 3), EXIF orientation applied.
    Raises BadImage."""
    img = _open(Path(path), page)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img)), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black so transparent pixels do not carry hidden colour into the input.
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # convert() would copy an RGB image
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise BadImage(f"unexpected image shape {rgb.shape}")
    return rgb


def load_mask(path: str | Path, page: int = 0, colors: list[tuple[int, int, int]] | None = None) -> np.ndarray:
    """Reads a mask of class ids (page `page` of a multi-page TIFF) as uint8 (H, W), EXIF orientation
    applied. Raises BadImage.

    Palette images keep their indices (not their colours); an RGB mask must be gray (R == G == B).
    colors: a colour-coded mask instead (labelling tools, CamVid): each pixel's id is the index of
    its colour in this list, whatever the image's mode.
    """
    img = _open(Path(path), page)
    if colors is not None:
        return _ids_of_colours(np.asarray(img.convert("RGB")), colors)
    if img.mode in ("P", "L", "1"):
        arr = np.asarray(img if img.mode != "1" else img.convert("L"))
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        if arr.max(initial=0) > 255:
            raise BadImage(f"mask value {int(arr.max())} > 255")
        arr = arr.astype(np.uint8)
    elif img.mode in ("RGB", "RGBA", "LA"):
        arr = np.asarray(img.convert("RGB"))
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise BadImage("colour mask: masks must hold class ids (one channel, or R == G == B), or give the "
                           "classes' colours (convert --colors)")
        arr = arr[..., 0]
    else:
        raise BadImage(f"mask mode {img.mode} is not supported")
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _ids_of_colours(rgb: np.ndarray, colors: list[tuple[int, int, int]]) -> np.ndarray:
    """(H, W, 3) uint8 colour mask -> (H, W) uint8, each pixel's index in `colors` (distinct colours).
    Raises BadImage naming the first colour that is not there and how many pixels have it."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in colors], np.int32)
    order = np.argsort(keys)
    ranked = keys[order]
    pos = np.minimum(np.searchsorted(ranked, code), len(keys) - 1)
    known = ranked[pos] == code
    if not known.all():
        v = int(code[~known][0])
        raise BadImage(f"colour ({v >> 16}, {(v >> 8) & 255}, {v & 255}) at {int((code == v).sum())} pixels is "
                       f"none of the {len(colors)} --colors")
    return order[pos].astype(np.uint8)
