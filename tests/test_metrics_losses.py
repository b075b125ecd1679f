import re

import numpy as np
import pytest
import tensorflow as tf

from unet_dist.config import TrainConfig
from unet_dist.data.border import batch_distance_sums
from unet_dist.losses import get_loss, soft_dice
from unet_dist.metrics import confusion_matrix, predict_classes, scores


def numpy_scores(t, p, k):
    ious, dices = [], []
    for c in range(k):
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        if tp + fp + fn == 0:
            ious.append(None)
            dices.append(None)
        else:
            ious.append(tp / (tp + fp + fn))
            dices.append(2 * tp / (2 * tp + fp + fn))
    present = [v for v in ious if v is not None]
    return ious, dices, float(np.mean(present)), float(np.mean(t == p))


@pytest.mark.parametrize("k, absent", [(2, None), (3, None), (4, 2), (5, 0)])
def test_confusion_matrix_scores_match_numpy(k, absent):
    rng = np.random.default_rng(k)
    t = rng.integers(0, k, (3, 16, 16, 1))
    p = rng.integers(0, k, (3, 16, 16))
    if absent is not None:  # a class in neither truth nor prediction: left out of the means
        t[t == absent] = (absent + 1) % k
        p[p == absent] = (absent + 1) % k
    cm = confusion_matrix(tf.constant(t), tf.constant(p, tf.int32), k).numpy()
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (t.ravel(), p.ravel()), 1)  # rows: truth, columns: prediction
    np.testing.assert_array_equal(cm, counts)
    assert cm.dtype == np.int64
    s = scores(cm)
    ious, dices, miou, acc = numpy_scores(t[..., 0], p, k)
    for a, b in zip(s["iou_per_class"], ious, strict=True):
        assert (a is None and b is None) or abs(a - b) < 1e-12
    for a, b in zip(s["dice_per_class"], dices, strict=True):
        assert (a is None and b is None) or abs(a - b) < 1e-12
    assert abs(s["iou"] - miou) < 1e-12 and abs(s["pixel_acc"] - acc) < 1e-12
    if absent is not None:
        assert s["iou_per_class"][absent] is None


def test_summed_confusion_matrices_equal_the_whole():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 3, (4, 8, 8, 1))
    p = rng.integers(0, 3, (4, 8, 8))
    whole = confusion_matrix(tf.constant(t), tf.constant(p, tf.int32), 3).numpy()
    halves = sum(confusion_matrix(tf.constant(t[i::2]), tf.constant(p[i::2], tf.int32), 3).numpy() for i in range(2))
    np.testing.assert_array_equal(whole, halves)


def test_mask_column_bug_of_the_seed_is_not_ours():
    # The seed's mean_iou read one image column; a column of background would score 1.0 there.
    t = np.zeros((1, 8, 8, 1), np.int64)
    t[0, 2:6, 2:6] = 1
    p = np.zeros((1, 8, 8), np.int32)  # predicts no foreground at all
    s = scores(confusion_matrix(tf.constant(t), tf.constant(p), 2).numpy())
    assert s["fg_iou"] == 0.0 and s["iou"] < 0.8


def test_predict_classes_binary_and_softmax():
    assert predict_classes(tf.constant([[[[0.2], [0.7]]]])).numpy().tolist() == [[[0, 1]]]
    assert predict_classes(tf.constant([[[[0.1, 0.6, 0.3]]]])).numpy().tolist() == [[[1]]]


@pytest.mark.parametrize("loss", ["bce", "cce", "dice", "ce_dice", "focal", "weighted_ce"])
@pytest.mark.parametrize("units", [1, 3])
def test_losses_are_per_example_and_lower_for_better_predictions(loss, units):
    if loss == "bce" and units == 3:
        return
    rng = np.random.default_rng(0)
    k = 2 if units == 1 else units
    y = rng.integers(0, k, (2, 8, 8, 1))
    good = np.eye(k)[y[..., 0]] * 0.9 + 0.1 / k
    bad = np.eye(k)[(y[..., 0] + 1) % k] * 0.9 + 0.1 / k
    if units == 1:
        good, bad = good[..., 1:], bad[..., 1:]
    w = np.ones((2, 8, 8, 1), np.float32) * 2
    fn = get_loss(TrainConfig(loss=loss))
    lg = fn(tf.constant(y), tf.constant(good, tf.float32), tf.constant(w)).numpy()
    lb = fn(tf.constant(y), tf.constant(bad, tf.float32), tf.constant(w)).numpy()
    assert lg.shape == (2,)
    assert (lg < lb).all()


