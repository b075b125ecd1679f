"""Paired image/mask augmentation on batches, in TensorFlow ops, driven by per-sample seeds.

Two stages, chosen by measurement (docs/benchmarks.md):
- per sample, `crop_resize`: zoom, random crop and flips are one `crop_and_resize` box from the
  decoded image straight to the network size (a flipped box gives a flipped crop), so a sample is
  resampled once, whatever its original size;
- per batch, `augment_batch`: rotations (`ImageProjectiveTransformV3`, the kernel behind Keras'
  preprocessing layers), elastic deformation and colour, where per-op overhead is amortised.

Every random draw of sample i comes from its own stateless seed, so a sample is augmented the same
way whatever the batch it lands in, the pipeline's parallelism or the number of workers, and a
resumed run sees exactly the samples it would have seen. Geometric transforms move image and mask
together; the mask is always resampled with nearest neighbour, so class ids stay class ids.
"""

from __future__ import annotations

import math

import tensorflow as tf

from unet_dist.config import AugmentConfig

# Uniform draws per sample, by use.
_FLIP_H, _FLIP_V, _ROT90, _ZOOM, _SHIFT_X, _SHIFT_Y, _ANGLE, _BRIGHT, _CONTRAST, _HUE = range(10)


def _to_unit(image: tf.Tensor, resampled: tf.Tensor) -> tf.Tensor:
    """Resampled pixels of a uint8 source are in [0, 255]: bring them to [0, 1]."""
    return resampled * (1.0 / 255.0) if image.dtype == tf.uint8 else resampled


def resize_pair(image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
    """image (H, W, 3) uint8 or float in [0, 1], mask (H, W, 1) uint8 -> image float32 in [0, 1] and
    mask uint8 at `size`; bilinear / nearest."""
    image = _to_unit(image, tf.image.resize(image, size, method="bilinear"))
    mask = tf.image.resize(mask, size, method="nearest")
    return image, mask


def draw(seed: tf.Tensor, cfg: AugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """One sample's random numbers from its (2,) seed: 10 uniforms and (g, g, 2) standard normals."""
    u_seed, n_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    u = tf.random.stateless_uniform([10], u_seed)
    n = tf.random.stateless_normal([cfg.elastic_grid, cfg.elastic_grid, 2], n_seed)
    return u, n


def crop_resize(image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int], u: tf.Tensor,
                cfg: AugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """Zoom, random crop and flips of one sample, resampled once to `size`.

    image (H, W, 3) uint8 or float32 in [0, 1], mask (H, W, 1) uint8, any H, W; u (10,) the sample's
    uniforms from `draw`. Zoom is in
    [max(1, scale_min), scale_max]: the (1 / zoom) window is placed at random inside the image.
    Returns image (h, w, 3) float32 in [0, 1] (bilinear), mask (h, w, 1) uint8 (nearest neighbour).
    """
    zoom = tf.constant(1.0)
    cy = cx = tf.constant(0.5)
    if cfg.scale_crop:
        zoom = tf.maximum(cfg.scale_min + u[_ZOOM] * (cfg.scale_max - cfg.scale_min), 1.0)
        room = (1.0 - 1.0 / zoom) / 2
        cy += (2.0 * u[_SHIFT_Y] - 1.0) * room
        cx += (2.0 * u[_SHIFT_X] - 1.0) * room
    half = 0.5 / zoom
    y1, y2, x1, x2 = cy - half, cy + half, cx - half, cx + half
    if cfg.flip:  # a box given bottom-to-top (right-to-left) samples a flipped crop
        fy, fx = u[_FLIP_V] < 0.5, u[_FLIP_H] < 0.5
        y1, y2 = tf.where(fy, y2, y1), tf.where(fy, y1, y2)
        x1, x2 = tf.where(fx, x2, x1), tf.where(fx, x1, x2)
    box = tf.stack([y1, x1, y2, x2])[None]
    image = _to_unit(image, tf.image.crop_and_resize(image[None], box, [0], size)[0])
    mask = tf.image.crop_and_resize(mask[None], box, [0], size, method="nearest")[0]
    return image, tf.cast(mask, tf.uint8)


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


def _elastic(images, masks, normals, cfg: AugmentConfig):
    """The 2015 paper's elastic deformation (section 3.1): displacements N(0, sigma) on a coarse
    grid x grid, upsampled bicubically to a smooth per-pixel field; bilinear for images, nearest
    for masks. images (B, H, W, 3), masks (B, H, W, 1), normals (B, g, g, 2)."""
    b, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
    field = tf.image.resize(normals * cfg.elastic_sigma, (h, w), method="bicubic")  # (B, H, W, 2)
    yy, xx = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32), indexing="ij")
    ys = _reflect(yy[None] + field[..., 0], h)  # (B, H, W)
    xs = _reflect(xx[None] + field[..., 1], w)
    bi = tf.broadcast_to(tf.range(b)[:, None, None], tf.shape(ys))

    def gather(y, x):
        return tf.gather_nd(images, tf.stack([bi, tf.cast(y, tf.int32), tf.cast(x, tf.int32)], axis=-1))

    y0, x0 = tf.floor(ys), tf.floor(xs)
    y1, x1 = tf.minimum(y0 + 1, h - 1), tf.minimum(x0 + 1, w - 1)
    wy, wx = (ys - y0)[..., None], (xs - x0)[..., None]
    top = gather(y0, x0) * (1 - wx) + gather(y0, x1) * wx
    bottom = gather(y1, x0) * (1 - wx) + gather(y1, x1) * wx
    images = top * (1 - wy) + bottom * wy
    nearest = tf.stack([bi, tf.cast(tf.round(ys), tf.int32), tf.cast(tf.round(xs), tf.int32)], axis=-1)
    masks = tf.gather_nd(masks, nearest)
    return images, masks


