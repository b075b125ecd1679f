"""Post-processing of predicted masks: small objects removed, only the largest object kept, objects
grown.

Three steps, any of them, each for chosen classes; the pixels the first two take become class 0,
the background, and components are 8-connected (pixels that touch at a corner are one, MONAI's
default), each page of a stack on its own:
- min-size:N removes each component of fewer than N pixels: the specks and fragments beside real
  objects, which cost object precision where a class has many objects (cells; Cellpose drops masks
  under 15 pixels, MONAI offers RemoveSmallObjects). It runs first.
- largest keeps only the largest component: where a class is one object an image (an organ in a CT
  slice, the pet of a pet photo), its pixels outside it are false positives. nnU-Net tests this on
  each class's validation predictions and keeps it where it helps; MONAI offers it as
  KeepLargestConnectedComponent.
- grow:N leaves the mask as it is and grows each remaining object by up to N pixels over the
  background, each background pixel to its nearest object (`objects.grown`), in the objects
  `predict --instances` numbers and `evaluate --images` scores: where cells touch (the 2015 U-Net's
  EM slices, cells that tile the image) a model trained to leave a gap between them predicts it a
  few pixels too wide, each cell short of its edge; where objects lie apart on a background, growing
  them only adds a ring. It runs last.
Whether any helps is the data's question, so `evaluate --images` measures each for every class
(`advice`, `size_advice`, `grow_advice`) and `predict --postprocess` applies them. They run on the
host (scipy), after the probabilities: --probabilities writes them as predicted, and the SavedModel
of `export` does not include them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from unet_dist.config import ConfigError
from unet_dist.data.convert import IGNORE
from unet_dist.objects import (
    FIELDS,
    components,
    count_row,
    grown_steps,
    matched_objects,
    object_scores,
    ratios,
)

# The min-size thresholds `evaluate --images` measures (`size_effect`): 2, 4, ... 4096 pixels.
SIZES = tuple(2**i for i in range(1, 13))
# The growths `evaluate --images` measures (`grow_effect`), and the most grow:N takes.
GROWS = (1, 2, 3, 4, 6, 8)
MAX_GROW = 64
USAGE = ("none, or largest[:C,...] (keep each class's largest object; every class but the background 0, or "
         "those), min-size:N[:C,...] (remove objects under N pixels), grow:N[:C,...] (grow the objects by N "
         "pixels over the background), or several joined by +")


@dataclass(frozen=True)
class Postprocess:
    """What --postprocess does to a mask: `small`'s components under `min_size` pixels removed,
    then `largest`'s cut to their largest component; and to its objects: `grown`'s grown by `grow`
    pixels (`grows`). False when it does nothing."""

    largest: tuple[int, ...] = ()
    min_size: int = 0
    small: tuple[int, ...] = ()
    grow: int = 0
    grown: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.largest or self.small or self.grown)

    def __str__(self) -> str:
        """The --postprocess value that gives this one, classes named: 'none', 'min-size:32:1+largest:2+grow:3:1'."""
        steps = ([f"min-size:{self.min_size}:{_listed(self.small)}"] * bool(self.small)
                 + [f"largest:{_listed(self.largest)}"] * bool(self.largest)
                 + [f"grow:{self.grow}:{_listed(self.grown)}"] * bool(self.grown))
        return "+".join(steps) or "none"

    def grows(self, num_classes: int) -> tuple[int, ...] | None:
        """For each class id 0..num_classes-1, the pixels its objects grow by (`objects.components`);
        None where none grows."""
        return tuple(self.grow * (c in self.grown) for c in range(num_classes)) if self.grown else None

    def __call__(self, mask: np.ndarray) -> np.ndarray:
        """`mask` (H, W) class ids post-processed: a copy where a step changes pixels (min-size,
        largest), else `mask` itself (grow alone shapes objects, not the mask)."""
        if self.small:
            mask = remove_small(mask, self.small, self.min_size)
        return keep_largest(mask, self.largest) if self.largest else mask


def _listed(classes: tuple[int, ...]) -> str:
    return ",".join(map(str, classes))


def parse(text: str, num_classes: int, name: str = "--postprocess") -> Postprocess:
    """--postprocess TEXT for a model of `num_classes` classes: 'none'; 'largest' (every class but
    the background 0) or 'largest:1,3' (those); 'min-size:N' or 'min-size:N:1,3'; 'grow:N' or
    'grow:N:1,3'; or several, each once, joined by '+' (they run in that order whatever the order
    given). ConfigError naming the value, and `name`, where it came from (the option, or a config key
    such as train.object_postprocess)."""
    if text == "none":
        return Postprocess()
    found: dict[str, tuple] = {}
    sizes = {"min-size": (2, None), "grow": (1, MAX_GROW)}  # the steps that take N: its least and most
    for step in text.split("+"):
        kind, colon, rest = step.partition(":")
        if kind not in ("largest", *sizes) or kind in found or (colon and not rest):
            raise ConfigError(f"{name} {text!r}: {USAGE}")
        size = None
        if kind in sizes:
            (low, high), (size, colon, rest) = sizes[kind], rest.partition(":")
            if not size.isdigit() or int(size) < low or (high and int(size) > high) or (colon and not rest):
                raise ConfigError(f"{name} {text!r}: {kind} takes a whole number of pixels from {low}"
                                  f"{f' to {high}' if high else ' up'} ({kind}:N or {kind}:N:C[,C...]), not {step!r}")
        found[kind] = (class_list(f"{name} {text!r}", rest, num_classes), size)
    largest, _ = found.get("largest", ((), None))
    small, size = found.get("min-size", ((), 0))
    grown, grow = found.get("grow", ((), 0))
    return Postprocess(largest, int(size), small, int(grow), grown)


def class_list(flag: str, listed: str, num_classes: int) -> tuple[int, ...]:
    """The classes `listed` names ('1,3'; sorted, once each), or every class but the background where
    it is empty, for a model of `num_classes` classes. ConfigError starting with `flag` (the option
    and its value) where an id is not a number or not one of classes 1..num_classes-1."""
    if not listed:
        return tuple(range(1, num_classes))
    try:
        classes = [int(c) for c in listed.split(",")]
    except ValueError:
        raise ConfigError(f"{flag}: {listed!r} is not a list of class ids such as 1,3") from None
    bad = [c for c in classes if not 1 <= c < num_classes]
    if bad:
        raise ConfigError(f"{flag}: class {bad[0]} is not one of this model's classes 1 to {num_classes - 1} "
                          "(0 is the background)")
    return tuple(sorted(set(classes)))


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


def remove_small(mask: np.ndarray, classes: tuple[int, ...], min_size: int) -> np.ndarray:
    """`mask` (H, W) class ids with each component of `classes` of fewer than `min_size` pixels
    given to class 0. A copy: the mask given is left as it is."""
    out = mask.copy()
    for c in classes:
        labels, n = components(mask, c)
        if n:
            small = np.bincount(labels.ravel()) < min_size
            small[0] = False
            out[small[labels]] = 0
    return out


def outside_largest_each(mask: np.ndarray, num_classes: int) -> list[np.ndarray | None]:
    """[None, `outside_largest(mask, 1)`, ..., `outside_largest(mask, K-1)`]: labelled once for
    `moved_by_truth` and `largest_outlines` of the same mask."""
    return [None, *(outside_largest(mask, c) for c in range(1, num_classes))]


def moved_by_truth(mask: np.ndarray, truth: np.ndarray, num_classes: int,
                   outside: list[np.ndarray | None] | None = None) -> np.ndarray:
    """(K, K) int64: row c, column t: the pixels `keep_largest(mask, (c,))` would move from class c
    to the background whose truth (H, W) is class t. Row 0 is zeros; truth IGNORE is not counted,
    as `metrics.confusion_matrix` does not count it. With `applied`, what post-processing any set
    of classes does to a confusion matrix: the classes' pixels are disjoint. outside: the mask's
    `outside_largest_each`, where the caller has it."""
    outside = outside or outside_largest_each(mask, num_classes)
    out = np.zeros((num_classes, num_classes), np.int64)
    for c in range(1, num_classes):
        t = truth[outside[c]]
        out[c] = np.bincount(t[t != IGNORE], minlength=num_classes)[:num_classes]
    return out


def largest_outlines(mask: np.ndarray, truth: np.ndarray, num_classes: int, tolerance: float,
                     outside: list[np.ndarray | None] | None = None) -> np.ndarray:
    """(2, K, surface.FIELDS): `surface.boundary_rows` of `mask` (H, W) against `truth` (H, W) as
    predicted (row 0) and with each class cut to its largest component alone (row 1): the
    outlines' side of `advice`, where a speck far from the object barely moves the IoU but sets
    the HD95 (the pet's largest component, nnU-Net's organ's). outside: as `moved_by_truth`'s."""
    from unet_dist.surface import FIELDS, boundary_row

    outside = outside or outside_largest_each(mask, num_classes)
    out = np.zeros((2, num_classes, FIELDS))
    for c in range(1, num_classes):
        out[0, c] = boundary_row(mask, truth, c, tolerance)
        cut = outside[c]
        out[1, c] = boundary_row(np.where(cut, 0, mask), truth, c, tolerance) if cut.any() else out[0, c]
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


def advice(cm: np.ndarray, moved: np.ndarray, outlines: np.ndarray | None = None) -> list[dict]:
    """For each class but the background that post-processing would change: its IoU as predicted and
    with only its largest component kept (`cm`, `moved`: over all images), and whether that helps:
    the test nnU-Net makes on its validation predictions. outlines: the images' `largest_outlines`
    (N, 2, K, FIELDS), for the mean HD95 of each both ways (hd95, hd95_largest_only; None where no
    image has the class in both masks)."""
    from unet_dist.metrics import scores
    from unet_dist.surface import boundary_scores

    before = scores(cm)["iou_per_class"]
    hd95 = None  # {class: mean HD95} as predicted, and with the largest component alone
    if outlines is not None:
        hd95 = [{row["class"]: row["hd95"] for row in boundary_scores(outlines[:, j])} for j in (0, 1)]
    out = []
    for c in range(1, cm.shape[0]):
        if moved[c].any():
            after = scores(applied(cm, moved, (c,)))["iou_per_class"][c]
            out.append({"class": c, "iou": before[c], "iou_largest_only": after,
                        **({"hd95": hd95[0].get(c), "hd95_largest_only": hd95[1].get(c)} if hd95 else {}),
                        # None after: class c was left only where the truth is ignored.
                        "helps": after is not None and after > before[c]})
    return out


def size_effect(pred: np.ndarray, truth: np.ndarray, num_classes: int, matched: list | None = None) -> np.ndarray:
    """(K, len(SIZES), 3 + K) float64: at [c, j], what removing class c's objects under SIZES[j]
    pixels from predicted class ids `pred` (H, W) takes from the object counts against `truth`
    (H, W) (`objects.object_counts`' predicted objects, matches and SEG's sum), then the pixels it
    moves to the background by their truth class (IGNORE not counted). Summed over images, with
    `size_advice`, what any min-size does, as `moved_by_truth` gives largest's effect. matched:
    `objects.matched_objects` of classes 1..K-1, where the caller has them already. Objects grown
    there (grow:N) are sized by, and give the background, their own class's pixels alone, as
    min-size removes them before they grow; that their neighbours would then grow into the room
    they leave is not counted, so with grow the F1 and SEG after a removal can be a little low
    (evaluate's `objects` scores the masks and objects predict writes, exactly)."""
    out = np.zeros((num_classes, len(SIZES), 3 + num_classes))
    t = truth.ravel()
    scored = t != IGNORE
    for c in range(1, num_classes):
        _, labels, counted, match_iou, seg = matched[c - 1] if matched else matched_objects(pred, truth, c)
        n = len(counted)
        if not n:
            continue
        lab = np.where(pred.ravel() == c, labels.ravel(), 0)  # the objects as the mask has them, not grown
        size = np.bincount(lab, minlength=n + 1)[1:]
        inside = (lab > 0) & scored
        by_truth = np.bincount(lab[inside].astype(np.int64) * num_classes + t[inside],
                               minlength=(n + 1) * num_classes).reshape(n + 1, num_classes)[1:]
        for j, limit in enumerate(SIZES):
            under = size < limit
            out[c, j] = [np.count_nonzero(counted & under), np.count_nonzero(match_iou[under]), seg[under].sum(),
                         *by_truth[under].sum(axis=0)]
    return out


def size_advice(cm: np.ndarray, objects: np.ndarray, effect: np.ndarray) -> list[dict]:
    """For each class but the background with a predicted object: its object F1, SEG and IoU as
    predicted and after removing its objects under each of SIZES pixels (`cm` (K, K) confusion
    matrix, `objects` (K, FIELDS) `object_counts` and `effect` `size_effect`, each summed over the
    images), the min-size of the highest object F1 (the smallest of equals), and whether that
    raises the F1. Removing objects cannot raise SEG (a true object's match can only go)."""
    from unet_dist.metrics import scores

    out = []
    for c in range(1, cm.shape[0]):
        if not objects[c, 1]:
            continue
        rows = []
        for j, limit in enumerate(SIZES):
            removed = effect[c, j]
            after = objects[c, :4] - np.array([0, *removed[:3]])
            moved = np.zeros(cm.shape)  # `moved_by_truth`'s layout: row c, what class c gives the background
            moved[c] = removed[3:]
            cut = applied(np.asarray(cm, np.float64), moved, (c,))
            kept = ratios(after)
            rows.append({"min_size": limit, "removed_objects": int(removed[0]), "object_f1": kept["f1"],
                         "seg": kept["seg"], "iou": scores(cut)["iou_per_class"][c]})
        before = ratios(objects[c])
        best = max(rows, key=lambda r: -1 if r["object_f1"] is None else r["object_f1"])
        out.append({"class": c, "object_f1": before["f1"], "seg": before["seg"],
                    "iou": scores(cm)["iou_per_class"][c], "by_min_size": rows, "best_min_size": best["min_size"],
                    "helps": best["object_f1"] is not None and before["f1"] is not None
                    and best["object_f1"] > before["f1"]})
    return out


def grow_effect(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                truth_ids: np.ndarray | None = None, pred_ids: np.ndarray | None = None) -> np.ndarray:
    """(1 + len(GROWS), K, FIELDS) float64: `objects.object_counts` of predicted class ids `pred`
    (H, W) against `truth` (H, W) with every class's objects as predicted, then grown by each of
    GROWS pixels (truth_ids: as for object_counts; pred_ids: class 1's predicted objects as a label
    image, in place of its components). Summed over images, `grow_advice`'s table.
    Each class's objects, true and predicted, are labelled once, and grown from one nearest-object
    search (`grown_steps`), one growth held at a time, over the background no lower class's took at
    that growth (as `objects.class_objects` grows them)."""
    out = np.zeros((1 + len(GROWS), num_classes, FIELDS))
    # The background lower classes' objects took at each of GROWS, where a higher class may grow.
    taken = np.zeros((len(GROWS), *pred.shape), bool) if num_classes > 2 else None
    for c in range(1, num_classes):
        labels, n = (pred_ids, int(pred_ids.max(initial=0))) if c == 1 and pred_ids is not None else components(pred, c)
        ids = truth_ids if c == 1 and truth_ids is not None else components(truth, c)[0]
        steps = grown_steps(labels, pred == 0, GROWS) if n else [labels] * len(GROWS)
        for j, objects in enumerate(itertools.chain([labels], steps)):
            if j and taken is not None:  # not free: every other pixel goes where it went
                objects = np.where(taken[j - 1], 0, objects)
                taken[j - 1] |= objects > 0
            out[j, c] = count_row(matched_objects(pred, truth, c, ids, objects=(objects, n)))
            del objects  # before the next growth is made
    return out


def grow_advice(effect: np.ndarray) -> list[dict]:
    """For each class but the background with a predicted object: its object F1, SEG, panoptic
    quality and mean AP (`objects.object_scores`) as predicted and with its objects grown by each
    of GROWS pixels (`effect`: `grow_effect` summed over the images), the growth of the highest SEG
    (the smallest of equals), and whether that raises it. Growing adds and removes no object, only
    pixels of them, so it is chosen by SEG (each true object's IoU with its match), the cell
    tracking challenge's measure of the objects' outlines."""
    out = []
    for c in range(1, effect.shape[1]):
        if not effect[0, c, 1]:  # no predicted object: none to grow
            continue
        rows = []
        for g, counts in zip((0, *GROWS), effect[:, c], strict=True):
            (scored,) = object_scores(np.stack([np.zeros_like(counts), counts]))  # as class 1 of 2
            rows.append({"grow": g, "object_f1": scored["f1"], "seg": scored["seg"],
                         "panoptic_quality": scored["panoptic_quality"], "mean_ap": scored["mean_ap"]})
        best = max(rows, key=lambda r: -1 if r["seg"] is None else r["seg"])
        out.append({"class": c, "by_grow": rows[1:], "object_f1": rows[0]["object_f1"], "seg": rows[0]["seg"],
                    "best_grow": best["grow"],
                    "helps": best["grow"] > 0 and best["seg"] is not None and best["seg"] > rows[0]["seg"]})
    return out
