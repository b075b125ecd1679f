"""Prediction on images of any size: restore a trained model, overlap-tile or resize, export.

Two ways to cover an image:
- tile (Ronneberger et al. 2015, Fig. 2): the image is mirror-padded and cut into overlapping
  tiles of the training size; each output pixel comes from the centre of a tile, where the network
  saw enough context, so the result is seamless. With valid padding the overlap is the network's
  own context ((input - output) / 2 per side); with same padding it is `overlap` pixels per side.
- resize: the whole image is resized to the training size and the prediction resized back, which
  is how a model trained on resized data (the paper's Pet model) sees its inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from unet_dist.checkpoint import restore_trained
from unet_dist.config import Config, ConfigError
from unet_dist.shapes import output_size


def load_trained(workdir: str | Path, which: str = "best") -> tuple[keras.Model, Config, str]:
    """(fully convolutional model with restored weights, its config, checkpoint path).

    which: 'best' (by val IoU; falls back to the latest) or 'latest'.
    """
    keras.mixed_precision.set_global_policy("float32")  # inference in float32 whatever training used
    return restore_trained(workdir, which)


def auto_mode(workdir: Path, cfg: Config) -> tuple[str, str]:
    """predict --mode auto: ('resize' or 'tile', why), from WORKDIR/data.json (the manifest's sizes).

    Training sees every image resized to data.image_size (patches are windows at that scale), so
    prediction must see that scale too: resize, unless every training image already was
    data.image_size, in which case the model learnt the images' own pixel scale and overlap-tile
    prediction keeps it for images of any size (the 2015 U-Net's setting).
    """
    meta = Path(workdir) / "data.json"
    if not meta.exists():
        return "tile", f"{meta} not found"
    try:
        info = json.loads(meta.read_text())
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{meta}: unreadable ({e}); pass --mode tile or resize") from None
    size = list(cfg.data.image_size)
    if info.get("image_size") is not None:
        return "resize", f"the training data was resized to {info['image_size']} at conversion"
    sizes = info.get("record_size")
    if not isinstance(sizes, dict):  # converted before the manifest recorded sizes
        return "tile", "the training data was not resized at conversion"
    if sizes.get("min") == sizes.get("max") == size:
        return "tile", f"every training image was {size}, the model's input size: tiles keep their pixel scale"
    return "resize", (f"the training images ({sizes.get('min')} to {sizes.get('max')}) were resized to {size} "
                      "in training")


def tiling(cfg: Config, tile: tuple[int, int] | None = None, overlap: int | None = None) -> tuple[tuple, tuple, tuple]:
    """(tile input size, model output size for it, kept output size per tile) for overlap-tile prediction.

    tile defaults to the training size, overlap (same padding; context pixels per tile side) to
    tile / 8, rounded up to the pooling grid. Raises ValueError naming --tile or --overlap when the
    network cannot take the tile or the overlap leaves nothing of it.
    """
    t = tuple(tile or cfg.data.image_size)
    if min(t) < 1:
        raise ValueError(f"--tile {t[0]}: must be > 0")
    try:
        out = output_size(t, cfg.model.depth, cfg.model.padding)
    except ValueError as e:
        raise ValueError(f"--tile {t[0]}: {e}") from None
    if cfg.model.padding == "valid":  # the network's own context: no overlap to choose
        return t, out, out
    overlap = t[0] // 8 if overlap is None else overlap
    if overlap < 0:
        raise ValueError(f"--overlap {overlap}: must be >= 0")
    # Keep tile origins on the pooling grid, so tiles pool the same pixels together as the whole image.
    step = 2**cfg.model.depth
    grid = -(-overlap // step) * step
    keep = (t[0] - 2 * grid, t[1] - 2 * grid)
    if min(keep) < 1:
        raise ValueError(f"--overlap {overlap} ({grid} on the {step} px pooling grid) leaves nothing of a "
                         f"{t[0]}x{t[1]} tile")
    return t, out, keep


def predict_tiled(model, image: np.ndarray, cfg: Config, tile: tuple[int, int] | None = None,
                  overlap: int | None = None, batch: int | None = None) -> np.ndarray:
    """Overlap-tile prediction. image (H, W, 3) float32 in [0, 1] -> probabilities (H, W, U).

    model: the Keras model, or `traced(model)` when predicting many images (an eager call of the
    model costs tens of milliseconds over its compute on a CPU, for every batch of tiles).
    batch: tiles per call; default about 2^20 input pixels (16 tiles of 256x256, 3 of 572x572), which
    bounds the activations held at once for wide models.
    """
    (th, tw), (oh, ow), (kh, kw) = tiling(cfg, tile, overlap)
    batch = batch or max(1, 2**20 // (th * tw))
    H, W = image.shape[:2]
    ny, nx = -(-H // kh), -(-W // kw)
    # Context around the kept region of each tile, per side.
    top, left = (th - kh) // 2, (tw - kw) // 2
    padded = np.pad(image, ((top, ny * kh - H + (th - kh - top)), (left, nx * kw - W + (tw - kw - left)), (0, 0)),
                    mode="reflect")  # mirror padding: the network sees plausible context at borders
    crop_y, crop_x = (oh - kh) // 2, (ow - kw) // 2
    origins = [(i * kh, j * kw) for i in range(ny) for j in range(nx)]
    canvas = None
    for b in range(0, len(origins), batch):
        chunk = origins[b : b + batch]
        tiles = np.stack([padded[y : y + th, x : x + tw] for y, x in chunk])
        probs = np.asarray(model(tiles, training=False))  # (n, oh, ow, U)
        if canvas is None:
            canvas = np.zeros((ny * kh, nx * kw, probs.shape[-1]), np.float32)
        for (y, x), p in zip(chunk, probs, strict=True):
            canvas[y : y + kh, x : x + kw] = p[crop_y : crop_y + kh, crop_x : crop_x + kw]
    return canvas[:H, :W]


def traced(fn):
    """`fn` (the model, or `resize_predict_fn`'s function) as one traced function, for any batch and
    image size: after the first sizes it traces once with unknown dimensions, not once per size."""
    return tf.function(fn, reduce_retracing=True)


def _reflect_indices(n: int, before: int, after: int) -> np.ndarray:
    """Indices into a length-n axis that mirror-pad it by `before` and `after` (numpy's "reflect").

    tf.pad's REFLECT needs each pad smaller than the axis, but a valid-padding model's context can
    be wider than its output (a 252 px tile of a depth-4 net: 68 px out, 92 px of context per side).
    """
    i = np.arange(-before, n + after)
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.abs(i) % period
    return np.where(i >= n, period - i, i)


def resize_predict_fn(model: keras.Model, cfg: Config):
    """A TF function: uint8 images (B, H, W, 3) -> probabilities (B, H, W, U) via the training size.

    The image is resized so that the model's *output* covers it (valid padding: mirror-padded by
    the network's context), and the output is resized back to (H, W).
    """
    th, tw = cfg.data.image_size
    oh, ow = output_size((th, tw), cfg.model.depth, cfg.model.padding)
    ph, pw = (th - oh) // 2, (tw - ow) // 2

    def fn(images):
        size = tf.shape(images)[1:3]
        x = tf.image.resize(tf.image.convert_image_dtype(images, tf.float32), (oh, ow))
        if ph or pw:
            x = tf.gather(x, _reflect_indices(oh, ph, th - oh - ph), axis=1)
            x = tf.gather(x, _reflect_indices(ow, pw, tw - ow - pw), axis=2)
        probs = model(x, training=False)
        return tf.image.resize(probs, size, method="bilinear")

    return fn


def classes_from_probs(probs):
    """(..., U) probabilities -> (...) uint8 class ids (works on numpy and tensors)."""
    if probs.shape[-1] == 1:
        return tf.cast(probs[..., 0] >= 0.5, tf.uint8)
    return tf.cast(tf.argmax(probs, axis=-1), tf.uint8)


def export_saved_model(model: keras.Model, cfg: Config, out: str | Path) -> None:
    """SavedModel with a `serve` signature: uint8 images (B, H, W, 3) of any size -> uint8 masks (B, H, W)."""
    fn = resize_predict_fn(model, cfg)
    archive = keras.export.ExportArchive()
    archive.track(model)

    def serve(images):
        probs = fn(images)
        return {"mask": classes_from_probs(probs), "probabilities": probs}

    archive.add_endpoint(name="serve", fn=serve,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.write_out(str(out), verbose=False)