def test_soft_dice_perfect_is_zero():
    y = tf.constant(np.array([[[[1], [0]], [[0], [1]]]]))
    assert abs(float(soft_dice(y, tf.cast(y, tf.float32))[0])) < 1e-5


def border_weight_map(m, class_w, w0, sigma):
    """The pipeline's weights of one mask (H, W, 1) whose distances are computed per sample: (H, W, 1)."""
    from unet_dist.data.pipeline import border_weights

    d = batch_distance_sums(m[None], sigma)
    return border_weights(tf.constant(m[None]), tf.constant(d), class_w, w0, sigma).numpy()[0]


def test_border_weight_map_peaks_between_touching_objects():
    m = np.zeros((20, 30, 1), np.uint8)
    m[5:15, 2:13] = 1
    m[5:15, 15:28] = 1  # a 2-pixel gap at columns 13-14
    w = border_weight_map(m, np.array([1.0, 1.0], np.float32), w0=10, sigma=5)[..., 0]
    gap = w[10, 13]
    assert gap > 8  # d1 + d2 = 3 px: close to 1 + w0
    assert w[10, 6] == 1.0  # inside an object: class weight only
    assert w[0, 29] < gap  # far corner: small border term
    single = border_weight_map(m[:, :13], np.array([1.0, 1.0], np.float32), 10, 5)
    assert np.all(single == 1.0)  # one object: no border term


def test_border_weight_map_of_many_cells_is_the_whole_image_definition():
    # Cells as in EM slices (Voronoi regions, 2-3 px background membranes between them). Each
    # object's distances come from a window around it; the definition takes every object's
    # distance transform over the whole image and the nearest two per pixel.
    from scipy import ndimage

    from unet_dist.data.convert import IGNORE

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:160, :200]
    seeds = rng.random((40, 2)) * [160, 200]
    d = np.sort(np.stack([np.hypot(yy - y, xx - x) for y, x in seeds]), 0)
    m = ((d[1] - d[0]) > 2.5).astype(np.uint8)[..., None]
    m[:8, :8] = IGNORE
    class_w = np.array([0.7, 1.8], np.float32)
    w = border_weight_map(m, class_w, w0=10, sigma=5)[..., 0]

    labels, n = ndimage.label(m[..., 0] == 1)
    assert n > 30
    dist = np.sort(np.stack([ndimage.distance_transform_edt(labels != k) for k in range(1, n + 1)]), 0)
    border = 10 * np.exp(-((dist[0] + dist[1]) ** 2) / (2 * 5**2)) * (m[..., 0] == 0)
    expected = class_w[np.minimum(m[..., 0], 1)] + border
    np.testing.assert_allclose(w, expected, rtol=0, atol=1e-5)
    assert border.max() > 8  # membranes between touching cells carry the border term


