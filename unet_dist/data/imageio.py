"""Reading user images and masks with Pillow into normalised numpy arrays.

Shared by conversion and prediction so both see an image the same way: EXIF orientation applied,
every mode (grayscale, palette, RGBA, CMYK, 16-bit, float) turned into 8-bit RGB, or into 8-bit
grayscale for a data set of one channel. A multi-page TIFF (an electron-microscopy or microscopy
stack) is read page by page: each page is an image. Images of other numbers of channels (a
fluorescence image's stains, a satellite image's bands) come as numpy arrays, .npy files of shape
(H, W, C), which no image format Pillow reads can hold; masks may be .npy arrays (H, W) as well.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ARRAY_SUFFIX = ".npy"  # an image or mask as a numpy array, read by numpy rather than Pillow
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp",  # GIF: e.g. Carvana's masks
                  ARRAY_SUFFIX)
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
# Pillow's modes of one channel wider than 8 bits (16-bit and 32-bit integers, 32-bit floats).
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


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
    if Path(path).suffix.lower() == ARRAY_SUFFIX:
        try:
            return [tuple(_array(Path(path)).shape[:2])]
        except BadImage:
            return []
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


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except OSError as e:  # missing, or no permission: not a corrupt image
        raise BadImage(f"cannot read ({e.strerror})") from None
    if path.is_dir():
        raise BadImage("a folder, not an image")
    if size == 0:
        raise BadImage("empty file")


def _array(path: Path) -> np.ndarray:
    """A .npy file, memory-mapped (its header read, its values not yet): numbers of shape (H, W) or
    (H, W, C). Raises BadImage."""
    _check_file(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise BadImage(f"cannot read ({e.strerror})") from None
    if magic != b"\x93NUMPY":  # numpy itself would call any other file pickled data
        raise BadImage("not a numpy .npy file (no .npy header)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # pickled objects, a bad header, cut short
        raise BadImage(f"not a numpy array file numpy can read ({e})") from None
    if arr.ndim not in (2, 3) or 0 in arr.shape:
        raise BadImage(f"an array of shape {arr.shape}; an image is (H, W) or (H, W, channels)")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.issubdtype(arr.dtype, np.complexfloating):
        raise BadImage(f"an array of {arr.dtype}; images and masks hold real numbers")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise BadImage(f"{arr.shape[1]}x{arr.shape[0]} pixels, more than this reader's limit of {MAX_PIXELS} "
                       "(32768x32768): cut it into smaller images")
    return arr


def _open(path: Path, page: int = 0) -> Image.Image:
    _check_file(path)
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


def windowed(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values (any shape, any real dtype) -> uint8: `lo` to 0 and `hi` to 255 (hi > lo), linearly,
    rounded; values outside clipped, NaN 0. The one mapping of wider values to 8 bits, whether the
    window is the image's own (`_to_uint8`) or the data set's (`load_image`'s `window`)."""
    scaled = np.nan_to_num((arr.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo)) + 0.5, nan=0.0)
    return np.clip(scaled, 0, 255).astype(np.uint8)


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
    return windowed(arr, lo, hi)


def load_image(path: str | Path, page: int = 0, channels: int = 3, window: list | None = None) -> np.ndarray:
    """Reads an image (page `page` of a multi-page TIFF) as uint8 (H, W, channels). Raises BadImage.

    channels 3: any image file, as RGB (`load_rgb`); 1: any image file, as grayscale (a colour one by
    its luma); 4: an RGBA file, its alpha as the fourth channel (a near-infrared band stored there).
    A .npy array (H, W) or (H, W, C) must have C == channels (H, W: one, or three equal ones); an
    array of 16-bit, 32-bit or float values is scaled to 8 bits channel by channel as `_to_uint8`
    says (each stain or band has its own range), the same in conversion and prediction.

    window: [[lo, hi]] * channels, the data set's intensity window (`convert --intensity`): every
    image's values, 8-bit ones included, map from [lo, hi] to [0, 255] channel by channel
    (`windowed`) instead of by the image's own percentiles, so that a value means the same in every
    image (CT's Hounsfield units).
    """
    values = image_values(path, page, channels)
    if window is not None:
        if values.shape[2] != channels:  # a gray file or (H, W) array read as RGB: each channel its window
            values = np.repeat(values, channels, axis=-1)
        return np.stack([windowed(values[..., c], lo, hi) for c, (lo, hi) in enumerate(window)], axis=-1)
    if values.dtype != np.uint8:
        values = np.stack([_to_uint8(values[..., c]) for c in range(values.shape[2])], axis=-1)
    return np.repeat(values, channels, axis=-1) if values.shape[2] != channels else values


def image_values(path: str | Path, page: int = 0, channels: int = 3) -> np.ndarray:
    """An image's own values, unscaled: (H, W, channels), or (H, W, 1) where a gray file or an (H, W)
    array is read for channels 3 (its one channel, to be repeated). 16-bit, 32-bit and float
    pages and arrays keep their dtype; other image files are uint8 as `load_image` reads them
    (RGB, luma, RGBA). Bool arrays read as 0 and 255. Raises BadImage."""
    path = Path(path)
    if path.suffix.lower() == ARRAY_SUFFIX:
        arr = np.array(_array_channels(path, channels))  # out of the memory map
        return arr.astype(np.uint8) * 255 if arr.dtype == np.bool_ else arr
    if channels not in (1, 3, 4):
        raise BadImage(f"an image file gives 1, 3 or 4 (RGBA) channels; store {channels}-channel images as .npy "
                       f"arrays (H, W, {channels})")
    img = _open(path, page)
    if channels == 4:
        return _rgba(img)
    if img.mode in _WIDE_MODES:  # one channel: gray
        return np.asarray(img)[..., None]
    img = _on_black(img)
    if channels == 1:
        return np.asarray(img.convert("L"))[..., None]
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # convert() would copy an RGB image


