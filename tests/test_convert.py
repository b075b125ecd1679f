import json
import re

import numpy as np
import pytest
import tensorflow as tf
from conftest import colour_coded_dir, run_main, run_module
from PIL import Image

from unet_dist.data.convert import ConvertError, convert
from unet_dist.data.imageio import load_mask, load_rgb
from unet_dist.data.pipeline import FEATURES


def _pet_dir(tmp_path, n=3):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "annotations" / "trimaps").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
        tri = np.full((40, 50), 2, np.uint8)
        tri[10:30, 10:30] = 1
        tri[10, 10:30] = 3
        Image.fromarray(img).save(src / "images" / f"ok_{i}.jpg")
        Image.fromarray(tri).save(src / "annotations" / "trimaps" / f"ok_{i}.png")
    return src


def _add(src, stem, image_bytes=None, image=None, mask=None, suffix=".jpg", mask_shape=(40, 50)):
    path = src / "images" / f"{stem}{suffix}"
    if image_bytes is not None:
        path.write_bytes(image_bytes)
    elif image is not None:
        image.save(path)
    if mask is not False:
        tri = np.full(mask_shape, 2, np.uint8)
        tri[5:15, 5:15] = 1
        Image.fromarray(tri if mask is None else mask).save(src / "annotations" / "trimaps" / f"{stem}.png")
    return path


def _records(out, split):
    m = json.loads((out / "manifest.json").read_text())
    recs = []
    for f in m[split]["shards"]:
        for raw in tf.data.TFRecordDataset(str(out / f)):
            recs.append(tf.io.parse_single_example(raw, FEATURES))
    return recs


def test_each_bad_file_kind_is_skipped_with_its_reason(tmp_path):
    src = _pet_dir(tmp_path)
    good = (src / "images" / "ok_0.jpg").read_bytes()
    _add(src, "empty", image_bytes=b"")
    _add(src, "truncated", image_bytes=good[: len(good) // 3])
    _add(src, "notimage", image_bytes=b"this is text, not a jpeg" * 20)
    _add(src, "nomask", image_bytes=good, mask=False)
    _add(src, "wrongsize", image_bytes=good, mask_shape=(20, 20))
    (src / "images" / "Abyssinian_1.mat").write_bytes(b"MATLAB 5.0")
    _add(src, "badtrimap", image_bytes=good, mask=np.full((40, 50), 7, np.uint8))
    m = convert(src, tmp_path / "out", shards=2, val_fraction=0.0, workers=2, progress=False)
    reasons = {json.dumps(s["file"]).split("/")[-1].strip('"'): s["reason"] for s in m["skipped"]}
    assert reasons["empty.jpg"] == "empty file"
    assert "corrupt or truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["notimage.jpg"]
    assert "no mask" in reasons["nomask.jpg"]
    assert "20x20" in reasons["wrongsize.jpg"] and "50x40" in reasons["wrongsize.jpg"]
    assert "not an image file (.mat)" in reasons["Abyssinian_1.mat"]
    assert "[7]" in reasons["badtrimap.jpg"]
    assert len(m["skipped"]) == 7
    assert m["train"]["records"] == 3
    # The records' sizes (predict --mode auto reads them): every kept image here is 50x40.
    assert m["record_size"] == {"min": [40, 50], "max": [40, 50]}


def test_a_conversion_in_a_log_file_reports_its_progress(tmp_path, capsys, monkeypatch):
    # No terminal (a batch job): a line now and then (here after every image but the last), where
    # tqdm would show nothing at all; progress=False silences it.
    import unet_dist.progress

    monkeypatch.setattr(unet_dist.progress, "LOG_INTERVAL_S", 0.0)
    src = _pet_dir(tmp_path, n=3)
    convert(src, tmp_path / "out", shards=1, workers=1)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("convert: ")]
    assert [line.split(" (")[0] for line in lines] == ["convert: 1/3 img", "convert: 2/3 img"], lines
    convert(src, tmp_path / "out2", shards=1, workers=1, progress=False)
    assert "convert: " not in capsys.readouterr().err


def test_exit_codes_and_summary_line(tmp_path, capsys):
    src = _pet_dir(tmp_path, n=2)
    (src / "images" / "x.mat").write_bytes(b"0")
    ok = run_module("unet_dist.convert", str(src), str(tmp_path / "o1"), "--shards", "1", "--workers", "1")
    assert ok.returncode == 0, ok.stderr
    assert "skipped 1 files" in ok.stderr and "x.mat" in ok.stderr
    # Not the named layout: non-zero, one clear line.
    bad = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "o2"), "--layout", "folders")
    assert bad.returncode != 0
    assert "is not in the --layout folders layout" in bad.stderr and "masks is missing" in bad.stderr
    # Nothing convertible.
    for f in (src / "images").glob("*.jpg"):
        f.write_bytes(b"")
    none = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "o3"), "--workers", "1")
    assert none.returncode != 0 and "could be converted" in none.stderr
    assert not (tmp_path / "o3" / "manifest.json").exists()
    # An existing conversion is not overwritten by accident.
    again = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "o1"))
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert (tmp_path / "o1" / "manifest.json").exists()
    # OUT below a file: one line, for convert and for the synthetic-data writer.
    (tmp_path / "afile").write_text("x")
    for module, args in (("unet_dist.convert", [str(src)]), ("unet_dist.synthetic", ["-n", "1"])):
        blocked = run_main(capsys, module, *args, str(tmp_path / "afile" / "out"))
        assert blocked.returncode != 0 and "Traceback" not in blocked.stderr, blocked.stderr[-2000:]
        assert f"OUT {tmp_path / 'afile' / 'out'}" in blocked.stderr
    # The synthetic writer replaces an earlier synthetic set (a smaller one keeps none of its extra
    # samples) and refuses a folder of other images, which it would have mixed into.
    run_module("unet_dist.synthetic", str(tmp_path / "syn"), "-n", "3", check=True)
    run_module("unet_dist.synthetic", str(tmp_path / "syn"), "-n", "2", "--seed", "1", check=True)
    assert sorted(p.name for p in (tmp_path / "syn" / "images").iterdir()) == ["synth_00000.jpg", "synth_00001.jpg"]
    mixed = run_main(capsys, "unet_dist.synthetic", str(src), "-n", "1")
    assert mixed.returncode == 2 and f"OUT {src} holds files this command did not write" in mixed.stderr
    assert not list(src.glob("*/synth_*")) and not list(src.glob("*/*/synth_*"))
    # --sparse: small pets on 384x384 images, the set patch training with foreground oversampling is for.
    run_main(capsys, "unet_dist.synthetic", str(tmp_path / "sparse"), "-n", "4", "--sparse", check=True)
    for trimap in (tmp_path / "sparse" / "annotations" / "trimaps").iterdir():
        t = np.asarray(Image.open(trimap))
        assert t.shape == (384, 384) and 0 < (t == 1).mean() < 0.02, (trimap, (t == 1).mean())
    # --cells: EM-like gray PNG slices of about 300 touching cells (1) parted by membranes (2).
    run_main(capsys, "unet_dist.synthetic", str(tmp_path / "cells"), "-n", "1", "--cells", check=True)
    image = Image.open(tmp_path / "cells" / "images" / "synth_00000.png")
    t = np.asarray(Image.open(tmp_path / "cells" / "annotations" / "trimaps" / "synth_00000.png"))
    assert image.mode == "L" and image.size == (572, 572) and set(np.unique(t)) == {1, 2}
    from scipy import ndimage

    assert 250 < ndimage.label(t == 1)[1] <= 300  # cells: touching, yet apart
    # --faint-membranes: the same cells, membranes 0.08 darker than their cell instead of dark.
    run_main(capsys, "unet_dist.synthetic", str(tmp_path / "faint"), "-n", "1", "--cells", "--faint-membranes",
             check=True)
    faint = np.asarray(Image.open(tmp_path / "faint" / "images" / "synth_00000.png")).astype(float)
    assert (np.asarray(Image.open(tmp_path / "faint" / "annotations" / "trimaps" / "synth_00000.png")) == t).all()
    dark = np.asarray(image).astype(float)
    assert dark[t == 1].mean() - dark[t == 2].mean() > 80 and 10 < faint[t == 1].mean() - faint[t == 2].mean() < 30
    assert run_main(capsys, "unet_dist.synthetic", str(tmp_path / "f2"), "--faint-membranes").returncode == 2
    # --instance-masks: the same cells as instance label images (folders layout), each cell's id on
    # its membrane pixels too; written over the trimap set, which goes.
    run_main(capsys, "unet_dist.synthetic", str(tmp_path / "faint"), "-n", "1", "--cells", "--faint-membranes",
             "--instance-masks", check=True)
    ids = np.asarray(Image.open(tmp_path / "faint" / "masks" / "synth_00000.png"))
    assert not (tmp_path / "faint" / "annotations" / "trimaps").exists()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "faint" / "images" / "synth_00000.png")), faint)
    assert ids.shape == (572, 572) and ids.min() == 1 and 250 < len(np.unique(ids)) <= 300
    assert all(len(np.unique(ids[t == 1][ndimage.label(t == 1)[0][t == 1] == k])) == 1 for k in (1, 50, 100))
    # --ct: int16 slices in Hounsfield units, the organ (1) 30 HU above the tissue, air and bone in some.
    run_main(capsys, "unet_dist.synthetic", str(tmp_path / "ct"), "-n", "4", "--ct", check=True)
    hu = [np.load(p) for p in sorted((tmp_path / "ct" / "images").iterdir())]
    t = np.asarray(Image.open(tmp_path / "ct" / "annotations" / "trimaps" / "synth_00000.png"))
    assert hu[0].dtype == np.int16 and hu[0].shape == t.shape == (96, 96) and set(np.unique(t)) == {1, 2}
    assert 25 < hu[0][t == 1].mean() - np.median(hu[0][t == 2]) < 35
    air = [h.min() == -1000 and h.max() == 1800 for h in hu]
    assert any(air) and not all(air), [(h.min(), h.max()) for h in hu]


