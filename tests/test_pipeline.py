import subprocess

import numpy as np
import pytest
import tensorflow as tf
from conftest import PY, ROOT, subprocess_env

from unet_dist.config import AugmentConfig, load_config
from unet_dist.data.augment import augment
from unet_dist.data.pipeline import DataError, Shard, eval_dataset, load_manifest, train_dataset

PLAIN = ["data.augment.flip=false", "data.augment.scale_crop=false", "data.augment.brightness=0",
         "data.augment.contrast=0", "data.image_size=[64, 64]", "model.depth=2", "data.shuffle_buffer=8"]


def _l_shape(h=48, w=64):
    """An image whose red channel is exactly its (asymmetric, L-shaped) mask."""
    mask = np.zeros((h, w, 1), np.uint8)
    mask[6:40, 8:20] = 1
    mask[30:40, 8:50] = 1
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 0.3, (h, w, 3)).astype(np.float32)
    img[..., 0] = mask[..., 0] * 0.9 + 0.05
    return tf.constant(img), tf.constant(mask)


def _agreement(image, mask):
    return float(np.mean((image.numpy()[..., 0] > 0.5) == (mask.numpy()[..., 0] == 1)))


@pytest.mark.parametrize("cfg", [
    AugmentConfig(flip=True, scale_crop=False, brightness=0, contrast=0),
    AugmentConfig(flip=False, rot90=True, scale_crop=False, brightness=0, contrast=0),
    AugmentConfig(flip=False, scale_crop=True, scale_prob=1.0, scale_max=1.6, brightness=0, contrast=0),
    AugmentConfig(flip=False, scale_crop=True, scale_prob=1.0, scale_min=0.5, scale_max=0.7, brightness=0, contrast=0),
    AugmentConfig(flip=False, scale_crop=False, rotate_degrees=30, brightness=0, contrast=0),
    AugmentConfig(flip=False, scale_crop=False, elastic=True, elastic_sigma=8, brightness=0, contrast=0),
    AugmentConfig(flip=True, rot90=True, scale_crop=True, rotate_degrees=15, elastic=True, brightness=0.1,
                  contrast=0.1, hue=0.02),
])
def test_augmentation_keeps_image_and_mask_aligned(cfg):
    image, mask = _l_shape()
    changed = 0
    for s in range(12):
        out_img, out_mask = augment(image, mask, (48, 48), cfg, tf.constant([7, s], tf.int64))
        assert out_img.shape == (48, 48, 3) and out_mask.dtype == tf.uint8
        assert set(np.unique(out_mask.numpy())) <= {0, 1}  # nearest neighbour: no new class ids
        if cfg.brightness == 0:
            assert _agreement(out_img, out_mask) > 0.97
        ref_img, _ = augment(image, mask, (48, 48), AugmentConfig(flip=False, scale_crop=False, brightness=0,
                                                                   contrast=0), tf.constant([7, s], tf.int64))
        changed += not np.allclose(out_img.numpy(), ref_img.numpy())
    assert changed >= 4  # the transform did something


@pytest.mark.parametrize("cfg", [
    AugmentConfig(rot90=True, hue=0.0), AugmentConfig(elastic=True, elastic_sigma=8, hue=0.0),
    AugmentConfig(rotate_degrees=30, hue=0.05), AugmentConfig(hue=0.05),
])
def test_border_distances_move_with_the_mask_through_the_batch_stage(cfg):
    # Stand-in distances that equal the mask: wherever the batch stage moves the mask, they go too;
    # hue alone moves nothing and hands them back as they were.
    from unet_dist.data.augment import augment_batch, draw

    image, mask = _l_shape(48, 48)
    distances = tf.cast(mask, tf.float32)[None]
    for s in range(6):
        u, normals = draw(tf.constant([5, s], tf.int64), cfg)
        _, masks, moved = augment_batch(image[None], mask[None], u[None], normals[None], cfg, distances)
        assert moved.shape == (1, 48, 48, 1)
        agree = np.mean((moved.numpy() > 0.5) == (masks.numpy() == 1))
        assert agree > 0.97, (cfg, s, agree)
        if not (cfg.rot90 or cfg.rotate_degrees or cfg.elastic):
            np.testing.assert_array_equal(moved.numpy(), distances.numpy())


