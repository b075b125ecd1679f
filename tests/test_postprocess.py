"""Largest-component post-processing: the masks, the confusion-matrix arithmetic evaluate uses, and
predict and evaluate --images with --postprocess."""

import json

import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_overrides

from unet_dist.config import ConfigError, load_config
from unet_dist.data.convert import IGNORE
from unet_dist.metrics import confusion_matrix, scores
from unet_dist.objects import object_counts, object_scores
from unet_dist.postprocess import advice, applied, keep_largest, moved_by_truth, parse


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


@pytest.mark.parametrize("text,classes", [("none", ()), ("largest", (1, 2, 3)), ("largest:3,1,3", (1, 3))])
def test_postprocess_values(text, classes):
    assert parse(text, 4) == classes


@pytest.mark.parametrize("text,message", [
    ("big", "none, largest"), ("largest:", "none, largest"), ("largest:a", "'a' is not a list of class ids"),
    ("largest:0", "class 0 is not one of this model's classes 1 to 3"), ("largest:4", "class 4 is not one")])
def test_bad_postprocess_values_are_named(text, message):
    with pytest.raises(ConfigError, match=f"--postprocess '{text}': .*{message}"):
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
    assert predict_main(["--workdir", str(w), str(pet_src / "images"), "--out", str(tmp_path / "pred"),
                         "--postprocess", "largest:1"]) == 0
    assert "--postprocess largest:1" in capsys.readouterr().out
    cm, objects = np.zeros((2, 2), np.int64), np.zeros((2, 4))
    for path in sorted((pet_src / "images").iterdir()):
        truth = (np.asarray(Image.open(pet_src / "annotations" / "trimaps" / f"{path.stem}.png")) == 1).astype(int)
        pred = np.asarray(Image.open(tmp_path / "pred" / f"{path.stem}_mask.png")).astype(int)
        assert ndimage.label(pred == 1, structure=np.ones((3, 3)))[1] <= 1
        cm += np.bincount((truth * 2 + pred).ravel(), minlength=4).reshape(2, 2)
        objects += object_counts(pred, truth, 2)
    assert pp["iou_per_class"] == pytest.approx(scores(cm)["iou_per_class"], abs=1e-12)
    # Its object scores are those of the masks predict wrote: one object an image at most now.
    assert all(r["object_f1_per_class"][0] is None for r in pp["per_image"])
    (mine,) = object_scores(objects)
    assert pp["objects"] == [pytest.approx({**mine, "name": "pet"})]
    assert pp["objects"][0]["predicted_objects"] <= len(list((pet_src / "images").iterdir()))
    assert raw["objects"][0]["predicted_objects"] > pp["objects"][0]["predicted_objects"]
    # Bad values, before any work; the flag is not one of --data's.
    assert predict_main(["--workdir", str(w), str(pet_src / "images"), "--out", str(tmp_path / "p2"),
                         "--postprocess", "largest:2"]) == 2
    assert "predict: error: --postprocess 'largest:2': class 2 is not one of this model's classes 1 to 1" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        evaluate_main(["--workdir", str(w), "--data", str(shards), "--postprocess", "largest"])
    assert "--postprocess: not used with --data" in capsys.readouterr().err