def test_modes_exif_and_sizes(tmp_path):
    src = _pet_dir(tmp_path, n=1)
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    _add(src, "gray", image=Image.fromarray(rgb[..., 0], "L"))
    _add(src, "rgba", image=Image.fromarray(np.dstack([rgb, np.full((40, 50), 255, np.uint8)]), "RGBA"), suffix=".png")
    _add(src, "cmyk", image=Image.fromarray(rgb).convert("CMYK"))
    _add(src, "palette", image=Image.fromarray(rgb).convert("P"), suffix=".png")
    _add(src, "sixteen", image=Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), suffix=".png")
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): stored 50x40, shown 40x50.
    yy, xx = np.mgrid[0:40, 0:50]
    smooth = np.dstack([yy * 6, xx * 5, (yy + xx) * 2]).astype(np.uint8)  # JPEG keeps smooth data
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(smooth, 1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(src / "images" / "exif.jpg", exif=exif.tobytes())
    tri = np.full((40, 50), 2, np.uint8)
    Image.fromarray(tri).save(src / "annotations" / "trimaps" / "exif.png")
    m = convert(src, tmp_path / "out", shards=1, val_fraction=0.0, workers=1, progress=False)
    assert m["skipped"] == [], m["skipped"]
    recs = {r["stem"].numpy().decode(): r for r in _records(tmp_path / "out", "train")}
    assert set(recs) == {"ok_0", "gray", "rgba", "cmyk", "palette", "sixteen", "exif"}
    for stem, r in recs.items():
        img = tf.io.decode_image(r["image"], channels=3).numpy()
        assert img.shape == (40, 50, 3), stem
        assert (int(r["height"]), int(r["width"])) == (40, 50)
    # The EXIF-rotated image is stored upright: compare with the original pixels (JPEG tolerance).
    upright = tf.io.decode_image(recs["exif"]["image"], channels=3).numpy().astype(int)
    assert np.abs(upright - smooth.astype(int)).mean() < 4
    assert load_rgb(src / "images" / "gray.jpg").shape == (40, 50, 3)


def test_resize_and_classes_and_manifest(tmp_path):
    src = _pet_dir(tmp_path, n=10)
    m = convert(src, tmp_path / "bin", image_size=(32, 24), shards=3, val_fraction=0.3, seed=5, workers=2,
                progress=False)
    assert m["image_size"] == [32, 24]
    assert m["layout"] == "oxford-pet" and m["classes"] == "binary" and m["num_classes"] == 2
    assert m["train"]["records"] == 7 and m["val"]["records"] == 3
    assert len(m["train"]["shards"]) == 3 and m["train"]["shards"][0] == "train-00000-of-00003.tfrecord"
    assert abs(sum(m["class_pixel_fraction"]) - 1) < 1e-6
    for r in _records(tmp_path / "bin", "train"):
        mask = tf.io.decode_png(r["mask"]).numpy()
        assert mask.shape == (32, 24, 1)
        assert set(np.unique(mask)) <= {0, 1}  # pet vs the rest: border (3) joins the rest
    tri = convert(src, tmp_path / "tri", classes="trimap", shards=1, val_fraction=0.3, seed=5, workers=1,
                  progress=False)
    assert tri["num_classes"] == 3
    vals = set()
    for r in _records(tmp_path / "tri", "train"):
        vals |= set(np.unique(tf.io.decode_png(r["mask"]).numpy()).tolist())
    assert vals == {0, 1, 2}
    # Deterministic split for a seed; another seed gives another split.
    convert(src, tmp_path / "again", shards=1, val_fraction=0.3, seed=5, workers=1, progress=False)
    convert(src, tmp_path / "other", shards=1, val_fraction=0.3, seed=6, workers=1, progress=False)

    def val_stems(out):
        return sorted(r["stem"].numpy().decode() for r in _records(out, "val"))

    assert val_stems(tmp_path / "tri") == val_stems(tmp_path / "again")
    assert val_stems(tmp_path / "again") != val_stems(tmp_path / "other")
    # No temporary files remain under the output.
    assert not [p for p in (tmp_path / "bin").iterdir() if p.name.startswith(".")]


def test_folders_layout_binary_255_and_multiclass(tmp_path):
    src = tmp_path / "f"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i, ext in enumerate(["png", "bmp", "tif"]):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(src / "images" / f"s{i}.{ext}")
        mask = np.zeros((16, 16), np.uint8)
        mask[:8] = 255
        Image.fromarray(mask).save(src / "masks" / f"s{i}.png")
    m = convert(src, tmp_path / "o", layout="folders", shards=1, val_fraction=0, workers=1, progress=False)
    assert m["train"]["records"] == 3 and m["num_classes"] == 2
    mask = tf.io.decode_png(_records(tmp_path / "o", "train")[0]["mask"]).numpy()
    assert set(np.unique(mask)) == {0, 1}
    for i in range(3):
        mask = np.zeros((16, 16), np.uint8)
        mask[:4], mask[4:8] = 1, 4
        Image.fromarray(mask).save(src / "masks" / f"s{i}.png")
    kw = {"layout": "folders", "classes": "multiclass", "shards": 1, "val_fraction": 0, "workers": 1,
          "progress": False}
    # Ids 0, 1 and 4: a gap is refused, with the key that accepts it, and nothing is written.
    with pytest.raises(ConvertError, match=r"class ids \[0, 1, 4\] but never 2, 3: multiclass ids run 0\.\.N-1; "
                                           r"if those classes .* pass --num-classes 5$"):
        convert(src, tmp_path / "mc", **kw)
    assert not (tmp_path / "mc" / "manifest.json").exists()
    mc = convert(src, tmp_path / "mc", num_classes=5, **kw)
    assert mc["num_classes"] == 5 and mc["class_pixel_fraction"] == [0.5, 0.25, 0, 0, 0.25]
    # A mask with an id at or above --num-classes is skipped and named (the others convert).
    mask = np.zeros((16, 16), np.uint8)
    mask[:4] = 7
    Image.fromarray(mask).save(src / "masks" / "s0.png")
    mc = convert(src, tmp_path / "mc", num_classes=5, overwrite=True, **kw)
    assert mc["train"]["records"] == 2
    assert mc["skipped"] == [{"file": str(src / "images" / "s0.png"),
                              "reason": f"mask {src / 'masks' / 's0.png'}: class ids [7] are not below --num-classes 5"}]
    # 0/255 masks as multiclass would be a 256-class model: refused, pointing at --classes binary.
    for i in range(3):
        mask = np.zeros((16, 16), np.uint8)
        mask[:8] = 255
        Image.fromarray(mask).save(src / "masks" / f"s{i}.png")
    with pytest.raises(ConvertError, match=r"\(0/255 masks are two classes: --classes binary\)"):
        convert(src, tmp_path / "mc255", **kw)


def test_instance_masks_become_objects_parted_where_they_touch(tmp_path, capsys):
    # --classes instances: label images (0 background, an id per object, 16-bit here, ids past 255)
    # of touching cells. Two classes, the touching objects parted by a gap one pixel wide, so that
    # their 8-connected components are the objects again, at the source size and resized.
    from unet_dist.data.convert import instance_classes
    from unet_dist.objects import components

    labels = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [0, 3, 3, 0], [0, 3, 3, 0]])
    assert instance_classes(labels).tolist() == [[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 0]]
    src = tmp_path / "cells"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    yy, xx = np.mgrid[0:64, 0:64]
    centres = [(10, 12), (12, 40), (40, 10), (44, 44), (30, 28), (55, 60)]
    nearest = np.argmin([(yy - y) ** 2 + (xx - x) ** 2 for y, x in centres], axis=0)
    tiles = (nearest + 1) * 300  # every pixel in a cell, each touching its neighbours: ids 300 ... 1800
    tiles[:2] = 0  # some background
    for i, ids in enumerate((tiles, tiles.T)):
        Image.fromarray(np.full((64, 64), 90 + i, np.uint8)).save(src / "images" / f"c{i}.png")
        Image.fromarray(ids.astype(np.uint16)).save(src / "masks" / f"c{i}.png")
    np.save(src / "images" / "c2.npy", np.zeros((64, 64, 3), np.uint8))
    np.save(src / "masks" / "c2.npy", tiles)  # an array of ids, any width
    kw = {"layout": "folders", "classes": "instances", "shards": 1, "val_fraction": 0, "workers": 1,
          "progress": False}
    m = convert(src, tmp_path / "o", **kw)
    assert (m["num_classes"], m["class_names"], m["train"]["records"]) == (2, ["background", "object"], 3)
    for rec in _records(tmp_path / "o", "train"):
        mask = tf.io.decode_png(rec["mask"]).numpy()[..., 0]
        assert components(mask, 1)[1] == len(centres)  # each cell its own object
        assert 0.02 < (mask[2:] == 0).mean() < 0.15  # the gaps: thin
    small = convert(src, tmp_path / "s", image_size=(40, 40), **kw)  # gaps drawn at the new size
    assert small["train"]["records"] == 3
    for rec in _records(tmp_path / "s", "train"):
        assert components(tf.io.decode_png(rec["mask"]).numpy()[..., 0], 1)[1] == len(centres)
    # Instances drawn in colours for viewing: each colour an object, black the background.
    palette = np.array([[0, 0, 0], [200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [200, 30, 200],
                        [30, 200, 200]], np.uint8)
    Image.fromarray(palette[tiles // 300]).save(src / "masks" / "c1.png")
    m = convert(src, tmp_path / "o", overwrite=True, **kw)
    (rgb,) = [r for r in _records(tmp_path / "o", "train") if tf.io.decode_png(r["image"]).numpy().mean() == 91]
    mask = tf.io.decode_png(rgb["mask"]).numpy()[..., 0]
    assert components(mask, 1)[1] == len(centres) and not mask[:2].any() and 0.02 < (mask[2:] == 0).mean() < 0.15
    # A negative id is named; the other layouts and --colors do not take instances.
    np.save(src / "masks" / "c2.npy", -tiles)
    m = convert(src, tmp_path / "o", overwrite=True, **kw)
    assert m["skipped"] == [{"file": str(src / "images" / "c2.npy"), "reason": f"mask {src / 'masks' / 'c2.npy'}: "
                             "instance id -1800: ids are 0 (background) or positive"}]
    # A binary mask of the same cells, their membranes drawn, is not instances: every cell would be one object.
    np.save(src / "masks" / "c2.npy", np.where(instance_classes(tiles) > 0, 255, 0))
    m = convert(src, tmp_path / "o", overwrite=True, **kw)
    assert m["skipped"] == [{"file": str(src / "images" / "c2.npy"), "reason": f"mask {src / 'masks' / 'c2.npy'}: "
                             "its 1 id is 6 separate objects: not an instance label image (an id per object) but a "
                             "binary or class mask; convert it with --classes binary or multiclass, or label its "
                             "objects first"}]
    ids = tiles.copy()
    ids[:, 43:45] = np.where(ids[:, 43:45] == 1200, 0, ids[:, 43:45])  # a cell cut in two: still instances
    assert components(instance_classes(ids), 1)[1] == len(centres) + 1
    np.save(src / "masks" / "c2.npy", ids)
    assert convert(src, tmp_path / "o", overwrite=True, **kw)["skipped"] == []
    with pytest.raises(ConvertError, match="^--classes instances needs --layout folders$"):
        convert(_pet_dir(tmp_path), tmp_path / "p", classes="instances")


def test_pixels_of_the_ignore_value_are_left_out(tmp_path, capsys):
    # --ignore-value: the Pet trimaps' border (3) left out of pet vs the rest; records hold IGNORE there.
    from unet_dist.data.convert import IGNORE

    src = _pet_dir(tmp_path, n=4)
    m = convert(src, tmp_path / "bin", ignore_value=3, shards=1, val_fraction=0, workers=1, progress=False)
    assert m["ignore_value"] == 3 and m["num_classes"] == 2
    assert m["ignored_pixel_fraction"] == 20 / (40 * 50)  # the border row of each trimap
    assert abs(sum(m["class_pixel_fraction"]) - 1) < 1e-6  # of the labelled pixels
    mask = tf.io.decode_png(_records(tmp_path / "bin", "train")[0]["mask"]).numpy()[..., 0]
    assert (mask[10, 10:30] == IGNORE).all() and set(np.unique(mask)) == {0, 1, IGNORE}
    # Without it the border joins the rest, and the manifest says nothing is left out.
    plain = convert(src, tmp_path / "plain", shards=1, val_fraction=0, workers=1, progress=False)
    assert plain["ignore_value"] is None and plain["ignored_pixel_fraction"] is None
    # VOC-style masks: class ids 0..2 and a void 255, which would otherwise be a gap up to id 255.
    folders = tmp_path / "voc"
    (folders / "images").mkdir(parents=True)
    (folders / "masks").mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folders / "images" / f"v{i}.png")
        ids = np.zeros((16, 16), np.uint8)
        ids[:4], ids[4:8], ids[8:10] = 1, 2, 255
        Image.fromarray(ids).save(folders / "masks" / f"v{i}.png")
    kw = {"layout": "folders", "classes": "multiclass", "shards": 1, "val_fraction": 0, "workers": 1,
          "progress": False}
    with pytest.raises(ConvertError, match="never 3, 4, 5"):
        convert(folders, tmp_path / "voc_out", **kw)
    voc = convert(folders, tmp_path / "voc_out", ignore_value=255, **kw)
    assert voc["num_classes"] == 3 and voc["class_pixel_fraction"] == [0.428571, 0.285714, 0.285714]  # 6, 4, 4 of 14 rows
    assert voc["ignored_pixel_fraction"] == 0.125
    done = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "cli"), "--ignore-value", "3", "--shards",
                    "1", "--val-fraction", "0", "--workers", "1", check=True)
    assert ("2 classes (1.0% of the pixels left out: mask value 3), images as JPEG (auto: every source image is a "
            "JPEG), in") in done.stdout, done.stdout
    # A split with no labelled pixel (a void mask alone in val, or in train) is refused, not trained or scored as NaN.
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(folders / "images" / f"v{i}.png")
        Image.fromarray(np.full((16, 16), 255 if i == 2 else i, np.uint8)).save(folders / "masks" / f"v{i}.png")
    kw = {**kw, "classes": "binary", "ignore_value": 255}
    refused = []
    for fold in range(3):  # each image is val once
        try:
            convert(folders, tmp_path / f"fold{fold}", fold=(fold, 3), **kw)
        except ConvertError as e:
            refused.append(str(e))
    assert refused == [f"--ignore-value 255: every mask pixel of the 1 val images in {folders} has that value; "
                       "nothing is labelled"], refused
    (folders / "images" / "v0.png").unlink()
    (folders / "images" / "v1.png").unlink()
    with pytest.raises(ConvertError, match="every mask pixel of the 1 train images in .* has that value"):
        convert(folders, tmp_path / "void", **kw)