@pytest.mark.parametrize("loss", ["bce", "dice", "ce_dice", "focal", "weighted_ce"])
@pytest.mark.parametrize("units", [1, 3])
def test_ignored_pixels_count_in_no_loss_and_no_metric(loss, units):
    # Pixels converted with --ignore-value hold IGNORE: whatever is predicted there, the loss and the
    # confusion matrix are those of the labelled pixels alone; with none ignored, nothing changes.
    from unet_dist.data.convert import IGNORE

    if loss == "bce" and units == 3:
        loss = "cce"
    rng = np.random.default_rng(1)
    k = 2 if units == 1 else units
    y = rng.integers(0, k, (2, 8, 8, 1))
    left_out = rng.random((2, 8, 8, 1)) < 0.3
    y_ignored = np.where(left_out, IGNORE, y)

    def probs():
        p = rng.random((2, 8, 8, k)) + 0.05
        p = p / p.sum(-1, keepdims=True)
        return p[..., 1:] if units == 1 else p

    p = probs()
    p_elsewhere = np.where(left_out, probs(), p)  # other predictions at the left-out pixels only
    w = (1 + rng.random((2, 8, 8, 1))).astype(np.float32)
    fn, plain = get_loss(TrainConfig(loss=loss), ignore=True), get_loss(TrainConfig(loss=loss))
    a, b = (fn(tf.constant(y_ignored), tf.constant(q, tf.float32), tf.constant(w)).numpy() for q in (p, p_elsewhere))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert np.isfinite(a).all() and (a > 0).all()
    np.testing.assert_allclose(fn(tf.constant(y), tf.constant(p, tf.float32), tf.constant(w)).numpy(),
                               plain(tf.constant(y), tf.constant(p, tf.float32), tf.constant(w)).numpy(), rtol=1e-5)
    if loss in ("bce", "cce", "weighted_ce"):  # each example's mean over its labelled pixels
        probs_k = np.concatenate([1 - p, p], -1) if units == 1 else p
        ce = -np.log(np.take_along_axis(probs_k, y, -1))[..., 0] * (w[..., 0] if loss == "weighted_ce" else 1)
        keep = ~left_out[..., 0]
        np.testing.assert_allclose(a, [ce[i][keep[i]].mean() for i in range(2)], rtol=1e-4)
    pred = tf.constant(rng.integers(0, k, (2, 8, 8)), tf.int32)
    cm = confusion_matrix(tf.constant(y_ignored), pred, k, ignore=True).numpy()
    keep = ~left_out[..., 0]
    expect = confusion_matrix(tf.constant(y[..., 0][keep]), tf.boolean_mask(pred, keep), k).numpy()
    np.testing.assert_array_equal(cm, expect)
    assert cm.sum() == keep.sum()
    # An example whose every pixel is left out adds nothing (not NaN).
    everything = fn(tf.constant(np.full_like(y, IGNORE)), tf.constant(p, tf.float32), tf.constant(w)).numpy()
    assert np.isfinite(everything).all()


def test_ignored_pixels_are_no_object_in_the_border_weight_map():
    from unet_dist.data.convert import IGNORE

    m = np.zeros((20, 30, 1), np.uint8)
    m[5:15, 2:13] = 1
    m[5:15, 15:28] = IGNORE  # not a second object: no border term between them
    w = border_weight_map(m, np.array([1.0, 1.0], np.float32), w0=10, sigma=5)[..., 0]
    assert w[10, 13] == 1.0


