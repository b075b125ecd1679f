"""Post-processing (the largest component, small objects removed): the masks, the arithmetic
evaluate uses to measure it, and predict and evaluate --images with --postprocess."""

import json
import re

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_overrides

from unet_dist.config import ConfigError, load_config
from unet_dist.data.convert import IGNORE
from unet_dist.metrics import confusion_matrix, scores
from unet_dist.objects import instances, object_counts, object_scores
from unet_dist.postprocess import (
    GROWS,
    SIZES,
    Postprocess,
    advice,
    applied,
    keep_largest,
    moved_by_truth,
    parse,
    remove_small,
    size_advice,
    size_effect,
)


def test_keep_largest_cuts_each_chosen_class_to_its_largest_8_connected_component():
    m = np.zeros((6, 8), np.uint8)
    m[0:3, 0:3] = 1  # 9 pixels
    m[3, 3] = 1  # touches the block at a corner: the same component
    m[5, 7] = 1  # a speck of its own
    m[0, 6:8] = 2
    m[4, 5] = 2
    one = keep_largest(m, (1,))
    assert one[5, 7] == 0 and one[3, 3] == 1 and (one[0:3, 0:3] == 1).all()
    assert (one == 2).sum() == 3  # class 2 untouched
    both = keep_largest(m, (1, 2))
    assert both[4, 5] == 0 and (both[0, 6:8] == 2).all()
    assert m[5, 7] == 1  # the mask given is left as it is
    assert (keep_largest(m, ()) == m).all()


def test_applied_gives_the_confusion_matrix_of_the_post_processed_masks():
    # evaluate sums what each class would lose (`moved_by_truth`) over images and processes and
    # derives every choice of classes from it: it must equal scoring keep_largest's masks.
    rng = np.random.default_rng(0)
    k = 4
    cms, moved, masks, truths = [], [], [], []
    for _ in range(3):
        pred = rng.integers(0, k, (20, 24)).astype(np.uint8)
        pred[2:10, 3:12] = 2  # one large component beside the noise's specks
        truth = rng.integers(0, k, (20, 24)).astype(np.uint8)
        truth[rng.random(truth.shape) < 0.1] = IGNORE
        cms.append(confusion_matrix(truth, tf.constant(pred, tf.int32), k, ignore=True).numpy())
        moved.append(moved_by_truth(pred, truth, k))
        masks.append(pred)
        truths.append(truth)
    for classes in [(1,), (2,), (1, 3), (1, 2, 3)]:
        want = sum(confusion_matrix(t, tf.constant(keep_largest(p, classes), tf.int32), k, ignore=True).numpy()
                   for p, t in zip(masks, truths, strict=True))
        np.testing.assert_array_equal(applied(sum(cms), sum(moved), classes), want)
        np.testing.assert_array_equal(applied(np.stack(cms), np.stack(moved), classes).sum(axis=0), want)


def test_advice_says_for_which_classes_the_largest_component_helps():
    truth = np.zeros((10, 10), np.uint8)
    truth[0:4, 0:4] = 1  # one object of class 1
    truth[6:8, 0:2] = truth[6:8, 6:8] = 2  # two objects of class 2
    pred = truth.copy()
    pred[9, 9] = 1  # a false speck of class 1
    cm = confusion_matrix(truth, tf.constant(pred, tf.int32), 3).numpy()
    moved = moved_by_truth(pred, truth, 3)
    (one, two) = advice(cm, moved)
    assert (one["class"], one["helps"], one["iou"], one["iou_largest_only"]) == (1, True, 16 / 17, 1.0)
    assert (two["class"], two["helps"], two["iou"], two["iou_largest_only"]) == (2, False, 1.0, 0.5)
    assert advice(cm, np.zeros_like(moved)) == []  # nothing to cut: nothing said


def test_remove_small_takes_the_components_under_the_size_alone():
    m = np.zeros((6, 8), np.uint8)
    m[0:2, 0:2] = 1  # 4 pixels
    m[2, 2] = 1  # touches it at a corner: one component of 5
    m[5, 7] = 1  # a speck
    m[4:6, 0:2] = 2  # 4 pixels of class 2
    assert (remove_small(m, (1,), 5) == np.where(np.arange(48).reshape(6, 8) == 47, 0, m)).all()
    cut = remove_small(m, (1, 2), 6)
    assert not cut.any() and m[5, 7] == 1  # the mask given is left as it is
    assert (Postprocess((2,), 2, (1,))(m) == remove_small(m, (1,), 2)).all()  # the speck, then class 2's one