def test_colour_coded_masks_map_to_the_classes_of_their_colours(tmp_path, capsys):
    src = colour_coded_dir(tmp_path)
    kw = {"layout": "folders", "classes": "multiclass", "shards": 1, "val_fraction": 0, "workers": 1,
          "progress": False}
    plain = tmp_path / "colors.txt"
    plain.write_text("# R G B name\n0 0 0 background\n255,0,0 car\n\n0 255 0 road\n")
    cvat = tmp_path / "labelmap.txt"  # CVAT's export
    cvat.write_text("# label:color_rgb:parts:actions\nbackground:0,0,0::\ncar:255,0,0::\nroad:0,255,0::\n")
    for i, colors in enumerate((plain, cvat)):
        m = convert(src, tmp_path / f"out{i}", colors=colors, **kw)
        assert m["num_classes"] == 3 and m["class_names"] == ["background", "car", "road"], m
        assert m["colors"] == [[0, 0, 0], [255, 0, 0], [0, 255, 0]] and m["skipped"] == []
        mask = tf.io.decode_png(_records(tmp_path / f"out{i}", "train")[0]["mask"]).numpy()[..., 0]
        assert (mask[:4] == 1).all() and (mask[4:6] == 2).all() and (mask[6:] == 0).all()
    # A colour no mask uses is a class all the same; names are optional.
    (tmp_path / "four.txt").write_text("0 0 0\n255 0 0\n0 255 0\n0 0 255\n")
    m = convert(src, tmp_path / "four", colors=tmp_path / "four.txt", **kw)
    assert m["num_classes"] == 4 and m["class_names"] == ["0", "1", "2", "3"]
    # A colour to leave out (--ignore-value) is the file's last: the green rows here.
    m = convert(src, tmp_path / "void", colors=plain, ignore_value=2, **kw)
    assert m["num_classes"] == 2 and m["class_names"] == ["background", "car"] and m["ignored_pixel_fraction"] == 0.125
    with pytest.raises(ConvertError, match="list the colour to leave out last \\(line 3 of the colours\\) and give "
                                           "--ignore-value 2"):
        convert(src, tmp_path / "void1", colors=plain, ignore_value=1, **kw)
    # A pixel of a colour the file does not list skips its sample, named; without --colors, every one.
    rgb = np.asarray(Image.open(src / "masks" / "c0.png")).copy()
    rgb[15, 15] = (0, 0, 255)
    Image.fromarray(rgb).save(src / "masks" / "c0.png")
    m = convert(src, tmp_path / "blue", colors=plain, **kw)
    assert [(r["file"].endswith("c0.png"), r["reason"]) for r in m["skipped"]] == [
        (True, f"mask {src / 'masks' / 'c0.png'}: colour (0, 0, 255) at 1 pixels is none of the 3 --colors")]
    with pytest.raises(ConvertError, match="no sample .* could be converted; 3 skipped, first: .*or give the "
                                           "classes' colours \\(convert --colors\\)"):
        convert(src, tmp_path / "none", **kw)
    # A file that is not a list of colours: one line naming it and the line.
    for text, message in (("0 0 0\nred car\n", "line 2: 'red car' is neither 'R G B [name]' nor CVAT's"),
                          ("0 0 0\n0,0,0 again\n", "line 2: (0, 0, 0) is class 0's colour already"),
                          ("0 0 300\n0 0 0\n", "line 1: (0, 0, 300) is not a colour"),
                          ("0 0 0\n", "1 colours; a class each, at least 2")):
        (tmp_path / "bad.txt").write_text(text)
        with pytest.raises(ConvertError, match=re.escape(message)):
            convert(src, tmp_path / "bad", colors=tmp_path / "bad.txt", **kw)
    with pytest.raises(ConvertError, match="--colors needs --layout folders"):
        convert(_pet_dir(tmp_path / "pet"), tmp_path / "pet_out", colors=plain, shards=1, workers=1, progress=False)
    cli = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "cli"), "--layout", "folders", "--classes",
                   "binary", "--colors", str(plain))
    assert cli.returncode == 2 and "3 colours with --classes binary, which has 2" in cli.stderr, cli.stderr


