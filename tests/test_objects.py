"""Object-level scores: connected components matched to the truth's at IoU > 0.5."""

import numpy as np
import pytest

from unet_dist.data.convert import IGNORE
from unet_dist.objects import EIGHT_CONNECTED, FIELDS, THRESHOLDS, object_counts, object_f1, object_scores, pooled


def _cells():
    truth = np.zeros((10, 12), np.uint8)
    truth[0:5, 0:5] = 1  # A
    truth[0:5, 6:11] = 1  # B, parted from A by a membrane one pixel wide
    truth[7:10, 0:4] = 1  # C
    return truth


def test_merged_objects_count_as_misses_where_pixel_iou_hardly_moves():
    truth = _cells()
    pred = truth.copy()
    pred[0:5, 5] = 1  # the membrane lost: A and B come out as one object
    pred[9, 11] = 1  # a speck
    rows = object_counts(pred, truth, 2)
    assert not rows[0].any()
    # Three true, three predicted, C matched at IoU 1. SEG (the cell tracking challenge's) credits
    # A and B with their IoU with the blob, which covers each wholly: 25 / 55.
    assert rows[1, :4].tolist() == [3, 3, 1, pytest.approx(1 + 2 * 25 / 55)]
    (s,) = object_scores(rows)
    assert (s["class"], s["true_objects"], s["predicted_objects"], s["matched"]) == (1, 3, 3, 1)
    assert s["precision"] == s["recall"] == s["f1"] == pytest.approx(1 / 3)
    assert s["seg"] == pytest.approx((1 + 2 * 25 / 55) / 3)
    assert object_f1(rows) == [None, pytest.approx(1 / 3)]  # evaluate's per-image rows
    exact = object_scores(object_counts(truth, truth, 2))[0]
    assert exact["f1"] == exact["seg"] == 1.0


def test_a_match_needs_more_than_half_the_union_and_seg_more_than_half_the_true_object():
    truth = np.zeros((4, 8), np.uint8)
    truth[:, 0:4] = 1  # 16 pixels
    half = truth.copy()
    half[:, 4:8] = 1  # IoU 16 / 32: not a match
    more = truth.copy()
    more[:, 4:7] = 1  # 16 / 28
    assert object_counts(half, truth, 2)[1, :4].tolist() == [1, 1, 0, 0.5]  # SEG: it covers the true object
    assert object_counts(more, truth, 2)[1, :4].tolist() == [1, 1, 1, pytest.approx(16 / 28)]
    small = np.zeros_like(truth)
    small[:, 0:2] = 1  # 8 of its 16 pixels: half, not more
    assert object_counts(small, truth, 2)[1, :4].tolist() == [1, 1, 0, 0]


def test_matches_are_also_counted_above_stricter_ious_as_cell_benchmarks_report_them():
    # A exact (IoU 1), B cut to IoU 20/25 = 0.8, C to 9/12 = 0.75, and a speck: 3 true objects, 4
    # predicted. A match at a threshold needs an IoU above it, as at 0.5.
    truth = _cells()
    pred = truth.copy()
    pred[0:5, 6] = 0
    pred[7:10, 3] = 0
    pred[9, 11] = 1
    (s,) = object_scores(object_counts(pred, truth, 2))
    assert THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    matched = [3, 3, 3, 3, 3, 2, 1, 1, 1, 1]
    assert [b["iou"] for b in s["by_iou"]] == list(THRESHOLDS) and [b["matched"] for b in s["by_iou"]] == matched
    assert s["by_iou"][0] == {"iou": 0.5, "matched": 3, "precision": 0.75, "recall": 1.0, "f1": pytest.approx(6 / 7),
                              "ap": 0.75}
    assert [b["ap"] for b in s["by_iou"]] == pytest.approx([m / (3 + 4 - m) for m in matched])  # TP / (TP+FP+FN)
    assert s["mean_ap"] == pytest.approx((5 * 3 / 4 + 2 / 5 + 4 * 1 / 6) / 10)
    assert s["panoptic_quality"] == pytest.approx((1 + 0.8 + 0.75) / (3 + 1 / 2))  # IoUs / (TP + FP/2 + FN/2)
    # The Data Science Bowl's way: each image's TP / (TP + FP + FN), averaged over the images with an
    # object. Three cells found exactly, one missed in another image, and an image of none.
    missed, empty = np.zeros_like(truth), np.zeros_like(truth)
    missed[2:5, 2:5] = 1
    rows = np.stack([object_counts(truth, truth, 2), object_counts(empty, missed, 2), object_counts(empty, empty, 2)])
    (s,) = object_scores(rows.sum(axis=0), per_image=rows)
    assert [b["ap"] for b in s["by_iou"]] == [0.75] * 10  # pooled: 3 / (4 + 3 - 3)
    assert [b["image_ap"] for b in s["by_iou"]] == [0.5] * 10 and s["image_mean_ap"] == 0.5  # (1 + 0) / 2
    assert "image_mean_ap" not in object_scores(rows.sum(axis=0))[0]
    # Each image's count: off by 0 and 1 (of 3 and 1 true), the empty image left out. With one more
    # off by 1 of 3 (the speck, one too many), the pooled count is right (7 against 7), the images' not.
    assert (s["image_count_error"], s["image_count_relative_error"]) == (0.5, 0.5)
    rows = np.concatenate([rows, object_counts(pred, truth, 2)[None]])
    (s,) = object_scores(rows.sum(axis=0), per_image=rows)
    assert s["true_objects"] == s["predicted_objects"] == 7
    assert (s["image_count_error"], s["image_count_relative_error"]) == pytest.approx((2 / 3, (0 + 1 + 1 / 3) / 3))


