"""Boundary distances of predicted masks: how far each class's outline lies from the truth's.

IoU and Dice count pixels, so they hardly see what matters where a mask is measured or drawn on: a
speck of a class far from its object, or an outline a few pixels off along its whole length, each
move a few hundred pixels of many thousands. The medical benchmarks (the Medical Segmentation
Decathlon, Metrics Reloaded's recommendations, MONAI's metrics) report boundary distances beside the
overlap, and `evaluate --images` does too, per image and class, in pixels:

- HD95: the 95th percentile of the distances from each outline pixel of the prediction to the
  truth's outline, and of the truth's to the prediction's, the larger of the two (MONAI's
  `compute_hausdorff_distance(percentile=95)`): the Hausdorff distance, less its 5% worst pixels.
- ASSD: the mean of all those distances, both ways (the average symmetric surface distance).
- NSD: the share of the outline pixels, both ways, within `tolerance` pixels of the other outline
  (Nikolov et al. 2021's normalised surface Dice): 1 where the outlines agree to the tolerance.

A class's outline is its pixels with a 4-neighbour outside the class (the mask less its binary
erosion, as MONAI's `get_mask_edges`), the image's edge counting as outside. The distances are
Euclidean, to the nearest pixel of the other outline (a k-d tree each way). Pixels left out of the
truth (IGNORE, convert --ignore-value) are left out of the prediction too, so an outline anywhere
in an ignored band (the Pet trimaps' border) is as good as the truth's. An image with a class in
one mask only has no distance for it (it counts as missed or spurious, and its NSD is 0); with the
class in neither it is not counted.
"""

from __future__ import annotations

import numpy as np

from unet_dist.data.convert import IGNORE

# Per image and class: truth has the class, prediction has it, HD95, ASSD, NSD (the distances 0
# unless both have it).
FIELDS = 5
TOLERANCE = 2.0  # NSD's default tolerance in pixels


def outline(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) -> bool (H, W): the pixels of `mask` with a 4-neighbour outside it or past the
    image's edge."""
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For two outlines' pixels a (n, 2) and b (m, 2) (row, column; neither empty): the Euclidean
    distance from each pixel of a to the nearest of b (n,) float64, and from each of b to the
    nearest of a (m,). k-d trees of the outlines' pixels, not distance transforms of the box: an
    outline is a small part of a large mask, and scipy's transform takes 33 bytes a pixel of the box
    at its peak (2.2 GB for one object across an 8192x8192 image). The distances are the same: the
    square root of an integer, in float64."""
    from scipy.spatial import KDTree

    return KDTree(b).query(a)[0], KDTree(a).query(b)[0]


def boundary_row(pred: np.ndarray, truth: np.ndarray, c: int, tolerance: float = TOLERANCE) -> np.ndarray:
    """(FIELDS,) float64 for class c of predicted class ids `pred` (H, W) against `truth` (H, W)
    (IGNORE: left out of both). The outlines are taken in the box around both masks' pixels of c,
    which changes none (every outline pixel is in it, and a pixel on its edge has a neighbour
    outside it that is of neither mask) and keeps a small object's cost small on a large image."""
    t = truth == c
    p = (pred == c) & (truth != IGNORE)
    has_t, has_p = bool(t.any()), bool(p.any())
    if not (has_t and has_p):
        return np.array([has_t, has_p, 0.0, 0.0, 0.0])
    rows, cols = np.flatnonzero((t | p).any(axis=1)), np.flatnonzero((t | p).any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    d_pt, d_tp = _distances(np.argwhere(outline(p[box])), np.argwhere(outline(t[box])))
    both = np.concatenate([d_pt, d_tp])
    hd95 = max(np.percentile(d_pt, 95), np.percentile(d_tp, 95))
    return np.array([1.0, 1.0, hd95, both.mean(), np.mean(both <= tolerance)])


def boundary_rows(pred: np.ndarray, truth: np.ndarray, num_classes: int, tolerance: float = TOLERANCE) -> np.ndarray:
    """(K, FIELDS) float64: `boundary_row` of each class but the background (row 0 zeros)."""
    out = np.zeros((num_classes, FIELDS))
    for c in range(1, num_classes):
        out[c] = boundary_row(pred, truth, c, tolerance)
    return out


def per_class(rows: np.ndarray) -> dict[str, list]:
    """One image's `boundary_rows` (K, FIELDS) -> {hd95_per_class, assd_per_class, nsd_per_class}:
    lists of K, None for the background and where the image has no such distance."""
    both = (rows[:, 0] > 0) & (rows[:, 1] > 0)
    either = (rows[:, 0] > 0) | (rows[:, 1] > 0)
    out = {}
    for name, field, counted in (("hd95", 2, both), ("assd", 3, both), ("nsd", 4, either)):
        out[f"{name}_per_class"] = [None] + [float(rows[c, field]) if counted[c] else None
                                             for c in range(1, len(rows))]
    return out


def boundary_scores(rows: np.ndarray, tolerance: float = TOLERANCE) -> list[dict]:
    """(N, K, FIELDS) `boundary_rows` of N images -> for each class but the background in any of
    them: the mean and median HD95 and the mean ASSD over the images with the class in both masks
    (None where none has), the mean NSD over those with it in either, and how many images had it
    in the truth alone (missed) and in the prediction alone (spurious). Each image weighs the same,
    as the benchmarks average these distances."""
    out = []
    for c in range(1, rows.shape[1]):
        t, p = rows[:, c, 0] > 0, rows[:, c, 1] > 0
        if not (t | p).any():
            continue
        both = rows[t & p, c]
        out.append({"class": c, "images": int((t & p).sum()), "hd95": _mean(both[:, 2]),
                    "hd95_median": float(np.median(both[:, 2])) if len(both) else None,
                    "assd": _mean(both[:, 3]), "nsd": _mean(rows[t | p, c, 4]), "nsd_tolerance": tolerance,
                    "missed": int((t & ~p).sum()), "spurious": int((p & ~t).sum())})
    return out


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


# `boundary_sums`: the (image, class) pairs with the class in both masks, their HD95s and ASSDs
# summed, the pairs with it in either, their NSDs summed.
SUMS = 5


def boundary_sums(rows: np.ndarray) -> np.ndarray:
    """One image's `boundary_rows` (K, FIELDS) -> (SUMS,) float64 over its classes but the
    background, to be summed over images and processes (`pooled_boundary`)."""
    fg = rows[1:]
    both, either = (fg[:, 0] > 0) & (fg[:, 1] > 0), (fg[:, 0] > 0) | (fg[:, 1] > 0)
    return np.array([both.sum(), fg[both, 2].sum(), fg[both, 3].sum(), either.sum(), fg[either, 4].sum()])


def pooled_boundary(sums: np.ndarray) -> dict:
    """`boundary_sums` summed over images -> {"hd95", "assd", "nsd"}: the means over every (image,
    class but the background) pair that has them (None where none has), the classes pooled as
    `objects.pooled` pools the objects' scores: what training's evaluation and evaluate --data log."""
    both, hd95, assd, either, nsd = sums
    return {"hd95": float(hd95 / both) if both else None, "assd": float(assd / both) if both else None,
            "nsd": float(nsd / either) if either else None}