def test_records_keep_lossless_sources_exact(tmp_path, capsys):
    # PNG, TIFF or BMP sources are stored as PNG: training decodes the very pixels predict reads. JPEG
    # at quality 95 halves the chroma, and colour detail a pixel wide is lost (the stripes below).
    from unet_dist.data.pipeline import DataError, image_format, load_manifest, parse_record

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    stripes = np.zeros((32, 48, 3), np.uint8)
    stripes[:, 0::2, 0], stripes[:, 1::2, 1] = 200, 200  # red and green columns, 1 px each
    gray = np.random.default_rng(0).integers(0, 256, (32, 48), dtype=np.uint8)
    sources = {"stripes": stripes, "gray": np.repeat(gray[..., None], 3, axis=-1)}
    Image.fromarray(stripes).save(src / "images" / "stripes.png")
    Image.fromarray(gray).save(src / "images" / "gray.tif")
    for stem in sources:
        Image.fromarray((np.arange(48) % 2 * np.ones((32, 1))).astype(np.uint8)).save(src / "masks" / f"{stem}.png")
    kw = {"layout": "folders", "shards": 1, "val_fraction": 0, "workers": 1, "progress": False}

    def decoded(out):
        m = load_manifest(out)
        recs = {}  # stem: (the stored bytes, the image as the pipeline decodes it)
        for raw in tf.data.TFRecordDataset(str(out / m["train"]["shards"][0])):
            ex = tf.io.parse_single_example(raw, FEATURES)
            recs[ex["stem"].numpy().decode()] = ex["image"], parse_record(raw, image_format(m))[0].numpy()
        return m, recs

    out = tmp_path / "out"
    convert(src, out, **kw)
    m, recs = decoded(out)
    assert (m["image_format"], m["image_format_why"]) == ("png", "auto: not every source image is a JPEG, so none "
                                                                 "is stored lossy")
    for stem, (_, image) in recs.items():
        np.testing.assert_array_equal(image, sources[stem], err_msg=stem)
    assert tf.io.decode_png(recs["gray"][0]).shape[-1] == 1  # stored as one channel, decoded as three
    # Training and evaluation read them through the same decoding.
    from unet_dist.config import load_config
    from unet_dist.data.pipeline import eval_dataset, train_dataset

    cfg = load_config(None, ["data.image_size=[32, 48]", "data.augment.flip=false", "data.augment.scale_crop=false",
                             "data.augment.brightness=0", "data.augment.contrast=0"])
    [whole] = eval_dataset(out, cfg, 2, split="train")
    assert sorted(map(bytes, (whole["image"].numpy() * 255).round().astype(np.uint8))) == \
        sorted(map(bytes, sources.values()))
    assert next(iter(train_dataset(out, cfg, 2, 2)))["image"].shape == (2, 32, 48, 3)
    convert(src, out, image_format="jpeg", overwrite=True, **kw)
    m, recs = decoded(out)
    assert m["image_format"] == "jpeg" and np.abs(recs["stripes"][1].astype(int) - stripes).mean() > 20
    assert np.abs(recs["gray"][1].astype(int) - sources["gray"]).max() > 0
    # The Pet layout's JPEG photos stay JPEG under auto; a manifest from before --image-format reads as jpeg.
    assert convert(_pet_dir(tmp_path / "pet"), tmp_path / "pet_out", **{**kw, "layout": "oxford-pet"})["image_format"] == "jpeg"
    assert image_format({}) == "jpeg"
    cli = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "cli"), "--layout", "folders",
                   "--image-format", "gif")
    assert cli.returncode == 2 and "--image-format: invalid choice: 'gif'" in cli.stderr, cli.stderr
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**m, "image_format": "gif"}))
    with pytest.raises(DataError, match='image_format must be "png" or "jpeg", got "gif"; convert again'):
        load_manifest(out)