def test_ignored_pixels_count_in_no_object_and_classes_are_scored_apart():
    truth = _cells()
    truth[7:10, 6:12] = IGNORE
    pred = truth.copy()
    pred[pred == IGNORE] = 0
    pred[8, 8] = 1  # an object wholly where the truth is left out: none
    pred[0:5, 0:5] = 2  # A predicted as class 2
    rows = object_counts(pred, truth, 3)
    assert rows[1, :4].tolist() == [3, 2, 2, 2.0]
    assert rows[2, :4].tolist() == [0, 1, 0, 0]
    two = object_scores(rows)[1]
    assert (two["class"], two["recall"], two["seg"], two["precision"], two["f1"]) == (2, None, None, 0.0, 0.0)
    assert object_f1(rows) == [None, pytest.approx(0.8), 0.0]
    # Training's evaluation pools the classes: 2 matches of 3 true and 3 predicted objects.
    assert pooled(rows) == {"object_f1": pytest.approx(2 / 3), "seg": pytest.approx(2 / 3)}
    assert pooled(np.zeros((3, FIELDS))) == {"object_f1": None, "seg": None}
    assert object_scores(np.zeros((3, FIELDS))) == [] and object_f1(np.zeros((3, FIELDS))) == [None] * 3  # no object anywhere


def test_instances_number_each_object_of_each_class_apart():
    # predict --instances: the objects object_counts matches, numbered: class 1's in raster order,
    # then class 2's; 0 on the background. 16-bit while the count fits, 32-bit past it.
    from unet_dist.objects import instances

    mask = _cells()
    mask[9, 11] = 1  # a speck, an object of its own
    mask[6, 4] = 1  # touches C's corner (7, 3) diagonally: one object with C, first in raster order
    mask[2:4, 11] = 2  # class 2 beside B: an object of another class
    labels = instances(mask)
    assert labels.dtype == np.uint16
    assert np.array_equal(labels > 0, mask > 0)
    assert [labels[0, 0], labels[0, 6], labels[6, 4], labels[7, 0], labels[9, 11], labels[2, 11]] == [1, 2, 3, 3, 4, 5]
    for i in range(1, labels.max() + 1):  # each instance is one class
        assert len(np.unique(mask[labels == i])) == 1
    assert np.array_equal(instances(np.zeros((3, 3), np.uint8)), np.zeros((3, 3)))
    # Of chosen classes alone (cells, not the class of their borders): the others are 0.
    ones = instances(mask, (1,))
    assert np.array_equal(ones, np.where(mask == 1, labels, 0)) and np.array_equal(instances(mask, (2,)) > 0, mask == 2)
    specks = np.zeros((520, 520), np.uint8)
    specks[::2, ::2] = 1  # 67,600 objects 8-connected to none
    many = instances(specks)
    assert many.dtype == np.int32 and many.max() == 260 * 260 and many[518, 518] == many.max()