@pytest.mark.parametrize("cfg", [AugmentConfig(rot90=True), AugmentConfig(elastic=True, elastic_sigma=8)])
def test_images_of_any_channel_count_move_whole_beside_the_border_distances(cfg):
    # Five channels: the first three come out as a 3-channel image's would, the other two move with
    # them, and the distances that ride along as one more channel come out as they would with three.
    from unet_dist.data.augment import augment_batch, draw

    image, mask = _l_shape(48, 48)
    five = tf.concat([image, image[..., :2] * 0.5], axis=-1)[None]
    distances = tf.cast(mask, tf.float32)[None]
    u, normals = draw(tf.constant([5, 1], tf.int64), cfg)
    images3, masks3, moved3 = augment_batch(image[None], mask[None], u[None], normals[None], cfg, distances)
    images5, masks5, moved5 = augment_batch(five, mask[None], u[None], normals[None], cfg, distances)
    assert images5.shape == (1, 48, 48, 5) and moved5.shape == (1, 48, 48, 1)
    np.testing.assert_allclose(images5.numpy()[..., :3], images3.numpy(), atol=1e-6)
    np.testing.assert_allclose(images5.numpy()[..., 3:], images3.numpy()[..., :2] * 0.5, atol=1e-6)
    np.testing.assert_array_equal(masks5.numpy(), masks3.numpy())
    np.testing.assert_allclose(moved5.numpy(), moved3.numpy(), atol=1e-6)


def test_alignment_check_catches_an_image_only_flip():
    image, mask = _l_shape(48, 48)
    assert _agreement(tf.reverse(image, [1]), mask) < 0.9  # the check above can fail


def test_augmentation_is_a_function_of_the_seed():
    image, mask = _l_shape()
    cfg = AugmentConfig(rotate_degrees=10, elastic=True)
    a = augment(image, mask, (32, 32), cfg, tf.constant([1, 2], tf.int64))
    b = augment(image, mask, (32, 32), cfg, tf.constant([1, 2], tf.int64))
    c = augment(image, mask, (32, 32), cfg, tf.constant([1, 3], tf.int64))
    assert np.array_equal(a[0].numpy(), b[0].numpy()) and not np.array_equal(a[0].numpy(), c[0].numpy())


def test_noise_blur_and_gamma_each_change_their_share_of_the_samples_by_the_drawn_amount():
    # Each sample against numpy/scipy from its own draws: noise of the drawn std, then its own
    # Gaussian blur, its own coarser resolution and its own gamma; the samples not drawn for a
    # transform pass it unchanged, and no mask moves.
    from scipy.ndimage import gaussian_filter

    from unet_dist.data import augment as aug

    image, mask = _l_shape(48, 48)
    image = image * 0.3 + 0.35  # in [0.35, 0.65]: noise of std 0.1 at most is almost never clipped
    cfg = AugmentConfig(flip=False, scale_crop=False, brightness=0, contrast=0, noise=0.1, noise_prob=0.5,
                        blur=1.5, blur_prob=0.5, gamma=0.5, gamma_prob=0.5, lowres=0.5, lowres_prob=0.5)
    n = 40
    draws = [aug.draw(tf.constant([9, s], tf.int64), cfg) for s in range(n)]
    u, normals = tf.stack([d[0] for d in draws]), tf.stack([d[1] for d in draws])
    sampled = [aug.augment_sample(image, mask, (48, 48), u[s], cfg) for s in range(n)]
    images, masks = tf.stack([x[0] for x in sampled]), tf.stack([x[1] for x in sampled])
    out, out_masks = aug.augment_batch(images, masks, u, normals, cfg)
    np.testing.assert_array_equal(out_masks.numpy(), np.repeat(mask.numpy()[None], n, axis=0))
    counts = dict.fromkeys(("noise", "blur", "lowres", "gamma"), 0)
    for s in range(n):
        us, x, got = u[s].numpy(), image.numpy(), images[s].numpy()
        if us[aug._NOISE_P] < cfg.noise_prob:
            counts["noise"] += 1
            want = us[aug._NOISE_STD] * cfg.noise
            assert abs(np.std(got - x) - want) <= 0.05 * want + 0.001, (s, want)
        else:
            np.testing.assert_array_equal(got, x)
        x = got
        if us[aug._BLUR_P] < cfg.blur_prob:
            counts["blur"] += 1
            sigma = cfg.blur * (0.5 + 0.5 * us[aug._BLUR_SIGMA])
            x = gaussian_filter(x, (sigma, sigma, 0), mode="mirror", truncate=5 / sigma)  # radius ceil(3 * 1.5)
        if us[aug._LOWRES_P] < cfg.lowres_prob:  # nearest neighbour down (pixel centres), bicubic up
            counts["lowres"] += 1
            n = max(1, int(np.round(np.float32(48) * np.float32(1 - cfg.lowres * us[aug._LOWRES]))))
            at = np.minimum(np.floor((np.arange(n, dtype=np.float32) + 0.5) * np.float32(48 / n)), 47).astype(int)
            x = np.clip(tf.image.resize(x[at][:, at], (48, 48), method="bicubic").numpy(), 0, 1)
        if us[aug._GAMMA_P] < cfg.gamma_prob:
            counts["gamma"] += 1
            g = np.exp((2 * us[aug._GAMMA] - 1) * np.log(1.5))
            x = np.clip(x, 0, 1) ** g
        np.testing.assert_allclose(out[s].numpy(), x, atol=2e-5, err_msg=str(s))
    assert all(0.25 * n <= c <= 0.75 * n for c in counts.values()), counts