def test_interrupted_shards_never_appear_under_final_names(tmp_path, monkeypatch, capsys):
    src = _pet_dir(tmp_path, n=6)
    import unet_dist.data.convert as conv

    calls = {"n": 0}
    real = conv._example

    def dying(rec):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-conversion
        return real(rec)

    monkeypatch.setattr(conv, "_example", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "out", shards=2, val_fraction=0, workers=1, progress=False)
    assert list((tmp_path / "out").iterdir()) == []
    # The command says so in one line (exit 130, as for SIGINT), and an earlier conversion in OUT stays whole.
    convert(src, tmp_path / "out", shards=2, val_fraction=0, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls["n"] = 0
    done = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "out"), "--overwrite", "--workers", "1")
    assert done.returncode == 130 and done.stderr.strip().splitlines() == [
        f"convert: interrupted; {tmp_path / 'out'} is as it was before"], done.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    # A worker that dies (out of memory) ends the conversion in one line, where the pool used to wait for ever.
    import conftest

    monkeypatch.setattr(conv, "process", conftest.exit_at_once)
    with pytest.raises(ConvertError, match=r"^a conversion worker process died \(out of memory\?\) after 0 of 6 "
                                           r"images; try fewer --workers$"):
        convert(src, tmp_path / "out", shards=2, val_fraction=0, workers=1, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_masks_keep_palette_indices(tmp_path):
    arr = np.array([[0, 1], [2, 1]], np.uint8)
    img = Image.fromarray(arr, "P")
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    img.save(tmp_path / "m.png")
    assert np.array_equal(load_mask(tmp_path / "m.png"), arr)
    with pytest.raises(ConvertError):
        convert(tmp_path / "nope", tmp_path / "o")


@pytest.mark.parametrize("kwargs, words", [
    ({"shards": 0}, "--shards 0: must be >= 1"), ({"val_fraction": 1.0}, "--val-fraction 1.0: must be in [0, 1)"),
    ({"workers": 0}, "--workers 0: must be >= 1"), ({"seed": -1}, "--seed -1: must be >= 0"),
    ({"num_classes": 3}, "--num-classes is for --classes multiclass; binary has a fixed number"),
    ({"num_classes": 1, "classes": "multiclass", "layout": "folders"}, "--num-classes 1: must be in [2, 256]"),
    ({"ignore_value": 256}, "--ignore-value 256: a mask value, 0 to 255"),
    ({"ignore_value": 3, "classes": "trimap"}, "--ignore-value 3 with --classes trimap: that trimap value is one of "
     "its three classes; --classes binary --ignore-value 3 leaves the border out of pet vs the rest"),
    ({"ignore_value": 255, "num_classes": 256, "classes": "multiclass", "layout": "folders"},
     "--num-classes 256: with --ignore-value, at most 255 classes (id 255 marks the pixels left out)"),
])
def test_bad_arguments_are_named_before_work(tmp_path, kwargs, words):
    src = _pet_dir(tmp_path, n=2)
    with pytest.raises(ConvertError) as e:
        convert(src, tmp_path / "o", **kwargs)
    assert str(e.value) == words
    assert not (tmp_path / "o").exists()


def test_a_missing_file_or_a_folder_is_not_called_corrupt(tmp_path):
    from unet_dist.data.imageio import BadImage

    with pytest.raises(BadImage, match=r"^cannot read \(No such file or directory\)$"):
        load_rgb(tmp_path / "missing.png")
    with pytest.raises(BadImage, match=r"^a folder, not an image$"):
        load_rgb(tmp_path)


def test_an_image_there_is_no_memory_to_decode_is_skipped_in_one_line(tmp_path, monkeypatch):
    from PIL import ImageFile

    from unet_dist.data.imageio import BadImage

    Image.fromarray(np.zeros((30, 40), np.uint8)).save(tmp_path / "x.png")

    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    with pytest.raises(BadImage, match=r"^not enough memory to decode it \(40x30 pixels\)$"):
        load_rgb(tmp_path / "x.png")


def test_no_empty_shards_and_overwrite_removes_the_earlier_set(tmp_path):
    # 10 images, 3 of them val, into 8 shards: 7 train shards of one record each, none empty
    # (an empty shard made the trainer stop with "shard ... is empty"), and the folder holds
    # exactly the shards the manifest names, also after --overwrite with another shard count.
    src = _pet_dir(tmp_path, n=10)
    m = convert(src, tmp_path / "out", shards=8, val_fraction=0.3, seed=5, workers=1, progress=False)
    assert m["train"]["shards"] == [f"train-0000{i}-of-00007.tfrecord" for i in range(7)]
    assert m["train"]["records_per_shard"] == [1] * 7 and 0 not in m["train"]["bytes"]
    m = convert(src, tmp_path / "out", shards=2, val_fraction=0.3, seed=5, workers=1, progress=False, overwrite=True)
    on_disk = sorted(p.name for p in (tmp_path / "out").glob("*.tfrecord"))
    assert on_disk == sorted(m["train"]["shards"] + m["val"]["shards"]) and len(m["train"]["shards"]) == 2
    # A manifest of an earlier version, with an empty last shard, still loads and trains.
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (tmp_path / "out" / "train-00002-of-00002.tfrecord").write_bytes(b"")
    for key, extra in (("shards", "train-00002-of-00002.tfrecord"), ("bytes", 0), ("records_per_shard", 0)):
        manifest["train"][key].append(extra)
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    from unet_dist.config import load_config
    from unet_dist.data.pipeline import Shard, load_manifest, train_dataset

    cfg = load_config(None, ["data.image_size=[32, 32]", "model.depth=2"])
    for index in (0, 1):  # file sharding over 2 workers; the empty shard holds nothing to share out
        batch = next(iter(train_dataset(tmp_path / "out", cfg, 2, 4, Shard(index, 2),
                                        manifest=load_manifest(tmp_path / "out"))))
        assert batch["image"].shape == (2, 32, 32, 3)


def test_masks_named_with_a_suffix_and_gif_masks(tmp_path):
    # Many data sets name the mask of X.jpg X_mask.gif (Carvana) or X_mask.png: --mask-suffix pairs
    # them, and GIF palette masks keep their indices.
    src = tmp_path / "f"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(src / "images" / f"car{i}.jpg")
        mask = np.zeros((16, 16), np.uint8)
        mask[:, :6] = 1
        Image.fromarray(mask, "P").save(src / "masks" / f"car{i}_mask.gif")
    kw = {"layout": "folders", "shards": 1, "val_fraction": 0, "workers": 1, "progress": False}
    with pytest.raises(ConvertError, match="no image with a mask found"):
        convert(src, tmp_path / "o", **kw)
    m = convert(src, tmp_path / "o", mask_suffix="_mask", **kw)
    assert m["train"]["records"] == 3 and m["num_classes"] == 2 and not m["skipped"]
    mask = tf.io.decode_png(_records(tmp_path / "o", "train")[0]["mask"]).numpy()[..., 0]
    assert (mask[:, :6] == 1).all() and (mask[:, 6:] == 0).all()
    with pytest.raises(ConvertError, match=r"--mask-suffix '_mask.png': the end of a file stem"):
        convert(src, tmp_path / "o2", mask_suffix="_mask.png", **kw)
    cli = run_module("unet_dist.convert", str(src), str(tmp_path / "o3"), "--layout", "folders", "--mask-suffix",
                     "_mask", "--val-fraction", "0.34", "--workers", "1")
    assert cli.returncode == 0 and "2 train and 1 val records" in cli.stdout, cli.stderr


def test_folds_validate_on_every_image_exactly_once(tmp_path):
    # --fold I/K: the K conversions of one SRC and seed deal the images into K val splits.
    src = _pet_dir(tmp_path, n=11)
    validated = []
    for i in range(3):
        m = convert(src, tmp_path / f"f{i}", shards=1, seed=4, workers=1, progress=False, fold=(i, 3))
        val = [r["stem"].numpy().decode() for r in _records(tmp_path / f"f{i}", "val")]
        train = [r["stem"].numpy().decode() for r in _records(tmp_path / f"f{i}", "train")]
        assert set(val).isdisjoint(train) and len(val) + len(train) == 11
        assert m["fold"] == [i, 3] and m["val"]["records"] == len(val) in (3, 4)
        assert m["val_fraction"] == pytest.approx(len(val) / 11)
        validated += val
    assert sorted(validated) == sorted(f"ok_{i}" for i in range(11))
    assert convert(src, tmp_path / "plain", shards=1, workers=1, progress=False)["fold"] is None
    for fold, words in (((3, 3), "--fold 3/3: fold I of K needs K >= 2 and 0 <= I < K"),
                        ((0, 1), "--fold 0/1: fold I of K needs K >= 2 and 0 <= I < K"),
                        ((-1, 3), "--fold -1/3: fold I of K needs K >= 2 and 0 <= I < K"),
                        ((0, 12), "--fold 0/12: 11 images cannot fill 12 folds")):
        with pytest.raises(ConvertError) as e:
            convert(src, tmp_path / "bad", workers=1, progress=False, fold=fold)
        assert str(e.value) == words
        assert not (tmp_path / "bad").exists()  # refused before anything is written
    both = run_module("unet_dist.convert", str(src), str(tmp_path / "x"), "--fold", "0/5", "--val-fraction", "0.1")
    assert both.returncode == 2 and "--val-fraction: not allowed with argument --fold" in both.stderr, both.stderr
    bad = run_module("unet_dist.convert", str(src), str(tmp_path / "x"), "--fold", "two")
    assert bad.returncode == 2 and "--fold 'two': expected I/K, e.g. 0/5" in bad.stderr, bad.stderr
    assert not (tmp_path / "x").exists()


def test_wide_and_float_images_are_scaled_per_image(tmp_path):
    # 16-bit, 32-bit and float images map their 1st..99.8th percentiles to 0..255. A fixed divisor
    # made a 12-bit camera image in a 16-bit file use 16 levels and a float image in [0, 1] black.
    ramp = np.tile(np.linspace(0, 1, 300), (20, 1))
    for name, values in [("twelve.png", (ramp * 4095).astype(np.uint16)), ("float.tif", ramp.astype(np.float32)),
                         ("wide.tif", (ramp * 1e6 - 5e5).astype(np.int32))]:
        Image.fromarray(values).save(tmp_path / name)
        rgb = load_rgb(tmp_path / name)
        assert rgb.shape == (20, 300, 3) and rgb.dtype == np.uint8, name
        assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 200, name
        assert np.all(np.diff(rgb[0, :, 0].astype(int)) >= 0), name  # the order of values is kept
    spots = np.zeros((50, 50), np.uint16)
    spots[3, 4] = 4000  # 1 pixel of 2,500: above the 99.8th percentile, so minimum and maximum scale it
    Image.fromarray(spots).save(tmp_path / "spots.png")
    assert load_rgb(tmp_path / "spots.png")[3, 4].tolist() == [255] * 3
    Image.fromarray(np.full((5, 5), 7, np.uint16)).save(tmp_path / "flat.png")
    assert load_rgb(tmp_path / "flat.png").max() == 0


def _stack(arrays, path):
    """Writes `arrays` (2-D) as the pages of a multi-page TIFF."""
    frames = [Image.fromarray(a) for a in arrays]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def test_a_tiff_stack_is_one_sample_per_page(tmp_path):
    # EM and microscopy data come as multi-page TIFFs (the 2015 U-Net's ISBI 2012 set: one 30-page
    # stack of slices and one of labels). Each page is a sample, named STEM_pNNN; a stack whose mask
    # has another number of pages is skipped. Before, the first page alone was read, silently.
    from unet_dist.data.imageio import BadImage

    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    pages = [np.full((24, 32), 100 * (i + 1), np.uint16) for i in range(4)]
    masks = [np.zeros((24, 32), np.uint8) for _ in range(4)]
    for i, (page, mask) in enumerate(zip(pages, masks, strict=True)):
        page[: 4 * (i + 1)] = 4095  # rows 0..4(i+1) bright, labelled 1: each page its own content
        mask[: 4 * (i + 1)] = 1

    _stack(pages, src / "images" / "vol.tif")
    _stack(masks, src / "masks" / "vol.tif")
    _stack(pages[:3], src / "images" / "odd.tif")
    _stack(masks[:2], src / "masks" / "odd.tif")
    Image.fromarray(pages[0]).save(src / "images" / "flat.tif")
    Image.fromarray(masks[0]).save(src / "masks" / "flat.png")
    m = convert(src, tmp_path / "out", layout="folders", shards=1, val_fraction=0.0, workers=1, progress=False)
    assert m["skipped"] == [{"file": str(src / "images" / "odd.tif"),
                             "reason": f"3 page(s), but its mask {src / 'masks' / 'odd.tif'} has 2"}]
    recs = {r["stem"].numpy().decode(): r for r in _records(tmp_path / "out", "train")}
    assert sorted(recs) == ["flat", "vol_p000", "vol_p001", "vol_p002", "vol_p003"]
    for i in range(4):
        image = tf.io.decode_image(recs[f"vol_p{i:03d}"]["image"], channels=3).numpy()[..., 0]
        mask = tf.io.decode_png(recs[f"vol_p{i:03d}"]["mask"]).numpy()[..., 0]
        np.testing.assert_array_equal(mask, masks[i])
        assert image[: 4 * (i + 1)].min() > 240 and image[4 * (i + 1):].max() < 15, i  # page i, scaled
    with pytest.raises(BadImage, match=r"^no page 4 \(the file has 4\)$"):
        load_rgb(src / "images" / "vol.tif", 4)


def test_the_pages_of_a_stack_stay_in_one_split(tmp_path):
    # Neighbouring slices of a volume are nearly the same image: a volume with pages in train and val
    # scores val on what training saw. Split by file, each volume is whole in one split; a data set
    # that is one stack is split by page, as it must be.
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(0)
    for vol in "abc":
        _stack([rng.integers(0, 255, (16, 16), dtype=np.uint8) for _ in range(4)], src / "images" / f"{vol}.tif")
        _stack([np.eye(16, dtype=np.uint8)] * 4, src / "masks" / f"{vol}.tif")

    def volumes(out):
        return {split: sorted(r["stem"].numpy().decode()[0] for r in _records(out, split)) for split in ("train", "val")}

    common = dict(layout="folders", shards=2, workers=1, progress=False)
    m = convert(src, tmp_path / "file", val_fraction=0.3, seed=1, **common)
    split = volumes(tmp_path / "file")
    assert m["split_by"] == "file" and m["files"] == {"train": 2, "val": 1}
    assert len(split["val"]) == 4 and len(set(split["val"])) == 1  # one whole volume: 4 of 12 pages
    assert set(split["train"]).isdisjoint(split["val"]) and len(split["train"]) == 8
    # By page, for the same seed, a volume has pages on both sides (what file splitting prevents).
    m = convert(src, tmp_path / "page", val_fraction=0.3, seed=1, split_by="page", **common)
    split = volumes(tmp_path / "page")
    assert m["split_by"] == "page" and len(split["val"]) == 4 and set(split["train"]) & set(split["val"])
    # Folds deal whole volumes: three folds validate on each volume once.
    validated = []
    for i in range(3):
        convert(src, tmp_path / f"fold{i}", fold=(i, 3), **common)
        split = volumes(tmp_path / f"fold{i}")
        assert len(set(split["val"])) == 1 and set(split["train"]).isdisjoint(split["val"]), i
        validated += split["val"]
    assert sorted(validated) == sorted("abc" * 4)
    with pytest.raises(ConvertError, match=r"^--fold 0/4: 3 files cannot fill 4 folds; --split-by page deals their"):
        convert(src, tmp_path / "bad", fold=(0, 4), **common)
    cli = run_module("unet_dist.convert", str(src), str(tmp_path / "cli"), "--layout", "folders", "--workers", "1",
                     "--val-fraction", "0.3", "--seed", "1")
    assert cli.returncode == 0, cli.stderr
    assert "8 train and 4 val records (split by file: from 2 and 1 image files), 2 classes" in cli.stdout, cli.stdout
    # One stack alone is split by page; by file it cannot be split, and says so before any work.
    for vol in "bc":
        (src / "images" / f"{vol}.tif").unlink()
    m = convert(src, tmp_path / "one", val_fraction=0.25, **common)
    assert m["split_by"] == "page" and m["files"] == {"train": 1, "val": 1} and m["val"]["records"] == 1
    with pytest.raises(ConvertError, match=r"^--split-by file: SRC has one image file \(a.tif\), which cannot be"):
        convert(src, tmp_path / "nofile", split_by="file", **common)
    assert not (tmp_path / "nofile").exists()


def test_files_of_one_group_stay_in_one_split(tmp_path):
    # 2-D slices exported one file each (patient03_slice012.png) leak like a stack's pages: --group
    # REGEX keeps the files whose stems give the same match together, in val fractions and folds.
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for patient in range(4):
        for sl in range(3):
            Image.fromarray(np.full((8, 8), 40 * patient + sl, np.uint8)).save(src / "images" / f"p{patient}_s{sl}.png")
            Image.fromarray(np.eye(8, dtype=np.uint8)).save(src / "masks" / f"p{patient}_s{sl}.png")

    def patients(out):
        return {split: sorted(r["stem"].numpy().decode()[:2] for r in _records(out, split)) for split in ("train", "val")}

    common = dict(layout="folders", shards=1, workers=1, progress=False)
    m = convert(src, tmp_path / "g", val_fraction=0.25, seed=3, group=r"^(p[0-9]+)_", **common)
    split = patients(tmp_path / "g")
    assert m["split_by"] == "group" and m["groups"] == {"train": 3, "val": 1}
    assert len(split["val"]) == 3 and len(set(split["val"])) == 1 and set(split["train"]).isdisjoint(split["val"])
    # By file (without --group), the same seed puts some patient on both sides.
    convert(src, tmp_path / "f", val_fraction=0.25, seed=3, **common)
    split = patients(tmp_path / "f")
    assert set(split["train"]) & set(split["val"])
    # Where no group fits in the val fraction, the smallest is val, never the larger: p0 (3 files)
    # against the rest (9) for 1 val image.
    for seed in range(3):
        m = convert(src, tmp_path / f"small{seed}", val_fraction=0.1, seed=seed, group="^(p0|p)", **common)
        assert m["val"]["records"] == 3 and patients(tmp_path / f"small{seed}")["val"] == ["p0"] * 3, seed
    validated = []
    for i in range(4):
        convert(src, tmp_path / f"fold{i}", fold=(i, 4), group=r"^(p[0-9]+)_", **common)
        validated += patients(tmp_path / f"fold{i}")["val"]
    assert sorted(validated) == sorted([f"p{p}" for p in range(4)] * 3)
    for group, kwargs, words in ((r"^(p[0-9]+", {}, r"^--group '\^\(p\[0-9\]\+': not a regular expression \(missing \)"),
                                 (r"^q", {}, r"^--group '\^q': 12 image file\(s\) do not match it, such as p0_s0.png; "),
                                 (r"^(p[0-9]+)_", {"split_by": "page"}, r"^--group .* keeps files together; it cannot "),
                                 (r"^(p[0-9]+)_", {"fold": (0, 5)}, r"^--fold 0/5: 4 groups cannot fill 5 folds$"),
                                 ("^p", {}, r"^--group '\^p': every file is in one group \('p'\); a val split needs ")):
        with pytest.raises(ConvertError, match=words):
            convert(src, tmp_path / "bad", group=group, **kwargs, **common)
    assert not (tmp_path / "bad").exists()
    cli = run_module("unet_dist.convert", str(src), str(tmp_path / "cli"), "--layout", "folders", "--workers", "1",
                     "--val-fraction", "0.25", "--seed", "3", "--group", "^(p[0-9]+)_")
    assert cli.returncode == 0 and "9 train and 3 val records (split by group: 3 and 1 groups), 2 classes" in cli.stdout, \
        cli.stdout + cli.stderr


def test_lists_name_the_images_to_convert_and_the_val_split(tmp_path, capsys):
    # Public data sets ship their own split (VOC's ImageSets/Segmentation/val.txt, the Pet set's
    # annotations/test.txt: 'Abyssinian_201 1 1 1'); scores compare with published ones only on it.
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8), 30 * i, np.uint8)).save(src / "images" / f"a{i}.png")
        Image.fromarray(np.eye(8, dtype=np.uint8)).save(src / "masks" / f"a{i}.png")
    _stack([np.full((8, 8), v, np.uint8) for v in (1, 2, 3)], src / "images" / "vol.tif")
    _stack([np.eye(8, dtype=np.uint8)] * 3, src / "masks" / "vol.tif")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(src / "images" / "lonely.png")  # no mask: skipped
    listing = tmp_path / "val.txt"
    # Stems, file names and paths, the first word of a line; comments and blank lines; an image
    # SRC has without a mask (skipped) is no error.
    listing.write_text("# the val images\na1\nvol.tif 1 1\n\nimages/a3.png 2 1 1\nlonely\n")

    def stems(out, split):
        return sorted(r["stem"].numpy().decode() for r in _records(out, split))

    common = dict(layout="folders", shards=2, workers=1, progress=False, val_list=listing)
    for seed in (0, 1):  # the list splits; the seed only orders the records
        m = convert(src, tmp_path / f"out{seed}", seed=seed, **common)
        assert stems(tmp_path / f"out{seed}", "val") == ["a1", "a3", "vol_p000", "vol_p001", "vol_p002"]
        assert stems(tmp_path / f"out{seed}", "train") == ["a0", "a2", "a4", "a5"]
    assert m["val_list"] == str(listing.resolve()) and m["val_fraction"] == 5 / 9 and m["files"] == {"train": 4,
                                                                                                    "val": 3}
    ok = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "cli"), "--layout", "folders", "--val-list",
                  str(listing), "--workers", "1")
    assert ok.returncode == 0 and (f"4 train and 5 val records (split by file: from 4 and 3 image files) (val: the "
                                   f"images {listing.resolve()} names), 2 classes") in ok.stdout, ok.stdout
    # --list converts only the images a list names (a trainval list: the test images stay out), and
    # the rest is passed over, not skipped; --val-list then names val among them.
    trainval = tmp_path / "trainval.txt"
    trainval.write_text("a0\na1\na2\nvol\nlonely\n")
    m = convert(src, tmp_path / "only", **{**common, "val_list": None}, only=trainval, val_fraction=0.25)
    assert sorted(stems(tmp_path / "only", "train") + stems(tmp_path / "only", "val")) == [
        "a0", "a1", "a2", "vol_p000", "vol_p001", "vol_p002"]
    assert m["list"] == str(trainval.resolve()) and [k["file"] for k in m["skipped"]] == [str(src / "images" /
                                                                                             "lonely.png")]
    (tmp_path / "a1.txt").write_text("a1\n")
    convert(src, tmp_path / "both", **{**common, "val_list": tmp_path / "a1.txt"}, only=trainval)
    assert stems(tmp_path / "both", "val") == ["a1"] and stems(tmp_path / "both", "train") == [
        "a0", "a2", "vol_p000", "vol_p001", "vol_p002"]
    with pytest.raises(ConvertError, match=r"^--val-list .*val\.txt: 1 of its 4 images are not in --list .*trainval"
                                           r"\.txt, such as 'a3'$"):
        convert(src, tmp_path / "outside", **common, only=trainval)
    clash = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "clash"), "--val-list", str(listing),
                     "--fold", "0/2")
    assert clash.returncode == 2 and "not allowed with argument --val-list" in clash.stderr
    for text, kwargs, words in (
            ("a1\nzz9\nzz1\n", {}, r"^--val-list .*val\.txt: 2 of its 3 images are not in SRC, such as 'zz1'$"),
            ("lonely\n", {}, r"^--val-list .*: none of its 1 images has a mask in SRC$"),
            ("a0 a1\n" + "".join(f"a{i}\n" for i in range(6)) + "vol\n", {},
             r"^--val-list .* names every image with a mask in SRC; nothing is left to train on$"),
            ("# nothing\n\n", {}, r"^--val-list .*: names no image \(one a line: its stem or file name\)$"),
            ("a1\n", {"group": "^a"}, r"^--val-list .* names the val images itself; it cannot be used with --group$"),
            ("a1\n", {"split_by": "page"}, r"it cannot be used with --split-by page$"),
            (None, {}, r"^--val-list .*missing\.txt: cannot be read \(\[Errno 2\] No such file")):
        bad = tmp_path / ("missing.txt" if text is None else "val.txt")
        if text is not None:
            bad.write_text(text)
        with pytest.raises(ConvertError, match=words):
            convert(src, tmp_path / "bad", **{**common, "val_list": bad, **kwargs})
    assert not (tmp_path / "bad").exists()


