"""Object-level scores of predicted masks: each class's connected components matched to the truth's.

Pixel IoU cannot tell whether touching objects came out apart: two cells merged into one blob
lose a membrane's few pixels. The 2015 U-Net's border weights (train.loss weighted_ce) are there to
part them, so `evaluate --images` also counts objects: the connected components of each class but
the background in the truth and in the prediction, a predicted object matching a true one where
their IoU is above 0.5 (then the match is unique, as in the Data Science Bowl 2018's measure). From
the counts, summed over images and processes: precision, recall and F1 of the objects, and the cell
tracking challenge's SEG: the mean over true objects of their IoU with the predicted object that
covers more than half of them (0 where none does). SEG's match is looser than the F1's: a blob of
two merged cells covers more than half of each, and each scores its IoU with it (below 0.5) where
the F1 counts two misses. Stricter matches (IoU above 0.55 ... 0.95) give the cell benchmarks'
average precision and the panoptic quality (`object_scores`). Components are 8-connected, as
`postprocess` takes them, grown over the background where `--postprocess grow:N` says (`grown`),
and each page of a stack is counted alone (a cell cut by two slices is two objects).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from unet_dist.data.convert import IGNORE

EIGHT_CONNECTED = np.ones((3, 3), bool)
MATCH_IOU = 0.5
# The IoUs above which `object_scores` also counts matches (by_iou): 0.5, 0.55, ... 0.95, the Data
# Science Bowl 2018's and StarDist's; Cellpose reports 0.5, 0.75 and 0.9 of them. Above 0.5 each
# object is in one pair at most, so the pairs of the 0.5 match are all there is to count.
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
# Per image and class: true objects, predicted objects, matched pairs (IoU > 0.5), SEG's sum (the
# IoUs of the true objects with the predicted ones that cover more than half of them), the matched
# pairs' IoUs summed (panoptic quality's), and the pairs matched at each of THRESHOLDS[1:].
FIELDS = 5 + len(THRESHOLDS) - 1
AT_THRESHOLDS = [2, *range(5, FIELDS)]  # the fields of the matches above each of THRESHOLDS
SEG_COVER = 0.5  # of a true object's pixels, that its SEG match covers


def components(mask: np.ndarray, c: int) -> tuple[np.ndarray, int]:
    """(int32 labels (H, W): 0 outside class c's objects, 1..n its 8-connected components in raster
    order, n)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask == c, structure=EIGHT_CONNECTED)
    return labels, int(n)


def grown(labels: np.ndarray, free: np.ndarray, by: float) -> np.ndarray:
    """Object labels (H, W) (0 none) with each object grown by up to `by` pixels (Euclidean) over the
    `free` pixels (bool (H, W)): each free pixel within `by` of an object goes to the nearest one
    (of equally near ones, either), as scikit-image's expand_labels grows them. A model that leaves
    the background between touching cells a few pixels too wide predicts each cell short of its
    edge (`--postprocess grow:N`, measured by `evaluate --images`)."""
    return next(grown_steps(labels, free, (by,)))


def grown_steps(labels: np.ndarray, free: np.ndarray, steps) -> Iterator[np.ndarray]:
    """`grown(labels, free, by)` for each `by` of `steps`, from one nearest-object search
    (`nearest_objects`), each (H, W) int32 made as it is asked for."""
    reach = int(np.ceil(max(steps, default=0)))
    near, d2 = nearest_objects(labels, free, reach)
    for by in steps:
        yield np.where(d2 <= by * by, near, 0).astype(labels.dtype, copy=False)


# Pixels of the strips `nearest_objects` searches one at a time: beyond its results, its memory is
# about 25 bytes a pixel of a strip (100 MiB), whatever the image's size.
STRIP_PIXELS = 2**22