@pytest.mark.parametrize("dense", [True, False])
def test_matches_equal_their_definition_pair_by_pair(monkeypatch, dense):
    # matched_objects counts the (true, predicted) overlaps in a dense table where it fits (a chunk
    # of pixels at a time) and by sorting the overlapping pairs where it does not: both must give
    # what every pair's IoU gives.
    import unet_dist.objects as objects

    monkeypatch.setattr(objects, "_table_fits", lambda cells, pixels: dense)
    monkeypatch.setattr(objects, "PAIR_CHUNK", 64)  # several chunks an image, a table's worth each
    rng = np.random.default_rng(11)
    for trial in range(12):
        truth = np.zeros((48, 56), np.uint8)
        for y, x in rng.integers(0, 44, (10, 2)):
            truth[y : y + rng.integers(2, 12), x : x + rng.integers(2, 12)] = 1
        pred = np.where(rng.random(truth.shape) < 0.15, 1 - truth, truth)  # specks, holes, merges
        if trial % 2:
            truth[rng.random(truth.shape) < 0.1] = IGNORE
        ids = objects.components(truth, 1)[0].astype(np.uint16) if trial % 3 == 0 else None
        nt, lp, counts, matched, seg = objects.matched_objects(pred, truth, 1, ids)
        lt = objects.components(truth, 1)[0] if ids is None else ids
        valid = truth != IGNORE
        want_matched, want_seg = np.zeros(lp.max()), np.zeros(lp.max())
        for j in range(1, lp.max() + 1):
            pj = (lp == j) & valid
            for i in range(1, nt + 1):
                ti = (lt == i) & valid
                inter = (ti & pj).sum()
                iou = inter / (ti.sum() + pj.sum() - inter) if inter else 0.0
                want_matched[j - 1] += iou * (iou > 0.5)
                want_seg[j - 1] += iou * (inter > 0.5 * ti.sum())
            assert counts[j - 1] == pj.any()
        assert nt == lt.max() and np.array_equal(lp, objects.components(pred, 1)[0])
        assert matched.tolist() == pytest.approx(want_matched.tolist(), abs=1e-12)
        assert seg.tolist() == pytest.approx(want_seg.tolist(), abs=1e-12)


@pytest.mark.parametrize("strip_pixels", [1, 37, 2**22])
def test_growth_in_strips_equals_one_transform_of_the_whole_image(monkeypatch, strip_pixels):
    # nearest_objects searches strips of rows with the growth's reach above and below, to bound
    # its memory on large images. It must give what one distance transform of the whole image
    # gives (the code before it), equal ties included: grid points 2 to 8 apart are full of them.
    from scipy import ndimage

    import unet_dist.objects as objects

    monkeypatch.setattr(objects, "STRIP_PIXELS", strip_pixels)  # 1: a row a strip
    rng = np.random.default_rng(7)
    steps = (1, 1.5, 2, 3, 4, 6, 8)
    checked = 0
    for trial in range(60):
        h, w = rng.integers(3, 90, 2)
        points = rng.random((h, w)) < rng.choice([0.003, 0.02, 0.1])
        if trial % 3 == 0:
            points = np.zeros((h, w), bool)
            points[:: rng.integers(2, 9), :: rng.integers(2, 9)] = True
        labels, n = ndimage.label(points, structure=EIGHT_CONNECTED)
        free = rng.random((h, w)) < 0.9
        dist, (ni, nj) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        for by, got in zip(steps, objects.grown_steps(labels, free, steps), strict=True):
            want = np.where(free & (labels == 0) & (dist <= by), labels[ni, nj], labels) if n else labels
            assert got.dtype == labels.dtype and np.array_equal(got, want), (trial, by)
            checked += 1
    assert checked == 60 * len(steps)