def test_size_effect_gives_the_scores_of_the_masks_without_their_small_objects():
    # evaluate sums `size_effect` over images and processes and derives every min-size from it:
    # each must score as the masks remove_small cuts do, pixels and objects.
    rng = np.random.default_rng(1)
    k = 3
    preds, truths = [], []
    for _ in range(3):
        truth = np.zeros((40, 48), np.uint8)
        for y, x in rng.integers(0, 36, (12, 2)):
            truth[y : y + rng.integers(2, 9), x : x + rng.integers(2, 9)] = rng.integers(1, k)
        pred = truth.copy()
        noise = rng.random(truth.shape)
        pred[noise < 0.08] = rng.integers(0, k, (noise < 0.08).sum())  # specks, holes, objects cut apart
        truth[rng.random(truth.shape) < 0.05] = IGNORE
        preds.append(pred)
        truths.append(truth)

    def scored(masks):
        cm = sum(confusion_matrix(t, tf.constant(p, tf.int32), k, ignore=True).numpy()
                 for p, t in zip(masks, truths, strict=True))
        return cm, sum(object_counts(p, t, k) for p, t in zip(masks, truths, strict=True))

    cm, objects = scored(preds)
    rows = size_advice(cm, objects, sum(size_effect(p, t, k) for p, t in zip(preds, truths, strict=True)))
    assert [r["class"] for r in rows] == [1, 2]
    for row in rows:
        c = row["class"]
        assert (row["object_f1"], row["iou"]) == (object_scores(objects)[c - 1]["f1"], scores(cm)["iou_per_class"][c])
        assert [r["min_size"] for r in row["by_min_size"]] == list(SIZES)
        for r in row["by_min_size"][:7]:
            cut_cm, cut_objects = scored([remove_small(p, (c,), r["min_size"]) for p in preds])
            (mine,) = [o for o in object_scores(cut_objects) if o["class"] == c] or [{"f1": 0.0, "seg": 0.0}]
            assert r["object_f1"] == pytest.approx(mine["f1"]) and r["seg"] == pytest.approx(mine["seg"])
            assert r["iou"] == pytest.approx(scores(cut_cm)["iou_per_class"][c])
            assert r["removed_objects"] == objects[c, 1] - cut_objects[c, 1]
        assert row["by_min_size"][0]["removed_objects"] > 0  # the single-pixel specks
        best = max(r["object_f1"] for r in row["by_min_size"])
        assert row["helps"] == (best > row["object_f1"])
        assert row["by_min_size"][[r["object_f1"] for r in row["by_min_size"]].index(best)]["min_size"] == (
            row["best_min_size"])


@pytest.mark.parametrize("text,want,named", [
    ("none", Postprocess(), "none"), ("largest", Postprocess((1, 2, 3)), "largest:1,2,3"),
    ("largest:3,1,3", Postprocess((1, 3)), "largest:1,3"), ("min-size:32", Postprocess((), 32, (1, 2, 3)), None),
    ("largest:1+min-size:8:3", Postprocess((1,), 8, (3,)), "min-size:8:3+largest:1"),
    ("grow:3", Postprocess(grow=3, grown=(1, 2, 3)), "grow:3:1,2,3"),
    ("grow:2:1+min-size:8:1", Postprocess((), 8, (1,), 2, (1,)), "min-size:8:1+grow:2:1")])
def test_postprocess_values(text, want, named):
    got = parse(text, 4)
    assert got == want and bool(got) == (text != "none")
    assert str(got) == (named or "min-size:32:1,2,3") and parse(str(got), 4) == got  # the value that gives it


@pytest.mark.parametrize("text,message", [
    ("big", "none, or largest"), ("largest:", "none, or largest"), ("largest:a", "'a' is not a list of class ids"),
    ("largest:0", "class 0 is not one of this model's classes 1 to 3"), ("largest:4", "class 4 is not one"),
    ("largest+largest:1", "none, or largest"), ("min-size", "whole number of pixels from 2 up"),
    ("min-size:1", "not 'min-size:1'"), ("min-size:4.5", "not 'min-size:4.5'"), ("min-size:9:", "not 'min-size:9:'"),
    ("min-size:9:5", "class 5 is not one"), ("grow:0", "grow takes a whole number of pixels from 1 to 64"),
    ("grow:65", "not 'grow:65'"), ("grow:2+grow:3", "none, or largest"), ("grow:2:0", "class 0 is not one")])