def test_deep_supervised_loss_weighs_each_level_by_its_resolution():
    # Level l's output is scored against the mask's pixel at the centre of each 2^l block, weighted
    # 2^-l over the weights' sum (nnU-Net): 4/7, 2/7 and 1/7 for levels 0, 1 and 2.
    from unet_dist.losses import deep_supervised

    rng = np.random.default_rng(0)
    y = tf.constant(rng.integers(0, 2, (2, 8, 8, 1)), tf.uint8)
    w = tf.constant(rng.random((2, 8, 8, 1)), tf.float32)
    probs = [tf.constant(rng.uniform(0.05, 0.95, (2, 8 // 2**level, 8 // 2**level, 1)), tf.float32) for level in range(3)]
    base = get_loss(TrainConfig(loss="weighted_ce"))
    got = deep_supervised(base, [0, 1, 2])(y, probs, w)
    want = (4 * base(y, probs[0], w) + 2 * base(y[:, 1::2, 1::2], probs[1], w[:, 1::2, 1::2])
            + base(y[:, 2::4, 2::4], probs[2], w[:, 2::4, 2::4])) / 7
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)
    assert deep_supervised(base, [0]) is base


@pytest.mark.parametrize("loss", ["bce", "cce", "focal", "ce_dice"])
def test_class_weights_weight_each_labelled_pixel_of_the_cross_entropy_by_its_class(loss):
    from unet_dist.config import ConfigError, load_config
    from unet_dist.data.convert import IGNORE
    from unet_dist.data.pipeline import class_balance_weights
    from unet_dist.losses import class_weights, focal

    k = 2 if loss in ("bce", "ce_dice") else 3
    frac = [0.9, 0.1] if k == 2 else [0.8, 0.2, 0.0]
    manifest = {"num_classes": k, "class_pixel_fraction": frac}
    balanced = class_weights(TrainConfig(class_weights="balanced"), manifest)
    sqrt = class_weights(TrainConfig(class_weights="sqrt"), manifest)
    # 1/f and 1/sqrt(f), scaled to a mean pixel weight of 1 over the training masks; an unseen class 1.
    want = ([1 / 1.8, 5.0], [0.9**-0.5, 0.1**-0.5]) if k == 2 else ([0.625, 2.5, 1.0], [0.8**-0.5, 0.2**-0.5, 1.0])
    np.testing.assert_allclose(balanced, want[0], rtol=1e-6)
    np.testing.assert_allclose(sqrt[:2] / sqrt[0], np.array(want[1][:2]) / want[1][0], rtol=1e-6)
    assert np.dot(frac, balanced) == pytest.approx(1) and np.dot(frac, sqrt) == pytest.approx(1)
    assert class_weights(TrainConfig(), manifest) is None
    # weighted_ce's w_c (the 2015 map's) is balanced's: an unseen class no longer turns it off.
    np.testing.assert_allclose(class_balance_weights(manifest), balanced, rtol=1e-6)
    rng = np.random.default_rng(1)
    y = rng.integers(0, k, (2, 8, 8, 1)).astype(np.uint8)
    y[0, :2] = IGNORE  # left out: in no loss, whatever its weight would be
    p = rng.random((2, 8, 8, k)) + 0.05
    p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
    p = p[..., 1:] if k == 2 else p
    cw = np.array([0.5, 3.0, 7.0][:k], np.float32)
    got = get_loss(TrainConfig(loss=loss), ignore=True, class_w=cw)(tf.constant(y), tf.constant(p))
    ids = np.where(y == IGNORE, 0, y)
    per_pixel = tf.constant(cw[ids])
    plain = get_loss(TrainConfig(loss=loss), ignore=True)
    if loss == "focal":
        want_loss = focal(tf.constant(y), tf.constant(p), per_pixel, ignore=True)
    else:  # weighted cross-entropy by hand, over the labelled pixels; ce_dice's dice unweighted
        probs_k = np.concatenate([1 - p, p], -1) if k == 2 else p
        ce = -np.log(np.take_along_axis(probs_k, ids.astype(np.int64), -1))[..., 0] * cw[ids][..., 0]
        keep = y[..., 0] != IGNORE
        want_loss = np.array([ce[i][keep[i]].mean() for i in range(2)])
        if loss == "ce_dice":
            want_loss = want_loss + soft_dice(tf.constant(y), tf.constant(p), ignore=True).numpy()
    np.testing.assert_allclose(got.numpy(), np.asarray(want_loss), rtol=1e-5)
    assert not np.allclose(got.numpy(), plain(tf.constant(y), tf.constant(p)).numpy(), rtol=1e-3)
    # Refused in one line naming the key: a loss without a cross-entropy to weight, the wrong
    # number of weights, fractions the data does not have.
    for bad, message in ((["train.loss=dice", "train.class_weights=balanced"], "none with train.loss dice"),
                         (["train.class_weights=[1, 2, 3]"], "none, balanced, sqrt, or 2 weights >= 0"),
                         (["train.class_weights=[0, 0]"], "not all 0")):
        with pytest.raises(ConfigError, match=f"train.class_weights.*{re.escape(message)}"):
            load_config(None, bad)
    with pytest.raises(ConfigError, match="train.class_weights: balanced needs the training masks' class pixel"):
        class_weights(TrainConfig(class_weights="balanced"), {"num_classes": 2})
