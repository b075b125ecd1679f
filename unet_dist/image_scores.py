"""Whole images' predicted masks scored against their own masks: what `evaluate --images` reports.

Each image's counts are kept in its own row (a confusion matrix, `objects.object_counts`,
`surface.boundary_rows`) and summed over processes in one collective, so that every score comes
from exact counts and the same bits on any number of processes; the pixel scores are those of one
confusion matrix over every pixel (no average of per-image scores), as the record evaluation's.
Beside the masks as `predict --postprocess` writes them, the masks as predicted are measured with
each post-processing (`unet_dist/postprocess.py`): whether keeping each class's largest component,
removing its small objects or growing its objects would help, and the line that says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unet_dist.metrics import confusion_matrix, scores
from unet_dist.objects import FIELDS, class_objects, matched_objects, object_counts, object_f1, object_scores
from unet_dist.postprocess import (
    GROWS,
    SIZES,
    Postprocess,
    advice,
    grow_advice,
    grow_effect,
    largest_outlines,
    moved_by_truth,
    outside_largest_each,
    size_advice,
    size_effect,
)
from unet_dist.surface import FIELDS as BOUNDARY_FIELDS
from unet_dist.surface import boundary_rows, boundary_scores, per_class


def own_scores(cm: np.ndarray, objs: np.ndarray) -> dict:
    """An image's, a stack's or a record's own scores from its (K, K) confusion matrix and
    `object_counts` rows (K, FIELDS): mean IoU, each class's IoU, Dice and object F1, and the
    objects counted, per class (None for the background): a count's error, where cells are
    counted, is the number read first."""
    return {**{key: v for key, v in scores(cm).items() if key in ("iou", "fg_iou", "iou_per_class", "dice_per_class")},
            "object_f1_per_class": object_f1(objs),
            **{f"{what}_objects_per_class": [None, *objs[1:, field].astype(int).tolist()]
               for field, what in ((0, "true"), (1, "predicted"))}}


class ImageScores:
    """The counts of `n` images of `k` classes, an image at a time (`add`), summed over processes
    (`sum_over`), then scored (`per_image`, `per_stack`, `summary`).

    postprocess: the `postprocess.Postprocess` predict writes the masks with; ignore: the truth
    holds IGNORE pixels (convert --ignore-value), left out of every count; tolerance: NSD's, in
    pixels (`surface.boundary_rows`). float64 counts: the collective sums them on every backend,
    exactly up to 2**53 pixels."""

    def __init__(self, n: int, k: int, postprocess: Postprocess, ignore: bool, tolerance: float):
        self.k, self.postprocess, self.ignore, self.tolerance = k, postprocess, ignore, tolerance
        self.grows = postprocess.grows(k)  # the objects' growth (--postprocess grow:N), or None
        # Each image's counts of the masks as written, for its own row:
        self.counts = np.zeros((n, k, k))  # confusion matrices
        self.objects = np.zeros((n, k, FIELDS))  # `object_counts`
        self.boundary = np.zeros((n, k, BOUNDARY_FIELDS))  # `surface.boundary_rows`
        self.seen = np.zeros(n)  # read and predicted (its pixels may all be left out)
        # And of the masks as predicted, what post-processing would do to them: whole numbers summed
        # over this process's images, sums of IoUs (SEG's) kept per image (then each image's come
        # from one process, and they are added in one order on any number of processes, to the
        # same bits).
        self.raw = {"cm": np.zeros((k, k)), "moved": np.zeros((k, k)),  # `moved_by_truth`
                    "small": np.zeros((k, len(SIZES), 3 + k)),  # `size_effect`; its SEG sums (field 2) in small_seg
                    "objects": np.zeros((n, k, FIELDS)), "small_seg": np.zeros((n, k, len(SIZES))),
                    "grow": np.zeros((n, 1 + len(GROWS), k, FIELDS)),  # `grow_effect`
                    "outlines": np.zeros((n, 2, k, BOUNDARY_FIELDS))}  # `largest_outlines`

    def add(self, i: int, predicted: np.ndarray, truth: np.ndarray, ids: np.ndarray | None = None,
            predicted_ids: np.ndarray | None = None) -> None:
        """Image i's counts: `predicted` (H, W) class ids as the model predicts them (the record
        evaluation's class rule), `truth` (H, W) class ids (IGNORE left out), `ids` (H, W) the
        truth's instances where its masks were instance masks (matched instead of class 1's
        components). predicted_ids (H, W): class 1's predicted objects themselves, a label image
        (0 the background, any numbers; two classes, no post-processing), matched instead of the
        components of `predicted`, which is then predicted_ids > 0: another tool's instances, whose
        touching objects stay apart (and grow from their own numbers)."""
        k, raw = self.k, self.raw
        raw_cm = confusion_matrix(truth, predicted, k, self.ignore).numpy()
        raw["grow"][i] = grow_effect(predicted, truth, k, ids, predicted_ids)  # first: the largest, while nothing else is held
        # Labelled once for both tables.
        objs = (class_objects(predicted, range(1, k), self.grows) if predicted_ids is None  # grown as predict
                else {1: (predicted_ids, int(predicted_ids.max(initial=0)))})               # --instances grows them
        matched = [matched_objects(predicted, truth, c, ids if c == 1 else None, objects=objs[c]) for c in range(1, k)]
        raw_objects = object_counts(predicted, truth, k, matched)
        small = size_effect(predicted, truth, k, matched)
        raw["objects"][i], raw["small_seg"][i] = raw_objects, small[..., 2]
        raw["cm"] += raw_cm
        outside = outside_largest_each(predicted, k)  # each class's components labelled once for both
        raw["moved"] += moved_by_truth(predicted, truth, k, outside)
        raw["outlines"][i] = largest_outlines(predicted, truth, k, self.tolerance, outside)
        raw["small"] += small
        written = self.postprocess(predicted)  # `predicted` itself where it changes no pixel (grow alone)
        if written is predicted:  # and then its objects are the raw ones, grown as the flag says
            self.counts[i], self.objects[i] = raw_cm, raw_objects
            self.boundary[i] = raw["outlines"][i, 0]
        else:
            self.counts[i] = confusion_matrix(truth, written, k, self.ignore).numpy()
            self.objects[i] = object_counts(written, truth, k, truth_ids=ids, grows=self.grows)
            self.boundary[i] = boundary_rows(written, truth, k, self.tolerance)
        self.seen[i] = 1

    def sum_over(self, runtime) -> None:
        """Every process's counts summed, on each (one collective; raises CollectiveError)."""
        from unet_dist.predict import sum_over_processes

        self.counts, self.objects, self.boundary, self.seen, *summed = sum_over_processes(
            runtime, [self.counts, self.objects, self.boundary, self.seen, *self.raw.values()])
        raw = dict(zip(self.raw, summed, strict=True))
        raw["objects"], raw["grow"] = raw["objects"].sum(axis=0), raw["grow"].sum(axis=0)
        raw["small"][..., 2] = raw.pop("small_seg").sum(axis=0)
        self.raw = raw

    @property
    def read(self) -> np.ndarray:
        """(n,) bool: the images read and predicted."""
        return self.seen > 0

    @property
    def labelled(self) -> np.ndarray:
        """(n,) bool: the images with a pixel not left out (convert --ignore-value)."""
        return self.counts.sum(axis=(1, 2)) > 0

    def per_image(self, samples: list) -> list[dict]:
        """Each scored image's own row (`samples`: the `imageio.Sample`s of the n images), worst
        IoU first: where to look when the mean disappoints."""
        rows = [{"image": str(samples[i].image), **({"page": samples[i].page} if samples[i].stacked else {}),
                 **own_scores(self.counts[i], self.objects[i]), **per_class(self.boundary[i])}
                for i in np.flatnonzero(self.read & self.labelled)]
        return sorted(rows, key=lambda r: r["iou"])

    def per_stack(self, stacks: dict) -> list[dict]:
        """Each stack's scores over its pages' summed counts (`stacks`: `imageio.stacks_of` the
        samples), worst first: the per-volume score nnU-Net and the EM challenges report."""
        kept = {f: pages for f, all_pages in stacks.items()
                if (pages := [i for i in all_pages if self.read[i]]) and self.labelled[pages].any()}
        return sorted(({"image": str(f), "pages": len(pages),
                        **own_scores(self.counts[pages].sum(axis=0), self.objects[pages].sum(axis=0))}
                       for f, pages in kept.items()), key=lambda r: r["iou"])

    def summary(self, names: list[str]) -> dict:
        """The pixel scores over every image read, then objects, boundary and the post-processing
        tables (largest_component, small_objects, grown_objects), each class's rows named from
        `names` (data.json's class names) where it has one."""
        read, raw = self.read, self.raw
        out = {**scores(self.counts[read].sum(axis=0)),
               "objects": object_scores(self.objects[read].sum(axis=0), per_image=self.objects[read]),
               "boundary": boundary_scores(self.boundary[read], self.tolerance),
               "largest_component": advice(raw["cm"].astype(np.int64), raw["moved"].astype(np.int64),
                                           raw["outlines"][read]),
               "small_objects": size_advice(raw["cm"], raw["objects"], raw["small"]),
               "grown_objects": grow_advice(raw["grow"])}
        for key in ("objects", "boundary", "largest_component", "small_objects", "grown_objects"):
            for row in out[key]:
                if row["class"] < len(names):
                    row["name"] = names[row["class"]]
        return out