def test_out_cannot_be_the_folder_of_the_images_or_masks(tmp_path):
    src = _pet_dir(tmp_path, n=2)
    for folder in ("images", "annotations/trimaps"):
        with pytest.raises(ConvertError, match=f"^OUT {src / folder} is SRC's {folder} folder; convert into"):
            convert(src, src / folder, workers=1, progress=False)
    assert sorted(p.name for p in (src / "images").iterdir()) == ["ok_0.jpg", "ok_1.jpg"]


def test_large_images_are_read_up_to_the_readers_own_limit(tmp_path):
    # Pillow refuses 179 M pixels and more (about 13400x13400) with an error that is not an OSError:
    # a traceback in convert and predict. Slides and aerial images for overlap-tile prediction are
    # that large; the reader's own limit is 2**30 pixels, checked from the header before decoding.
    import struct
    import zlib

    from unet_dist.data.imageio import BadImage

    def png_header(path, w, h):  # a PNG of w x h pixels whose data is cut short: never decoded in full
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
        return path

    with pytest.raises(BadImage, match=r"^corrupt or truncated image"):  # past the size check, to the data
        load_rgb(png_header(tmp_path / "slide.png", 15000, 12000))
    with pytest.raises(BadImage, match=r"^40000x30000 pixels, more than this reader's limit of 1073741824 "):
        load_mask(png_header(tmp_path / "huge.png", 40000, 30000))