def test_gamma_of_the_inverted_image_and_kept_statistics_as_nnunet_draws_them():
    # nnU-Net's two gammas: of the inverted image on one share of the samples, then of the image on
    # another, each g drawn alone; with gamma_retain_stats each keeps every channel's mean and std.
    # Checked against numpy from each sample's own draws; no mask moves.
    from unet_dist.data import augment as aug

    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0.1, 0.9, (40, 16, 16, 3)), tf.float32)
    masks = tf.zeros((40, 16, 16, 1), tf.uint8)
    for retain in (False, True):
        cfg = AugmentConfig(flip=False, scale_crop=False, brightness=0, contrast=0, gamma=0.5, gamma_prob=0.5,
                            gamma_inverted_prob=0.5, gamma_retain_stats=retain)
        u = tf.stack([aug.draw(tf.constant([7, s], tf.int64), cfg)[0] for s in range(40)])
        out, out_masks = aug.augment_batch(images, masks, u, tf.zeros((40, 3, 3, 2)), cfg)
        assert not out_masks.numpy().any()
        counts = [0, 0]
        for s in range(40):
            us, x = u[s].numpy(), images[s].numpy().astype(np.float64)
            for which, (p, g, power) in enumerate(((aug._GAMMA_INV_P, aug._GAMMA_INV, lambda x, g: 1 - (1 - x) ** g),
                                                   (aug._GAMMA_P, aug._GAMMA, lambda x, g: x ** g))):
                if us[p] >= 0.5:
                    continue
                counts[which] += 1
                y = power(x, np.exp((2 * us[g] - 1) * np.log(1.5)))
                if retain:
                    y = np.clip((y - y.mean((0, 1))) * x.std((0, 1)) / y.std((0, 1)) + x.mean((0, 1)), 0, 1)
                    assert np.allclose(y.mean((0, 1)), x.mean((0, 1)), atol=1e-3), s  # nothing here clips much
                x = y
            np.testing.assert_allclose(out[s].numpy(), x, atol=3e-5, err_msg=f"{s} {retain}")
        assert all(10 <= c <= 30 for c in counts), counts


def test_the_augmentation_is_described_in_one_line():
    from unet_dist.data.augment import describe

    plain = ["data.augment.flip=false", "data.augment.scale_crop=false", "data.augment.brightness=0",
             "data.augment.contrast=0"]
    assert describe(load_config(None, plain).data.augment) == "none"
    intensity = ["data.augment.noise=0.1", "data.augment.blur=1", "data.augment.lowres=0.5", "data.augment.gamma=0.5"]
    assert describe(load_config(None, plain + intensity).data.augment) == (
        "noise std 0-0.1 on 10%, blur sigma 0.5-1 px on 20%, lowres 0.5-1 on 25%, gamma 0.667-1.5 on 30%")
    nnunet = ["data.augment.gamma=0.5", "data.augment.gamma_inverted_prob=0.1", "data.augment.gamma_retain_stats=true"]
    assert describe(load_config(None, plain + nnunet).data.augment) == (
        "gamma 0.667-1.5 on 30% (of the inverted image on 10%) keeping each channel's mean and std")
    assert describe(load_config(None, ["data.augment.rotate_degrees=15", "data.augment.elastic=true",
                                       "data.augment.scale_prob=1"]).data.augment) == (
        "flips, zoom 0.8-1.25, rotation +-15 degrees, elastic 3x3 grid sigma 10 px, brightness 0.1, contrast 0.1")


def _keys(batches):
    """A fingerprint per image (augmentation off: the same record gives the same pixels)."""
    return [hash(img.tobytes()) for b in batches for img in b["image"].numpy()]


