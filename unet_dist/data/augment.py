"""Paired image/mask augmentation on batches, in TensorFlow ops, driven by per-sample seeds.

Two stages, chosen by measurement (docs/benchmarks.md):
- per sample, `augment_sample`: zoom, random crop and flips pick and flip a window of the decoded
  image, resampled once straight to the network size, whatever the original size; brightness and
  contrast ride on the scaling to [0, 1] that the resampled image needs anyway;
- per batch, `augment_batch` (only when one of them is on): rotations (`ImageProjectiveTransformV3`,
  the kernel behind Keras' preprocessing layers), elastic deformation, blur, a coarser resolution,
  gamma and hue, where per-op overhead is amortised. Gaussian noise is added per sample, at the
  end of the first stage, since each sample's noise comes from its own seed.

Every random draw of sample i comes from its own stateless seed, so a sample is augmented the same
way whatever the batch it lands in, the pipeline's parallelism or the number of workers, and a
resumed run sees exactly the samples it would have seen. Geometric transforms move image and mask
together; the mask is always resampled with nearest neighbour, so class ids stay class ids.
"""

from __future__ import annotations

import math

import tensorflow as tf

from unet_dist.config import AugmentConfig, blur_radius
from unet_dist.data.border import STEPS_PER_PX
from unet_dist.data.convert import IGNORE

# Uniform draws per sample, by use. (Stateless draws of more values keep the first ones, so adding
# uses at the end leaves every earlier draw, and every earlier run's augmentation, as it was.)
(_FLIP_H, _FLIP_V, _ROT90, _ZOOM, _SHIFT_X, _SHIFT_Y, _ANGLE, _BRIGHT, _CONTRAST, _HUE,
 _FG, _FG_CLASS, _FG_PIXEL, _NOISE_P, _NOISE_STD, _NOISE_SEED, _BLUR_P, _BLUR_SIGMA, _GAMMA_P,
 _GAMMA, _LOWRES_P, _LOWRES, _GAMMA_INV_P, _GAMMA_INV) = range(24)
UNIFORMS = 24
_NOISE_STREAM = 0x6E6F6973  # first word of the noise's seeds, apart from every other stream's


def _to_unit(image: tf.Tensor, resampled: tf.Tensor) -> tf.Tensor:
    """Resampled pixels of a uint8 source are in [0, 255]: bring them to [0, 1]."""
    return resampled * (1.0 / 255.0) if image.dtype == tf.uint8 else resampled


