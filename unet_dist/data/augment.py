"""Paired image/mask augmentation in TensorFlow ops, driven by stateless seeds.

Every random draw comes from a per-element seed, so an element is augmented the same way whatever
the pipeline's parallelism, and a resumed run sees exactly the samples it would have seen.
Geometric transforms move image and mask together; the mask is always resampled with nearest
neighbour so class ids stay class ids.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from unet_dist.config import AugmentConfig


def resize_pair(image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int]) -> tuple[tf.Tensor, tf.Tensor]:
    """image (H, W, 3) float, mask (H, W, 1) uint8 -> the same at `size`; bilinear / nearest."""
    image = tf.image.resize(image, size, method="bilinear")
    mask = tf.image.resize(mask, size, method="nearest")
    return image, mask


def _scale_crop(image, mask, size, cfg: AugmentConfig, seed):
    """Zooms by a random factor over the scale that covers `size`, then takes a random crop of `size`."""
    s_seed, c_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    cover = tf.maximum(size[0] / h, size[1] / w)
    zoom = tf.random.stateless_uniform([], s_seed, cfg.scale_min, cfg.scale_max)
    scale = cover * tf.maximum(zoom, 1.0)  # zooms below 1 would leave the crop uncovered
    new = tf.maximum(tf.cast(tf.math.ceil(tf.stack([h, w]) * scale), tf.int32), tf.constant(size))
    image, mask = resize_pair(image, mask, new)
    stack = tf.concat([image, tf.cast(mask, tf.float32)], axis=-1)  # (H', W', 4): one crop for both
    stack = tf.image.stateless_random_crop(stack, [size[0], size[1], 4], c_seed)
    return stack[..., :3], tf.cast(tf.round(stack[..., 3:]), tf.uint8)


def _warp(image, mask, cfg: AugmentConfig, seed):
    """A small rotation and the 2015 paper's elastic deformation as one sampling of both tensors.

    Elastic: displacements drawn N(0, sigma) on a coarse grid x grid, upsampled bicubically to a
    smooth per-pixel field (Ronneberger et al. 2015, section 3.1).
    """
    r_seed, e_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    yy, xx = tf.meshgrid(tf.range(hf), tf.range(wf), indexing="ij")  # (H, W) each
    cy, cx = (hf - 1) / 2, (wf - 1) / 2
    src_y, src_x = yy, xx
    if cfg.rotate_degrees > 0:
        limit = cfg.rotate_degrees * math.pi / 180
        a = tf.random.stateless_uniform([], r_seed, -limit, limit)
        dy, dx = yy - cy, xx - cx
        src_y = cy + tf.cos(a) * dy - tf.sin(a) * dx
        src_x = cx + tf.sin(a) * dy + tf.cos(a) * dx
    if cfg.elastic and cfg.elastic_sigma > 0:
        coarse = tf.random.stateless_normal([1, cfg.elastic_grid, cfg.elastic_grid, 2], e_seed) * cfg.elastic_sigma
        field = tf.image.resize(coarse, tf.stack([h, w]), method="bicubic")[0]  # (H, W, 2)
        src_y = src_y + field[..., 0]
        src_x = src_x + field[..., 1]

    def sample(t, order):
        c = tf.shape(t)[2]
        ch = tf.broadcast_to(tf.range(tf.cast(c, tf.float32))[None, None, :], tf.shape(t))
        coords = [tf.broadcast_to(src_y[..., None], tf.shape(t)), tf.broadcast_to(src_x[..., None], tf.shape(t)), ch]
        return keras.ops.image.map_coordinates(t, coords, order=order, fill_mode="reflect")

    image = sample(image, 1)
    mask = tf.cast(sample(tf.cast(mask, tf.float32), 0), tf.uint8)
    return image, mask


def augment(image: tf.Tensor, mask: tf.Tensor, size: tuple[int, int], cfg: AugmentConfig,
            seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Random paired augmentation to a fixed `size`.

    Args:
      image: (H, W, 3) float32 in [0, 1], any H, W.
      mask: (H, W, 1) uint8 class ids.
      size: (h, w) of the outputs.
      cfg: which transforms are on.
      seed: int32 (2,) stateless seed for this element.
    Returns:
      image (h, w, 3) float32 in [0, 1], mask (h, w, 1) uint8.
    """
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 8))
    if cfg.scale_crop:
        image, mask = _scale_crop(image, mask, size, cfg, seeds[0])
    else:
        image, mask = resize_pair(image, mask, size)
    if cfg.flip:
        flips = tf.random.stateless_uniform([2], seeds[1]) < 0.5
        image = tf.cond(flips[0], lambda: tf.reverse(image, [1]), lambda: image)
        mask = tf.cond(flips[0], lambda: tf.reverse(mask, [1]), lambda: mask)
        image = tf.cond(flips[1], lambda: tf.reverse(image, [0]), lambda: image)
        mask = tf.cond(flips[1], lambda: tf.reverse(mask, [0]), lambda: mask)
    if cfg.rot90:
        k = tf.random.stateless_uniform([], seeds[2], 0, 4, dtype=tf.int32)
        image, mask = tf.image.rot90(image, k), tf.image.rot90(mask, k)
    if cfg.rotate_degrees > 0 or cfg.elastic:
        image, mask = _warp(image, mask, cfg, seeds[3])
    if cfg.brightness > 0:
        image = tf.image.stateless_random_brightness(image, cfg.brightness, seeds[4])
    if cfg.contrast > 0:
        image = tf.image.stateless_random_contrast(image, 1 - cfg.contrast, 1 + cfg.contrast, seeds[5])
    if cfg.hue > 0:
        image = tf.image.stateless_random_hue(image, cfg.hue, seeds[6])
    image = tf.clip_by_value(image, 0.0, 1.0)
    image = tf.ensure_shape(image, [size[0], size[1], 3])
    mask = tf.ensure_shape(mask, [size[0], size[1], 1])
    return image, mask