def test_file_sharding_gives_disjoint_records_and_equal_steps(shards):
    cfg = load_config(None, PLAIN)
    m = load_manifest(shards)
    n = m["train"]["records"]
    per_worker = []
    for i in range(2):
        ds = train_dataset(shards, cfg, local_batch=2, global_batch=4, shard=Shard(i, 2))
        per_worker.append(set(_keys(ds.take(40))))  # 80 samples: several passes over ~18 records
    assert per_worker[0].isdisjoint(per_worker[1])
    assert len(per_worker[0]) + len(per_worker[1]) == n
    # The stream repeats: any number of steps is available on every worker.
    for i in range(2):
        assert len(list(train_dataset(shards, cfg, 2, 4, Shard(i, 2)).take(100))) == 100


def test_balanced_shares_cover_every_item_once_and_finish_together():
    # What predict and evaluate --images split images by: the costliest first, each to the least
    # loaded process, the same split on every process.
    costs = [50, 1, 1, 49, 2, 3, 1, 1, 40, 1]
    for count in (1, 2, 3, 4):
        shares = [Shard(i, count).balanced(costs) for i in range(count)]
        assert sorted(i for share in shares for i in share) == list(range(len(costs)))
        loads = [sum(costs[i] for i in share) for share in shares]
        assert max(loads) - min(loads) <= max(costs), (count, shares)
    # Large and small images in turn: every N-th item, as before, gave one process every large one.
    costs = [40, 1] * 4
    assert [Shard(i, 2).balanced(costs) for i in range(2)] == [[0, 1, 4, 5], [2, 3, 6, 7]]  # 82 and 82, not 160 and 4
    # Equal costs: every N-th item.
    assert Shard(1, 3).balanced([1] * 7) == [1, 4]
    assert Shard(2, 3).balanced([]) == []