def _colour(images: tf.Tensor, u: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    if cfg.brightness > 0 or cfg.contrast > 0:
        # Contrast about each channel's mean, then a brightness shift, as one multiply-add:
        # (x - m) * f + m + d  ==  x * f + (m * (1 - f) + d).
        b = tf.shape(images)[0]
        delta = (2.0 * u[:, _BRIGHT] - 1.0) * cfg.brightness if cfg.brightness > 0 else tf.zeros([b])
        factor = 1.0 + (2.0 * u[:, _CONTRAST] - 1.0) * cfg.contrast if cfg.contrast > 0 else tf.ones([b])
        factor, delta = factor[:, None, None, None], delta[:, None, None, None]
        if cfg.contrast > 0:
            offset = tf.reduce_mean(images, axis=[1, 2], keepdims=True) * (1.0 - factor) + delta
        else:
            offset = delta
        images = images * factor + offset
    if cfg.hue > 0:
        hsv = tf.image.rgb_to_hsv(tf.clip_by_value(images, 0.0, 1.0))
        hue = tf.math.floormod(hsv[..., 0] + ((2.0 * u[:, _HUE] - 1.0) * cfg.hue)[:, None, None], 1.0)
        images = tf.image.hsv_to_rgb(tf.stack([hue, hsv[..., 1], hsv[..., 2]], axis=-1))
    return images


def augment_batch(images: tf.Tensor, masks: tf.Tensor, u: tf.Tensor, normals: tf.Tensor,
                  cfg: AugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """Rotations, elastic deformation and colour jitter of a batch (after `crop_resize`).

    Args:
      images: (B, H, W, 3) float32 in [0, 1], H and W static.
      masks: (B, H, W, 1) uint8 class ids.
      u, normals: (B, 10) and (B, g, g, 2), each sample's draws (`draw`, as given to `crop_resize`).
      cfg: which transforms are on; pixels from outside the image are mirrored.
    Returns:
      images (B, H, W, 3) float32 in [0, 1], masks (B, H, W, 1) uint8.
    """
    h, w = images.shape[1], images.shape[2]
    transforms = _rotation(u, h, w, cfg)
    if transforms is not None:
        images = _transform(images, transforms, "BILINEAR")
        masks = tf.cast(_transform(tf.cast(masks, tf.float32), transforms, "NEAREST"), tf.uint8)
    if cfg.elastic and cfg.elastic_sigma > 0:
        images, masks = _elastic(images, masks, normals, cfg)
    images = tf.clip_by_value(_colour(images, u, cfg), 0.0, 1.0)
    return images, masks


def augment(image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int], cfg: AugmentConfig,
            seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """One sample through both stages, as the pipeline does it. seed: (2,) int64."""
    u, normals = draw(tf.cast(seed, tf.int64), cfg)
    image, mask = crop_resize(image, mask, size, u, cfg)
    images, masks = augment_batch(image[None], mask[None], u[None], normals[None], cfg)
    return images[0], masks[0]
