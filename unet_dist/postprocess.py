"""Post-processing of predicted masks: only the largest connected component of chosen classes kept.

Where a class is one object an image (an organ in a CT slice, the pet of a pet photo), its pixels
outside the largest component are false positives; nnU-Net tests this on each class's validation
predictions and keeps it where it helps, MONAI offers it as KeepLargestConnectedComponent. Whether
it helps is the data's question, so `evaluate --images` measures it for every class (`advice`) and
`predict --postprocess` applies it. Pixels of class c outside its largest component become class 0,
the background; components are 8-connected (pixels that touch at a corner are one, MONAI's
default), each page of a stack on its own. It runs on the host (scipy), after the probabilities:
--probabilities writes them as predicted, and the SavedModel of `export` does not include it.
"""

from __future__ import annotations

import numpy as np

from unet_dist.config import ConfigError
from unet_dist.data.convert import IGNORE
from unet_dist.objects import components


def parse(text: str, num_classes: int) -> tuple[int, ...]:
    """--postprocess TEXT -> the classes to keep the largest component of, for a model of
    `num_classes` classes: 'none' -> (), 'largest' -> every class but the background (0),
    'largest:1,3' -> those. ConfigError naming the value."""
    if text == "none":
        return ()
    kind, _, listed = text.partition(":")
    if kind != "largest" or (_ and not listed):
        raise ConfigError(f"--postprocess {text!r}: none, largest (every class but the background 0), or "
                          "largest:C[,C...] (those classes)")
    if not listed:
        return tuple(range(1, num_classes))
    try:
        classes = [int(c) for c in listed.split(",")]
    except ValueError:
        raise ConfigError(f"--postprocess {text!r}: {listed!r} is not a list of class ids such as 1,3") from None
    bad = [c for c in classes if not 1 <= c < num_classes]
    if bad:
        raise ConfigError(f"--postprocess {text!r}: class {bad[0]} is not one of this model's classes 1 to "
                          f"{num_classes - 1} (0, the background, takes the removed pixels)")
    return tuple(sorted(set(classes)))


def describe(classes: tuple[int, ...]) -> str:
    """The --postprocess value that gives `classes` ('none', 'largest:1,3')."""
    return f"largest:{','.join(map(str, classes))}" if classes else "none"


def outside_largest(mask: np.ndarray, c: int) -> np.ndarray:
    """(H, W) bool: the pixels of class c in `mask` (H, W) class ids outside its largest 8-connected
    component (of equal ones, the first in raster order is kept)."""
    labels, n = components(mask, c)
    if n <= 1:
        return np.zeros(mask.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels > 0) & (labels != sizes.argmax())


def keep_largest(mask: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """`mask` (H, W) class ids with each of `classes` cut to its largest component; the rest of
    each goes to class 0. A copy: the mask given is left as it is."""
    out = mask.copy()
    for c in classes:
        out[outside_largest(mask, c)] = 0
    return out


def moved_by_truth(mask: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64: row c, column t: the pixels `keep_largest(mask, (c,))` would move from class c
    to the background whose truth (H, W) is class t. Row 0 is zeros; truth IGNORE is not counted,
    as `metrics.confusion_matrix` does not count it. With `applied`, what post-processing any set
    of classes does to a confusion matrix: the classes' pixels are disjoint."""
    out = np.zeros((num_classes, num_classes), np.int64)
    for c in range(1, num_classes):
        t = truth[outside_largest(mask, c)]
        out[c] = np.bincount(t[t != IGNORE], minlength=num_classes)[:num_classes]
    return out


def applied(cm: np.ndarray, moved: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """Confusion matrix `cm` (K, K; truth rows, prediction columns) of masks as predicted, made that
    of the same masks after `keep_largest(classes)`, from their `moved_by_truth` (summed alike):
    what class c loses goes from its column to the background's. Works on stacks (..., K, K)."""
    out = np.array(cm, copy=True)
    for c in classes:
        out[..., :, c] -= moved[..., c, :]
        out[..., :, 0] += moved[..., c, :]
    return out


def advice(cm: np.ndarray, moved: np.ndarray) -> list[dict]:
    """For each class but the background that post-processing would change: its IoU as predicted and
    with only its largest component kept (`cm`, `moved`: over all images), and whether that helps:
    the test nnU-Net makes on its validation predictions."""
    from unet_dist.metrics import scores

    before = scores(cm)["iou_per_class"]
    out = []
    for c in range(1, cm.shape[0]):
        if moved[c].any():
            after = scores(applied(cm, moved, (c,)))["iou_per_class"][c]
            out.append({"class": c, "iou": before[c], "iou_largest_only": after,
                        # None after: class c was left only where the truth is ignored.
                        "helps": after is not None and after > before[c]})
    return out