def test_per_record_sharding_with_fewer_shards_than_workers(shards):
    # Fewer shard files than workers: every worker reads every file and keeps every n-th record.
    cfg = load_config(None, PLAIN)
    m = load_manifest(shards)
    n, files = m["train"]["records"], len(m["train"]["shards"])
    count = files + 1
    # Two passes over each worker's share: together the workers see every record (the parallel map
    # may let a sample of the next pass overtake one of this pass, so exact disjointness is not asserted).
    seen = [set(_keys(train_dataset(shards, cfg, 1, count, Shard(i, count)).take(2 * n // count)))
            for i in range(count)]
    assert all(seen) and set().union(*seen) == set(_keys(train_dataset(shards, cfg, 1, 1).take(3 * n)))
    # Fewer records than workers: a worker would have nothing to read; one line says so.
    with pytest.raises(DataError, match=rf"{n} training records for {n + 1} input pipelines .* at least one"):
        train_dataset(shards, cfg, 1, n + 1, Shard(n, n + 1))


def test_deterministic_mode_is_world_size_independent_and_resumable(shards):
    # The noise's seed is each sample's own too (noise, blur, lowres and gamma on half the samples).
    cfg = load_config(None, ["runtime.deterministic=true", "data.image_size=[64, 64]", "model.depth=2",
                             "data.augment.elastic=true", "data.augment.noise=0.1", "data.augment.noise_prob=0.5",
                             "data.augment.blur=1", "data.augment.blur_prob=0.5", "data.augment.gamma=0.5",
                             "data.augment.gamma_prob=0.5", "data.augment.lowres=0.5", "data.augment.lowres_prob=0.5"])
    one = [b["image"].numpy() for b in train_dataset(shards, cfg, 4, 4, Shard(0, 1)).take(6)]
    w0 = [b["image"].numpy() for b in train_dataset(shards, cfg, 2, 4, Shard(0, 2)).take(6)]
    w1 = [b["image"].numpy() for b in train_dataset(shards, cfg, 2, 4, Shard(1, 2)).take(6)]
    for s in range(6):
        np.testing.assert_array_equal(one[s], np.concatenate([w0[s], w1[s]]))
    resumed = [b["image"].numpy() for b in train_dataset(shards, cfg, 4, 4, Shard(0, 1), start_step=3).take(3)]
    for s in range(3):
        np.testing.assert_array_equal(resumed[s], one[3 + s])


def test_a_shuffle_buffer_beyond_the_data_shuffles_it_whole(shards):
    # In a child: a buffer of 10**11 used to crash the process (tf.data reserves what it is given).
    code = f"""
import numpy as np
from unet_dist.config import load_config
from unet_dist.data.pipeline import train_dataset, load_manifest
n = load_manifest({str(shards)!r})["train"]["records"]
masks = [[b["mask"].numpy() for b in train_dataset({str(shards)!r}, load_config(None, [
    "runtime.deterministic=true", "data.image_size=[64, 64]", "model.depth=2", f"data.shuffle_buffer={{size}}"]),
    4, 4).take(4)] for size in (n, 10**11)]
print("same" if all(np.array_equal(a, b) for a, b in zip(*masks)) else "different")
"""
    proc = subprocess.run([PY, "-c", code], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "same", proc.stderr[-2000:]


def test_eval_sees_every_record_exactly_once(shards):
    cfg = load_config(None, PLAIN)
    m = load_manifest(shards)
    whole = _keys(eval_dataset(shards, cfg, 3, Shard(0, 1)))
    parts = [_keys(eval_dataset(shards, cfg, 3, Shard(i, 2))) for i in range(2)]
    assert len(whole) == m["val"]["records"]
    assert sorted(parts[0] + parts[1]) == sorted(whole)
    assert set(parts[0]).isdisjoint(parts[1])


def test_pipelines_start_no_autotuning_thread(shards):
    """tf.data's autotuning thread kept 2-process runs alive 31-43 s after their last line (an
    iterator's teardown waits for its next wake-up; data/pipeline.py): neither pipeline may start one."""
    cfg = load_config(None, PLAIN)
    for ds in (train_dataset(shards, cfg, 2, 4, Shard(0, 2)), eval_dataset(shards, cfg, 3, Shard(1, 2))):
        assert ds.options().autotune.enabled is False


def test_missing_or_mismatched_data_is_named(tmp_path, shards):
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="afile is a file, not a folder"):
        load_manifest(tmp_path / "afile")
    with pytest.raises(DataError, match="manifest.json not found: convert the data first"):
        load_manifest(tmp_path)
    (tmp_path / "images").mkdir()  # the source folder given as --data
    with pytest.raises(DataError, match=f"holds images/, so it looks like the images and masks themselves; convert "
                                        f"them first \\(python -m unet_dist.convert {tmp_path} DATA\\)"):
        load_manifest(tmp_path)
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    m = json.loads((copy / "manifest.json").read_text())
    (copy / m["train"]["shards"][1]).unlink()
    with pytest.raises(DataError, match=m["train"]["shards"][1]):
        load_manifest(copy)


@pytest.mark.parametrize("edit, words", [
    (lambda m: [1], "the top level must be an object, got [1]"),
    (lambda m: {**m, "num_classes": "two"}, 'num_classes must be an integer >= 2, got "two"'),
    (lambda m: {**m, "train": [1, 2]}, 'train must be an object with "shards" and "records", got [1, 2]'),
    (lambda m: {**m, "val": {}}, "val.shards must be a list of file names, got null"),
    (lambda m: {**m, "train": {**m["train"], "records": None}}, "train.records must be an integer >= 0, got null"),
    (lambda m: {**m, "train": {**m["train"], "records_per_shard": [1]}},
     "train.records_per_shard must be a list of {n} counts (one per shard), got [1]"),
])
def test_a_manifest_of_another_shape_is_named_in_one_line(tmp_path, shards, edit, words):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    m = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(edit(m)))
    with pytest.raises(DataError) as e:
        load_manifest(copy)
    words = words.replace("{n}", str(len(m["train"]["shards"])))
    assert str(e.value) == f"{copy / 'manifest.json'}: {words}; convert again"


def test_a_manifest_that_is_not_text_is_named_in_one_line(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n")  # another file under its name
    with pytest.raises(DataError, match=r"manifest.json: unreadable manifest \('utf-8' codec can't decode byte 0x89"):
        load_manifest(tmp_path)


def test_nearest_resampling_keeps_class_ids_and_identity():
    from unet_dist.data.augment import nearest

    mask = tf.constant(np.random.default_rng(0).integers(0, 3, (37, 53, 1)), tf.uint8)
    np.testing.assert_array_equal(nearest(mask, (37, 53)).numpy(), mask.numpy())
    up = nearest(mask, (74, 106)).numpy()  # exactly 2x: every source pixel becomes a 2x2 block
    np.testing.assert_array_equal(up[::2, ::2], mask.numpy())
    np.testing.assert_array_equal(up[1::2, 1::2], mask.numpy())
    down = nearest(mask, (20, 20)).numpy()
    assert down.shape == (20, 20, 1) and set(np.unique(down)) <= {0, 1, 2}


def test_sample_stage_flips_both_axes_with_the_mask():
    from unet_dist.data.augment import augment_sample

    image, mask = _l_shape(48, 48)
    cfg = AugmentConfig(flip=True, scale_crop=False, brightness=0, contrast=0)
    u = tf.constant([0.0, 0.0] + [0.9] * 8)  # both flips drawn (u < 0.5 for _FLIP_H and _FLIP_V)
    out_img, out_mask = augment_sample(image, mask, (48, 48), u, cfg)
    np.testing.assert_allclose(out_img.numpy(), image.numpy()[::-1, ::-1], atol=1e-6)
    np.testing.assert_array_equal(out_mask.numpy(), mask.numpy()[::-1, ::-1])


def test_zooming_out_shrinks_the_image_inside_a_mirrored_border():
    # scale_min < 1: the window is larger than the image and reaches past its edges, which are
    # mirrored there (image and mask alike), so an object appears smaller and wholly inside.
    from unet_dist.data.augment import augment_sample, draw

    n = 64
    mask = np.zeros((n, n, 1), np.uint8)
    mask[28:36, 28:36] = 1  # 64 pixels in the middle, far from the edges
    image = tf.constant(np.repeat(mask * 200, 3, axis=-1).astype(np.uint8))
    for zoom in (0.7, 0.8):  # borders of at most 28 px: the mirror holds no copy of the middle
        cfg = AugmentConfig(flip=False, scale_crop=True, scale_prob=1.0, scale_min=zoom, scale_max=zoom, brightness=0,
                            contrast=0)
        for s in range(6):
            u, _ = draw(tf.constant([9, s], tf.int64), cfg)
            out_img, out_mask = augment_sample(image, tf.constant(mask), (n, n), u, cfg)
            fg = int((out_mask.numpy() == 1).sum())
            assert 64 * zoom**2 * 0.6 <= fg <= 64 * zoom**2 * 1.4, (zoom, s, fg)
            assert _agreement(out_img, out_mask) > 0.97
    # The border is the image mirrored: an object at the edge is seen twice, not cut off by a blank.
    edge = np.zeros((n, n, 1), np.uint8)
    edge[:, :8] = 1
    cfg = AugmentConfig(flip=False, scale_crop=True, scale_prob=1.0, scale_min=0.5, scale_max=0.5, brightness=0,
                        contrast=0)
    u = tf.constant([0.9, 0.9, 0.9, 0.0, 0.0, 0.0] + [0.9] * 7)  # the window starts 64 px before the image
    _, out_mask = augment_sample(tf.constant(np.repeat(edge * 200, 3, axis=-1)), tf.constant(edge), (n, n), u, cfg)
    np.testing.assert_array_equal(out_mask.numpy()[0, :, 0], [0] * 28 + [1] * 8 + [0] * 28)


def test_scale_prob_is_the_share_of_samples_zoomed():
    from unet_dist.data.augment import augment_sample, draw

    image, mask = _l_shape(48, 48)
    for prob, lo, hi in ((0.3, 0.1, 0.5), (1.0, 0.9, 1.0)):  # a zoom near 1 may round to the whole image
        cfg = AugmentConfig(flip=False, scale_crop=True, scale_prob=prob, brightness=0, contrast=0)
        zoomed = 0
        for s in range(60):
            u, _ = draw(tf.constant([4, s], tf.int64), cfg)
            zoomed += not np.array_equal(augment_sample(image, mask, (48, 48), u, cfg)[1].numpy(), mask.numpy())
        assert lo * 60 <= zoomed <= hi * 60, (prob, zoomed)


def test_patches_are_a_fraction_of_the_image_and_stay_aligned(shards):
    from unet_dist.data.augment import augment_sample, draw

    image, mask = _l_shape(48, 48)
    cfg = AugmentConfig(flip=True, scale_crop=True, brightness=0, contrast=0)
    for s in range(8):
        u, _ = draw(tf.constant([3, s], tf.int64), cfg)
        out_img, out_mask = augment_sample(image, mask, (24, 24), u, cfg, fraction=(0.5, 0.5))
        assert out_img.shape == (24, 24, 3)
        assert _agreement(out_img, out_mask) > 0.97
    over = ["data.image_size=[64, 64]", "data.patch_size=[32, 32]", "model.depth=2"]
    batch = next(iter(train_dataset(shards, load_config(None, over), 2, 2)))
    assert batch["image"].shape == (2, 32, 32, 3) and batch["mask"].shape == (2, 32, 32, 1)


def test_foreground_oversampling_aims_patches_at_each_class_present():
    # data.foreground_oversample: that share of patches holds a foreground pixel, of a class drawn
    # evenly among those present (nnU-Net's sampling); IGNORE is no foreground, and an image
    # without foreground gets a patch placed anywhere.
    from unet_dist.data.augment import augment_sample, draw
    from unet_dist.data.convert import IGNORE

    cfg = AugmentConfig(flip=True, scale_crop=True, brightness=0, contrast=0)
    mask = np.zeros((128, 128, 1), np.uint8)
    mask[100:104, 8:12] = 1  # 16 pixels of class 1
    mask[0:60, 60:128] = 2  # 4080 of class 2
    mask[120:, 120:] = IGNORE
    image = tf.zeros((128, 128, 3), tf.uint8)

    def holding(mask, share, n=120):  # how many of n patches hold class 1, class 2, IGNORE
        seen = np.zeros(3, int)
        for s in range(n):
            u, _ = draw(tf.constant([5, s], tf.int64), cfg)
            _, m = augment_sample(image, tf.constant(mask), (32, 32), u, cfg, fraction=(0.25, 0.25),
                                  foreground=share)
            seen += [(m.numpy() == v).any() for v in (1, 2, IGNORE)]
        return seen

    every = holding(mask, 1.0)
    assert every[0] + every[1] >= 120 and 40 <= every[0] <= 80, every  # each class about half the time
    none = holding(mask, 0.0)
    assert none[0] < 20 and none[1] < 100, none  # the small class by chance alone: about 7% of patches
    third = holding(mask, 0.33)
    assert none[0] < third[0] < every[0], (none, third, every)
    only_ignored = np.where(mask == IGNORE, IGNORE, 0).astype(np.uint8)
    assert holding(only_ignored, 1.0)[2] == holding(only_ignored, 0.0)[2]  # placed as without it


def _texture(h, w):
    """uint8 (h, w, 3): 3-px stripes, a 4-px checker diagonal and noise, all finer than a 3x downscale keeps."""
    yy, xx = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).integers(0, 255, (h, w))
    return np.dstack([(xx % 3 == 0) * 255, ((xx + yy) % 4 < 2) * 255, noise]).astype(np.uint8)


def test_downscaling_is_antialiased_as_pil_resizes_at_conversion():
    # Conversion resizes with PIL (antialiased); the pipeline used plain bilinear sampling, which
    # turns fine texture into other patterns when it downscales: training then saw other images.
    from PIL import Image

    from unet_dist.data.augment import resize_pair

    image = _texture(384, 300)
    pil = np.asarray(Image.fromarray(image).resize((100, 128), Image.BILINEAR)) / 255.0
    ours, mask = resize_pair(tf.constant(image), tf.zeros((384, 300, 1), tf.uint8), (128, 100))
    assert ours.shape == (128, 100, 3) and mask.shape == (128, 100, 1)
    assert np.abs(ours.numpy() - pil).max() < 0.01
    assert np.abs(tf.image.resize(image, (128, 100)).numpy() / 255.0 - pil).max() > 0.3  # plain sampling aliases
    # Upscaling keeps the plain bilinear kernel (antialiasing changes nothing there).
    small = image[:40, :30]
    up, _ = resize_pair(tf.constant(small), tf.zeros((40, 30, 1), tf.uint8), (128, 100))
    np.testing.assert_allclose(up.numpy(), tf.image.resize(small, (128, 100)).numpy() / 255.0, atol=1e-6)


def _cells(tmp_path, n=6, size=96, cells=25):
    """EM-like images: Voronoi cells of one class, 2-3 px background membranes between them."""
    from PIL import Image

    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        d = np.sort(np.stack([np.hypot(yy - y, xx - x) for y, x in rng.random((cells, 2)) * size]), 0)
        m = ((d[1] - d[0]) > 2.5).astype(np.uint8)
        Image.fromarray((m * 150 + rng.integers(0, 60, m.shape)).astype(np.uint8)).save(tmp_path / f"images/c{i}.png")
        Image.fromarray(m * 255).save(tmp_path / f"masks/c{i}.png")
    return tmp_path


def test_stored_border_distances_give_the_weights_computed_per_sample(tmp_path):
    # convert --border-distances: the pipeline takes the 2015 weight map from the records' distances
    # instead of computing it per sample. Under exact transforms (flips, 90-degree turns, no
    # resampling) the two agree to the distances' quarter-pixel steps.
    from unet_dist.data.border import stored_distances
    from unet_dist.data.convert import convert
    from unet_dist.data.pipeline import FEATURES

    src = _cells(tmp_path / "src")
    for name, border in (("plain", False), ("stored", True)):
        convert(src, tmp_path / name, layout="folders", shards=2, val_fraction=0.34, border_distances=border,
                progress=False)
    m = load_manifest(tmp_path / "stored")
    assert m["border_distances"] == {"steps_per_px": 4, "max_step": 255}
    assert load_manifest(tmp_path / "plain")["border_distances"] is None
    record = next(iter(tf.data.TFRecordDataset(str(tmp_path / "stored" / m["train"]["shards"][0]))))
    ex = tf.io.parse_single_example(record, {**FEATURES, "border": FEATURES["mask"]})
    mask = tf.io.decode_png(ex["mask"]).numpy()[..., 0]
    np.testing.assert_array_equal(tf.io.decode_png(ex["border"]).numpy()[..., 0], stored_distances(mask))
    val = next(iter(tf.data.TFRecordDataset(str(tmp_path / "stored" / m["val"]["shards"][0]))))
    assert "border" not in tf.train.Example.FromString(val.numpy()).features.feature  # evaluation has no weights

    cfg = load_config(None, ["train.loss=weighted_ce", "data.image_size=[96, 96]", "data.augment.rot90=true",
                             "data.augment.scale_crop=false", "runtime.deterministic=true", "model.depth=2"])
    batches = {name: list(train_dataset(tmp_path / name, cfg, 4, 4).take(3)) for name in ("plain", "stored")}
    for plain, stored in zip(batches["plain"], batches["stored"], strict=True):
        np.testing.assert_array_equal(plain["mask"].numpy(), stored["mask"].numpy())
        np.testing.assert_array_equal(plain["image"].numpy(), stored["image"].numpy())
        w, ws = plain["weight"].numpy(), stored["weight"].numpy()
        assert w.max() > 8  # membranes between touching cells carry the border term
        # A quarter-pixel step moves w0 * exp(-s^2 / (2 sigma^2)) by at most 10 * 0.121 * 0.125.
        assert np.abs(ws - w).max() < 0.16 and np.abs(ws - w).mean() < 0.02


@pytest.mark.parametrize("size, zoom, expected", [((64, 64), None, 10.0), ((32, 32), None, 5.0),
                                                  ((64, 64), 2.0, 20.0)])
def test_stored_border_distances_are_in_pixels_of_the_network_input(size, zoom, expected):
    # A record's distances are in its own pixels: resized or zoomed, they are scaled with it.
    from unet_dist.data.augment import augment_sample

    image, mask = _l_shape(64, 64)
    cfg = AugmentConfig(flip=True, scale_crop=zoom is not None, scale_prob=1.0, scale_min=zoom or 1.0,
                        scale_max=zoom or 1.25, brightness=0.2, contrast=0.2)
    steps = tf.fill([64, 64, 1], tf.constant(40, tf.uint8))  # 10 px in quarter-pixel steps
    u = tf.random.stateless_uniform([13], [1, 2])
    out_image, out_mask, distances = augment_sample(tf.cast(image * 255, tf.uint8), mask, size, u, cfg,
                                                    distances=steps)
    assert out_image.shape == (*size, 3) and distances.shape == (*size, 1)
    np.testing.assert_allclose(distances.numpy(), expected, rtol=1e-5)


def test_a_sigma_beyond_the_stored_distances_is_one_line(tmp_path):
    from unet_dist.config import ConfigError
    from unet_dist.data.convert import convert

    convert(_cells(tmp_path / "src", n=3), tmp_path / "d", layout="folders", shards=1, val_fraction=0.34,
            border_distances=True, progress=False)
    cfg = load_config(None, ["train.loss=weighted_ce", "data.image_size=[96, 96]", "train.weight_sigma=13"])
    with pytest.raises(ConfigError, match=r"^config key train.weight_sigma: 13 needs border distances up to 68 px"):
        train_dataset(tmp_path / "d", cfg, 1, 1)
    # records shrunk to half their size hold half the distances in input pixels: sigma 5 still fits, 7 does not
    ok = load_config(None, ["train.loss=weighted_ce", "data.image_size=[48, 48]", "data.augment.scale_crop=false"])
    train_dataset(tmp_path / "d", ok, 1, 1)
    with pytest.raises(ConfigError, match=r"at most 6.1"):
        train_dataset(tmp_path / "d", load_config(None, ["train.loss=weighted_ce", "data.image_size=[48, 48]",
                                                         "data.augment.scale_crop=false", "train.weight_sigma=7"]),
                      1, 1)
