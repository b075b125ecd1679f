"""The distances d1 + d2 behind the 2015 U-Net's border weights (Ronneberger et al., eq. 2), in
numpy and scipy.

No TensorFlow here: conversion's worker processes compute them into the records (`convert
--border-distances`), as the paper precomputed its weight maps, and the pipeline computes them per
batch from the augmented masks where the records have none. Either way the weights come from them
in one place, `pipeline.border_weights`.
"""

from __future__ import annotations

import numpy as np

from unet_dist.data.convert import IGNORE

# Records store d1 + d2 in steps of 1/4 pixel up to 255 steps (63.75 px), one byte a pixel: the
# border term w0 * exp(-s^2 / (2 sigma^2)) is below w0 * 1e-6 past 5.26 sigma, so the clip covers
# sigma up to 12 px at the records' scale (the paper's is 5). Its slope is at most
# w0 * 0.61 / sigma (at s = sigma), so rounding s to a quarter pixel moves it by at most
# w0 * 0.61 / (8 sigma): 0.15 at the paper's w0 = 10, sigma = 5.
STEPS_PER_PX = 4
MAX_STEP = 255


def reach(sigma: float) -> float:
    """The sum of distances d1 + d2 beyond which the border term is below w0 * 1e-6."""
    return float(sigma * np.sqrt(2 * np.log(1e6)))


def distance_sum(mask: np.ndarray, limit: float) -> np.ndarray:
    """d1 + d2 per pixel of class ids `mask` (H, W), exact where it is at most `limit`, else > limit.

    d1, d2: the distances to the nearest and second nearest foreground object (a connected
    component of class ids > 0; IGNORE, left-out pixels, is no object). inf where fewer than two
    objects are within reach. Returns (H, W) float64.
    """
    from scipy import ndimage

    labels, n = ndimage.label((mask > 0) & (mask != IGNORE))
    d1, d2 = np.full(mask.shape, np.inf), np.full(mask.shape, np.inf)  # the nearest two, per pixel
    if n < 2:
        return d1 + d2
    # Where d1 + d2 <= limit both objects are within `limit` of the pixel. So each object's
    # distances are needed only within `limit` of its bounding box: a distance transform of that
    # window, not of the whole image per object (300 cells in 572x572 at the paper's sigma: 57 ms
    # and a 17 MiB peak, against 2.6 s and 1.5 GiB).
    pad = int(np.ceil(limit))
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        window = tuple(slice(max(b.start - pad, 0), min(b.stop + pad, size))
                       for b, size in zip(box, mask.shape, strict=True))
        dk = ndimage.distance_transform_edt(labels[window] != k)  # exact: object k is inside
        near, second = d1[window], d2[window]  # views
        np.minimum(second, np.maximum(near, dk), out=second)
        np.minimum(near, dk, out=near)
    return d1 + d2


def stored_distances(mask: np.ndarray) -> np.ndarray:
    """What a record stores: d1 + d2 of class ids `mask` (H, W) in uint8 steps of 1 / STEPS_PER_PX
    pixel, clipped at MAX_STEP (no border term there at the sigmas the clip covers)."""
    s = distance_sum(mask, MAX_STEP / STEPS_PER_PX)
    return np.minimum(np.round(s * STEPS_PER_PX), MAX_STEP).astype(np.uint8)


def max_sigma(scale: float) -> float:
    """The largest train.weight_sigma the stored distances serve where the pipeline shrinks the
    records by `scale` (< 1: a record pixel covers less than a pixel of the network's input)."""
    return MAX_STEP / STEPS_PER_PX * scale / reach(1.0)


def batch_distance_sums(masks: np.ndarray, sigma: float) -> np.ndarray:
    """d1 + d2 of class ids `masks` (B, H, W, 1), exact as far as the border term of `sigma` reaches
    (beyond, > reach(sigma)). Returns (B, H, W, 1) float32, inf where fewer than two objects are near."""
    return np.stack([distance_sum(m[..., 0], reach(sigma)) for m in masks]).astype(np.float32)[..., None]
