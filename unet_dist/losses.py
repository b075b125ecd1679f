"""Segmentation losses, per example, so the step can average over the global batch.

Every loss takes y_true (B, h, w, 1) integer class ids, y_prob (B, h, w, U) float32 probabilities
(U = 1 sigmoid channel for binary, else num_classes softmax channels), an optional pixel weight
(B, h, w, 1), and returns (B,) float32: the loss of each example, averaged over its pixels.
With ignore=True (data converted with --ignore-value), pixels whose id is IGNORE count in no loss:
each example's loss is averaged over its labelled pixels (0 for an example with none).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from unet_dist.config import Config, ConfigError, TrainConfig
from unet_dist.data.convert import IGNORE
from unet_dist.data.pipeline import class_balance_weights

EPS = 1e-6
LossFn = Callable[[tf.Tensor, tf.Tensor, "tf.Tensor | None"], tf.Tensor]


def _one_hot(y_true: tf.Tensor, y_prob: tf.Tensor) -> tf.Tensor:
    """(B, h, w, 1) ids -> targets shaped like y_prob: (B, h, w, 1) {0,1} or (B, h, w, K) one-hot."""
    y = tf.cast(y_true[..., 0], tf.int32)
    if y_prob.shape[-1] == 1:
        return tf.cast(y, tf.float32)[..., None]
    return tf.one_hot(y, y_prob.shape[-1], dtype=tf.float32)


def labelled(y_true: tf.Tensor, ignore: bool) -> tuple[tf.Tensor, tf.Tensor | None]:
    """(y_true with IGNORE ids replaced by 0, (B, h, w) float32 1/0 for labelled pixels), or
    (y_true, None) when nothing is ignored."""
    if not ignore:
        return y_true, None
    valid = tf.not_equal(y_true, tf.cast(IGNORE, y_true.dtype))
    return tf.where(valid, y_true, tf.zeros_like(y_true)), tf.cast(valid[..., 0], tf.float32)


def pixel_mean(x: tf.Tensor, valid: tf.Tensor | None) -> tf.Tensor:
    """(B, h, w) -> (B,): the mean over each example's pixels, or over its labelled ones."""
    if valid is None:
        return tf.reduce_mean(x, axis=[1, 2])
    return tf.reduce_sum(x * valid, axis=[1, 2]) / tf.maximum(tf.reduce_sum(valid, axis=[1, 2]), 1.0)


def pixel_cross_entropy(y_true, y_prob) -> tf.Tensor:
    """(B, h, w) cross-entropy of each pixel (binary or categorical, by the number of channels)."""
    if y_prob.shape[-1] == 1:
        return keras.losses.binary_crossentropy(tf.cast(y_true, tf.float32), y_prob)
    return keras.losses.sparse_categorical_crossentropy(y_true[..., 0], y_prob)


def cross_entropy(y_true, y_prob, weight=None, ignore: bool = False) -> tf.Tensor:
    y_true, valid = labelled(y_true, ignore)
    ce = pixel_cross_entropy(y_true, y_prob)  # (B, h, w)
    if weight is not None:
        ce = ce * weight[..., 0]
    return pixel_mean(ce, valid)


def soft_dice(y_true, y_prob, weight=None, ignore: bool = False) -> tf.Tensor:
    """1 - soft Dice per example, averaged over the foreground channel (binary) or all classes."""
    y_true, valid = labelled(y_true, ignore)
    t = _one_hot(y_true, y_prob)
    if valid is not None:  # left-out pixels add to neither the overlap nor the sizes
        t, y_prob = t * valid[..., None], y_prob * valid[..., None]
    inter = tf.reduce_sum(t * y_prob, axis=[1, 2])  # (B, U)
    denom = tf.reduce_sum(t + y_prob, axis=[1, 2])
    dice = (2.0 * inter + EPS) / (denom + EPS)
    return 1.0 - tf.reduce_mean(dice, axis=-1)