def table_path(out: Path) -> Path:
    """Where evaluate --images writes its per-image table: --out's name with .csv for its suffix
    (eval_images.csv), or with .csv added where --out is a .csv itself."""
    return out.with_name(out.name + ".csv") if out.suffix == ".csv" else out.with_suffix(".csv")


# The per-image table's columns for each class (`per_image_csv`): the per_image rows' lists, the
# background's left out where it has none.
TABLE_FIELDS = ("iou", "dice", "hd95", "assd", "nsd", "true_objects", "predicted_objects", "object_f1")


def per_image_csv(rows: list[dict], names: list[str], num_classes: int, key: str = "image") -> str:
    """The per_image rows of evaluate --images (worst first) as CSV, for a spreadsheet: image, page
    (empty for an image that is not a stack's page), mean IoU, then for each of the classes NAME
    (data.json's or the manifest's class names; a class past them by its id) the columns iou_NAME,
    dice_NAME, ... (TABLE_FIELDS; the background's IoU and Dice alone), empty where the image has
    no such score. key "record": evaluate --data's per_record rows, a record a row and no page
    column."""
    import csv
    import io

    names = [names[c] if c < len(names) else str(c) for c in range(num_classes)]
    columns = [(f, c) for c in range(num_classes) for f in TABLE_FIELDS if c or f in ("iou", "dice")]
    page = ["page"] if key == "image" else []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([key, *page, "iou", *(f"{f}_{names[c]}" for f, c in columns)])
    for r in rows:
        cells = [r[f"{f}_per_class"][c] for f, c in columns]
        writer.writerow([r[key], *([r.get("page", "")] if page else []), f"{r['iou']:.6g}",
                         *("" if v is None else v if isinstance(v, int) else f"{v:.6g}" for v in cells)])
    return buf.getvalue()


