import numpy as np
from conftest import run_main, tiny_overrides
from PIL import Image

from unet_dist.config import load_config

AUGMENT = ["data.augment.noise=0.1", "data.augment.noise_prob=0.5", "data.augment.blur=1",
           "data.augment.blur_prob=0.5", "data.augment.rotate_degrees=20"]


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_preview_shows_the_samples_training_takes_first(capsys, shards, tmp_path):
    from unet_dist.data.pipeline import Shard, train_dataset
    from unet_dist.logs import class_shades, shown_images

    # Deterministic: the stream's order is fixed, so these are the run's first samples (global batch 4:
    # two batches for 5 samples).
    overrides = tiny_overrides() + AUGMENT + ["runtime.deterministic=true"]
    proc = run_main(capsys, "unet_dist.preview", "--data", str(shards), "--out", str(tmp_path / "p"), "-n", "5",
                    *_sets(overrides), check=True)
    *_, said, wrote = proc.stdout.strip().splitlines()
    assert said == ("preview: data.augment: flips, zoom 0.8-1.25 on 20%, rotation +-20 degrees, brightness 0.1, "
                    "contrast 0.1, noise std 0-0.1 on 50%, blur sigma 0.5-1 px on 50%")
    assert wrote.startswith("preview: wrote 5 training samples (64x64")
    cfg = load_config(None, overrides)
    stream = iter(train_dataset(shards, cfg, 4, 4, Shard(0, 1)))
    batches = [next(stream), next(stream)]
    images = np.concatenate([b["image"].numpy() for b in batches])[:5]
    masks = np.concatenate([b["mask"].numpy()[..., 0] for b in batches])[:5]
    for i in range(5):
        shown = np.asarray(Image.open(tmp_path / "p" / f"sample_{i:03d}.png"))
        assert shown.shape == (64, 3 * 64, 3)
        np.testing.assert_array_equal(shown[:, :64], shown_images(images[i : i + 1], (64, 64))[0])
        np.testing.assert_array_equal(shown[:, 64:128], class_shades(masks[i], 2))
    assert np.asarray(Image.open(tmp_path / "p" / "samples.png")).shape == (5 * 64, 3 * 64, 3)


def test_preview_adds_the_border_weight_map_for_weighted_ce(capsys, shards, tmp_path):
    proc = run_main(capsys, "unet_dist.preview", "--data", str(shards), "--out", str(tmp_path / "p"), "-n", "2",
                    *_sets(tiny_overrides() + ["train.loss=weighted_ce"]), check=True)
    assert "wrote 2 training samples" in proc.stdout
    weights = np.asarray(Image.open(tmp_path / "p" / "sample_000.png"))[:, 3 * 64 :]
    assert weights.shape == (64, 64, 3) and weights.max() == 255 and weights.min() < 128


def test_preview_refuses_in_one_line(capsys, shards, tmp_path):
    (tmp_path / "file").write_text("x")
    for args, code, words in (
        (["--out", str(tmp_path / "p"), "--set", "model.num_classes=3", "--set", "train.loss=cce"], 1, "model.num_classes is 3"),
        (["--out", str(tmp_path / "file")], 2, "is a file, not a folder"),
        (["--out", str(tmp_path / "p"), "--set", "data.augment.blur=-1"], 2, "data.augment.blur"),
    ):
        proc = run_main(capsys, "unet_dist.preview", "--data", str(shards), *args, *_sets(tiny_overrides()))
        assert proc.returncode == code and words in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
