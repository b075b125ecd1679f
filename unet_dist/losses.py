"""Segmentation losses, per example, so the step can average over the global batch.

Every loss takes y_true (B, h, w, 1) integer class ids, y_prob (B, h, w, U) float32 probabilities
(U = 1 sigmoid channel for binary, else num_classes softmax channels), an optional pixel weight
(B, h, w, 1), and returns (B,) float32: the loss of each example, averaged over its pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from unet_dist.config import TrainConfig

EPS = 1e-6
LossFn = Callable[[tf.Tensor, tf.Tensor, "tf.Tensor | None"], tf.Tensor]


def _one_hot(y_true: tf.Tensor, y_prob: tf.Tensor) -> tf.Tensor:
    """(B, h, w, 1) ids -> targets shaped like y_prob: (B, h, w, 1) {0,1} or (B, h, w, K) one-hot."""
    y = tf.cast(y_true[..., 0], tf.int32)
    if y_prob.shape[-1] == 1:
        return tf.cast(y, tf.float32)[..., None]
    return tf.one_hot(y, y_prob.shape[-1], dtype=tf.float32)


def pixel_cross_entropy(y_true, y_prob) -> tf.Tensor:
    """(B, h, w) cross-entropy of each pixel (binary or categorical, by the number of channels)."""
    if y_prob.shape[-1] == 1:
        return keras.losses.binary_crossentropy(tf.cast(y_true, tf.float32), y_prob)
    return keras.losses.sparse_categorical_crossentropy(y_true[..., 0], y_prob)


def cross_entropy(y_true, y_prob, weight=None) -> tf.Tensor:
    ce = pixel_cross_entropy(y_true, y_prob)  # (B, h, w)
    if weight is not None:
        ce = ce * weight[..., 0]
    return tf.reduce_mean(ce, axis=[1, 2])


def soft_dice(y_true, y_prob, weight=None) -> tf.Tensor:
    """1 - soft Dice per example, averaged over the foreground channel (binary) or all classes."""
    t = _one_hot(y_true, y_prob)
    inter = tf.reduce_sum(t * y_prob, axis=[1, 2])  # (B, U)
    denom = tf.reduce_sum(t + y_prob, axis=[1, 2])
    dice = (2.0 * inter + EPS) / (denom + EPS)
    return 1.0 - tf.reduce_mean(dice, axis=-1)


def focal(y_true, y_prob, weight=None, gamma: float = 2.0) -> tf.Tensor:
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_t)^gamma."""
    t = _one_hot(y_true, y_prob)
    if y_prob.shape[-1] == 1:
        fl = keras.losses.binary_focal_crossentropy(t, y_prob, gamma=gamma)
    else:
        fl = keras.losses.categorical_focal_crossentropy(t, y_prob, gamma=gamma, alpha=1.0)
    if weight is not None:
        fl = fl * weight[..., 0]
    return tf.reduce_mean(fl, axis=[1, 2])


def get_loss(cfg: TrainConfig) -> LossFn:
    """The configured per-example loss. 'weighted_ce' expects the pipeline's 2015 weight map."""
    if cfg.loss in ("bce", "cce"):
        return lambda y, p, w=None: cross_entropy(y, p)
    if cfg.loss == "weighted_ce":
        def weighted(y, p, w=None):
            if w is None:
                raise ValueError("loss weighted_ce needs the pipeline's weight map (batch['weight'])")
            return cross_entropy(y, p, w)
        return weighted
    if cfg.loss == "dice":
        return lambda y, p, w=None: soft_dice(y, p)
    if cfg.loss == "ce_dice":
        return lambda y, p, w=None: cross_entropy(y, p) + soft_dice(y, p)
    if cfg.loss == "focal":
        return lambda y, p, w=None: focal(y, p, gamma=cfg.focal_gamma)
    raise ValueError(f"unknown loss {cfg.loss!r}")