def test_bad_postprocess_values_are_named(text, message):
    with pytest.raises(ConfigError, match=f"--postprocess {re.escape(repr(text))}: .*{re.escape(message)}"):
        parse(text, 4)


def test_predict_and_evaluate_images_post_process_alike(shards, pet_src, tmp_path, capsys, monkeypatch):
    # A model that marks the bright pixels as pet: a pet and specks, so the largest component
    # changes the masks. evaluate --images scores what predict --postprocess writes, and its
    # advice without the flag gives the same IoU for the class.
    from PIL import Image
    from scipy import ndimage

    import unet_dist.inference as inference
    from unet_dist.evaluate import main as evaluate_main
    from unet_dist.predict import main as predict_main
    from unet_dist.trainer import train

    w = tmp_path / "w"
    train(load_config(None, tiny_overrides(steps=1)), shards, w)
    monkeypatch.setattr(inference.Predictor, "__call__",
                        lambda self, image: tf.constant(image[..., :1].astype(np.float32) / 255 > 0.5, tf.float32))
    src = ["--images", str(pet_src)]
    assert evaluate_main(["--workdir", str(w), *src, "--out", str(tmp_path / "raw.json")]) == 0
    raw = json.loads((tmp_path / "raw.json").read_text())
    (lc,) = raw["largest_component"]
    assert raw["postprocess"] == "none" and (lc["class"], lc["name"]) == (1, "pet") and lc["iou"] == raw["iou_per_class"][1]
    said = capsys.readouterr().err
    assert ("keeping only the largest connected component raises the IoU of class 1 (pet)" in said) == lc["helps"]
    assert evaluate_main(["--workdir", str(w), *src, "--postprocess", "largest", "--out", str(tmp_path / "pp.json")]) == 0
    pp = json.loads((tmp_path / "pp.json").read_text())
    assert pp["postprocess"] == "largest:1" and pp["iou_per_class"][1] == pytest.approx(lc["iou_largest_only"])
    assert pp["iou_per_class"][1] != raw["iou_per_class"][1]
    # And its outlines both ways: the masks as predicted, and as predict --postprocess largest writes them.
    assert (lc["hd95"], lc["hd95_largest_only"]) == pytest.approx((raw["boundary"][0]["hd95"], pp["boundary"][0]["hd95"]))
    assert lc["hd95_largest_only"] != lc["hd95"]
    assert predict_main(["--workdir", str(w), str(pet_src / "images"), "--out", str(tmp_path / "pred"),
                         "--postprocess", "largest:1"]) == 0
    assert "--postprocess largest:1" in capsys.readouterr().out
    cm, objects = np.zeros((2, 2), np.int64), []
    for path in sorted((pet_src / "images").iterdir()):
        truth = (np.asarray(Image.open(pet_src / "annotations" / "trimaps" / f"{path.stem}.png")) == 1).astype(int)
        pred = np.asarray(Image.open(tmp_path / "pred" / f"{path.stem}_mask.png")).astype(int)
        assert ndimage.label(pred == 1, structure=np.ones((3, 3)))[1] <= 1
        cm += np.bincount((truth * 2 + pred).ravel(), minlength=4).reshape(2, 2)
        objects.append(object_counts(pred, truth, 2))
    assert pp["iou_per_class"] == pytest.approx(scores(cm)["iou_per_class"], abs=1e-12)
    # Its object scores are those of the masks predict wrote: one object an image at most now.
    assert all(r["object_f1_per_class"][0] is None for r in pp["per_image"])
    by_name = {r["image"]: r for r in pp["per_image"]}  # and each image's objects counted
    for path, counts in zip(sorted((pet_src / "images").iterdir()), objects, strict=True):
        assert by_name[str(path)]["true_objects_per_class"] == [None, int(counts[1, 0])]
        assert by_name[str(path)]["predicted_objects_per_class"] == [None, int(counts[1, 1])] != [None, 0]
    (mine,) = object_scores(sum(objects), per_image=np.stack(objects))
    (theirs,) = pp["objects"]
    assert [pytest.approx(b) for b in mine.pop("by_iou")] == theirs.pop("by_iou")
    assert theirs == pytest.approx({**mine, "name": "pet"})
    assert pp["objects"][0]["predicted_objects"] <= len(list((pet_src / "images").iterdir()))
    assert raw["objects"][0]["predicted_objects"] > pp["objects"][0]["predicted_objects"]
    # min-size: evaluate's measure of each size is the score of the masks predict writes with it.
    (small,) = raw["small_objects"]
    assert (small["class"], small["name"], small["object_f1"]) == (1, "pet", raw["objects"][0]["f1"])
    best = next(r for r in small["by_min_size"] if r["min_size"] == small["best_min_size"])
    assert small["helps"] and best["object_f1"] > small["object_f1"], small  # the bright specks go
    assert (f"removing the objects under {best['min_size']} pixels raises the object F1 of class 1 (pet) from "
            f"{small['object_f1']:.4f} to {best['object_f1']:.4f}") in said
    flag = f"min-size:{best['min_size']}"
    assert f"(predict --postprocess {flag}:1)" in said
    assert evaluate_main(["--workdir", str(w), *src, "--postprocess", flag, "--out", str(tmp_path / "ms.json")]) == 0
    ms = json.loads((tmp_path / "ms.json").read_text())
    assert ms["postprocess"] == f"{flag}:1" and ms["iou_per_class"][1] == pytest.approx(best["iou"])
    assert (ms["objects"][0]["f1"], ms["objects"][0]["seg"]) == pytest.approx((best["object_f1"], best["seg"]))
    assert ms["small_objects"] == raw["small_objects"]  # measured on the masks as predicted, whatever the flag
    assert predict_main(["--workdir", str(w), str(pet_src / "images"), "--out", str(tmp_path / "pred_ms"),
                         "--postprocess", flag, "--instances"]) == 0
    for path in sorted((pet_src / "images").iterdir()):
        labels = np.asarray(Image.open(tmp_path / "pred_ms" / f"{path.stem}_instances.tif"))
        assert np.bincount(labels.ravel())[1:].min(initial=best["min_size"]) >= best["min_size"]
    # grow: objects grown over the background, the mask as predicted. evaluate's measure of each
    # growth is the score with the flag, and predict numbers the objects so grown.
    (grown,) = raw["grown_objects"]
    assert [r["grow"] for r in grown["by_grow"]] == list(GROWS) and grown["object_f1"] == raw["objects"][0]["f1"]
    by = grown["by_grow"][1]
    capsys.readouterr()
    assert evaluate_main(["--workdir", str(w), *src, "--postprocess", "grow:2", "--out", str(tmp_path / "g.json")]) == 0
    g, said_g = json.loads((tmp_path / "g.json").read_text()), capsys.readouterr().err
    # With grow given, min-size is measured on the grown objects, and its flag keeps the growth.
    (small_g,) = g["small_objects"]
    assert small_g["object_f1"] == pytest.approx(by["object_f1"]) and small_g["helps"], small_g
    assert f"(predict --instances --postprocess min-size:{small_g['best_min_size']}:1+grow:2:1)" in said_g
    assert (g["postprocess"], g["iou"]) == ("grow:2:1", raw["iou"])  # pixels as predicted
    assert (g["objects"][0]["f1"], g["objects"][0]["seg"], g["objects"][0]["mean_ap"]) == pytest.approx(
        (by["object_f1"], by["seg"], by["mean_ap"]))
    assert g["objects"][0]["seg"] != raw["objects"][0]["seg"]
    assert ("growing the objects of class 1 (pet)" in said) == grown["helps"]
    assert ("measures min-size on the grown objects" in said) == grown["helps"]  # min-size helps too (above)
    assert predict_main(["--workdir", str(w), str(pet_src / "images"), "--out", str(tmp_path / "pred_g"),
                         "--postprocess", "grow:2", "--instances"]) == 0
    pixels, numbered = np.zeros(2, np.int64), 0  # of the objects, of class 1; the objects' rows
    for path in sorted((pet_src / "images").iterdir()):
        mask = np.asarray(Image.open(tmp_path / "pred_g" / f"{path.stem}_mask.png"))
        labels = np.asarray(Image.open(tmp_path / "pred_g" / f"{path.stem}_instances.tif"))
        assert np.array_equal(labels, instances(mask, (1,), (0, 2)))
        pixels += [(labels > 0).sum(), (mask == 1).sum()]
        # Each object's row: its area grown, its confidence over the pixels the mask gives it (> 0.5).
        rows = [r.split(",") for r in (tmp_path / "pred_g" / f"{path.stem}_objects.csv").read_text().splitlines()[1:]]
        assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [
            (i, 1, n) for i, n in enumerate(np.bincount(labels.ravel())[1:], 1)]
        assert all(0.5 < float(r[-1]) <= 1 for r in rows)
        numbered += len(rows)
    assert pixels[0] > pixels[1]  # grown
    said = capsys.readouterr().out
    assert f"; {numbered:,} objects numbered (STEM_instances.tif, STEM_objects.csv)" in said
    # And every image's rows in one table, after the image's path and page.
    assert f"predict: {tmp_path / 'pred_g' / 'objects.csv'}: the {numbered:,} objects of " in said
    table = (tmp_path / "pred_g" / "objects.csv").read_text().splitlines()
    first = sorted((pet_src / "images").iterdir())[0]
    head, *own = (tmp_path / "pred_g" / f"{first.stem}_objects.csv").read_text().splitlines()
    assert table[0] == f"image,page,{head}" and len(table) == 1 + numbered
    assert table[1 : 1 + len(own)] == [f"{first},,{row}" for row in own]
    assert predict_main(["--workdir", str(w), str(pet_src / "images"), "--out", str(tmp_path / "p2"),
                         "--postprocess", "grow:2"]) == 2
    assert "predict: error: --postprocess 'grow:2': grow is used with --instances only" in capsys.readouterr().err
    # Bad values, before any work; the flag is not one of --data's.
    assert predict_main(["--workdir", str(w), str(pet_src / "images"), "--out", str(tmp_path / "p2"),
                         "--postprocess", "largest:2"]) == 2
    assert "predict: error: --postprocess 'largest:2': class 2 is not one of this model's classes 1 to 1" in (
        capsys.readouterr().err)
    assert predict_main(["--workdir", str(w), str(pet_src / "images"), "--out", str(tmp_path / "p2"),
                         "--instances", "--instance-classes", "1,2"]) == 2
    assert "predict: error: --instance-classes '1,2': class 2 is not one of this model's classes 1 to 1" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        predict_main(["--workdir", str(w), str(pet_src / "images"), "--out", str(tmp_path / "p2"),
                      "--instance-classes", "1"])
    assert "--instance-classes: used with --instances only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["--workdir", str(w), "--data", str(shards), "--postprocess", "largest"])
    assert "--postprocess: not used with --data" in capsys.readouterr().err


