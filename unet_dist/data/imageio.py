"""Reading user images and masks with Pillow into normalised numpy arrays.

Shared by conversion and prediction so both see an image the same way: EXIF orientation applied,
every mode (grayscale, palette, RGBA, CMYK, 16-bit) turned into 8-bit RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")  # GIF: e.g. Carvana's masks


def image_files(folder: Path) -> list[Path]:
    """The files directly in `folder` with an image suffix, sorted by name. Hidden files are left
    out: the real Pet set ships macOS "._*" resource forks beside its trimaps, never images."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


class BadImage(ValueError):
    """A file that cannot be used; the message is the reason, shown with the file name."""


def _open(path: Path) -> Image.Image:
    try:
        size = path.stat().st_size
    except OSError as e:  # missing, or no permission: not a corrupt image
        raise BadImage(f"cannot read ({e.strerror})") from None
    if path.is_dir():
        raise BadImage("a folder, not an image")
    if size == 0:
        raise BadImage("empty file")
    try:
        img = Image.open(path)
        img.load()  # decode now, so truncated data fails here rather than later
    except UnidentifiedImageError:
        raise BadImage("not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"corrupt or truncated image ({e})") from None
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not lose the image
        return img


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scales 16-bit or float single-channel data to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float64)
    hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
    return np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)


def load_rgb(path: str | Path) -> np.ndarray:
    """Reads an image as uint8 (H, W, 3), EXIF orientation applied. Raises BadImage."""
    img = _open(Path(path))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img)), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on black so transparent pixels do not carry hidden colour into the input.
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    rgb = np.asarray(img.convert("RGB"))
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise BadImage(f"unexpected image shape {rgb.shape}")
    return rgb


def load_mask(path: str | Path) -> np.ndarray:
    """Reads a mask of class ids as uint8 (H, W), EXIF orientation applied. Raises BadImage.

    Palette images keep their indices (not their colours); an RGB mask must be gray (R == G == B).
    """
    img = _open(Path(path))
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
            raise BadImage("colour mask: masks must hold class ids (one channel, or R == G == B)")
        arr = arr[..., 0]
    else:
        raise BadImage(f"mask mode {img.mode} is not supported")
    return np.ascontiguousarray(arr, dtype=np.uint8)