def test_grown_objects_take_the_background_nearest_them_and_are_scored_so():
    # Two cells tiling the image, predicted with the gap between them two pixels too wide: each
    # 6x5 of its 6x6 (IoU 5/6). Grown by a pixel, each takes the gap column beside it: exact.
    from unet_dist.objects import class_objects, grown, instances, matched_objects
    from unet_dist.postprocess import GROWS, SIZES, grow_advice, grow_effect, size_effect

    truth = np.ones((6, 12), np.uint8)
    ids = np.where(np.arange(12) < 6, 1, 2)[None].repeat(6, axis=0)
    pred = truth.copy()
    pred[:, 5:7] = 0
    assert object_counts(pred, truth, 2, truth_ids=ids)[1, :4].tolist() == [2, 2, 2, pytest.approx(10 / 6)]
    assert object_counts(pred, truth, 2, truth_ids=ids, grows=(0, 1))[1, :4].tolist() == [2, 2, 2, 2.0]
    assert np.array_equal(instances(pred, grows=(0, 1)), ids)
    rows = grow_advice(grow_effect(pred, truth, 2, ids))
    assert [r["grow"] for r in rows[0]["by_grow"]] == list(GROWS)
    assert (rows[0]["seg"], rows[0]["best_grow"], rows[0]["helps"]) == (pytest.approx(5 / 6), 1, True)
    # The table evaluate sums, from one distance transform a class: object_counts with each growth.
    rng = np.random.default_rng(3)
    blocks = np.zeros((40, 48), np.uint8)
    for y, x in rng.integers(0, 36, (14, 2)):
        blocks[y : y + rng.integers(3, 10), x : x + rng.integers(3, 10)] = rng.integers(1, 3)
    noisy = np.where(rng.random(blocks.shape) < 0.1, 0, blocks)  # holes, objects cut apart and short
    blocks[rng.random(blocks.shape) < 0.05] = IGNORE
    effect = grow_effect(noisy, blocks, 3)
    for j, g in enumerate((0, *GROWS)):
        assert np.array_equal(effect[j], object_counts(noisy, blocks, 3, grows=(g, g, g))), g
    assert not np.array_equal(effect[0], effect[1])
    # min-size, which runs before growing, sizes grown objects by their pixels as predicted (30,
    # not 36: under 32) and gives the background those alone.
    effect = size_effect(pred, truth, 2, [matched_objects(pred, truth, 1, ids, objects=class_objects(pred, (1,), (0, 1))[1])])
    assert effect[1, SIZES.index(32)].tolist() == [2, 2, 2.0, 0, 60] and not effect[1, SIZES.index(16)].any()
    # Up to N pixels, Euclidean: a lone pixel grown by 1 is a plus; by 1.5, the 3x3 square. Never
    # over another object or class (free), and ties go to either object.
    lone = np.zeros((5, 5), np.int32)
    lone[2, 2] = 7
    assert grown(lone, lone == 0, 1).tolist()[1:4] == [[0, 0, 7, 0, 0], [0, 7, 7, 7, 0], [0, 0, 7, 0, 0]]
    assert (grown(lone, lone == 0, 1.5)[1:4, 1:4] == 7).all() and grown(lone, lone == 0, 2).sum() == 7 * 13
    walled = np.zeros((5, 5), bool)
    walled[1] = True  # the one row it may take
    assert np.array_equal(grown(lone, walled, 1) > 0, (lone > 0) | (walled & (grown(lone, lone == 0, 1) > 0)))
    # Class 2 grows over the background class 1 left, not over class 1.
    two = np.zeros((3, 7), np.uint8)
    two[:, 0], two[:, 6] = 1, 2
    assert instances(two, grows=(0, 2, 2)).tolist() == [[1, 1, 1, 0, 2, 2, 2]] * 3
    assert instances(two, grows=(0, 3, 3)).tolist() == [[1, 1, 1, 1, 2, 2, 2]] * 3  # the middle column: class 1's
    # Numbering class 2 alone (predict --instance-classes 2) gives it the same objects: class 1 still
    # grows first and keeps the middle column.
    assert instances(two, (2,), grows=(0, 3, 3)).tolist() == [[0, 0, 0, 0, 1, 1, 1]] * 3
    assert instances(two, (1,), grows=(0, 3, 3)).tolist() == [[1, 1, 1, 1, 0, 0, 0]] * 3
    # And they are scored as predict numbers them: against these very objects, every class exact.
    numbered = instances(two, grows=(0, 3, 3))
    as_numbered = np.where(numbered == 2, 2, np.minimum(numbered, 1)).astype(np.uint8)
    for counts in (object_counts(two, as_numbered, 3, grows=(0, 3, 3)), grow_effect(two, as_numbered, 3)[3]):
        assert counts[1:, 3].tolist() == [1.0, 1.0], counts  # SEG's sums: IoU 1 each