def _array_dir(tmp_path, arrays: dict, masks: dict | None = None):
    """A folders-layout SRC of .npy images (and .npy masks, a square by default)."""
    src = tmp_path / "arrays"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for stem, arr in arrays.items():
        np.save(src / "images" / f"{stem}.npy", arr)
        mask = (masks or {}).get(stem)
        if mask is None:
            mask = np.zeros(arr.shape[:2], np.int64)
            mask[4:12, 4:12] = 1
        np.save(src / "masks" / f"{stem}.npy", mask)
    return src


def test_npy_images_of_any_number_of_channels_are_stored_and_read_back_whole(tmp_path):
    from unet_dist.data.imageio import _to_uint8
    from unet_dist.data.pipeline import parse_record

    rng = np.random.default_rng(0)
    five = {f"u{i}": rng.integers(0, 256, (20, 24, 5), dtype=np.uint8) for i in range(3)}
    wide = rng.normal(100, 30, (20, 24, 5)).astype(np.float32)
    wide[..., 2] *= 1000  # each channel is scaled to 8 bits by its own range
    src = _array_dir(tmp_path, {**five, "wide": wide, "rgb": rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
                                "badmask": five["u0"]},
                     masks={"badmask": np.full((20, 24), 0.5, np.float32)})
    (src / "images" / "text.npy").write_text("not an array")
    np.save(src / "masks" / "text.npy", np.zeros((20, 24), np.uint8))
    m = convert(src, tmp_path / "out", layout="folders", channels=5, val_fraction=0.0, progress=False)
    assert m["channels"] == 5 and m["image_format"] == "png" and m["train"]["records"] == 4
    reasons = {r["file"].rsplit("/", 1)[-1]: r["reason"] for r in m["skipped"]}
    assert reasons["text.npy"] == "not a numpy .npy file (no .npy header)"
    assert reasons["rgb.npy"].startswith("3 channel(s) (an array of shape (20, 24, 3)), not 5 (convert --channels")
    assert "a mask array holds integer class ids" in reasons["badmask.npy"], reasons
    want = {**five, "wide": np.stack([_to_uint8(wide[..., c]) for c in range(5)], -1)}
    assert (want["wide"].reshape(-1, 5).max(axis=0) == 255).all()  # not darkened by channel 2's larger values
    for raw in (r for f in m["train"]["shards"] for r in tf.data.TFRecordDataset(str(tmp_path / "out" / f))):
        stem = tf.io.parse_single_example(raw, FEATURES)["stem"].numpy().decode()
        image, mask = parse_record(raw, "png", channels=5)
        np.testing.assert_array_equal(image.numpy(), want[stem])
        assert mask.numpy()[..., 0].sum() == 64
    # Resized at conversion: each plane as Pillow resizes it, the same as a 3-channel image's planes.
    m = convert(src, tmp_path / "small", layout="folders", channels=5, val_fraction=0.0, progress=False,
                image_size=(10, 12))
    raw = next(iter(tf.data.TFRecordDataset(str(tmp_path / "small" / m["train"]["shards"][0]))))
    stem = tf.io.parse_single_example(raw, FEATURES)["stem"].numpy().decode()
    plane = np.asarray(Image.fromarray(np.ascontiguousarray(want[stem][..., 3])).resize((12, 10), Image.BILINEAR))
    np.testing.assert_array_equal(parse_record(raw, "png", channels=5)[0].numpy()[..., 3], plane)


def test_channels_1_reads_gray_4_rgba_and_others_come_as_arrays(tmp_path, capsys):
    from unet_dist.data.imageio import BadImage, load_image

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    rgba = np.dstack([rgb, np.full((8, 8), 77, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgb.png", channels=1).shape == (8, 8, 1)
    assert load_image(tmp_path / "rgb.png", channels=1)[0, 0, 0] == np.asarray(Image.fromarray(rgb).convert("L"))[0, 0]
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png", channels=4), rgba)  # alpha kept as a channel
    for path, channels, message in ((tmp_path / "rgb.png", 4, "mode RGB: an image file gives 4 channels as RGBA"),
                                    (tmp_path / "rgb.png", 2, "store 2-channel images as .npy arrays (H, W, 2)")):
        with pytest.raises(BadImage, match=re.escape(message)):
            load_image(path, channels=channels)
    np.save(tmp_path / "gray.npy", np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert (load_image(tmp_path / "gray.npy", channels=3) == np.arange(64).reshape(8, 8, 1)).all()  # gray RGB
    src = _array_dir(tmp_path, {"a": rng_image(), "b": rng_image()})
    for args, message in ((["--channels", "0"], "--channels 0: must be in [1, 64]"),
                          (["--channels", "4", "--image-format", "jpeg"],
                           "--image-format jpeg with --channels 4: JPEG holds 1 or 3 channels")):
        r = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "o"), "--layout", "folders", *args)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    r = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "o"), "--layout", "folders", "--channels", "4",
                 check=True)
    assert "images of 4 channels (train with model.in_channels=4) as PNG" in r.stdout, r.stdout
    # --channels 1: colour and gray files alike are stored and read back as one channel, their luma.
    from unet_dist.data.pipeline import parse_record

    gray = tmp_path / "gray"
    (gray / "images").mkdir(parents=True)
    (gray / "masks").mkdir()
    for stem, fmt in (("p", "PNG"), ("j", "JPEG")):
        Image.fromarray(rgb).save(gray / "images" / f"{stem}.{fmt.lower()}", format=fmt)
        Image.fromarray(np.eye(8, dtype=np.uint8)).save(gray / "masks" / f"{stem}.png")
    for fmt in ("png", "jpeg"):
        m = convert(gray, tmp_path / f"g{fmt}", layout="folders", channels=1, val_fraction=0.0, progress=False,
                    image_format=fmt)
        assert m["channels"] == 1
        for raw in tf.data.TFRecordDataset(str(tmp_path / f"g{fmt}" / m["train"]["shards"][0])):
            image = parse_record(raw, fmt, channels=1)[0].numpy()
            stem = tf.io.parse_single_example(raw, FEATURES)["stem"].numpy().decode()
            luma = load_image(gray / "images" / f"{stem}.{'png' if stem == 'p' else 'jpeg'}", channels=1)
            assert image.shape == (8, 8, 1) and np.abs(image.astype(int) - luma).max() <= (0 if fmt == "png" else 3)