def focal(y_true, y_prob, weight=None, gamma: float = 2.0, ignore: bool = False) -> tf.Tensor:
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_t)^gamma."""
    y_true, valid = labelled(y_true, ignore)
    t = _one_hot(y_true, y_prob)
    if y_prob.shape[-1] == 1:
        fl = keras.losses.binary_focal_crossentropy(t, y_prob, gamma=gamma)
    else:
        fl = keras.losses.categorical_focal_crossentropy(t, y_prob, gamma=gamma, alpha=1.0)
    if weight is not None:
        fl = fl * weight[..., 0]
    return pixel_mean(fl, valid)


def class_weights(cfg: TrainConfig, manifest: dict) -> np.ndarray | None:
    """train.class_weights for the data of `manifest`: (K,) float32, the weight of each class's
    pixels in the cross-entropy, or None (none). balanced: 1 / f_c, sqrt: 1 / sqrt(f_c), with f_c
    the share of class c among the training masks' labelled pixels (the manifest's
    class_pixel_fraction; balanced is scikit-learn's 'balanced' and the 2015 U-Net's w_c), scaled
    so that the mean pixel weight over the training masks is 1: the loss keeps its size, and the
    learning rate its meaning. A class with no training pixel gets 1 (no pixel uses it). A list:
    those weights. Raises ConfigError naming the key where the manifest has no fractions."""
    w = cfg.class_weights
    if w == "none":
        return None
    if isinstance(w, list):
        return np.asarray(w, np.float32)
    if len(manifest.get("class_pixel_fraction") or []) != manifest["num_classes"]:
        raise ConfigError(f"config key train.class_weights: {w} needs the training masks' class pixel fractions, "
                          "which the data's manifest.json lacks; convert it again, or give one weight a class")
    return class_balance_weights(manifest, 1.0 if w == "balanced" else 0.5)


def get_loss(cfg: TrainConfig, ignore: bool = False, class_w: np.ndarray | None = None) -> LossFn:
    """The configured per-example loss. 'weighted_ce' expects the pipeline's 2015 weight map.
    ignore: leave out pixels whose id is IGNORE (the manifest's ignore_value is set). class_w: (K,)
    weights of each class's pixels in the cross-entropy (`class_weights`; not for dice and
    weighted_ce, whose map weights the classes itself)."""
    def by_class(y):  # (B, h, w, 1) each pixel's class weight, or None
        if class_w is None:
            return None
        ids, _ = labelled(y, ignore)  # IGNORE ids read as 0; those pixels count in no loss anyway
        return tf.gather(tf.constant(class_w, tf.float32), tf.cast(ids, tf.int32))

    if cfg.loss in ("bce", "cce"):
        return lambda y, p, w=None: cross_entropy(y, p, by_class(y), ignore=ignore)
    if cfg.loss == "weighted_ce":
        def weighted(y, p, w=None):
            if w is None:
                raise ValueError("loss weighted_ce needs the pipeline's weight map (batch['weight'])")
            return cross_entropy(y, p, w, ignore=ignore)
        return weighted
    if cfg.loss == "dice":
        return lambda y, p, w=None: soft_dice(y, p, ignore=ignore)
    if cfg.loss == "ce_dice":
        return lambda y, p, w=None: cross_entropy(y, p, by_class(y), ignore=ignore) + soft_dice(y, p, ignore=ignore)
    if cfg.loss == "focal":
        return lambda y, p, w=None: focal(y, p, by_class(y), gamma=cfg.focal_gamma, ignore=ignore)
    raise ValueError(f"unknown loss {cfg.loss!r}")


def deep_supervised(loss_fn: LossFn, levels: list[int]) -> LossFn:
    """`loss_fn` over the model's outputs at decoder `levels` (`model.supervised_levels`): a list
    [(B, h, w, U), (B, h/2, w/2, U), ...] for levels [0, 1, ...], each against the mask (and weight
    map) taken at its resolution, the pixel at the centre of each 2^l x 2^l block (PyTorch's
    nearest-exact, as MONAI's deep-supervision loss resizes the labels), weighted 2^-l and the
    weights normalised to 1, as nnU-Net's. h and w must divide by 2^l. One level: `loss_fn` itself.
    """
    if levels == [0]:
        return loss_fn
    weights = [2.0**-level for level in levels]
    weights = [w / sum(weights) for w in weights]

    def at(x, level):
        s = 2**level
        return x if x is None or s == 1 else x[:, s // 2 :: s, s // 2 :: s]

    def supervised(y_true, outputs, weight=None):
        return tf.add_n([w * loss_fn(at(y_true, level), p, at(weight, level))
                         for w, level, p in zip(weights, levels, outputs, strict=True)])

    return supervised


def training_loss(cfg: Config, ignore: bool = False, class_w: np.ndarray | None = None) -> LossFn:
    """train.loss (`get_loss`) over the outputs model.deep_supervision gives the model, if any."""
    from unet_dist.model import supervised_levels

    return deep_supervised(get_loss(cfg.train, ignore, class_w), supervised_levels(cfg.model))