def apart(before: float, after: float, between: str = " to ") -> str:
    """'0.9618 to 0.9631': two scores to 4 decimals, or to as many more (up to 8) as tell them
    apart, so that a gain of 3e-6 does not read as none."""
    digits = 4
    while digits < 8 and f"{before:.{digits}f}" == f"{after:.{digits}f}" and before != after:
        digits += 1
    return f"{before:.{digits}f}{between}{after:.{digits}f}"


def postprocess_advice(largest: list[dict], small: list[dict], grown: list[dict], given) -> list[str]:
    """evaluate --images' lines about the classes whose largest component alone raises their IoU
    (`postprocess.advice` rows), those whose object F1 rises without their small objects
    (`postprocess.size_advice` rows), and those whose SEG rises with their objects grown
    (`postprocess.grow_advice` rows), with the --postprocess value that does it. given: the
    `postprocess.Postprocess` evaluate was given, whose growth the min-size table measured with
    (so its flag keeps it)."""
    def named(row):
        return f"class {row['class']}" + (f" ({row['name']})" if "name" in row else "")

    def hd95(row):  # what it does to the outlines, where both have them
        if row.get("hd95") is None or row.get("hd95_largest_only") is None:
            return ""
        return f" (HD95 {row['hd95']:.2f} -> {row['hd95_largest_only']:.2f} px)"

    lines = []
    helps = [a for a in largest if a["helps"]]
    if helps:
        lines.append("evaluate: keeping only the largest connected component raises the IoU of "
                     + ", ".join(f"{named(a)} from {apart(a['iou'], a['iou_largest_only'])}" + hd95(a) for a in helps)
                     + f" on these images (predict --postprocess largest:{','.join(str(a['class']) for a in helps)})")
    for row in small:
        if row["helps"]:
            best = next(r for r in row["by_min_size"] if r["min_size"] == row["best_min_size"])
            iou = "" if row["iou"] is None or best["iou"] is None else f"; IoU {apart(row['iou'], best['iou'], ' -> ')}"
            lines.append(f"evaluate: removing the objects under {best['min_size']} pixels raises the object F1 of "
                         f"{named(row)} from {apart(row['object_f1'], best['object_f1'])} ({best['removed_objects']} "
                         f"removed{iou}) on these images (predict{' --instances' * bool(given.grown)} --postprocess "
                         f"{Postprocess(min_size=best['min_size'], small=(row['class'],), grow=given.grow, grown=given.grown)})")
    for row in grown:
        if row["helps"]:
            best = next(r for r in row["by_grow"] if r["grow"] == row["best_grow"])
            lines.append(f"evaluate: growing the objects of {named(row)} by {best['grow']} "
                         f"pixel{'s' * (best['grow'] != 1)} over the background "
                         f"raises their SEG from {apart(row['seg'], best['seg'])} (object F1 "
                         f"{apart(row['object_f1'], best['object_f1'], ' -> ')}) on these images (predict --instances "
                         f"--postprocess grow:{best['grow']}:{row['class']})"
                         + (f"; evaluate --images --postprocess grow:{best['grow']}:{row['class']} measures min-size on "
                            "the grown objects" if any(r["helps"] for r in small) and not given.grown else ""))
    return lines
