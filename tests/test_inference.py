"""Overlap-tile prediction is seamless: tiled and whole-image predictions agree."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from unet_dist.config import load_config
from unet_dist.inference import _reflect_indices, resize_predict_fn, tile_predict_fn, tiling, traced
from unet_dist.model import build_unet
from unet_dist.shapes import output_size


def _image(h, w):
    """A float32 (h, w, 3) image in [0, 1] whose values are whole uint8 steps (value * 255 is exact)."""
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    image = np.clip(np.dstack([np.sin(yy / 7), np.cos(xx / 5), np.sin((xx + yy) / 9)]) * 0.4 + 0.5
                    + rng.normal(0, 0.05, (h, w, 3)), 0, 1)
    return (np.round(image * 255) / 255).astype(np.float32)


def predict_tiled(model, image, cfg, **kw):
    """tile_predict_fn on one float image in [0, 1] (as uint8, exactly) -> (H, W, U) numpy."""
    fn = tile_predict_fn(model, cfg, **kw)
    return fn(tf.constant(np.round(image * 255).astype(np.uint8))[None])[0].numpy()


def test_valid_padding_tiles_equal_the_whole_image():
    # Valid convolutions see only their receptive field: tiling with the network's own context
    # reproduces the whole-image output exactly (Ronneberger et al. 2015, overlap-tile).
    cfg = load_config(None, ["model.padding=valid", "model.depth=2", "model.base_filters=4",
                             "data.image_size=[60, 60]", "model.norm=none"])
    keras.utils.set_random_seed(1)
    model = build_unet(cfg.model, None)
    o = output_size((60, 60), 2, "valid")[0]
    c = (60 - o) // 2
    H, W = 3 * o, 2 * o  # the whole image, mirror padded by c, is a valid input too
    img = _image(H, W)
    whole = model(np.pad(img, ((c, c), (c, c), (0, 0)), mode="reflect")[None], training=False).numpy()[0]
    tiled = predict_tiled(model, img, cfg)
    assert tiled.shape == whole.shape == (H, W, 1)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    # Batches of 4 of the 6 tiles (the last batch smaller), traced for unknown sizes, give the same.
    fn = traced(tile_predict_fn(model, cfg, batch=4))
    batch = tf.constant(np.round(np.stack([img, img[::-1]]) * 255).astype(np.uint8))
    both = fn(batch).numpy()
    np.testing.assert_allclose(both[0], whole, atol=1e-5)
    np.testing.assert_allclose(both[1], predict_tiled(model, img[::-1], cfg), atol=1e-5)
    # An image smaller than one tile's output, with context wider than the image itself: one tile.
    h, w = o // 3, o // 2
    small = _image(h, w)
    one = model(np.pad(small, ((c, 60 - c - h), (c, 60 - c - w), (0, 0)), mode="reflect")[None], training=False)
    assert c > w
    np.testing.assert_allclose(fn(tf.constant(np.round(small * 255).astype(np.uint8))[None])[0].numpy(),
                               one.numpy()[0, :h, :w], atol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (50, 38), (100, 150), (190, 64)])
def test_same_padding_tiles_give_the_whole_image_through_the_model(size):
    # Tiles lie inside the image (the first at its corner, the last flush with the far edges, on
    # the pooling grid), so with an overlap as wide as the depth-2 net's receptive field (radius
    # about 26 px; 28 px, on the grid) they give the whole image's output everywhere, its borders
    # included: the network meets them as it did in training, with its own zero padding beyond.
    # (Mirror-padded context at the borders, before, changed the output there.) An image of the
    # tile's size or smaller is one pass of the model.
    cfg = load_config(None, ["model.depth=2", "model.base_filters=4", "data.image_size=[64, 64]"])
    keras.utils.set_random_seed(2)
    model = build_unet(cfg.model, None)
    img = _image(*size)
    ph, pw = (-size[0]) % 4, (-size[1]) % 4  # to the pooling grid, as predict pads
    whole = model(np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")[None], training=False).numpy()[0]
    whole = whole[: size[0], : size[1]]
    tiled = predict_tiled(model, img, cfg, overlap=28)
    assert tiled.shape == whole.shape
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    # In batches of 3 tiles (the last one smaller), traced for unknown sizes, the same.
    fn = traced(tile_predict_fn(model, cfg, overlap=28, batch=3))
    np.testing.assert_allclose(fn(tf.constant(np.round(img * 255).astype(np.uint8))[None])[0].numpy(), whole,
                               atol=1e-5)
    # ...while tiles without overlap show seams (when there is more than one tile): the check can tell.
    if max(size) <= 64:
        return
    seamy = predict_tiled(model, img, cfg, overlap=0)
    assert np.abs(seamy - whole).max() > 1e-3


def test_a_model_trained_on_patches_tiles_with_mirrored_context():
    # Patches cut from inside images showed the network image content beyond its input's edges:
    # its tiles take mirrored context at the image's borders (it scored 1.2 points of pet IoU more
    # so than from the whole image), and agree with the whole image away from them.
    cfg = load_config(None, ["model.depth=2", "model.base_filters=4", "data.image_size=[64, 64]",
                             "data.patch_size=[32, 32]"])
    keras.utils.set_random_seed(2)
    model = build_unet(cfg.model, None)
    img = _image(64, 64)
    whole = model(img[None], training=False).numpy()[0]
    tiled = predict_tiled(model, img, cfg, overlap=28)
    inner = (slice(28, -28), slice(28, -28))
    np.testing.assert_allclose(tiled[inner], whole[inner], atol=1e-5)
    assert np.abs(tiled - whole).max() > 1e-3  # the borders: mirrored context, not the network's zero padding


def test_resize_prediction_when_the_context_is_wider_than_the_output():
    # Depth 2, valid padding, 60 px tiles: 20 px out, 20 px of context per side, more than
    # tf.pad's REFLECT allows. Resize mode (and the export, which uses it) must still work, and
    # pad the way the tiles and np.pad do.
    cfg = load_config(None, ["model.padding=valid", "model.depth=2", "model.base_filters=4",
                             "data.image_size=[60, 60]", "model.norm=none"])
    keras.utils.set_random_seed(3)
    model = build_unet(cfg.model, None)
    image = np.round(_image(45, 70) * 255).astype(np.uint8)
    probs = resize_predict_fn(model, cfg)(image[None]).numpy()
    assert probs.shape == (1, 45, 70, 1)
    small = tf.image.resize(tf.image.convert_image_dtype(image[None], tf.float32), (20, 20), antialias=True).numpy()
    expected = model(np.pad(small, ((0, 0), (20, 20), (20, 20), (0, 0)), mode="reflect"), training=False)
    np.testing.assert_allclose(probs, tf.image.resize(expected, (45, 70)).numpy(), atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_reflect_indices_pad_like_numpy_for_any_width(n):
    for before, after in [(0, 0), (1, 3), (n, n + 1), (4 * n + 3, 7)]:
        np.testing.assert_array_equal(np.arange(n)[_reflect_indices(n, before, after)],
                                      np.pad(np.arange(n), (before, after), mode="reflect"))


@pytest.mark.parametrize("tile,overlap,message", [
    (66, None, r"--tile 66: \[66, 66\] must be divisible by 2\^depth = 4"),
    (0, None, "--tile 0: must be > 0"),
    (64, -5, "--overlap -5: must be >= 0"),
    (64, 30, r"--overlap 30 \(32 on the 4 px pooling grid\) leaves nothing of a 64x64 tile"),
])
def test_bad_tile_or_overlap_is_named(tile, overlap, message):
    cfg = load_config(None, ["model.depth=2", "model.base_filters=4", "data.image_size=[64, 64]"])
    with pytest.raises(ValueError, match=message):
        tiling(cfg, (tile, tile), overlap)
    valid = load_config(None, ["model.padding=valid", "model.depth=2", "data.image_size=[60, 60]"])
    with pytest.raises(ValueError, match="--tile 61: 61 does not fit valid padding"):
        tiling(valid, (61, 61))


def test_an_interrupted_prediction_leaves_the_earlier_outputs_whole(tmp_path, monkeypatch):
    import os

    from PIL import Image

    import unet_dist.atomic
    from unet_dist.predict import save_outputs

    image = np.full((6, 8, 3), 200, np.uint8)
    save_outputs(image, np.ones((6, 8), np.uint8), tmp_path, "a")
    before = (tmp_path / "a_mask.png").read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt  # as if the process were stopped between writing and renaming

    monkeypatch.setattr(unet_dist.atomic.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_outputs(image, np.zeros((6, 8), np.uint8), tmp_path, "a")
    monkeypatch.setattr(unet_dist.atomic.os, "replace", os.replace)
    assert (tmp_path / "a_mask.png").read_bytes() == before
    assert np.asarray(Image.open(tmp_path / "a_mask.png")).max() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_mask.png", "a_overlay.png"]  # no temporary left


def test_a_folder_replaces_the_earlier_one_only_once_it_is_complete(tmp_path):
    # export writes its SavedModel folder this way, conversion its manifest.json.
    from unet_dist.atomic import atomic_path

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.pb").write_text("old")
    with pytest.raises(OSError, match="disk full"), atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.pb").write_text("half")
        raise OSError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "old.pb").read_text() == "old"
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.pb").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in out.iterdir()] == ["new.pb"]


@pytest.mark.parametrize("units", [1, 2, 3])
def test_probabilities_are_written_as_float32_pages(tmp_path, units):
    # predict --probabilities: the foreground's probability for a binary model (a sigmoid's unit, or
    # class 1 of two), one page per class otherwise, to float32 precision.
    from PIL import Image, ImageSequence

    from unet_dist.predict import save_outputs

    rng = np.random.default_rng(units)
    probs = rng.random((7, 9, units)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True) if units > 1 else 1
    save_outputs(np.zeros((7, 9, 3), np.uint8), np.zeros((7, 9), np.uint8), tmp_path, "a", probs)
    with Image.open(tmp_path / "a_probs.tif") as written:
        pages = [np.asarray(page) for page in ImageSequence.Iterator(written)]
    expected = [probs[..., -1]] if units <= 2 else [probs[..., k] for k in range(units)]
    assert len(pages) == len(expected)
    for page, want in zip(pages, expected, strict=True):
        assert page.dtype == np.float32 and np.array_equal(page, want)


def test_auto_mode_predicts_at_the_scale_training_saw(tmp_path):
    # Training resizes every image to data.image_size, so --mode auto must resize unless the images
    # already were that size (then tiles keep their pixel scale). It used to tile whenever the data
    # was not resized at conversion: images of other sizes were then predicted at another scale.
    import json

    from unet_dist.inference import auto_mode

    cfg = load_config(None, ["data.image_size=[128, 128]"])

    def mode(info):
        (tmp_path / "data.json").write_text(json.dumps(info))
        return auto_mode(tmp_path, cfg)

    assert mode({"image_size": [256, 256]})[0] == "resize"  # resized at conversion
    assert mode({"image_size": None, "record_size": {"min": [128, 128], "max": [128, 128]}}) == (
        "tile", "every training image was [128, 128], the model's input size: tiles keep their pixel scale")
    assert mode({"image_size": None, "record_size": {"min": [240, 250], "max": [500, 480]}}) == (
        "resize", "the training images ([240, 250] to [500, 480]) were resized to [128, 128] in training")
    assert mode({"image_size": None, "record_size": {"min": [512, 512], "max": [512, 512]}})[0] == "resize"
    assert mode({"image_size": None})[0] == "tile"  # converted before sizes were recorded: as before


def test_flip_tta_averages_the_four_mirror_images_flipped_back():
    from unet_dist.inference import mirrored

    cfg = load_config(None, ["model.depth=2", "model.base_filters=4", "data.image_size=[32, 32]"])
    keras.utils.set_random_seed(4)
    model = build_unet(cfg.model, None)
    images = np.round(np.stack([_image(40, 56), _image(40, 56)[::-1, ::-1]]) * 255).astype(np.uint8)
    for plain, flipped in ((resize_predict_fn(model, cfg), resize_predict_fn(model, cfg, flip=True)),
                           (tile_predict_fn(model, cfg, overlap=4, batch=5),
                            tile_predict_fn(model, cfg, overlap=4, batch=5, flip=True))):
        got = traced(flipped)(tf.constant(images)).numpy()
        # Resize mode mirrors the resized image in one batch of four (resizing commutes with
        # mirroring); tile mode tiles the mirror images one after the other: both are the whole
        # image's mirror images.
        expect = np.mean([np.flip(plain(tf.constant(np.flip(images, axes).copy())).numpy(), axes)
                          for axes in [(), (2,), (1,), (1, 2)]], axis=0)
        assert got.shape == (2, 40, 56, 1)
        np.testing.assert_allclose(got, expect, atol=1e-5)
        # The mirror images predict differently (the net is not mirror-symmetric), so flipping
        # them back is checked: without it the average would differ.
        flipped_back = plain(tf.constant(images[:, ::-1].copy())).numpy()[:, ::-1]
        assert np.abs(flipped_back - plain(tf.constant(images)).numpy()).max() > 1e-4
    # Either way, the same average.
    tiles = np.stack([_image(32, 32), _image(32, 32)[::-1]])
    np.testing.assert_allclose(mirrored(model)(tf.constant(tiles), training=False).numpy(),
                               mirrored(model, one_at_a_time=True)(tf.constant(tiles), training=False).numpy(),
                               atol=1e-6)


def test_resize_prediction_antialiases_as_conversion_does():
    # A model trained on PIL-resized records must see PIL-like inputs: plain bilinear sampling of a
    # large image aliased the synthetic pets' stripes (the demo model: mean IoU 0.91 -> 0.97 with it).
    from PIL import Image

    cfg = load_config(None, ["model.depth=2", "data.image_size=[128, 100]"])

    def identity(x, training=False):  # the model's input, returned as its "probabilities"
        return x

    yy, xx = np.mgrid[0:384, 0:300]
    image = np.dstack([(xx % 3 == 0) * 255, ((xx + yy) % 4 < 2) * 255, (yy % 3 == 1) * 255]).astype(np.uint8)
    seen = resize_predict_fn(identity, cfg)(tf.constant(image[None])).numpy()[0]
    pil = np.asarray(Image.fromarray(image).resize((100, 128), Image.BILINEAR))[None] / 255.0
    expected = tf.image.resize(pil.astype(np.float32), (384, 300)).numpy()[0]
    assert np.abs(seen - expected).max() < 0.01


def test_a_folder_predicted_into_before_is_predicted_without_those_outputs(tmp_path):
    # predict --out INPUT, then predict INPUT again: the earlier masks and overlays are not images to predict.
    from PIL import Image

    from unet_dist.data.imageio import samples_of, stacks_of
    from unet_dist.predict import expand_folders, save_outputs, write_stack

    image = np.full((6, 8, 3), 200, np.uint8)
    for name in ("a.png", "b_mask.png", "d_probs.tif"):  # no overlay beside b and d: the user's own images, kept
        Image.fromarray(image).save(tmp_path / name)
    save_outputs(image, np.ones((6, 8), np.uint8), tmp_path, "a")
    # A stack's outputs: a pair per page, and the pages' masks as one stack.
    Image.fromarray(image).save(tmp_path / "v.tif", save_all=True, append_images=[Image.fromarray(image)])
    samples = samples_of(tmp_path / "v.tif")
    [(path, indices)] = stacks_of(samples).items()
    pages = [samples[i] for i in indices]
    assert write_stack(path, pages, 0, tmp_path) == (
        f"predict: v_mask.tif not written: v_p000_mask.png unreadable in {tmp_path} ([Errno 2] No such file or "
        f"directory: '{tmp_path / 'v_p000_mask.png'}'); with several nodes, --out must be a folder they share", False)
    probs = np.full((6, 8, 1), 0.75, np.float32)
    for page in pages:
        save_outputs(image, np.ones((6, 8), np.uint8), tmp_path, page.name, probs, instances=(1,))
    assert write_stack(path, pages, 0, tmp_path, probabilities=True, instances=True) == (
        f"predict: {tmp_path / 'v_mask.tif'}: the 2 page masks of {path} as one stack (their probabilities in "
        "v_probs.tif, their instances in v_instances.tif, their objects in v_objects.csv)", True)
    assert all((tmp_path / f"v{kind}").exists() for kind in ("_mask.tif", "_probs.tif", "_instances.tif"))
    # Each page's one object (the whole 6x8 page), after its page's number.
    assert (tmp_path / "v_objects.csv").read_text() == (
        "page,label,class,area,centroid_y,centroid_x,top,left,bottom,right,mean_probability\n"
        "0,1,1,48,2.5000,3.5000,0,0,6,8,0.7500\n1,1,1,48,2.5000,3.5000,0,0,6,8,0.7500\n")
    # An image's pair, probabilities and instances.
    save_outputs(image, np.ones((6, 8), np.uint8), tmp_path, "c", probs, instances=(1,))
    found, notes = expand_folders([tmp_path])
    assert [p.name for p in found] == ["a.png", "b_mask.png", "d_probs.tif", "v.tif"]
    # a's pair, c's four files, each of v's pages' four and v's three stacks.
    assert notes == [f"predict: {tmp_path}: leaving out 17 files of earlier predictions and masks (X_mask.png with "
                     "X_overlay.png; X_mask.*, X_overlay.png, X_probs.tif and X_instances.tif beside an image X; "
                     "X_mask.tif stacks)"]
    assert expand_folders([tmp_path / "a_mask.png"]) == ([tmp_path / "a_mask.png"], [])  # named, it is predicted
    # Without overlays (predict --no-overlay), the outputs are known by the image beside them: an
    # image's, a stack's pages' and its stack; and so are masks kept beside their images, as
    # Kaggle's LGG MRI set keeps X_mask.tif beside X.tif. A mask alone (b's) stays an image.
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("a.png", "b_mask.png", "m.tif", "m_mask.tif", "v.tif", "w_1.jpg", "w_1_mask.jpg"):
        (plain / name).write_bytes((tmp_path / ("v.tif" if name == "v.tif" else "a.png")).read_bytes())
    save_outputs(None, np.ones((6, 8), np.uint8), plain, "a", probs, instances=(1,))
    for page in pages:
        save_outputs(None, np.ones((6, 8), np.uint8), plain, page.name)
    assert write_stack(path, pages, 0, plain)[1]
    assert not list(plain.glob("*_overlay.png"))
    found, notes = expand_folders([plain])
    assert [p.name for p in found] == ["a.png", "b_mask.png", "m.tif", "v.tif", "w_1.jpg"]
    assert notes[0].startswith(f"predict: {plain}: leaving out 8 files of earlier predictions and masks (")


def test_an_image_the_device_has_no_memory_for_is_one_line():
    # TensorFlow's out-of-memory message is a page; predict and evaluate --images name the image in
    # one line (PredictionError) and go on with the next, as for an unreadable one.
    from unet_dist.inference import PredictionError, Predictor

    def fn(images):
        if images.shape[1] is None or images.shape[1] > 40:  # traced for the large image's size
            raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[...]\nHint: ...")
        return tf.zeros(tf.concat([tf.shape(images)[:3], [1]], 0))

    cfg = load_config(None, [])
    for mode, need in (("tile", "a smaller --tile"), ("resize", "a device with more memory")):
        predictor = Predictor(fn, [], cfg, ["ckpt"], mode, "as --mode asks")
        assert predictor(np.zeros((30, 20, 3), np.uint8)).shape == (30, 20, 1)
        with pytest.raises(PredictionError) as e:
            predictor(np.zeros((50, 60, 3), np.uint8))
        assert str(e.value) == (f"out of memory predicting a 50x60 image in {mode} mode; {need}, fewer --workdir "
                                "runs or --tta none need less")


def test_processes_share_images_by_what_they_cost_to_predict(tmp_path, monkeypatch):
    # predict and evaluate --images on N processes: each image costs its tiles in tile mode (one
    # model input in resize mode), read from the headers, and the shares are balanced by that.
    from PIL import Image

    from unet_dist.data import imageio
    from unet_dist.data.imageio import samples_of
    from unet_dist.data.pipeline import Shard
    from unet_dist.inference import Predictor
    from unet_dist.predict import header_sizes, my_share

    real_page_sizes = imageio.page_sizes

    cfg = load_config(None, [])
    tiled = Predictor(None, [], cfg, ["ckpt"], "tile", "as --mode asks", [(48, 48)])
    assert tiled.cost((96, 100)) == 2 * 3 and tiled.cost((0, 0)) == 1
    resized = Predictor(None, [], cfg, ["ckpt"], "resize", "as --mode asks", [None])
    assert resized.cost((960, 1000)) == 1
    assert Predictor(None, [], cfg, ["c1", "c2"], "per run", "", [(48, 48), None]).cost((96, 100)) == 7
    files = []
    for name, side in (("a", 480), ("b", 48), ("c", 480), ("d", 48)):
        Image.new("RGB", (side, side)).save(tmp_path / f"{name}.png")
        files.append(tmp_path / f"{name}.png")
    # A stack of three pages, the first and the last large; and a file that is not an image (cost 1).
    Image.new("L", (480, 480)).save(tmp_path / "s.tif", save_all=True,
                                    append_images=[Image.new("L", (48, 48)), Image.new("L", (480, 480))])
    (tmp_path / "e.png").write_bytes(b"not an image")
    samples = [s for f in [*files, tmp_path / "s.tif", tmp_path / "e.png"] for s in samples_of(f)]
    # Each process reads every other file's headers (a stack's pages together), and one sum gives
    # every process all the sizes: here the sum is taken over both processes' parts directly.
    read = []
    monkeypatch.setattr(imageio, "page_sizes", lambda path: read.append(path) or real_page_sizes(path))
    parts = [header_sizes(samples, Shard(k, 2)) for k in range(2)]
    assert sorted(read) == sorted(dict.fromkeys(s.image for s in samples))  # each file once
    assert parts[0][0].tolist() == [480, 480] and parts[1][0].tolist() == [0, 0]

    class Process:
        def __init__(self, shard):
            self.process_shard = shard

        def sum_shares(self, value, what):
            assert np.array_equal(value, parts[self.process_shard.index]), what
            return parts[0] + parts[1]

    shares = [[samples[i].name for i in my_share(samples, tiled.cost, Process(Shard(k, 2)))] for k in range(2)]
    # 100 tiles each for a, c, s_p000 and s_p002, 1 for the rest: 202 each. Every N-th image would
    # have given one process all four large ones (a, c, s_p000, s_p002), 400 against 4.
    assert shares == [["a", "b", "s_p000", "s_p001"], ["c", "d", "s_p002", "e"]]
    assert my_share(samples, tiled.cost, Process(Shard(0, 1))) == list(range(len(samples)))  # no sum


def test_predictions_are_written_in_the_background_and_a_failed_write_is_raised(tmp_path, monkeypatch):
    # predict encodes and writes on background threads while the next image is predicted; a write
    # that fails (a full disk) is raised by the writer, after the writes already started are done.
    from PIL import Image

    import unet_dist.atomic
    from unet_dist.predict import Writer

    image = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    masks = [np.random.default_rng(i).integers(0, 2, (30, 40), dtype=np.uint8) for i in range(7)]
    # Images of more than `pixels` together wait only while they are one: a large image is not
    # held twice, or encoded twice at once.
    writer = Writer(tmp_path / "ok", threads=2, pixels=2000)
    (tmp_path / "ok").mkdir()
    for i, m in enumerate(masks):
        writer.put(image, m, f"im{i}")
        assert len(writer.pending) == 1
    writer.close()
    for i, m in enumerate(masks):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "ok" / f"im{i}_mask.png")), m)
        overlay = np.asarray(Image.open(tmp_path / "ok" / f"im{i}_overlay.png"))
        assert overlay.shape == (30, 120, 3) and np.array_equal(overlay[:, :40], image)
        assert np.array_equal(overlay[:, 40:80], np.repeat(m[..., None] * 255, 3, axis=2))  # the mask, white
        assert np.array_equal(overlay[:, 80:], image * m[..., None])
    assert not [p for p in (tmp_path / "ok").iterdir() if ".tmp-" in p.name]
    real = unet_dist.atomic.atomic_path

    @contextlib.contextmanager
    def full_disk(path):
        with real(path) as tmp:
            yield tmp
            if path.name.startswith("im3"):  # the file was written in part
                raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(unet_dist.atomic, "atomic_path", full_disk)
    (tmp_path / "full").mkdir()
    writer = Writer(tmp_path / "full", threads=2)
    with pytest.raises(OSError, match="No space left on device"):
        for i, m in enumerate(masks):
            writer.put(image, m, f"im{i}")
        writer.close()
    writer.close()  # what was started is finished
    written = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert "im0_mask.png" in written and not [n for n in written if "im3" in n], written  # nor its temporary file


def test_predict_shows_its_progress_on_the_chief_alone(monkeypatch):
    # predict and evaluate (both sources): a bar on the chief's terminal, as training's; in a log file
    # (not a terminal) a line a minute, so none for a short one; nothing from the other processes.
    import io
    import sys

    from unet_dist.logs import chief_progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    class Process:
        def __init__(self, rank, world_size):
            self.is_chief, self.world_size = rank == 0, world_size

    for stream, rank, world_size, shown in ((Terminal(), 0, 1, "predict: 100%"),
                                            (Terminal(), 0, 2, "predict (rank 0's share): 100%"),
                                            (Terminal(), 1, 2, None), (io.StringIO(), 0, 1, None)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert list(chief_progress(Process(rank, world_size), "predict", "img", [3, 5, 7])) == [3, 5, 7]
        text = stream.getvalue()
        assert (shown in text and "3/3" in text) if shown else text == "", (rank, world_size, text)
    # A long one in a log file: a line now and then (here every item) with the count and time left,
    # none for the last (the command's summary follows), none from the other processes.
    import unet_dist.progress

    monkeypatch.setattr(unet_dist.progress, "LOG_INTERVAL_S", 0.0)
    for rank, world_size, desc in ((0, 1, "predict"), (0, 2, "predict (rank 0's share)"), (1, 2, None)):
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        assert list(chief_progress(Process(rank, world_size), "predict", "img", [3, 5, 7])) == [3, 5, 7]
        lines = sys.stderr.getvalue().splitlines()
        starts = [] if desc is None else [f"{desc}: {k}/3 img (" for k in (1, 2)]
        assert len(lines) == len(starts) and all(map(str.startswith, lines, starts)), lines
        assert desc is None or lines[-1].endswith(" img/s, eta 0:00:00)"), lines
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with chief_progress(Process(0, 1), "evaluate", "batch", total=4) as bar:  # evaluate --data's use
        bar.update()
    assert sys.stderr.getvalue().startswith("evaluate: 1/4 batch ("), sys.stderr.getvalue()


def test_the_saved_model_serves_class_colours_where_the_masks_had_them(tmp_path):
    # Masks coded by colour at conversion: `serve` returns each pixel's class colour beside its id.
    from unet_dist.inference import export_saved_model

    colors = [[0, 0, 0], [255, 0, 0], [0, 255, 0]]

    def fn(images):  # class 0, 1 and 2 in the first three columns, whatever the image
        onehot = tf.one_hot(tf.range(tf.shape(images)[2]) % 3, 3)
        return tf.broadcast_to(onehot[None, None], [tf.shape(images)[0], tf.shape(images)[1], tf.shape(images)[2], 3])

    export_saved_model([], fn, tmp_path / "coloured", colors)
    export_saved_model([], fn, tmp_path / "plain")
    images = np.zeros((2, 4, 6, 3), np.uint8)
    served = tf.saved_model.load(str(tmp_path / "coloured")).serve(images)
    np.testing.assert_array_equal(served["mask"].numpy()[1, 2], [0, 1, 2, 0, 1, 2])
    assert served["colors"].dtype == tf.uint8
    np.testing.assert_array_equal(served["colors"].numpy()[1, 2], np.array(colors, np.uint8)[[0, 1, 2, 0, 1, 2]])
    assert set(tf.saved_model.load(str(tmp_path / "plain")).serve(images)) == {"mask", "probabilities"}


def test_the_served_window_maps_values_to_the_bytes_conversion_stores():
    # export's serve_values maps raw values in the graph; it must give the bytes imageio.windowed
    # gives for the same values (records, predict), out-of-window and NaN values included.
    from unet_dist.data.imageio import windowed
    from unet_dist.inference import windowed_tf

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(50, 400, 100_000), np.linspace(-160, 240, 4001), [np.nan, np.inf, -np.inf]])
    values = np.stack([values, values * 3.7], -1).astype(np.float32)
    window = [[-160.0, 240.0], [33.25, 86.5]]
    want = np.stack([windowed(values[:, c], lo, hi) for c, (lo, hi) in enumerate(window)], -1)
    np.testing.assert_array_equal(windowed_tf(tf.constant(values), window).numpy(), want)


@pytest.mark.parametrize("intensity", ["window", {"window": [[0, 1]]}, {"window": [[1, 0]]}, {"window": [[0, "1"]]},
                                       {"window": [[0, 1], [0, 1], [0, 1], [0, 1]]}, {"window": [0, 1]}])
def test_a_bad_intensity_window_in_a_runs_data_json_is_one_line_naming_it(tmp_path, intensity):
    # predict maps new images by it: a window that is not one [LO, HI] per channel stops it, named.
    import json

    from unet_dist.config import ConfigError
    from unet_dist.inference import intensity_window

    (tmp_path / "data.json").write_text(json.dumps({"channels": 1 if intensity != {"window": [[0, 1]]} else 3,
                                                    "intensity": intensity}))
    with pytest.raises(ConfigError, match=r"data\.json: 'intensity' holds no window \[LO, HI\] for each of the "
                                          r"images' \d channels: .*; its images' intensity window is unknown"):
        intensity_window(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps({"channels": 2, "intensity": {"window": [[-1000, 400.5], [0, 1]]}}))
    assert intensity_window(tmp_path) == [[-1000, 400.5], [0, 1]]
    (tmp_path / "data.json").write_text(json.dumps({"channels": 1}))  # a run from before convert --intensity
    assert intensity_window(tmp_path) is None


@pytest.mark.parametrize("colors", [[[0, 0, 0]], "red", [[0, 0, 0], [255, 0]], [[0, 0, 0], [256, 0, 0]],
                                    [[0, 0, 0], [1.5, 0, 0]]])
def test_bad_colours_in_a_runs_data_json_are_one_line_naming_it(tmp_path, colors):
    import json

    from unet_dist.config import ConfigError
    from unet_dist.inference import data_info

    (tmp_path / "data.json").write_text(json.dumps({"classes": "multiclass", "colors": colors}))
    with pytest.raises(ConfigError, match=r"data\.json: 'colors' is not a list of class colours .*; hint"):
        data_info(tmp_path, "hint")
    (tmp_path / "data.json").write_text(json.dumps({"num_classes": 3, "colors": [[0, 0, 0], [255, 0, 0]]}))
    with pytest.raises(ConfigError, match=r"data\.json: 2 'colors' for 3 classes"):
        data_info(tmp_path, "hint")
    (tmp_path / "data.json").write_text(json.dumps({"num_classes": 2, "colors": [[0, 0, 0], [255, 0, 0]]}))
    assert data_info(tmp_path, "hint")["colors"][1] == [255, 0, 0]