def _array_channels(path: Path, channels: int) -> np.ndarray:
    """A .npy image as (H, W, C), memory-mapped, C == channels (or 1 for channels 3: gray)."""
    arr = _array(path)
    have = arr.shape[2] if arr.ndim == 3 else 1
    if have != channels and not (have == 1 and channels == 3):  # (H, W) reads as gray RGB, as a gray file does
        raise BadImage(f"{have} channel(s) (an array of shape {arr.shape}), not {channels} (convert --channels, "
                       "a run's model.in_channels)")
    return arr.reshape(*arr.shape[:2], have)


def _rgba(img: Image.Image) -> np.ndarray:
    if img.mode != "RGBA":
        raise BadImage(f"mode {img.mode}: an image file gives 4 channels as RGBA; store others as .npy arrays "
                       "(H, W, 4)")
    return np.asarray(img)


def _on_black(img: Image.Image) -> Image.Image:
    """Transparency composited on black: an image whose mode converts to RGB or L as it looks."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black so transparent pixels do not carry hidden colour into the input.
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    return img


def load_rgb(path: str | Path, page: int = 0) -> np.ndarray:
    """Reads an image file (page `page` of a multi-page TIFF) as uint8 (H, W, 3), EXIF orientation
    applied. Raises BadImage."""
    return load_image(path, page, 3)


def rgb_view(image: np.ndarray) -> np.ndarray:
    """(..., C) -> (..., 3) to look at (overlays, TensorBoard): RGB as it is, the first three channels
    of more (RGBA's colour), the first channel as gray of fewer."""
    c = image.shape[-1]
    if c == 3:
        return image
    return image[..., :3] if c > 3 else np.repeat(image[..., :1], 3, axis=-1)


def load_mask(path: str | Path, page: int = 0, colors: list[tuple[int, int, int]] | None = None,
              wide: bool = False) -> np.ndarray:
    """Reads a mask of class ids (page `page` of a multi-page TIFF) as uint8 (H, W), EXIF orientation
    applied. Raises BadImage.

    Palette images keep their indices (not their colours); an RGB mask must be gray (R == G == B).
    colors: a colour-coded mask instead (labelling tools, CamVid): each pixel's id is the index of
    its colour in this list, whatever the image's mode.
    wide: an instance label image (convert --classes instances) instead: int64 (H, W) ids of any
    size from 16- and 32-bit images and .npy arrays (negative ones refused), and from an RGB image
    each colour's (R << 16 | G << 8 | B: black the background, any other colour one object), as
    instance masks drawn for viewing come.
    """
    if Path(path).suffix.lower() == ARRAY_SUFFIX:
        return _array_mask(Path(path), colors, wide)
    img = _open(Path(path), page)
    if colors is not None:
        return _ids_of_colours(np.asarray(img.convert("RGB")), colors)
    if img.mode in ("P", "L", "1"):
        arr = np.asarray(img if img.mode != "1" else img.convert("L"))
    elif img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img)
        if wide:
            return _ids(arr)
        if arr.max(initial=0) > 255:
            raise BadImage(f"mask value {int(arr.max())} > 255")
        arr = arr.astype(np.uint8)
    elif img.mode in ("RGB", "RGBA", "LA"):
        arr = np.asarray(img.convert("RGB"))
        if wide:
            return (arr[..., 0].astype(np.int64) << 16) | (arr[..., 1].astype(np.int64) << 8) | arr[..., 2]
        if not (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
            raise BadImage("colour mask: masks must hold class ids (one channel, or R == G == B), or give the "
                           "classes' colours (convert --colors)")
        arr = arr[..., 0]
    else:
        raise BadImage(f"mask mode {img.mode} is not supported")
    return _ids(arr) if wide else np.ascontiguousarray(arr, dtype=np.uint8)


def _ids(arr: np.ndarray) -> np.ndarray:
    """An instance label image's ids as int64 (H, W); BadImage for a negative one."""
    if arr.size and arr.min() < 0:
        raise BadImage(f"instance id {int(arr.min())}: ids are 0 (background) or positive")
    return arr.astype(np.int64)


def _array_mask(path: Path, colors: list[tuple[int, int, int]] | None, wide: bool = False) -> np.ndarray:
    """A .npy mask: integer class ids (H, W) (or (H, W, 1)), or with `colors` (H, W, 3) colours."""
    arr = _array(path)
    if colors is not None:
        if arr.ndim != 3 or arr.shape[2] != 3 or not (arr.dtype == np.uint8):
            raise BadImage(f"an array of {arr.dtype} {arr.shape}; a colour mask array is uint8 (H, W, 3)")
        return _ids_of_colours(np.asarray(arr), colors)
    if arr.ndim == 3 and arr.shape[2] != 1:
        raise BadImage(f"an array of shape {arr.shape}; a mask array is (H, W) class ids")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise BadImage(f"an array of {arr.dtype}; a mask array holds integer class ids")
    arr = np.asarray(arr).reshape(arr.shape[:2])
    if wide:
        return _ids(arr)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise BadImage(f"mask value {int(arr.min() if arr.min() < 0 else arr.max())} outside 0..255")
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