def test_evaluate_scores_instance_masks_against_their_instances(tmp_path, monkeypatch):
    # Data converted from instance masks (convert --classes instances): evaluate --images matches
    # predicted objects to the instances, whole, not to the components of the gap-cut classes.
    # Here the "model" predicts the classes exactly: every cell found, but without its gap pixels,
    # so SEG is below 1 (it would be 1 against the components).
    import json
    import shutil

    import tensorflow as tf
    from conftest import tiny_overrides
    from PIL import Image

    import unet_dist.inference as inference
    from unet_dist.config import load_config
    from unet_dist.data.convert import convert, instance_classes
    from unet_dist.evaluate import main as evaluate_main
    from unet_dist.trainer import train

    src = tmp_path / "cells"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    yy, xx = np.mgrid[0:64, 0:64]
    rng = np.random.default_rng(0)
    cells = 0
    for i in range(4):
        centres = rng.integers(4, 60, (7, 2))
        ids = np.argmin([(yy - y) ** 2 + (xx - x) ** 2 for y, x in centres], axis=0) + 10  # ids 10..16, all touching
        cells += len(np.unique(ids))
        Image.fromarray((instance_classes(ids) * 200).astype(np.uint8)).save(src / "images" / f"c{i}.png")
        Image.fromarray(ids.astype(np.uint16)).save(src / "masks" / f"c{i}.png")
    convert(src, tmp_path / "data", layout="folders", classes="instances", shards=1, val_fraction=0.25, workers=1,
            progress=False)
    w = tmp_path / "w"
    train(load_config(None, tiny_overrides(steps=1)), tmp_path / "data", w)
    monkeypatch.setattr(inference.Predictor, "__call__",
                        lambda self, image: tf.constant(image[..., :1].astype(np.float32) / 255 > 0.5, tf.float32))
    assert evaluate_main(["--workdir", str(w), "--images", str(src), "--out", str(tmp_path / "e.json")]) == 0
    e = json.loads((tmp_path / "e.json").read_text())
    (o,) = e["objects"]
    assert (o["name"], o["true_objects"], o["predicted_objects"], o["matched"]) == ("object", cells, cells, cells)
    assert 0.6 < o["seg"] < 0.98 and e["iou_per_class"][1] == 1.0  # the pixels: as the masks' classes
    # --predictions --predicted-instances: another tool's label images (here the true instances,
    # every cell touching others, numbered 10..16) are scored object by object: every cell matched
    # whole. Read as a class mask instead, the touching cells are one object.
    pred = tmp_path / "pred"
    pred.mkdir()
    for i in range(4):
        shutil.copy(src / "masks" / f"c{i}.png", pred / f"c{i}_cp_masks.png")  # named as Cellpose names them
    assert evaluate_main(["--workdir", str(w), "--images", str(src), "--predictions", str(pred),
                          "--predicted-instances", "--prediction-suffix", "_cp_masks",
                          "--out", str(tmp_path / "labels.json")]) == 0
    e = json.loads((tmp_path / "labels.json").read_text())
    (o,) = e["objects"]
    assert (o["true_objects"], o["predicted_objects"], o["matched"], o["seg"]) == (cells, cells, cells, 1.0)
    assert e["predicted_instances"] and e["iou_per_class"][1] < 1  # the gaps' pixels
    # Grown from their own numbers, the touching cells have no background to take: the same.
    (g,) = e["grown_objects"]
    assert all((r["object_f1"], r["seg"]) == (1.0, 1.0) for r in g["by_grow"]), g
    for i in range(4):  # the same cells as one class mask, 0/255
        ids = np.asarray(Image.open(src / "masks" / f"c{i}.png"))
        Image.fromarray(((ids > 0) * 255).astype(np.uint8)).save(pred / f"c{i}.png")
    assert evaluate_main(["--workdir", str(w), "--images", str(src), "--predictions", str(pred),
                          "--out", str(tmp_path / "mask.json")]) == 0
    (o,) = json.loads((tmp_path / "mask.json").read_text())["objects"]
    assert o["true_objects"] == cells and o["predicted_objects"] == 4 and o["matched"] == 0