def rng_image():
    return np.random.default_rng(1).integers(0, 256, (16, 16, 4), dtype=np.uint8)


def test_intensity_window_and_dataset_map_every_image_by_one_window(tmp_path, capsys):
    # --intensity window maps every image, 16-bit and 8-bit files and arrays alike, by the given
    # window; --intensity dataset by the 0.5th-99.5th percentiles of the training images'
    # foreground (every value of it here: fewer than the sample's cap).
    from unet_dist.data.imageio import windowed
    from unet_dist.data.pipeline import parse_record

    rng = np.random.default_rng(0)
    hu = {f"ct{i}": rng.normal(40 + 20 * i, 30, (20, 24)).astype(np.int16) for i in range(3)}
    src = _array_dir(tmp_path, hu)
    Image.fromarray((hu["ct2"].astype(np.int32) + 1024).astype(np.uint16)).save(src / "images" / "u16.png")  # I;16
    np.save(src / "masks" / "u16.npy", np.load(src / "masks" / "ct2.npy"))
    Image.fromarray(np.full((20, 24), 100, np.uint8)).save(src / "images" / "gray8.png")
    np.save(src / "masks" / "gray8.npy", np.load(src / "masks" / "ct2.npy"))
    raw = {**{k: v.astype(np.float32) for k, v in hu.items()}, "u16": hu["ct2"] + 1024.0,
           "gray8": np.full((20, 24), 100.0, np.float32)}

    def stored(out):
        m = json.loads((out / "manifest.json").read_text())
        return {tf.io.parse_single_example(r, FEATURES)["stem"].numpy().decode(): parse_record(r, "png", channels=1)[0]
                .numpy()[..., 0] for f in m["train"]["shards"] for r in tf.data.TFRecordDataset(str(out / f))}

    out = tmp_path / "window"
    proc = run_main(capsys, "unet_dist.convert", str(src), str(out), "--layout", "folders", "--channels", "1",
                    "--val-fraction", "0", "--intensity", "window", "--window", "-20", "140", check=True)
    assert "--intensity window: values -20 to 140 stored as 0 to 255; predict maps new images so" in proc.stdout
    assert json.loads((out / "manifest.json").read_text())["intensity"] == {"mode": "window", "window": [[-20, 140]]}
    got = stored(out)
    for stem, values in raw.items():
        np.testing.assert_array_equal(got[stem], windowed(values, -20, 140), err_msg=stem)
    assert got["gray8"].max() == 191  # 100 of 8 bits, mapped too: (100 + 20) * 255 / 160 + 0.5 rounds down to 191
    # dataset: the percentiles of the foreground values (the masks' square) of every training image.
    m = convert(src, tmp_path / "dataset", layout="folders", channels=1, val_fraction=0.0, progress=False,
                intensity="dataset")
    fg = np.concatenate([v[4:12, 4:12].ravel() for v in raw.values()])
    lo, hi = np.percentile(fg, (0.5, 99.5))
    assert m["intensity"]["mode"] == "dataset" and m["intensity"]["sampled_values"] == fg.size
    np.testing.assert_allclose(m["intensity"]["window"], [[lo, hi]], rtol=1e-6)
    got = stored(tmp_path / "dataset")
    for stem, values in raw.items():
        np.testing.assert_array_equal(got[stem], windowed(values, *m["intensity"]["window"][0]), err_msg=stem)
    # Per channel: a pair for each of 3 channels, the gray files read as 3 equal channels, each mapped by its own.
    m = convert(src, tmp_path / "rgb", layout="folders", val_fraction=0.0, progress=False, intensity="window",
                window=[0, 100, 0, 200, -100, 100])
    assert m["intensity"]["window"] == [[0, 100], [0, 200], [-100, 100]]
    rec = next(r for r in _records(tmp_path / "rgb", "train") if r["stem"].numpy() == b"gray8")
    assert tf.io.decode_png(rec["image"]).numpy()[0, 0].tolist() == [255, 128, 255]
    # Bad values are named before any work.
    for args, words in ((["--intensity", "window"], "--intensity window needs --window LO HI"),
                        (["--window", "0", "1"], "--window is for --intensity window (this is --intensity image)"),
                        (["--intensity", "window", "--window", "5", "1"], "--window 5 1: each LO must be below its HI"),
                        (["--intensity", "window", "--window", "0", "1", "2"], "--window 0 1 2: 3 values; give LO HI "
                         "for every channel, or 6 values, LO HI for each of the 3 channels")):
        proc = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "bad"), "--layout", "folders", *args)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "bad").exists()
    # No foreground pixel in any training mask: no window to take.
    for stem in raw:
        np.save(src / "masks" / f"{stem}.npy", np.zeros((20, 24), np.uint8))
    with pytest.raises(ConvertError, match="no training mask has a foreground pixel"):
        convert(src, tmp_path / "empty", layout="folders", channels=1, val_fraction=0.0, progress=False,
                intensity="dataset")


def test_convert_counts_the_objects_and_warns_where_its_resize_merges_them(tmp_path, capsys):
    # Squares 7 pixels wide a pixel apart, as cells parted by a membrane: halved by --image-size
    # (nearest: Pillow keeps the odd pixels), the gaps close; at their own size or doubled they
    # stay apart.
    from unet_dist.data.convert import object_census

    grid = np.zeros((64, 64), np.uint8)
    for y in range(0, 64, 8):
        for x in range(0, 64, 8):
            grid[y + 1 : y + 8, x + 1 : x + 8] = 1
    halved = np.asarray(Image.fromarray(grid).resize((32, 32), Image.NEAREST))
    counts = object_census(grid, halved)
    assert counts[:, 1].tolist() == [64, 1] and not counts[:, 2:].any()
    assert object_census(grid, grid)[:, 1].tolist() == [64, 64]
    speck = np.zeros((16, 16), np.uint8)
    speck[3:5, 3:5], speck[10, 10] = 2, 2  # 4 pixels: counted; 1: under the 4 stored pixels counted
    assert object_census(speck, speck)[:, 2].tolist() == [1, 1]
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(3):
        Image.fromarray(np.stack([grid * 200] * 3, -1)).save(src / "images" / f"g{i}.png")
        Image.fromarray(grid * 255).save(src / "masks" / f"g{i}.png")
    done = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "half"), "--layout", "folders",
                    "--image-size", "32", check=True)
    assert "the images are 64x64 at their own size, stored at 32x32; objects an image (8-connected, as evaluate " \
           "counts them): foreground 64" in done.stdout
    assert ("convert: warning: --image-size 32x32 (shrinking the images 2x on average) merges the objects of class 1 "
            "(foreground): 64 an image at their own size, 1 as stored. Keep their size") in done.stderr
    m = json.loads((tmp_path / "half" / "manifest.json").read_text())
    assert m["own_size"] == {"min": [64, 64], "max": [64, 64], "mean": [64.0, 64.0]}
    assert m["objects"] == {"images": 3, "per_image_own": [None, 64.0], "per_image_stored": [None, 1.0]}
    for size in ([], ["--image-size", "128"]):
        kept = run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / f"kept{len(size)}"), "--layout",
                        "folders", *size, check=True)
        assert "foreground 64" in kept.stdout and "warning" not in kept.stderr, kept.stderr
    # Records kept at their own size and shrunk by training's data.image_size instead: train says so
    # at start, counting the first records as the pipeline resizes them.
    from unet_dist.config import load_config
    from unet_dist.data.pipeline import load_manifest
    from unet_dist.trainer import resize_lines

    data = tmp_path / "kept0"
    manifest = load_manifest(data)
    (line,) = resize_lines(load_config(None, ["data.image_size=[32, 32]"]), manifest, data)
    assert line == ("unet_dist: warning: data.image_size [32, 32] shrinks the training records (64x64) 2x and merges "
                    "the objects of class 1 (foreground): 64 a record as stored, 1 at data.image_size (the first 2 "
                    "records). Train at the records' size (--set data.image_size=[64,64]), on patches "
                    "(data.patch_size) where whole images do not fit")
    assert resize_lines(load_config(None, ["data.image_size=[64, 64]"]), manifest, data) == []