def test_advice_shows_a_small_gain_with_the_digits_that_tell_it_apart():
    from unet_dist.image_scores import apart

    assert apart(0.9617923050, 0.9617954015) == "0.96179 to 0.96180"
    assert apart(0.96179230, 0.96179290) == "0.961792 to 0.961793"
    assert apart(0.9, 0.95, " -> ") == "0.9000 -> 0.9500"
    assert apart(0.5, 0.5) == "0.5000 to 0.5000"


def test_given_objects_grow_from_their_own_numbers():
    # grow_effect of a label image (evaluate --predicted-instances): two touching cells predicted a
    # pixel short of their outer edges grow back towards the truth from their own numbers; as a class
    # mask the two are one component, which matches neither cell.
    from unet_dist.postprocess import GROWS, grow_effect

    truth_ids = np.zeros((12, 20), np.int32)
    truth_ids[2:10, 2:10], truth_ids[2:10, 10:18] = 1, 2
    labels = np.zeros_like(truth_ids)
    labels[3:9, 3:10], labels[3:9, 10:17] = 1, 2
    pred, truth = (labels > 0).astype(np.int32), (truth_ids > 0).astype(np.int32)
    effect = grow_effect(pred, truth, 2, truth_ids, labels)
    seg = [object_scores(np.stack([np.zeros_like(row), row]))[0]["seg"] for row in effect[:, 1]]
    # Grown by 1: the true cells but their outer corners (at sqrt(2)), the best of the growths.
    assert seg[0] < 0.7 < 0.95 < seg[1 + GROWS.index(1)] == max(seg)
    merged = grow_effect(pred, truth, 2, truth_ids)
    assert merged[:, 1, 2].tolist() == [0] * (1 + len(GROWS))  # no match at any growth