def test_each_numbered_object_is_measured_by_its_pixels_and_its_confidence_by_the_masks():
    # predict --instances' STEM_objects.csv rows: grown pixels count in the area and the box, not
    # in the mean probability of the object's class (they are background in the mask).
    from unet_dist.objects import instances, measured

    classes = np.zeros((8, 10), np.uint8)
    classes[1:3, 1:4] = 1  # 6 pixels of class 1
    classes[5:8, 6:9] = 2  # 9 of class 2
    probs = np.zeros((8, 10, 3), np.float32)
    probs[..., 0] = 1
    probs[1:3, 1:4] = [0.1, 0.7, 0.2]
    probs[1, 1] = [0.1, 0.9, 0.0]
    probs[5:8, 6:9] = [0.2, 0.2, 0.6]
    labels = instances(classes, grows=(0, 1, 0))  # class 1's object grown by a pixel: its 4-neighbours
    first, second = measured(labels, classes, probs)
    assert first == (1, 1, 16, 1.5, 2.0, 0, 0, 4, 5, pytest.approx((0.9 + 5 * 0.7) / 6))
    assert second == (2, 2, 9, 6.0, 7.0, 5, 6, 8, 9, pytest.approx(0.6))
    assert measured(labels, classes)[1] == (2, 2, 9, 6.0, 7.0, 5, 6, 8, 9, None)
    # A sigmoid's one unit is the foreground's probability.
    binary = (classes > 0).astype(np.uint8)
    fg = probs[..., 1:2] + probs[..., 2:3]
    assert [r[-1] for r in measured(instances(binary), binary, fg)] == pytest.approx([(0.9 + 5 * 0.9) / 6, 0.8])
    assert measured(np.zeros((4, 4), np.uint16), np.zeros((4, 4), np.uint8)) == []


def test_predicted_label_images_keep_their_objects_and_large_numbers_are_renumbered(tmp_path):
    # evaluate --predicted-instances reads another tool's labels as they are; numbers past the
    # image's pixel count (which would size the objects' count tables) are renumbered 1.., the
    # background staying 0, and a label image without background keeps every object.
    from PIL import Image

    from unet_dist.data.imageio import BadImage, Sample
    from unet_dist.evaluate import read_predicted

    def read_predicted_of(folder, name, *args, **kwargs):  # an image of its own, not a stack's page
        return read_predicted(folder, Sample(name, tmp_path / "src" / f"{name}.png"), *args, **kwargs)

    a = np.zeros((4, 5), np.int32)
    a[0, 0], a[1:3, 1] = 2**30, 7
    Image.fromarray(a, "I").save(tmp_path / "x.tif")
    assert read_predicted_of(tmp_path, "x", 2, (4, 5), labels=True).tolist() == np.where(a == 7, 1, np.where(a, 2, 0)).tolist()
    a[:] = 2**30
    a[0, 0] = 99
    Image.fromarray(a, "I").save(tmp_path / "x.tif")
    assert read_predicted_of(tmp_path, "x", 2, (4, 5), labels=True).tolist() == np.where(a == 99, 1, 2).tolist()
    small = np.array([[0, 2], [2, 4]], np.uint16)  # numbers up to the pixel count kept as they are
    Image.fromarray(small).save(tmp_path / "y_instances.tif")  # predict --instances' name first
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "y.png")
    assert read_predicted_of(tmp_path, "y", 2, (2, 2), labels=True).tolist() == small.tolist()
    with pytest.raises(BadImage, match=r"predicted mask .*y_instances.tif is 2x2, its mask 3x2"):
        read_predicted_of(tmp_path, "y", 2, (2, 3), labels=True)
    # A stack's page: predict's page file, else the same page of another tool's stack (STEM.tif).
    pages = [np.full((2, 3), v, np.uint8) for v in (0, 1, 255)]
    Image.fromarray(pages[0]).save(tmp_path / "v.tif", save_all=True, append_images=[Image.fromarray(p) for p in pages[1:]])
    page = Sample("v_p002", tmp_path / "src" / "v.tif", 2)
    assert read_predicted(tmp_path, page, 2, (2, 3)).tolist() == [[1] * 3] * 2  # 0/255: 1
    assert read_predicted(tmp_path, Sample("v_p001", tmp_path / "src" / "v.tif", 1), 2, (2, 3)).tolist() == [[1] * 3] * 2
    Image.fromarray(np.zeros((2, 3), np.uint8), "P").save(tmp_path / "v_p002_mask.png")
    assert read_predicted(tmp_path, page, 2, (2, 3)).tolist() == [[0] * 3] * 2
    with pytest.raises(BadImage, match=r"predicted mask .*v.tif has no page 5"):
        read_predicted(tmp_path, Sample("v_p005", tmp_path / "src" / "v.tif", 5), 2, (2, 3))
    with pytest.raises(BadImage, match=r"no predicted mask w_p000_mask.png or w_p000.\* or w.\* \(page 0\) in"):
        read_predicted(tmp_path, Sample("w_p000", tmp_path / "src" / "w.tif", 0), 2, (2, 3))