def nearest_objects(labels: np.ndarray, free: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """For object labels (H, W) (0 none) and the pixels they may grow over (`free`, bool (H, W)):
    (the label of the nearest object (H, W), its squared Euclidean distance (H, W), unsigned), at
    each object pixel its own label and 0, at each free background pixel within `reach` pixels of
    an object the nearest one's (of equally near ones, either) and its distance, elsewhere a
    distance above reach**2. The distance transform (scipy's, 33 bytes a pixel at its peak) runs
    on strips of rows with `reach` rows above and below, so that beyond its two results (5 bytes a
    pixel) an 8192x8192 image needs no more than a 2048x2048 one. Exact, since an object within
    `reach` of a pixel lies within `reach` rows of it, and equal ties go the same way (a test checks
    it against the whole image's transform)."""
    from scipy import ndimage

    far = reach * reach + 1
    d2 = np.full(labels.shape, far, np.uint8 if far < 2**8 else np.uint16 if far < 2**16 else np.uint32)
    d2[labels > 0] = 0
    near = labels.copy()
    height, width = labels.shape
    rows = max(1, STRIP_PIXELS // max(width, 1))
    for r0 in range(0, height if reach > 0 else 0, rows):
        r1 = min(height, r0 + rows)
        a, b = max(0, r0 - reach), min(height, r1 + reach)
        open_ = free[r0:r1] & (labels[r0:r1] == 0)
        if not open_.any() or not labels[a:b].any():
            continue
        part = labels[a:b]
        fi, fj = ndimage.distance_transform_edt(part == 0, return_distances=False, return_indices=True)[:, r0 - a:r1 - a]
        # Offsets clipped past reach before squaring: exact where it matters, and no int32
        # overflow on an image 50,000 pixels wide.
        di = np.minimum(np.abs(fi - np.arange(r0 - a, r1 - a, dtype=fi.dtype)[:, None]), reach + 1)
        dj = np.minimum(np.abs(fj - np.arange(width, dtype=fj.dtype)), reach + 1)
        dist2 = di * di + dj * dj
        reached = open_ & (dist2 <= reach * reach)
        d2[r0:r1][reached] = dist2[reached]
        near[r0:r1][reached] = part[fi[reached], fj[reached]]
    return near, d2


def class_objects(classes: np.ndarray, which=None, grows: tuple[int, ...] | None = None
                  ) -> dict[int, tuple[np.ndarray, int]]:
    """{class id: (its objects' labels (H, W) as `components` numbers them, n)} for each class of
    `which` (default: every class but the background 0 present in `classes` (H, W)), in class order,
    each class's objects grown by grows[c] pixels (`grown`) over the background that no lower
    class's took: the objects `instances` numbers, and so those `object_counts` and `evaluate
    --images` score, and training's evaluations with train.object_postprocess. A lower class that
    grows takes its background whether `which` names it or not, so that a class's objects are the
    same however many classes are numbered (predict --instance-classes against evaluate)."""
    present = [int(c) for c in np.unique(classes[classes > 0])]
    wanted = present if which is None else sorted(int(c) for c in which)
    out, free = {}, None  # free: the background no lower class's objects grew over
    for c in sorted(set(wanted) | {c for c in present if grows and grows[c] and c < max(wanted, default=0)}):
        labels, n = components(classes, c)
        if grows and grows[c] and n:
            labels = grown(labels, classes == 0 if free is None else free, grows[c])
            free = (classes == 0 if free is None else free) & (labels == 0)
        if c in wanted:
            out[c] = labels, n
    return out


def instances(classes: np.ndarray, which: tuple[int, ...] | None = None,
              grows: tuple[int, ...] | None = None) -> np.ndarray:
    """Class ids (H, W) -> instance labels (H, W), `predict --instances`: 0 on the background (class
    0), and each 8-connected component of every other class (or of the classes `which` names, 0
    elsewhere) numbered from 1, the lowest class's first, each class's in raster order (as
    `components` finds them). grows: for each class id, the pixels its objects grow by over the
    background that no lower class's took (`class_objects`). uint16, or int32 past 65,535 objects
    (what a 16-bit TIFF holds: the cell tracking challenge's format). An instance's class is the
    mask's at any of its pixels but those it grew over."""
    out, total = np.zeros(classes.shape, np.int32), 0
    for labels, n in class_objects(classes, which, grows).values():
        inside = labels > 0
        out[inside] = labels[inside] + total
        total += n
    return out.astype(np.uint16) if total <= np.iinfo(np.uint16).max else out


# The columns of `measured`, predict --instances' STEM_objects.csv.
MEASURES = ("label", "class", "area", "centroid_y", "centroid_x", "top", "left", "bottom", "right",
            "mean_probability")


def measured(labels: np.ndarray, classes: np.ndarray, probs: np.ndarray | None = None) -> list[tuple]:
    """Each object of an instance label image `labels` (H, W) (0 none, else 1..n, as `instances`
    numbers them) measured, a tuple of MEASURES per label present, in label order: its class (the
    mask `classes` (H, W) has it at every pixel of the object but those it grew over, which are
    background), its area in pixels, its centroid (the mean row and column of its pixels), its
    bounding box (rows top to bottom - 1, columns left to right - 1, as numpy slices take them),
    and the mean over the pixels the mask gives it of the probability of its class (a confidence,
    as Cellpose and StarDist give each object one; None without probs (H, W, U): U = 1, a sigmoid's
    foreground, or one per class). For counting cells and their sizes without reading the labels."""
    from scipy import ndimage

    n = int(labels.max(initial=0))
    if not n:
        return []
    # Per label, summed over strips of rows (a few MiB of temporaries where scipy's center_of_mass
    # and maximum take 8 bytes a pixel each, and 3.5 s for 18,000 objects on 8192x8192): its
    # pixels, their rows and columns, and of the pixels the mask gives it (classes > 0) how many,
    # their classes, and the probabilities of their class.
    height, width = labels.shape
    sums = np.zeros((6, n + 1))
    step = max(1, PAIR_CHUNK // max(width, 1))
    columns = np.arange(width, dtype=np.float64)
    for r0 in range(0, height, step):
        flat, kinds = labels[r0 : r0 + step].ravel(), classes[r0 : r0 + step].ravel()
        rows = len(flat) // width
        core = kinds > 0
        sums[0] += np.bincount(flat, minlength=n + 1)
        sums[1] += np.bincount(flat, weights=np.repeat(np.arange(r0, r0 + rows, dtype=np.float64), width), minlength=n + 1)
        sums[2] += np.bincount(flat, weights=np.tile(columns, rows), minlength=n + 1)
        sums[3] += np.bincount(flat, weights=core, minlength=n + 1)
        sums[4] += np.bincount(flat, weights=kinds, minlength=n + 1)
        if probs is not None:
            part = probs[r0 : r0 + step]
            own = part[..., 0] if part.shape[-1] == 1 else np.take_along_axis(part, kinds.reshape(rows, width, 1), -1)
            sums[5] += np.bincount(flat[core], weights=own.ravel()[core], minlength=n + 1)
    area, row_sum, column_sum, pixels, kind_sum, prob_sum = sums
    index = np.flatnonzero(area[1:]) + 1  # the labels present
    # Each object has one class at each pixel the mask gives it (a component of that class), at
    # least one such pixel, and background at those it grew over: so the mean is that class.
    given = np.maximum(pixels[index], 1)  # (0 class and mean where the mask gives it none)
    kind = np.rint(kind_sum[index] / given).astype(int)
    boxes = ndimage.find_objects(labels, max_label=n)
    mean = [None] * len(index) if probs is None else prob_sum[index] / given
    return [(int(i), int(c), int(area[i]), float(row_sum[i] / area[i]), float(column_sum[i] / area[i]),
             boxes[i - 1][0].start, boxes[i - 1][1].start, boxes[i - 1][0].stop, boxes[i - 1][1].stop,
             None if m is None else float(m))
            for i, c, m in zip(index, kind, mean, strict=True)]


def matched_objects(pred: np.ndarray, truth: np.ndarray, c: int, truth_ids: np.ndarray | None = None,
                    objects: tuple[np.ndarray, int] | None = None
                    ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class c's objects in predicted class ids `pred` (H, W) (`components`, or `objects`), matched
    to those of `truth` (H, W) (the truth's are never grown):
    (the true objects, the predicted objects' labels (H, W) as `components` gives them, and for
    predicted object 1..n: whether it counts (bool (n,): not wholly where the truth is IGNORE),
    its IoU with the true object it matches at IoU > 0.5 (float64 (n,), 0 where it matches none),
    and its part of SEG's sum (float64 (n,): its IoUs with the true objects it covers more than
    half of, several where it merged them)). IGNORE pixels are in neither object, as
    `metrics.confusion_matrix` leaves them out. truth_ids: the true objects themselves, an
    instance label image (H, W) of ids 0 (none) to n (`convert.load_instance_pair`), instead of
    class c's components in `truth`: instance masks, whose objects the gaps of
    `convert.instance_classes` may have cut a sliver off, and whose gap pixels are theirs (or
    class c's components, where the caller has them already). objects: the predicted objects (labels
    (H, W), n), where the caller has them already, or grown (`class_objects`), instead of
    `components(pred, c)`."""
    lt, nt = (truth_ids, int(truth_ids.max(initial=0))) if truth_ids is not None else components(truth, c)
    lp, npred = objects if objects is not None else components(pred, c)
    cells = (nt + 1) * (npred + 1)
    if _table_fits(cells, truth.size):
        # Every (true, predicted) pair's overlap from bincounts of PAIR_CHUNK pixels at a time (a
        # table's worth where it is larger): one pass, in cache, where sorting the pairs takes
        # several times as long and 20 bytes a pixel (evaluate --images scores an image's objects
        # 9 times). Keys in bincount's own type, which it would copy others to.
        flat_t, flat_p, flat_truth = lt.ravel(), lp.ravel(), truth.ravel()
        table = np.zeros(cells + 1, np.int64)
        step = max(cells, PAIR_CHUNK)
        for a in range(0, flat_t.size, step):
            keys = flat_t[a : a + step].astype(np.intp)
            keys *= npred + 1
            keys += flat_p[a : a + step]
            keys[flat_truth[a : a + step] == IGNORE] = cells  # a bin past the table's, dropped
            table += np.bincount(keys, minlength=cells + 1)
        table = table[:cells].reshape(nt + 1, npred + 1)
        area_t, area_p = table.sum(axis=1), table.sum(axis=0)
        ti, pi = np.nonzero(table[1:, 1:])  # in the order of the sort below
        ti, pi = ti + 1, pi + 1
        inter = table[ti, pi]
    else:
        # Overlapping pairs alone: a dense table of a noisy prediction's many specks against
        # hundreds of cells would take gigabytes.
        valid = (truth != IGNORE).ravel()
        t, p = lt.ravel()[valid], lp.ravel()[valid]
        area_t = np.bincount(t, minlength=nt + 1)
        area_p = np.bincount(p, minlength=npred + 1)
        both = (t > 0) & (p > 0)
        # int32 keys where they fit: np.unique sorts them, half the time of int64 on a 16 MP image.
        key = np.int32 if cells < 2**31 else np.int64
        pairs, inter = np.unique(t[both].astype(key) * key(npred + 1) + p[both].astype(key), return_counts=True)
        ti, pi = pairs // (npred + 1), pairs % (npred + 1)
    iou = inter / (area_t[ti] + area_p[pi] - inter)
    matched = np.zeros(npred + 1)
    pair = iou > MATCH_IOU  # above half the union: each object in one such pair at most
    matched[pi[pair]] = iou[pair]
    # SEG: a true object's match covers more than half of it, so there is one at most; a predicted
    # object can be the match of several.
    covers = inter > SEG_COVER * area_t[ti]
    seg = np.bincount(pi[covers], weights=iou[covers], minlength=npred + 1)
    return nt, lp, area_p[1:] > 0, matched[1:], seg[1:]


PAIR_CHUNK = 2**20  # pixels `matched_objects` counts at a time (8 MiB of keys)


def _table_fits(cells: int, pixels: int) -> bool:
    """Whether `matched_objects` counts the pairs in a dense (true, predicted) table: where it has
    no more cells than the image has pixels. Past that, zeroing and searching the table costs more
    than sorting the pairs (`object_counts` of a 572x572 slice, 221 cells against 4,660 predicted
    specks: 12.5 ms with the table, 6.4 ms sorted)."""
    return cells <= pixels


def object_counts(pred: np.ndarray, truth: np.ndarray, num_classes: int, matched: list | None = None,
                  truth_ids: np.ndarray | None = None, grows: tuple[int, ...] | None = None) -> np.ndarray:
    """(K, FIELDS) float64 for predicted class ids `pred` (H, W) against `truth` (H, W): row c,
    class c's [true objects, predicted objects, matches, SEG's sum, the matches' IoUs summed, the
    matches above each of THRESHOLDS[1:]]; row 0, the background's, is zeros. Pixels whose truth
    is IGNORE are counted in neither object (a predicted object lying wholly there is none), as
    `metrics.confusion_matrix` leaves them out. matched: `matched_objects` of classes 1..K-1,
    where the caller has them already; truth_ids: the true objects of class 1, the one class of
    instance masks (`matched_objects`); grows: for each class id, the pixels its predicted objects
    grow by (`class_objects`: as predict --instances grows them). A matched pair's objects meet
    both SEG's test and the F1's, since IoU > 0.5 takes more than half of each."""
    out = np.zeros((num_classes, FIELDS))
    objects = None if matched else class_objects(pred, range(1, num_classes), grows)
    for c in range(1, num_classes):
        out[c] = count_row(matched[c - 1] if matched else matched_objects(
            pred, truth, c, truth_ids if c == 1 else None, objects=objects[c]))
    return out


def count_row(matched: tuple) -> np.ndarray:
    """One class's `object_counts` row (FIELDS,) from its `matched_objects`."""
    nt, _, counted, match_iou, seg = matched
    return np.array([nt, np.count_nonzero(counted), np.count_nonzero(match_iou), seg.sum(), match_iou.sum(),
                     *[np.count_nonzero(match_iou > t) for t in THRESHOLDS[1:]]], np.float64)


def object_scores(counts: np.ndarray, per_image: np.ndarray | None = None) -> list[dict]:
    """`object_counts` rows (K, FIELDS), summed over images -> for each class but the background
    with a true or predicted object: its counts, precision, recall, F1 and SEG (None where a
    ratio has nothing to count), the panoptic quality (Kirillov et al. 2019: the matches' IoUs
    summed, over TP + FP / 2 + FN / 2), and by_iou: at each of THRESHOLDS, the matches above it,
    their precision, recall and F1, and TP / (TP + FP + FN) (what the Data Science Bowl 2018 and
    Cellpose call average precision, StarDist accuracy) of the objects pooled over images, with
    mean_ap its mean over THRESHOLDS. per_image: the rows (N, K, FIELDS) of each image, for the
    Bowl's way too: each image's TP / (TP + FP + FN) averaged over the images with an object of
    the class, true or predicted (image_ap in by_iou, image_mean_ap its mean over THRESHOLDS), and
    how far each image's count of objects is off, |predicted - true|, averaged over the same images
    (image_count_error) and, over those with a true object, as a share of its true count
    (image_count_relative_error): a pooled count hides errors that cancel between images."""
    out = []
    for c, row in enumerate(counts):
        if not c or not row[0] + row[1]:
            continue
        truth, predicted = row[0], row[1]
        image_ap, counting = None, {}
        if per_image is not None:
            rows = per_image[:, c][per_image[:, c, 0] + per_image[:, c, 1] > 0]
            matched = rows[:, AT_THRESHOLDS]  # (images, THRESHOLDS)
            image_ap = (matched / (rows[:, :1] + rows[:, 1:2] - matched)).mean(axis=0)
            off, true = np.abs(rows[:, 1] - rows[:, 0]), rows[:, 0]
            counting = {"image_count_error": float(off.mean()),
                        "image_count_relative_error": float((off[true > 0] / true[true > 0]).mean())
                        if (true > 0).any() else None}
        by_iou = []
        for i, (t, matched) in enumerate(zip(THRESHOLDS, row[AT_THRESHOLDS], strict=True)):
            r = ratios([truth, predicted, matched, 0])
            by_iou.append({"iou": t, "matched": int(matched), "precision": r["precision"], "recall": r["recall"],
                           "f1": r["f1"], "ap": float(matched / (truth + predicted - matched)),
                           **({"image_ap": float(image_ap[i])} if image_ap is not None else {})})
        out.append({"class": c, "true_objects": int(truth), "predicted_objects": int(predicted),
                    "matched": int(row[2]), **ratios(row),
                    # TP + FP / 2 + FN / 2 = (true + predicted) / 2
                    "panoptic_quality": float(2 * row[4] / (truth + predicted)),
                    "mean_ap": float(np.mean([b["ap"] for b in by_iou])),
                    **({"image_mean_ap": float(image_ap.mean())} if image_ap is not None else {}), **counting,
                    "by_iou": by_iou})
    return out


def ratios(row) -> dict:
    """Precision, recall, F1 and SEG of one `object_counts` row (or a sum of rows; its first four
    fields: true, predicted and matched objects, SEG's sum), None where a ratio has nothing to
    count."""
    truth, predicted, matched, seg_sum = (float(v) for v in row[:4])
    return {"precision": float(matched / predicted) if predicted else None,
            "recall": float(matched / truth) if truth else None,
            "f1": float(2 * matched / (truth + predicted)) if truth + predicted else None,
            "seg": float(seg_sum / truth) if truth else None}


def pooled(counts: np.ndarray) -> dict:
    """`object_counts` rows (K, FIELDS) summed over images -> the objects of every class but the
    background together: {"object_f1", "seg"} (None where there is no true or predicted object;
    SEG None without true objects), the numbers training's evaluation logs."""
    pooled_ratios = ratios(counts[1:].sum(axis=0))
    return {"object_f1": pooled_ratios["f1"], "seg": pooled_ratios["seg"]}


def object_f1(counts: np.ndarray) -> list[float | None]:
    """Each class's object F1 from `object_counts` rows (K, FIELDS): None for the background and
    for a class with no object in truth or prediction, as `metrics.scores` gives a class's IoU."""
    return [ratios(row)["f1"] if c else None for c, row in enumerate(counts)]