def _bilinear(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """(h, w, C) uint8 or float -> (H, W, C) float32 in the source's range; a cast when (h, w) = size.

    Downscaling is antialiased (a triangle filter as wide as the scale), as PIL's resize at conversion
    and predict's resize are: plain bilinear sampling of a larger image aliases fine texture (stripes
    become coarser stripes), so training would see other images than conversion and prediction make.
    Upscaling uses the ResizeBilinear kernel, where antialiasing changes nothing: it measured about
    twice as fast per image as a crop_and_resize box on this CPU. The identity case is a cast.
    """
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    same = tf.logical_and(h == size[0], w == size[1])
    larger = tf.logical_or(h > size[0], w > size[1])
    out = tf.cond(same, lambda: tf.cast(image, tf.float32),
                  lambda: tf.cond(larger, lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
                                  lambda: tf.image.resize(image, size, method="bilinear")))
    return tf.ensure_shape(out, [*size, image.shape[-1]])


def _nearest_index(n: tf.Tensor, out: int) -> tf.Tensor:
    """Source index of each of `out` pixels resampled from `n`: the pixel under its centre."""
    scale = tf.cast(n, tf.float32) / out
    idx = tf.cast(tf.floor((tf.range(out, dtype=tf.float32) + 0.5) * scale), tf.int32)
    return tf.minimum(idx, n - 1)


def nearest(mask: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
    """(h, w, C) class ids -> (H, W, C), nearest neighbour with the pixel-centre convention of
    `tf.image.resize`, so a mask stays on its bilinearly resized image. Two gathers: several times
    cheaper than the ResizeNearestNeighbor kernel on one-channel uint8."""
    mask = tf.gather(mask, _nearest_index(tf.shape(mask)[0], size[0]), axis=0)
    return tf.gather(mask, _nearest_index(tf.shape(mask)[1], size[1]), axis=1)


def resize_pair(image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
    """image (H, W, C) uint8 or float in [0, 1], mask (H, W, 1) uint8 -> image float32 in [0, 1] and
    mask uint8 at `size`; bilinear / nearest."""
    return _to_unit(image, _bilinear(image, size)), nearest(mask, size)


def draw(seed: tf.Tensor, cfg: AugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """One sample's random numbers from its (2,) seed: UNIFORMS uniforms and (g, g, 2) standard normals."""
    u_seed, n_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    u = tf.random.stateless_uniform([UNIFORMS], u_seed)
    n = tf.random.stateless_normal([cfg.elastic_grid, cfg.elastic_grid, 2], n_seed)
    return u, n


def _window(n: tf.Tensor, zoom: tf.Tensor, u: tf.Tensor, inside: tf.Tensor = -1) -> tuple[tf.Tensor, tf.Tensor]:
    """(start, length) in whole pixels of a 1 / zoom window placed at u in [0, 1) along `n` pixels:
    among every place, or, where `inside` >= 0, among the places that hold pixel `inside`. A window
    longer than `n` (zoom < 1) starts at or before 0 and ends at or after n: it holds all n pixels
    and reaches past them (start < 0 or start + length > n), which the caller fills by mirroring."""
    length = tf.maximum(tf.cast(tf.round(tf.cast(n, tf.float32) / zoom), tf.int32), 1)
    first, last = tf.minimum(0, n - length), tf.maximum(0, n - length)  # where it may start
    lo = tf.where(inside >= 0, tf.maximum(inside - length + 1, first), first)
    hi = tf.where(inside >= 0, tf.minimum(inside, last), last)
    start = lo + tf.cast(tf.floor(u * tf.cast(hi - lo + 1, tf.float32)), tf.int32)
    return tf.minimum(start, hi), length


def _foreground_pixel(mask: tf.Tensor, u: tf.Tensor) -> tf.Tensor:
    """(y, x) int32 of a foreground pixel of mask (H, W, 1) (a class id > 0 that is not IGNORE), or
    (-1, -1) where it has none. As nnU-Net samples: a class drawn evenly among those present, then a
    pixel evenly among that class's, so a rare class is aimed at as often as a common one.
    u: the sample's uniforms (`draw`)."""
    ids = mask[..., 0]
    where = tf.where(tf.logical_and(ids > 0, ids != IGNORE))  # (n, 2) in raster order
    classes, which = tf.unique(tf.gather_nd(ids, where))

    def pick():
        c = tf.minimum(tf.cast(u[_FG_CLASS] * tf.cast(tf.size(classes), tf.float32), tf.int32), tf.size(classes) - 1)
        of_class = tf.where(tf.equal(which, c))[:, 0]
        n = tf.size(of_class)
        k = tf.minimum(tf.cast(u[_FG_PIXEL] * tf.cast(n, tf.float32), tf.int32), n - 1)
        return tf.cast(tf.gather(where, of_class[k]), tf.int32)

    return tf.cond(tf.size(classes) > 0, pick, lambda: tf.constant([-1, -1]))


def _mirrored_window(t: tf.Tensor, y: tf.Tensor, x: tf.Tensor, hh: tf.Tensor, ww: tf.Tensor) -> tf.Tensor:
    """The (y, x, hh, ww) window of t (H, W, C), mirrored past t's edges where it reaches beyond them
    (zooming out: at most H and W beyond, as scale_min >= 0.5 allows). Mirrored, every pixel keeps
    a true label, where a constant border would need a class, or the ignore value, for pixels that
    show nothing. Two gathers of reflected indices: a third of MirrorPad's time on uint8 here."""
    def reflect(i, n):  # symmetric: -1 -> 0, n -> n - 1
        i = tf.where(i < 0, -i - 1, i)
        return tf.where(i >= n, 2 * n - i - 1, i)

    shape = tf.shape(t)
    t = tf.gather(t, reflect(y + tf.range(hh), shape[0]), axis=0)
    return tf.gather(t, reflect(x + tf.range(ww), shape[1]), axis=1)


def augment_sample(image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int], u: tf.Tensor,
                   cfg: AugmentConfig, fraction: tuple[float, float] = (1.0, 1.0),
                   foreground: float = 0.0, distances: tf.Tensor | None = None) -> tuple[tf.Tensor, ...]:
    """Zoom, random crop, flips, brightness, contrast and noise of one sample, resampled once to `size`.

    image (H, W, C) uint8 or float32 in [0, 1], mask (H, W, 1) uint8, any H, W; u (UNIFORMS,) the
    sample's uniforms from `draw`; fraction: the share of the image's height and width one output
    covers before zoom (1 for whole images, patch / image_size for patch training). A share
    scale_prob of the samples is zoomed by a factor in [scale_min, scale_max], the others not: a
    (fraction / zoom) window in whole pixels is placed at random inside the image (around it, where
    the window is larger: zooming out, `_mirrored_window`) and flipped on the source pixels (small
    and uint8), then resized: bilinear for the image, nearest neighbour for the mask. With patches (fraction <
    1), a share `foreground` of the windows (nnU-Net's oversample_foreground_percent, drawn per
    sample) is placed to hold a foreground pixel (`_foreground_pixel`) anywhere in it; an image with
    none gets a window placed evenly. Brightness and contrast are one multiply-add on the resized
    image, folded into its scaling to [0, 1]: at 256x256 every pass over a float image
    costs about as much as the resize, so each pass saved shows in images/s. Noise (`_noise`), on
    a share of the samples, comes last.
    distances: (H, W, 1) uint8, a record's border distances in steps of 1 / STEPS_PER_PX pixel
    (`border.stored_distances`): the same window and flips as the image, resampled bilinearly, and
    returned in pixels of the output (scaled by the resampling, so zoom and resize keep them true).
    Returns image (h, w, C) float32 in [0, 1], mask (h, w, 1) uint8 (and distances (h, w, 1) float32).
    Contrast is about the mean of all the image's channels, as for RGB.
    """
    moved = (image, mask) if distances is None else (image, mask, distances)  # windowed and flipped alike
    if cfg.scale_crop or fraction != (1.0, 1.0):
        zoom = tf.constant(1.0)
        if cfg.scale_crop:  # a share scale_prob of the samples, by a factor drawn evenly in [min, max]
            v = u[_ZOOM] / cfg.scale_prob
            zoom = tf.where(v < 1.0, cfg.scale_min + v * (cfg.scale_max - cfg.scale_min), 1.0)
        shape = tf.shape(image)
        inside = tf.constant([-1, -1])
        if foreground > 0 and fraction != (1.0, 1.0):
            inside = tf.cond(u[_FG] < foreground, lambda: _foreground_pixel(mask, u), lambda: inside)
        y, hh = _window(shape[0], zoom / fraction[0], u[_SHIFT_Y], inside[0])
        x, ww = _window(shape[1], zoom / fraction[1], u[_SHIFT_X], inside[1])

        def cropped():
            return tuple(tf.slice(t, [y, x, 0], [hh, ww, -1]) for t in moved)

        if cfg.scale_crop and cfg.scale_min < 1:  # only windows reaching past the image pay for the mirror
            outside = (y < 0) | (x < 0) | (y + hh > shape[0]) | (x + ww > shape[1])
            windows = tf.cond(outside, lambda: tuple(_mirrored_window(t, y, x, hh, ww) for t in moved), cropped)
        else:
            windows = cropped()
        moved = tuple(tf.ensure_shape(w, [None, None, t.shape[-1]]) for w, t in zip(windows, moved, strict=True))
    if cfg.flip:  # one reverse over the axes drawn (maybe none): no branches, few ops
        axes = tf.where(tf.stack([u[_FLIP_V] < 0.5, u[_FLIP_H] < 0.5]))[:, 0]
        moved = tuple(tf.ensure_shape(tf.reverse(t, axes), t.shape) for t in moved)
    image, mask, *extra = moved
    if extra:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        per_px = tf.sqrt(size[0] * size[1] / (shape[0] * shape[1]))  # output pixels per source pixel
        extra = [_bilinear(extra[0], size) * (per_px / STEPS_PER_PX)]
    mask = tf.cast(nearest(mask, size), tf.uint8)
    scale = 1.0 / 255.0 if image.dtype == tf.uint8 else 1.0
    resized = _bilinear(image, size)  # still in the source's range: [0, 255] for uint8
    if cfg.brightness <= 0 and cfg.contrast <= 0:
        image = _to_unit(image, resized)
    else:
        # Contrast about the image's mean, then a brightness shift:
        # (x s - m) f + m + d  ==  x (s f) + (m (1 - f) + d), with s the scaling to [0, 1].
        factor = 1.0 + (2.0 * u[_CONTRAST] - 1.0) * cfg.contrast if cfg.contrast > 0 else tf.constant(1.0)
        offset = (2.0 * u[_BRIGHT] - 1.0) * cfg.brightness if cfg.brightness > 0 else tf.constant(0.0)
        if cfg.contrast > 0:
            offset += tf.reduce_mean(resized) * scale * (1.0 - factor)
        image = tf.clip_by_value(resized * (scale * factor) + offset, 0.0, 1.0)
    if cfg.noise > 0:
        image = _noise(image, u, cfg)
    return (image, mask, *extra)


def _noise(image: tf.Tensor, u: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """A share noise_prob of the samples get Gaussian noise of a std drawn evenly in [0, noise]
    (nnU-Net draws the variance), clipped back to [0, 1]; the others are returned as they are, with
    no noise drawn. image (h, w, C) float32 in [0, 1]; u (UNIFORMS,). The noise's seed is taken
    from the sample's uniforms, so it too is the sample's own."""
    def noisy():
        seed = tf.stack([tf.constant(_NOISE_STREAM, tf.int64), tf.cast(u[_NOISE_SEED] * 2.0**24, tf.int64)])
        noise = tf.random.stateless_normal(tf.shape(image), seed) * (u[_NOISE_STD] * cfg.noise)
        return tf.clip_by_value(image + noise, 0.0, 1.0)

    return tf.cond(u[_NOISE_P] < cfg.noise_prob, noisy, lambda: image)


def describe(cfg: AugmentConfig) -> str:
    """What data.augment does to the training samples, in one line: each transform that is on,
    its range, and the share of the samples it touches where that is not all of them."""
    def share(p: float) -> str:
        return f" on {p:.0%}" if p < 1 else ""

    parts = []
    if cfg.flip:
        parts.append("flips")
    if cfg.rot90:
        parts.append("90-degree turns")
    if cfg.scale_crop:
        parts.append(f"zoom {cfg.scale_min:g}-{cfg.scale_max:g}{share(cfg.scale_prob)}")
    if cfg.rotate_degrees > 0:
        parts.append(f"rotation +-{cfg.rotate_degrees:g} degrees")
    if cfg.elastic and cfg.elastic_sigma > 0:
        parts.append(f"elastic {cfg.elastic_grid}x{cfg.elastic_grid} grid sigma {cfg.elastic_sigma:g} px")
    parts += [f"{name} {value:g}" for name, value in
              (("brightness", cfg.brightness), ("contrast", cfg.contrast), ("hue", cfg.hue)) if value > 0]
    if cfg.noise > 0:
        parts.append(f"noise std 0-{cfg.noise:g}{share(cfg.noise_prob)}")
    if cfg.blur > 0:
        parts.append(f"blur sigma {cfg.blur / 2:g}-{cfg.blur:g} px{share(cfg.blur_prob)}")
    if cfg.lowres > 0:
        parts.append(f"lowres {1 - cfg.lowres:g}-1{share(cfg.lowres_prob)}")
    if cfg.gamma > 0:
        parts.append(f"gamma {1 / (1 + cfg.gamma):.3g}-{1 + cfg.gamma:g}{share(cfg.gamma_prob)}"
                     + f" (of the inverted image{share(cfg.gamma_inverted_prob)})" * (cfg.gamma_inverted_prob > 0)
                     + " keeping each channel's mean and std" * cfg.gamma_retain_stats)
    return ", ".join(parts) or "none"


def needs_batch_stage(cfg: AugmentConfig) -> bool:
    """Whether `augment_batch` has anything to do (rotations, elastic deformation or an intensity transform)."""
    return (cfg.rot90 or cfg.rotate_degrees > 0 or (cfg.elastic and cfg.elastic_sigma > 0) or cfg.hue > 0
            or cfg.blur > 0 or cfg.lowres > 0 or cfg.gamma > 0)


def _rotation(u: tf.Tensor, h: int, w: int, cfg: AugmentConfig) -> tf.Tensor | None:
    """(B, 8) output->input transforms for 90-degree turns and small rotations about the centre."""
    if not (cfg.rot90 or cfg.rotate_degrees > 0):
        return None
    b = tf.shape(u)[0]
    angle = tf.zeros([b])
    if cfg.rot90:
        angle += tf.floor(u[:, _ROT90] * 4.0) * (math.pi / 2)
    if cfg.rotate_degrees > 0:
        angle += (2.0 * u[:, _ANGLE] - 1.0) * (cfg.rotate_degrees * math.pi / 180)
    cx, cy = (w - 1) / 2, (h - 1) / 2
    cos, sin = tf.cos(angle), tf.sin(angle)
    zeros = tf.zeros([b])
    # input = centre + R(angle) (output - centre)
    return tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, zeros, zeros], axis=1)


def _transform(images: tf.Tensor, transforms: tf.Tensor, interpolation: str) -> tf.Tensor:
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation=interpolation, fill_mode="REFLECT")


def _reflect(coord: tf.Tensor, size: int) -> tf.Tensor:
    """Mirrors coordinates that fall outside [0, size - 1] back inside (one reflection)."""
    top = float(size - 1)
    coord = tf.abs(coord)
    return tf.clip_by_value(top - tf.abs(top - coord), 0.0, top)


def _elastic(images, masks, normals, transforms, cfg: AugmentConfig):
    """The 2015 paper's elastic deformation (section 3.1): displacements N(0, sigma) on a coarse
    grid x grid, upsampled bicubically to a smooth per-pixel field; bilinear for images, nearest
    for masks. images (B, H, W, C), masks (B, H, W, 1), normals (B, g, g, 2).

    `transforms` ((B, 8) from `_rotation`, or None): rotations folded into the same sampling grid,
    so the batch is resampled once. The warp gathers rows of the flattened batch, which measured
    about 1.6x faster than `gather_nd` on (b, y, x) triples.
    """
    b, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
    field = tf.image.resize(normals * cfg.elastic_sigma, (h, w), method="bicubic")  # (B, H, W, 2)
    yy, xx = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    if transforms is None:
        ys, xs = yy[None] + field[..., 0], xx[None] + field[..., 1]  # (B, H, W)
    else:  # the source of output pixel (x, y) under the rotation, then displaced
        t = transforms[:, :, None, None]
        xs = t[:, 0] * xx + t[:, 1] * yy + t[:, 2] + field[..., 1]
        ys = t[:, 3] * xx + t[:, 4] * yy + t[:, 5] + field[..., 0]
    ys, xs = _reflect(ys, h), _reflect(xs, w)
    y0, x0 = tf.floor(ys), tf.floor(xs)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    y0, x0 = tf.cast(y0, tf.int32), tf.cast(x0, tf.int32)
    x1 = tf.minimum(x0 + 1, w - 1)
    row0 = tf.range(b)[:, None, None] * (h * w) + y0 * w  # flat index of (b, y0, 0)
    row1 = row0 + tf.where(y0 < h - 1, w, 0)
    pixels = tf.reshape(images, [-1, images.shape[-1]])

    def lerp_x(row):
        left = tf.gather(pixels, row + x0)
        return left + (tf.gather(pixels, row + x1) - left) * wx

    top = lerp_x(row0)
    images = top + (lerp_x(row1) - top) * wy
    nearest = tf.where(wy[..., 0] < 0.5, row0, row1) + tf.where(wx[..., 0] < 0.5, x0, x1)
    masks = tf.gather(tf.reshape(masks, [-1, masks.shape[-1]]), nearest)
    return images, masks


def _some(images: tf.Tensor, u: tf.Tensor, which: int, prob: float, transform) -> tf.Tensor:
    """transform(image (H, W, C), v (UNIFORMS,)) applied to each sample of images (B, H, W, C), B
    static, whose uniform u[i, which] < prob, one sample at a time; the others are left as they are
    and cost nothing. One op per sample: a convolution over the batch's samples side by side (as
    channels) rounded otherwise for other batch sizes, and a sample must be augmented alike
    whatever batch it lands in (a world-size-independent deterministic run)."""
    return tf.stack([tf.cond(v[which] < prob, lambda image=image, v=v: transform(image, v), lambda image=image: image)
                     for image, v in zip(tf.unstack(images), tf.unstack(u), strict=True)])


def _blur(images: tf.Tensor, u: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """A share blur_prob of the samples blurred by a Gaussian of a sigma drawn evenly in [blur / 2,
    blur] pixels, mirrored past the edges (a separable depthwise convolution). images (B, H, W, C)
    with B and C static."""
    r = blur_radius(cfg.blur)
    x = tf.range(-r, r + 1, dtype=tf.float32)

    def blurred(image, v):
        kernel = tf.exp(-0.5 * tf.square(x / (cfg.blur * (0.5 + 0.5 * v[_BLUR_SIGMA]))))
        kernel = tf.tile((kernel / tf.reduce_sum(kernel))[:, None, None], [1, image.shape[-1], 1])  # (2r + 1, C, 1)
        padded = tf.pad(image[None], [[0, 0], [r, r], [r, r], [0, 0]], mode="REFLECT")
        once = tf.nn.depthwise_conv2d(padded, kernel[:, None], [1, 1, 1, 1], "VALID")
        return tf.nn.depthwise_conv2d(once, kernel[None], [1, 1, 1, 1], "VALID")[0]

    return _some(images, u, _BLUR_P, cfg.blur_prob, blurred)


def _lowres(images: tf.Tensor, u: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """nnU-Net's low-resolution simulation: a share lowres_prob of the samples taken down to a
    share drawn evenly in [1 - lowres, 1] of their height and width by nearest neighbour, then back
    up bicubically (clipped to [0, 1]), as an image scanned more coarsely and interpolated.
    images (B, H, W, C) with B, H and W static."""
    h, w = images.shape[1], images.shape[2]

    def coarse(image, v):
        zoom = 1.0 - cfg.lowres * v[_LOWRES]
        small = tf.maximum(tf.cast(tf.round(tf.constant([h, w], tf.float32) * zoom), tf.int32), 1)
        down = tf.image.resize(image, small, method="nearest")
        return tf.clip_by_value(tf.image.resize(down, (h, w), method="bicubic"), 0.0, 1.0)

    return _some(images, u, _LOWRES_P, cfg.lowres_prob, coarse)


def _gamma(images: tf.Tensor, u: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """x ** g on a share gamma_prob of the samples, log g drawn evenly in +-log(1 + gamma) (as
    likely to darken as to brighten the mid-tones), the others g = 1; before it, on a share
    gamma_inverted_prob, the same of the inverted image, 1 - (1 - x) ** g with a g of its own (the
    bright tones stretched or squeezed instead), as nnU-Net does both. gamma_retain_stats: each
    sample given a gamma keeps every channel's mean and standard deviation over the image, as
    nnU-Net's do, clipped to [0, 1]. images (B, H, W, C) in [0, 1], B static where
    gamma_inverted_prob or gamma_retain_stats is set (`_some`: only the samples drawn are computed;
    at nnU-Net's shares, 0.1 and 0.3, keeping the statistics, 1.0-1.4 ms a 256x256x3 sample, where
    the whole batch through both and a select took 3.4)."""
    x = tf.clip_by_value(images, 0.0, 1.0)
    if cfg.gamma_inverted_prob > 0:
        x = _some(x, u, _GAMMA_INV_P, cfg.gamma_inverted_prob,
                  lambda image, v: _kept_stats(1.0 - _power(1.0 - image, _drawn_gamma(v[_GAMMA_INV], cfg)), image, cfg))
    if cfg.gamma_retain_stats:
        return _some(x, u, _GAMMA_P, cfg.gamma_prob,
                     lambda image, v: _kept_stats(_power(image, _drawn_gamma(v[_GAMMA], cfg)), image, cfg))
    g = tf.where(u[:, _GAMMA_P] < cfg.gamma_prob, _drawn_gamma(u[:, _GAMMA], cfg), 1.0)
    return _power(x, g[:, None, None, None])


def _drawn_gamma(v: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """Draws in [0, 1) -> g, log g evenly in +-log(1 + gamma)."""
    return tf.exp((2.0 * v - 1.0) * math.log1p(cfg.gamma))


def _power(x: tf.Tensor, g: tf.Tensor) -> tf.Tensor:
    """x ** g for x in [0, 1] (g broadcast against it) as exp(g log x): vectorised, 5-6x faster than
    tf.pow on this CPU (0 stays 0: log 0 = -inf)."""
    return tf.exp(g * tf.math.log(x))


def _kept_stats(y: tf.Tensor, x: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """One sample's y (H, W, C) moved to x's mean and standard deviation, each channel's over the
    image, then clipped to [0, 1] (gamma_retain_stats), else y."""
    if not cfg.gamma_retain_stats:
        return y
    mean, var = tf.nn.moments(x, axes=[0, 1])
    y_mean, y_var = tf.nn.moments(y, axes=[0, 1])
    return tf.clip_by_value((y - y_mean) * (tf.sqrt(var) / (tf.sqrt(y_var) + 1e-7)) + mean, 0.0, 1.0)


def _hue(images: tf.Tensor, u: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    hsv = tf.image.rgb_to_hsv(tf.clip_by_value(images, 0.0, 1.0))
    hue = tf.math.floormod(hsv[..., 0] + ((2.0 * u[:, _HUE] - 1.0) * cfg.hue)[:, None, None], 1.0)
    return tf.image.hsv_to_rgb(tf.stack([hue, hsv[..., 1], hsv[..., 2]], axis=-1))


def augment_batch(images: tf.Tensor, masks: tf.Tensor, u: tf.Tensor, normals: tf.Tensor,
                  cfg: AugmentConfig, distances: tf.Tensor | None = None) -> tuple[tf.Tensor, ...]:
    """Rotations, elastic deformation, blur, a coarser resolution, gamma and hue jitter of a batch
    (after `augment_sample`).

    Args:
      images: (B, H, W, C) float32 in [0, 1], H, W and C static (B too for blur and lowres); C == 3
        for hue.
      masks: (B, H, W, 1) uint8 class ids.
      u, normals: (B, UNIFORMS) and (B, g, g, 2), each sample's draws (`draw`, as given to `augment_sample`).
      cfg: which transforms are on; pixels from outside the image are mirrored.
      distances: (B, H, W, 1) float32 border distances (`augment_sample`'s), moved with the images
        (as the paper deformed its precomputed weight maps: a deformation's local stretch is not
        applied to them).
    Returns:
      images (B, H, W, C) float32 in [0, 1], masks (B, H, W, 1) uint8 (and distances (B, H, W, 1)).
    """
    h, w, c = images.shape[1], images.shape[2], images.shape[3]
    transforms = _rotation(u, h, w, cfg)
    elastic = cfg.elastic and cfg.elastic_sigma > 0
    # The distances move with the images as one more channel, where anything moves them.
    carried = distances is not None and (elastic or transforms is not None)
    if carried:
        images = tf.concat([images, distances], -1)
    if elastic:
        images, masks = _elastic(images, masks, normals, transforms, cfg)
    elif transforms is not None:
        images = _transform(images, transforms, "BILINEAR")
        masks = tf.cast(_transform(tf.cast(masks, tf.float32), transforms, "NEAREST"), tf.uint8)
    extra = () if distances is None else (distances,)
    if carried:
        images, extra = images[..., :c], (images[..., c:],)
    if cfg.blur > 0:
        images = _blur(images, u, cfg)
    if cfg.lowres > 0:
        images = _lowres(images, u, cfg)
    if cfg.gamma > 0:
        images = _gamma(images, u, cfg)
    if cfg.hue > 0:
        images = _hue(images, u, cfg)
    return (images, masks, *extra)


def augment(image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int], cfg: AugmentConfig,
            seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """One sample through both stages, as the pipeline does it. seed: (2,) int64."""
    u, normals = draw(tf.cast(seed, tf.int64), cfg)
    image, mask = augment_sample(image, mask, size, u, cfg)
    if not needs_batch_stage(cfg):
        return image, mask
    images, masks = augment_batch(image[None], mask[None], u[None], normals[None], cfg)
    return images[0], masks[0]
