"""Prediction on images of any size: restore a trained model, overlap-tile or resize, export.

Two ways to cover an image:
- tile (Ronneberger et al. 2015, Fig. 2): the image is mirror-padded and cut into overlapping
  tiles of the training size; each output pixel comes from the centre of a tile, where the network
  saw enough context, so the result is seamless. With valid padding the overlap is the network's
  own context ((input - output) / 2 per side); with same padding it is `overlap` pixels per side.
- resize: the whole image is resized to the training size and the prediction resized back, which
  is how a model trained on resized data (the paper's Pet model) sees its inputs.
Both are TF functions of a batch of uint8 images, so `predict` and the SavedModel `export` writes run
the same code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from unet_dist.checkpoint import restore_trained
from unet_dist.config import Config, ConfigError
from unet_dist.metrics import predict_classes
from unet_dist.postprocess import Postprocess, parse
from unet_dist.shapes import output_size


def load_trained(workdir: str | Path, which: str = "best", precision: str = "float32"
                 ) -> tuple[keras.Model, Config, str]:
    """(fully convolutional model with restored weights, its config, checkpoint path).

    which: 'best' (by val IoU; falls back to the latest) or 'latest'. precision: the Keras policy the
    model computes in (float32, mixed_bfloat16 or mixed_float16, already resolved), whatever training
    used: the variables are float32 under every policy, so any checkpoint loads into any of them.
    """
    keras.mixed_precision.set_global_policy(precision)
    return restore_trained(workdir, which)


def data_info(workdir: str | Path, hint: str) -> dict | None:
    """WORKDIR/data.json, what training wrote of its data (the manifest's layout, classes and sizes),
    or None when the run has none. Raises ConfigError naming the file, and `hint`, when unreadable."""
    meta = Path(workdir) / "data.json"
    if not meta.exists():
        return None
    try:
        info = json.loads(meta.read_text())
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{meta}: unreadable ({e}); {hint}") from None
    colors = info.get("colors")  # predict and export code masks in them; evaluate --images reads masks by them
    if colors is not None and not (isinstance(colors, list) and len(colors) >= 2 and all(
            isinstance(c, list) and len(c) == 3 and all(type(v) is int and 0 <= v <= 255 for v in c) for c in colors)):
        raise ConfigError(f"{meta}: 'colors' is not a list of class colours [R, G, B] (0-255 each): "
                          f"{json.dumps(colors)[:80]}; {hint}")
    if colors is not None and isinstance(info.get("num_classes"), int) and len(colors) != info["num_classes"]:
        raise ConfigError(f"{meta}: {len(colors)} 'colors' for {info['num_classes']} classes ('num_classes'); {hint}")
    intensity, channels = info.get("intensity"), info.get("channels", 3)
    window = intensity.get("window") if isinstance(intensity, dict) else None
    if (intensity is not None and not isinstance(intensity, dict)) or (window is not None and not (
            isinstance(window, list) and len(window) == channels and all(
                isinstance(w, list) and len(w) == 2 and all(type(v) in (int, float) and math.isfinite(v) for v in w)
                and w[0] < w[1] for w in window))):
        raise ConfigError(f"{meta}: 'intensity' holds no window [LO, HI] for each of the images' {channels} "
                          f"channels: {json.dumps(intensity)[:80]}; {hint}")
    return info


def _window_text(window: list | None) -> str:
    return "each image's own range" if window is None else ", ".join(f"{lo:g} to {hi:g}" for lo, hi in window)


def intensity_window(workdir: str | Path) -> list | None:
    """The [lo, hi] per channel that a run's images were mapped from to 8 bits (`convert --intensity`
    dataset or window; its data.json), or None: each image by its own percentiles."""
    info = data_info(workdir, "its images' intensity window is unknown") or {}
    return (info.get("intensity") or {}).get("window")


def check_intensity_matches(workdir: str | Path, manifest: dict, data_dir: str | Path) -> None:
    """evaluate --data: the records of `data_dir` must hold images mapped to 8 bits as the run's
    training data was (`convert --intensity`), or its scores would be of other inputs than the
    model learnt. Raises ConfigError naming both and the convert flags that match the run."""
    run, data = intensity_window(workdir), (manifest.get("intensity") or {}).get("window")
    if run != data:
        flags = ("--intensity window --window " + " ".join(repr(float(v)) for pair in run for v in pair)
                 if run is not None else "--intensity image")
        raise ConfigError(f"{data_dir}/manifest.json: images mapped to 8 bits from {_window_text(data)}, but the "
                          f"run's training data from {_window_text(run)} ({Path(workdir) / 'data.json'}); convert "
                          f"it again with {flags}")


def auto_mode(workdir: Path, cfg: Config) -> tuple[str, str]:
    """predict --mode auto: ('resize' or 'tile', why), from WORKDIR/data.json (the manifest's sizes).

    Training sees every image resized to data.image_size (patches are windows at that scale), so
    prediction must see that scale too: resize, unless every training image already was
    data.image_size, in which case the model learnt the images' own pixel scale and overlap-tile
    prediction keeps it for images of any size (the 2015 U-Net's setting).
    """
    info = data_info(workdir, "pass --mode tile or resize")
    if info is None:
        return "tile", f"{Path(workdir) / 'data.json'} not found"
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


def tile_predict_fn(model: keras.Model, cfg: Config, tile: tuple[int, int] | None = None,
                    overlap: int | None = None, batch: int | None = None, flip: bool = False):
    """A TF function: uint8 images (B, H, W, C) of any size -> probabilities (B, H, W, U) by overlap tiles.

    Each output pixel is taken from one tile of `tiling`'s size, at least the overlap away from the
    tile's edges where the image goes on. Where the network met image content beyond its input's
    edges in training (valid padding's context, the 2015 U-Net; patches cut from inside images,
    data.patch_size), the image is mirror-padded by the tiles' context, as the paper does, and cut
    into a grid of tiles whose outputs abut. Where it met whole images (same padding, no patches),
    it only ever saw an image's borders with its own zero padding beyond them: the tiles then lie
    inside the image, the first at its top-left corner and the last flush with its far edges (the
    image mirror-padded to the pooling grid there, by fewer pixels than the grid, as the whole image
    would be), so that with an overlap as wide as the network's receptive field they give what the
    whole image through the model gives, and an image of the training size is one pass. (Mirrored
    context at the borders of such a model's images cost the demo model 6.9 points of IoU on new
    images of its training size; for a model trained on patches it gained 1.2: README, tile mode.)
    The tiles of all B images go through the model `batch` at a time (default about 2^20 input
    pixels: 16 tiles of 256x256, 3 of 572x572), cut from the images inside the loop, so memory
    beyond the images and the output is bounded by one batch of tiles however large the images.
    flip: the images and their mirror images are tiled and predicted one after the other
    (`mirrored`); a mirror image's tiles fall elsewhere, so the average spans two tile grids.
    Raises ValueError naming --tile or --overlap (from `tiling`).
    """
    (th, tw), (oh, ow), (kh, kw) = tiling(cfg, tile, overlap)
    batch = batch or max(1, 2**20 // (th * tw))
    units = model.output_shape[-1]
    if cfg.model.padding == "valid" or cfg.data.patch_size:
        top, left = (th - kh) // 2, (tw - kw) // 2  # context above and left of each tile's kept part
        cy, cx = (oh - kh) // 2, (ow - kw) // 2  # where the kept part sits in the model's output

        def fn(images):
            h, w = tf.unstack(tf.shape(images)[1:3])
            ny, nx = (h + kh - 1) // kh, (w + kw - 1) // kw
            # The context beyond the image: mirrored, as in the paper.
            padded = (_reflect_indices(h, top, ny * kh - h + th - kh - top),
                      _reflect_indices(w, left, nx * kw - w + tw - kw - left))
            probs = _tiles_through(model, images, padded, tf.range(ny) * kh, tf.range(nx) * kw, (th, tw), batch,
                                   units, lambda probs, iy, ix: probs[:, cy : cy + kh, cx : cx + kw], (kh, kw))
            return probs[:, :h, :w]
    else:
        grid = 2**cfg.model.depth

        def fn(images):
            h, w = tf.unstack(tf.shape(images)[1:3])
            ys, xs = _inside(h, th, (th - kh) // 2, kh, grid), _inside(w, tw, (tw - kw) // 2, kw, grid)
            # Padded to the pooling grid at the far edges only, as a whole image would be for the model.
            padded = (_reflect_indices(h, 0, ys.padded - h), _reflect_indices(w, 0, xs.padded - w))

            def window(probs, iy, ix):  # each tile's output rows and columns that any output pixel takes
                rows = tf.gather(ys.starts, iy)[:, None] + tf.range(ys.window)
                cols = tf.gather(xs.starts, ix)[:, None] + tf.range(xs.window)
                return tf.gather(tf.gather(probs, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)

            probs = _tiles_through(model, images, padded, ys.origins, xs.origins, (ys.size, xs.size), batch, units,
                                   window, (ys.window, xs.window))
            return tf.gather(tf.gather(probs, ys.index, axis=1), xs.index, axis=2)

    return mirrored(fn, one_at_a_time=True) if flip else fn


class _Axis(NamedTuple):
    """Same-padding tiles along one axis of an image (`_inside`); int32 tensors."""
    size: tf.Tensor  # a tile's length: the tile, or the padded image where it is shorter
    padded: tf.Tensor  # the image's length padded to the pooling grid (by fewer pixels than the grid)
    origins: tf.Tensor  # (count,) where each tile starts
    starts: tf.Tensor  # (count,) where in each tile's output its window of `window` kept pixels starts
    window: tf.Tensor  # the kept window's length, the same for every tile
    index: tf.Tensor  # (n,) each output pixel's place in the tiles' windows laid end to end


def _inside(n, tile: int, context: int, keep: int, grid: int) -> _Axis:
    """The tiles of a same-padding model along an axis of length n (an int32 scalar), padded to
    the pooling grid (N = n rounded up to a multiple of `grid`, as the whole image would be): tile i
    starts at min(i * keep, N - tile), on the grid, the last flush with the far edge, and output
    pixel r comes from tile clip((r - context) // keep, 0, count - 1), at least `context` pixels
    from any tile edge inside the image. The pixels each tile gives fit a window of tile - context
    (tile 0's from its start, the others' from `context` on), the whole tile where there is one."""
    padded = (n + grid - 1) // grid * grid
    size = tf.minimum(tile, padded)
    count = (padded - size + keep - 1) // keep + 1
    i = tf.range(count)
    origins = tf.minimum(i * keep, padded - size)
    starts = tf.where(i > 0, context, 0)
    window = tf.where(count > 1, size - context, size)
    r = tf.range(n)
    t = tf.clip_by_value(tf.math.floordiv(r - context, keep), 0, count - 1)
    return _Axis(size, padded, origins, starts, window, t * window + r - tf.gather(origins, t) - tf.gather(starts, t))


def _tiles_through(model, x, padded, origins_y, origins_x, size, batch: int, units: int, crop, kept):
    """The model's outputs of every tile of the images x (B, H, W, C) uint8 padded as `padded` says
    ((H',) rows and (W',) columns of x: `_reflect_indices`; the padded images are never made, their
    tiles are cut through the indices), tile (b, i, j) of `size` (h, w) cut at (origins_y[i],
    origins_x[j]) of the padded images, `batch` tiles at a time, each output cropped by crop(probs
    (m, h', w', U), i (m,), j (m,)) -> (m, kh, kw, U), kept = (kh, kw) (ints, or int32 scalars
    known when the graph runs): float32 (B, ny * kh, nx * kw, U), the crops laid side by side in
    the tiles' order."""
    ny, nx = tf.size(origins_y), tf.size(origins_x)
    n = tf.shape(x)[0] * ny * nx
    th, tw = size

    def body(i, out):
        j = tf.range(i * batch, tf.minimum(i * batch + batch, n))
        k = j % (ny * nx)
        iy, ix = k // nx, k % nx
        rows = tf.gather(padded[0], tf.gather(origins_y, iy)[:, None] + tf.range(th))  # (m, th) rows of x
        cols = tf.gather(padded[1], tf.gather(origins_x, ix)[:, None] + tf.range(tw))  # (m, tw) columns of x
        m = tf.size(j)
        index = tf.stack([tf.broadcast_to((j // (ny * nx))[:, None, None], [m, th, tw]),
                          tf.broadcast_to(rows[:, :, None], [m, th, tw]),
                          tf.broadcast_to(cols[:, None, :], [m, th, tw])], axis=-1)
        tiles = tf.gather_nd(x, index)  # (m, th, tw, C): the tiles alone, however large the images
        probs = model(tf.image.convert_image_dtype(tiles, tf.float32), training=False)
        return i + 1, out.write(i, tf.cast(crop(probs, iy, ix), tf.float32))

    chunks = (n + batch - 1) // batch
    static = [k if isinstance(k, int) else None for k in kept]
    out = tf.TensorArray(tf.float32, size=chunks, infer_shape=False, element_shape=[None, *static, units])
    # One batch at a time (parallel_iterations=1): that bounds the activations held at once.
    _, out = tf.while_loop(lambda i, _: i < chunks, body, (0, out), parallel_iterations=1)
    kh, kw = kept
    tiles = tf.reshape(out.concat(), [tf.shape(x)[0], ny, nx, kh, kw, units])
    return tf.reshape(tf.transpose(tiles, [0, 1, 3, 2, 4, 5]), [tf.shape(x)[0], ny * kh, nx * kw, units])


def traced(fn):
    """`fn` (`tile_predict_fn`'s or `resize_predict_fn`'s function) as one traced function, for any batch
    and image size: after the first sizes it traces once with unknown dimensions, not once per size."""
    return tf.function(fn, reduce_retracing=True, autograph=False)


def _reflect_indices(n, before, after) -> tf.Tensor:
    """Indices into a length-n axis that mirror-pad it by `before` and `after` (numpy's "reflect").

    n, before, after: ints or int32 scalars (an image size known only when the graph runs).
    tf.pad's REFLECT needs each pad smaller than the axis, but a valid-padding model's context can
    be wider than its output (a 252 px tile of a depth-4 net: 68 px out, 92 px of context per side).
    """
    i = tf.range(-before, n + after)
    period = tf.maximum(2 * (n - 1), 1)  # n == 1: every index is 0
    i = tf.math.floormod(tf.abs(i), period)
    return tf.where(i >= n, period - i, i)


def resize_predict_fn(model: keras.Model, cfg: Config, flip: bool = False):
    """A TF function: uint8 images (B, H, W, C) -> probabilities (B, H, W, U) via the training size.

    The image is resized so that the model's *output* covers it (valid padding: mirror-padded by
    the network's context), and the output is resized back to (H, W). Downscaling is antialiased
    (a triangle filter as wide as the scale), as PIL's resize at conversion and the training
    pipeline's: without it, fine texture aliases into patterns training never showed. The demo model
    scored mean IoU 0.9117 on 48 new 240-500 px images without antialiasing, 0.9724 with it.
    flip: the resized image and its mirror images go through the model as one batch (`mirrored`);
    resizing commutes with mirroring, so that is mirroring the whole image, at the training size.
    """
    net = mirrored(model) if flip else model
    th, tw = cfg.data.image_size
    oh, ow = output_size((th, tw), cfg.model.depth, cfg.model.padding)
    ph, pw = (th - oh) // 2, (tw - ow) // 2

    def fn(images):
        size = tf.shape(images)[1:3]
        # Resized, then scaled to [0, 1] as convert_image_dtype scales (resizing is linear): the
        # whole image is taken to float32 once, inside resize, not twice (12 bytes a pixel of RGB).
        x = tf.image.resize(images, (oh, ow), antialias=True)
        dtype = tf.as_dtype(images.dtype)
        x = x * (1.0 / dtype.max) if dtype.is_integer else x
        if ph or pw:
            x = tf.gather(x, _reflect_indices(oh, ph, th - oh - ph), axis=1)
            x = tf.gather(x, _reflect_indices(ow, pw, tw - ow - pw), axis=2)
        probs = net(x, training=False)
        return tf.image.resize(probs, size, method="bilinear")

    return fn


def classes_from_probs(probs):
    """(..., U) probabilities -> (...) uint8 class ids (works on numpy and tensors): the evaluation's
    `metrics.predict_classes`, as uint8 for the mask PNGs and the SavedModel's masks."""
    return predict_classes(probs, tf.uint8)


MIRRORS = ([], [2], [1], [1, 2])  # the axes of (N, h, w, C) each mirror image reverses: none, left-right, up-down, both


def mirrored(fn: Callable, one_at_a_time: bool = False) -> Callable:
    """Test-time mirroring: `fn(x, **kwargs)` for inputs x (N, h, w, C) -> (N, h', w', U), averaged
    over x and its three mirror images (left-right, up-down, both), each prediction flipped back,
    as nnU-Net predicts by default. 4x the compute. It helps a model trained with flips
    (data.augment.flip), which has learnt mirror images as well as the originals.

    one_at_a_time False: the four go through `fn` as one batch of 4N (a model, on its inputs).
    True: one after the other, each started once the one before is summed into the average, so
    only one pass and the sum are held at once (whole images through tile prediction: four copies
    of a large image's probabilities at once cost about 50 bytes a pixel more than one).
    fn's output must be centred in its input (valid padding crops as much on each side), so that a
    flipped-back output covers the pixels the original does.
    """

    def averaged(x, **kwargs):
        if not one_at_a_time:
            probs = tf.split(fn(tf.concat([tf.reverse(x, a) for a in MIRRORS], 0), **kwargs), len(MIRRORS))
            return tf.add_n([tf.reverse(p, a) for p, a in zip(probs, MIRRORS, strict=True)]) / len(MIRRORS)
        total = None
        for a in MIRRORS:
            with tf.control_dependencies([] if total is None else [total]):  # the graph would run all four at once
                mirror = tf.reverse(x, a)
            probs = tf.reverse(fn(mirror, **kwargs), a)
            total = probs if total is None else total + probs
        return total / len(MIRRORS)

    return averaged


def prediction_fn(model: keras.Model, cfg: Config, workdir: str | Path, mode: str = "auto",
                  tile: tuple[int, int] | None = None, overlap: int | None = None,
                  tta: str = "none") -> tuple[Callable, str, str]:
    """(TF function: uint8 images (B, H, W, C) -> probabilities (B, H, W, U), the mode taken, why)
    for predict's and export's --mode auto|tile|resize and --tta none|flip. tile and overlap apply
    to tile mode.

    Raises ConfigError naming WORKDIR/data.json (auto), --tile or --overlap.
    """
    why = "as --mode asks"
    if mode == "auto":
        mode, why = auto_mode(workdir, cfg)
    flip = tta == "flip"
    if mode == "resize":
        fn = resize_predict_fn(model, cfg, flip)
    else:
        try:
            fn = tile_predict_fn(model, cfg, tile, overlap, flip=flip)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if flip:
        why += "; averaged over 4 mirror images" + ("" if cfg.data.augment.flip else
                                                    " (this model was trained without flips)")
    return fn, mode, why


class PredictionError(Exception):
    """One image could not be predicted (it does not fit in memory); the message says what needs less."""


@dataclass
class Predictor:
    """What predict, export and evaluate --images run: one trained run, or several averaged."""

    fn: Callable  # TF function: uint8 images (B, H, W, C) -> probabilities (B, H, W, U), averaged over the runs
    models: list[keras.Model]
    cfg: Config  # the first run's
    checkpoints: list[str]
    mode: str  # resize, tile, or "per run" when auto chose differently for the runs
    why: str
    tiles: list[tuple[int, int] | None] = field(default_factory=list)  # each run's kept tile size; None: resize mode
    precision: str = "float32"  # the Keras policy the models compute in
    colors: list | None = None  # class i's [R, G, B] where the first run's masks were coded by colour (data.json)
    window: list | None = None  # [lo, hi] per channel images are mapped from to 8 bits (convert --intensity), or None
    postprocess: Postprocess = Postprocess()  # what `mask` does to the class ids (predict --postprocess)
    _traced: Callable | None = field(default=None, init=False, repr=False)

    def __call__(self, image: np.ndarray) -> tf.Tensor:
        """(H, W, U) probabilities of one uint8 image (H, W, C), by `fn` traced once for every size.
        Raises PredictionError, one line, when the device runs out of memory for it: TensorFlow's
        own message is a page, and the caller goes on with the next image."""
        if self._traced is None:
            self._traced = traced(self.fn)
        try:
            return self._traced(image[None])[0]
        except tf.errors.ResourceExhaustedError:
            h, w = image.shape[:2]
            need = "a smaller --tile" if self.mode != "resize" else "a device with more memory"
            raise PredictionError(f"out of memory predicting a {h}x{w} image in {self.mode} mode; {need}, fewer "
                                  "--workdir runs or --tta none need less") from None

    def mask(self, probs) -> np.ndarray:
        """(H, W) uint8 class ids of probabilities (H, W, U), post-processed as --postprocess said
        (`postprocess.Postprocess`)."""
        return self.postprocess(np.asarray(classes_from_probs(probs)))

    def cost(self, size: tuple[int, int]) -> int:
        """The relative time to predict an image of `size` (H, W): the model's inputs over the runs,
        the tiles it is cut into for a run in tile mode, one for a run in resize mode (at least one
        an image: reading it, or finding it unreadable, takes time too)."""
        h, w = size
        return sum(max(1, -(-h // t[0]) * -(-w // t[1])) if t else 1 for t in self.tiles or [None])

    def summary(self) -> str:
        """'MODE mode: WHY; checkpoint(s) ...; precision P', for the line predict, export and evaluate print."""
        ckpts = self.checkpoints
        return (f"{self.mode} mode: {self.why}; checkpoint{'s' * (len(ckpts) > 1)} {', '.join(ckpts)}; "
                f"precision {self.precision}"
                + (f"; --postprocess {self.postprocess}" if self.postprocess else ""))


def load_predictor(workdirs: list[Path], which: str = "best", mode: str = "auto",
                   tile: tuple[int, int] | None = None, overlap: int | None = None,
                   tta: str = "none", precision: str = "float32", postprocess: str = "none") -> Predictor:
    """Each run's model and `prediction_fn`; with several runs (the folds of a cross-validation, or
    runs with other seeds) their probabilities are averaged, as nnU-Net ensembles its five folds.
    Each run keeps its own input size and auto mode: the average is taken at the image's own size.
    Every model computes in `precision` (a Keras policy, resolved: `load_trained`). postprocess:
    predict's --postprocess (`postprocess.parse`), which `Predictor.mask` applies.

    Raises ConfigError (or CheckpointError) naming the run, and when the runs predict other classes.
    """
    models, cfgs, checkpoints, fns, modes, tiles, windows = [], [], [], [], [], [], []
    for workdir in workdirs:
        model, cfg, ckpt = load_trained(workdir, which, precision)
        fn, run_mode, why = prediction_fn(model, cfg, workdir, mode, tile, overlap, tta)
        tiles.append(tiling(cfg, tile, overlap)[2] if run_mode == "tile" else None)
        if models and model.output_shape[-1] != models[0].output_shape[-1]:
            raise ConfigError(f"--workdir {workdir}: {cfg.model.num_classes} classes, but {workdirs[0]} has "
                              f"{cfgs[0].model.num_classes}: an ensemble averages the same classes")
        if cfgs and cfg.model.in_channels != cfgs[0].model.in_channels:
            raise ConfigError(f"--workdir {workdir}: images of {cfg.model.in_channels} channels, but {workdirs[0]} "
                              f"takes {cfgs[0].model.in_channels}: an ensemble predicts the same images")
        windows.append(intensity_window(workdir))
        if windows[-1] != windows[0]:
            raise ConfigError(f"--workdir {workdir}: images mapped to 8 bits from {_window_text(windows[-1])}, but "
                              f"{workdirs[0]}'s from {_window_text(windows[0])} (convert --intensity): an ensemble "
                              "reads each image once")
        models.append(model)
        cfgs.append(cfg)
        checkpoints.append(ckpt)
        fns.append(fn)
        modes.append((run_mode, why))
    if len(set(modes)) == 1:
        (mode, why), = set(modes)
    else:
        mode, why = "per run", "; ".join(f"{w}: {m} ({y})" for w, (m, y) in zip(workdirs, modes, strict=True))
    if (tile is not None or overlap is not None) and all(m == "resize" for m, _ in modes):
        # Resize mode has no tiles: taking the flag silently would hide that auto chose resize.
        flag = "--tile" if tile is not None else "--overlap"
        raise ConfigError(f"{flag}: used in tile mode only, and this is resize mode ({modes[0][1]}); "
                          "add --mode tile to predict in tiles")
    # Masks coded by colour at conversion: predict writes them, and export serves them, in these colours.
    colors = (data_info(workdirs[0], "the masks' colours are unknown") or {}).get("colors")
    post = parse(postprocess, cfgs[0].model.num_classes)
    if len(fns) == 1:
        return Predictor(fns[0], models, cfgs[0], checkpoints, mode, why, tiles, precision, colors, windows[0], post)

    def averaged(images):
        return tf.add_n([f(images) for f in fns]) / len(fns)

    return Predictor(averaged, models, cfgs[0], checkpoints, mode, f"{why}; averaged over {len(fns)} runs", tiles,
                     precision, colors, windows[0], post)


def windowed_tf(values: tf.Tensor, window: list) -> tf.Tensor:
    """float32 (..., C) values -> uint8 (..., C), channel c mapped from window[c] = [lo, hi] to 0..255
    with `imageio.windowed`'s float32 arithmetic, so that the same values give the same bytes."""
    lo = tf.constant([w[0] for w in window], tf.float32)
    scale = tf.constant([255.0 / (w[1] - w[0]) for w in window], tf.float32)  # as numpy: in float64, then cast
    scaled = (values - lo) * scale + 0.5
    scaled = tf.where(tf.math.is_nan(scaled), tf.zeros_like(scaled), scaled)
    return tf.cast(tf.clip_by_value(scaled, 0.0, 255.0), tf.uint8)


def export_saved_model(models: list[keras.Model], fn: Callable, out: str | Path, colors: list | None = None,
                       channels: int = 3, window: list | None = None) -> None:
    """SavedModel with a `serve` signature: uint8 images (B, H, W, channels) of any size (the models'
    model.in_channels; 3: RGB) -> {"mask": uint8 class
    ids (B, H, W), "probabilities": float32 (B, H, W, U)}, by `fn` (a `Predictor`'s, over `models`).
    colors: class i's [R, G, B] (masks coded by colour at conversion); the signature then also
    returns "colors": uint8 (B, H, W, 3), each pixel its class's colour, as `predict` writes them.
    window: [lo, hi] per channel (`convert --intensity`); a second signature `serve_values` then takes
    the images' own values, float32 (B, H, W, channels) (CT's Hounsfield units), and maps them to
    8 bits in the graph as `imageio.windowed` does (the same float32 arithmetic) before `serve`."""
    archive = keras.export.ExportArchive()
    for model in models:
        archive.track(model)
    palette = tf.constant(colors, tf.uint8) if colors else None

    def serve(images):
        probs = fn(images)
        mask = classes_from_probs(probs)
        out = {"mask": mask, "probabilities": probs}
        if palette is not None:
            out["colors"] = tf.gather(palette, tf.cast(mask, tf.int32))
        return out

    archive.add_endpoint(name="serve", fn=serve,
                         input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8, name="images")])
    if window is not None:
        def serve_values(values):
            return serve(windowed_tf(values, window))

        archive.add_endpoint(name="serve_values", fn=serve_values,
                             input_signature=[tf.TensorSpec([None, None, None, channels], tf.float32, name="values")])
    archive.write_out(str(out), verbose=False)
