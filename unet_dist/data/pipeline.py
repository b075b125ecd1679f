"""The tf.data input pipeline: TFRecord shards -> per-worker batches of (image, mask[, weight]).

Sharding: training shards are split by file across input pipelines (workers). With fewer training
shards than workers we fall back to per-record sharding (each worker reads every file and keeps
every n-th record) and warn: correct, but each worker then reads all the data.
Evaluation always shards per record in file order, so every val record is seen exactly once across
all workers, whatever the number of shards.

Equal steps by construction: the training stream repeats forever and the trainer takes a fixed
number of batches, so no worker runs out of data before another.

Resume: element i of the (seeded, repeated) record stream is augmented with the stateless seed
(seed, i), whatever batch it lands in, and a run resumed at step s skips the records of the first s
steps before decoding, so the data order continues exactly where it stopped in deterministic mode.
"""

from __future__ import annotations

import heapq
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from unet_dist.config import MAX_CHANNELS, Config, ConfigError
from unet_dist.data.augment import augment_batch, augment_sample, draw, nearest, needs_batch_stage, resize_pair
from unet_dist.data.border import MAX_STEP, STEPS_PER_PX, batch_distance_sums, max_sigma, reach
from unet_dist.data.convert import RECORD_FORMATS
from unet_dist.errors import tf_reason
from unet_dist.shapes import output_size

log = logging.getLogger(__name__)
# Every function this package traces (dataset maps, steps) branches and loops on Python values only
# (config, static shapes; inference's tile loop is an explicit tf.while_loop), never on tensors,
# so AutoGraph's source rewrite of each one buys nothing and costs start-up time on every process
# (about 1 s of a 4-step run's 9 s, measured); Keras 3 skips it for its own train step too.
# tf.function(..., autograph=False) says the same for the step functions.
plain = tf.autograph.experimental.do_not_convert
AUTOTUNE = tf.data.AUTOTUNE
FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "mask": tf.io.FixedLenFeature([], tf.string),
    "height": tf.io.FixedLenFeature([], tf.int64),
    "width": tf.io.FixedLenFeature([], tf.int64),
    "stem": tf.io.FixedLenFeature([], tf.string),
}


class DataError(ValueError):
    """The data folder or its manifest cannot be used; the message names the file."""


@dataclass(frozen=True)
class Shard:
    """Which input pipeline this is: `index` of `count` (Horovod rank/size or InputContext)."""

    index: int = 0
    count: int = 1

    def balanced(self, costs: list[float]) -> list[int]:
        """This shard's indices (ascending) of items costing `costs` (any unit, e.g. tiles to predict),
        split so that every shard's total is about the same: costliest first, each to the shard with
        the least so far (ties: the lower shard). That is the longest-processing-time rule: no shard's
        total exceeds another's by more than the costliest item. Every process computes the same
        split from the same costs, with no communication."""
        loads = [(0.0, j) for j in range(self.count)]  # a heap: (total so far, shard)
        mine = []
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            load, j = heapq.heappop(loads)
            heapq.heappush(loads, (load + costs[i], j))
            if j == self.index:
                mine.append(i)
        return sorted(mine)


def load_manifest(data_dir: str | Path) -> dict:
    """Reads DATA/manifest.json and checks that every shard it names exists and is non-empty."""
    data_dir = Path(data_dir)
    path = data_dir / "manifest.json"
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise DataError(f"data folder {data_dir} {what}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (data_dir / "images").is_dir():  # the images and masks themselves, given where their records belong
            raise DataError(f"{path} not found: {data_dir} holds images/, so it looks like the images and masks "
                            f"themselves; convert them first (python -m unet_dist.convert {data_dir} DATA) and "
                            "give DATA") from None
        raise DataError(f"{path} not found: convert the data first (python -m unet_dist.convert SRC {data_dir})") from None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        raise DataError(f"{path}: unreadable manifest ({e})") from None
    _check_manifest(manifest, path)
    for split in ("train", "val"):
        names = manifest[split]["shards"]
        sizes = manifest[split].get("bytes") or [None] * len(names)
        counts = manifest[split].get("records_per_shard") or [manifest[split]["records"]] * len(names)
        for name, size, count in zip(names, sizes, counts, strict=True):
            f = data_dir / name
            if not f.is_file():
                raise DataError(f"{path} names shard {f}, which does not exist")
            if f.stat().st_size == 0 and count:
                raise DataError(f"shard {f} is empty but {path} says it holds records")
            if size is not None and f.stat().st_size != size:
                raise DataError(f"shard {f} is {f.stat().st_size} bytes but {path} says {size}: truncated or "
                                f"replaced; convert again")
    if not manifest["train"]["shards"]:
        raise DataError(f"{path}: no training shards")
    return manifest


def _check_manifest(manifest, path: Path) -> None:
    """The structure `convert` writes, or a DataError naming the first key that differs (a manifest
    edited by hand, or written by something else)."""

    def bad(key: str, want: str, got) -> DataError:
        return DataError(f"{path}: {key} must be {want}, got {json.dumps(got)[:80]}; convert again")

    if not isinstance(manifest, dict):
        raise bad("the top level", "an object", manifest)
    for key in ("num_classes", "train", "val"):
        if key not in manifest:
            raise DataError(f"{path}: missing key {key!r}")
    k = manifest["num_classes"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise bad("num_classes", "an integer >= 2", k)
    if image_format(manifest) not in RECORD_FORMATS:
        raise bad("image_format", '"png" or "jpeg"', manifest["image_format"])
    c = image_channels(manifest)
    if not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= MAX_CHANNELS:
        raise bad("channels", f"an integer in [1, {MAX_CHANNELS}]", c)
    for split in ("train", "val"):
        part = manifest[split]
        if not isinstance(part, dict):
            raise bad(split, 'an object with "shards" and "records"', part)
        shards, records = part.get("shards"), part.get("records")
        if not isinstance(shards, list) or not all(isinstance(n, str) for n in shards):
            raise bad(f"{split}.shards", "a list of file names", shards)
        if not isinstance(records, int) or records < 0:
            raise bad(f"{split}.records", "an integer >= 0", records)
        for key in ("bytes", "records_per_shard"):  # optional (older manifests): one count per shard
            v = part.get(key)
            if v is not None and (not isinstance(v, list) or len(v) != len(shards)
                                  or not all(isinstance(n, int) and n >= 0 for n in v)):
                raise bad(f"{split}.{key}", f"a list of {len(shards)} counts (one per shard)", v)


def corrupt_shards(files: list[str]) -> list[tuple[str, int, str]]:
    """Reads every record of `files`; returns (file, records read before the error, error) for bad ones."""
    bad = []
    for f in files:
        n = 0
        try:
            for _ in tf.data.TFRecordDataset(f):
                n += 1
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.InvalidArgumentError) as e:
            bad.append((f, n, tf_reason(e)))
    return bad


def lost_records(data_dir: Path, manifest: dict, split: str = "train") -> tuple[int, list[str]]:
    """(records that cannot be read, one line per corrupt shard) for `split`, by reading every shard."""
    names = manifest[split]["shards"]
    counts = manifest[split].get("records_per_shard") or [None] * len(names)
    expected = {str(Path(data_dir) / n): c for n, c in zip(names, counts, strict=True)}
    lost, lines = 0, []
    for f, n, err in corrupt_shards(list(expected)):
        missing = (expected[f] - n) if expected[f] is not None else 1
        lost += missing
        lines.append(f"{f}: corrupt after {n} records, {missing} lost ({err})")
    return lost, lines


def unreadable_record(data_dir: Path, manifest: dict, split: str, error: tf.errors.OpError) -> str:
    """What a read of `split` failed on, for a one-line message: the first corrupt shard (found by
    reading every shard of the split), else the record that does not decode and TF's reason."""
    _, lines = lost_records(data_dir, manifest, split)
    return lines[0] if lines else f"a record that does not decode ({tf_reason(error)})"


def record_stems(data_dir: Path, manifest: dict, split: str) -> list[str]:
    """The stems (convert's `Sample.name`) of `split`'s records, in the order eval_dataset reads
    them (its shards' order): a record's name by its index."""
    files = [str(Path(data_dir) / f) for f in manifest[split]["shards"]]
    stem = {"stem": FEATURES["stem"]}
    ds = tf.data.TFRecordDataset(files).map(lambda s: tf.io.parse_single_example(s, stem)["stem"])
    return [s.decode() for s in ds.as_numpy_iterator()]


def image_format(manifest: dict) -> str:
    """How the data set's records store their images: "png" or "jpeg" (manifests from before
    convert --image-format: jpeg, the one format there was)."""
    return manifest.get("image_format", "jpeg")


def image_channels(manifest: dict) -> int:
    """The channels of the data set's images (convert --channels; manifests from before it: 3)."""
    return manifest.get("channels", 3)


def resize_census(data_dir: Path, manifest: dict, size: tuple[int, int], records: int = 8) -> tuple[np.ndarray, int]:
    """(`convert.object_census` summed over the first `records` training records: (2, MAX_CLASSES)
    each class's objects in the masks as stored and resized to `size` (H, W) as the pipeline
    resizes them (`augment.nearest`), the number of records counted): whether data.image_size
    merges the objects that conversion kept apart."""
    from unet_dist.data.convert import MAX_CLASSES, object_census

    total, n = np.zeros((2, MAX_CLASSES), np.int64), 0
    files = [str(data_dir / f) for f in manifest["train"]["shards"]]
    for serialized in tf.data.TFRecordDataset(files).take(records):
        _, mask = parse_record(serialized, manifest.get("image_format", "jpeg"), channels=image_channels(manifest))
        counted = object_census(mask.numpy()[..., 0], nearest(mask, size).numpy()[..., 0])
        if counted is not None:
            total, n = total + counted, n + 1
    return total, n


def parse_record(serialized: tf.Tensor, fmt: str, border: bool = False, channels: int = 3) -> tuple[tf.Tensor, ...]:
    """One serialized example -> image (H, W, channels) uint8, mask (H, W, 1) uint8. fmt: the
    manifest's `image_format`, "png" or "jpeg" (a one-channel image comes out as three equal
    channels where channels is 3); channels: the manifest's (`image_channels`).
    border: also the record's border distances (H, W, 1) uint8 (`convert --border-distances`).

    Images stay uint8 until the first resampling (which outputs float32), saving a full-size pass.
    """
    ex = tf.io.parse_single_example(serialized, {**FEATURES, **({"border": FEATURES["mask"]} if border else {})})
    if channels not in (1, 3):  # a grayscale PNG of (H, W * C), each pixel's channels side by side (convert._encode)
        image = tf.reshape(tf.io.decode_png(ex["image"], channels=1), [ex["height"], ex["width"], channels])
    elif fmt == "png":
        image = tf.io.decode_png(ex["image"], channels=channels)
    else:
        # INTEGER_FAST: a faster inverse DCT; its differences are far below the augmentation's noise.
        image = tf.io.decode_jpeg(ex["image"], channels=channels, dct_method="INTEGER_FAST")
    mask = tf.io.decode_png(ex["mask"], channels=1)
    if border:
        return image, mask, tf.io.decode_png(ex["border"], channels=1)
    return image, mask


def train_size(cfg: Config) -> tuple[int, int]:
    """(H, W) of a training input: data.patch_size when set, else data.image_size."""
    return tuple(cfg.data.patch_size or cfg.data.image_size)


def label_size(cfg: Config, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(h, w) of the model output for inputs of `size` (default data.image_size), to which labels
    are centre-cropped (smaller with valid padding)."""
    return output_size(tuple(size or cfg.data.image_size), cfg.model.depth, cfg.model.padding)


def _crop_labels(mask: tf.Tensor, cfg: Config, size: tuple[int, int]) -> tf.Tensor:
    """(..., H, W, 1) -> (..., h, w, 1) centred, for valid padding; unchanged for same padding."""
    h, w = label_size(cfg, size)
    H, W = size
    if (h, w) == (H, W):
        return mask
    top, left = (H - h) // 2, (W - w) // 2
    return mask[..., top : top + h, left : left + w, :]


def stored_border_distances(manifest: dict, cfg: Config, data_dir: Path) -> bool:
    """Whether the training records hold border distances (`convert --border-distances`) that
    serve train.weight_sigma; ConfigError where the sigma needs farther ones than they hold."""
    meta = manifest.get("border_distances")
    if not meta:
        return False
    if (meta["steps_per_px"], meta["max_step"]) != (STEPS_PER_PX, MAX_STEP):
        raise DataError(f"{data_dir}/manifest.json: border_distances {meta} are not the units this version "
                        f"reads ({STEPS_PER_PX} steps a pixel up to {MAX_STEP}); convert again")
    # The records' pixels per input pixel at the smallest zoom: a record shrunk to the input size,
    # or zoomed out, holds shorter distances in input pixels.
    records = manifest.get("record_size") or {}
    scale = min((n / r for n, r in zip(cfg.data.image_size, records.get("max") or [], strict=False)), default=1.0)
    if cfg.data.augment.scale_crop:
        scale *= min(cfg.data.augment.scale_min, 1.0)
    if cfg.train.weight_sigma > max_sigma(scale):
        raise ConfigError(f"config key train.weight_sigma: {cfg.train.weight_sigma:g} needs border distances up to "
                          f"{reach(cfg.train.weight_sigma):.0f} px, and the records in {data_dir} hold them up to "
                          f"{MAX_STEP / STEPS_PER_PX * scale:.0f} px at the training scale; at most "
                          f"{max_sigma(scale):.1f}; or convert at the training size, or without --border-distances")
    return True


def border_weights(masks: tf.Tensor, distances: tf.Tensor, class_w: np.ndarray, w0: float,
                   sigma: float) -> tf.Tensor:
    """The 2015 U-Net's pixel weights (Ronneberger et al., eq. 2): w_c(x) + w0 * exp(-(d1 + d2)^2 / (2 sigma^2))
    on background, w_c(x) elsewhere.

    masks: (B, H, W, 1) uint8 class ids (0 = background); distances: (B, H, W, 1) float32 d1 + d2 in
    pixels, the distances to the nearest and second nearest object (`border.distance_sum`; inf where
    there are not two); class_w: (num_classes,) balancing w_c. Returns (B, H, W, 1) float32.
    """
    ids = tf.minimum(tf.cast(masks, tf.int32), len(class_w) - 1)
    border = w0 * tf.exp(-tf.square(distances) / (2 * sigma**2))
    return tf.gather(tf.constant(class_w, tf.float32), ids) + tf.where(masks == 0, border, 0.0)


def class_balance_weights(manifest: dict, power: float = 1.0) -> np.ndarray:
    """(K,) float32 w_c = f_c ** -power, f_c the share of class c among the training masks' labelled
    pixels (the manifest's class_pixel_fraction), scaled so that the mean pixel weight over the
    training masks is 1. power 1 is inverse frequency (the 2015 U-Net's w_c, scikit-learn's
    'balanced'), 0.5 its square root. A class with no training pixel gets 1 (no pixel uses it);
    a manifest without fractions gives all ones."""
    frac = np.asarray(manifest.get("class_pixel_fraction") or [], np.float64)
    k = manifest["num_classes"]
    if frac.size != k:
        return np.ones(k, np.float32)
    seen = frac > 0
    weights = np.ones(k)
    weights[seen] = frac[seen] ** -power
    weights[seen] /= (frac[seen] * weights[seen]).sum()
    return weights.astype(np.float32)


def _options(deterministic: bool) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = deterministic
    # Horovod/multi-worker: we shard explicitly, so tf.distribute must not shard again.
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    # tf.data's autotuning runs a model thread per iterator that sleeps between optimisations for
    # a period doubling from 10 ms to 60 s, and an iterator's teardown waits for it. That wait was
    # often not cut short: after a 100-step demo run on 2 processes (horovodrun --gloo and --mpi,
    # MultiWorkerMirroredStrategy) every process printed its last line, then sat in the training
    # iterator's teardown until the thread's next wake-up, 31-43 s (up to a minute in general).
    # Without it the AUTOTUNE values keep tf.data's defaults (parallelism from the process's cores;
    # prefetch buffers grown by the prefetch autotuner, which needs no thread): the pipeline
    # measured no slower (docs/benchmarks.md).
    opts.autotune.enabled = False
    return opts


def train_dataset(data_dir: str | Path, cfg: Config, local_batch: int, global_batch: int,
                  shard: Shard = Shard(), start_step: int = 0, manifest: dict | None = None) -> tf.data.Dataset:
    """Infinite training batches for one input pipeline.

    Args:
      local_batch: the batch this dataset yields (per replica).
      global_batch: samples per training step over all pipelines; with `shard.count` pipelines each
        pipeline supplies global_batch / shard.count samples a step (one or more local batches).
      shard: this pipeline's index and the number of pipelines.
      start_step: the step to resume at; the stream continues where that step left it.

    In deterministic mode every pipeline reads the one seeded record stream and keeps its slice of
    each global batch (filtered before decoding), so step s sees the same samples, augmented the
    same way, on 1 or N workers: runs are reproducible and resumable across world sizes. Otherwise
    shards are split by file and each pipeline shuffles its own stream (no rank reads all data).

    Yields dicts: image (B, H, W, C) float32 in [0, 1] with (H, W) = `train_size(cfg)`, C the manifest's; mask
    (B, h, w, 1) uint8 with (h, w) the model's output size; and weight (B, h, w, 1) float32 when
    train.loss is weighted_ce. B = local_batch (drop_remainder, so every step is full).
    """
    data_dir = Path(data_dir)
    manifest = manifest or load_manifest(data_dir)
    det = cfg.runtime.deterministic
    seed = cfg.runtime.seed
    if global_batch % shard.count:
        raise ValueError(f"global batch {global_batch} is not divisible by {shard.count} input pipelines")
    per_pipeline = global_batch // shard.count
    counts = manifest["train"].get("records_per_shard") or [1] * len(manifest["train"]["shards"])
    # Empty shards (written by earlier versions of convert) hold nothing to share out.
    files = [str(data_dir / f) for f, n in zip(manifest["train"]["shards"], counts, strict=True) if n]
    per_record = not det and len(files) < shard.count
    if per_record and manifest["train"]["records"] < shard.count:
        raise DataError(f"{data_dir}: {manifest['train']['records']} training records for {shard.count} input "
                        "pipelines (workers): each needs at least one; train on fewer workers or convert more data")
    if per_record:
        log.warning("only %d training shards for %d workers: sharding per record (every worker reads every "
                    "shard); convert with --shards >= %d for file sharding", len(files), shard.count, shard.count)
    elif not det:
        files = files[shard.index :: shard.count]
    ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed)
    read = tf.data.TFRecordDataset
    if cfg.data.skip_corrupt_records:
        # Opt-in: a corrupt record ends its shard's stream instead of the run (reported by the trainer).
        def read(f):
            return tf.data.TFRecordDataset(f).ignore_errors(log_warning=True)
    ds = ds.interleave(read, cycle_length=min(cfg.data.cycle_length, len(files)),
                       num_parallel_calls=AUTOTUNE, deterministic=det or per_record)
    if per_record:
        ds = ds.shard(shard.count, shard.index)
    # A buffer as large as the stream already shuffles it whole (the same order for any larger one);
    # tf.data reserves what it is given, and a huge value crashed the process.
    buffer = max(1, min(cfg.data.shuffle_buffer, manifest["train"]["records"]))
    ds = ds.shuffle(buffer, seed=seed + 1).repeat()
    ds = ds.enumerate()  # (global index in this stream, record)
    if det:
        ds = ds.skip(start_step * global_batch)  # raw records only: cheap, no decoding
        ds = ds.filter(plain(lambda j, _: (j % global_batch) // per_pipeline == shard.index))
    elif start_step:
        ds = ds.skip(start_step * per_pipeline)
    size = train_size(cfg)
    # A patch covers this fraction of the image (at the image_size scale) in each dimension.
    fraction = tuple(p / s for p, s in zip(size, cfg.data.image_size, strict=True))
    weighted = cfg.train.loss == "weighted_ce"
    class_w = class_balance_weights(manifest)
    stored = weighted and stored_border_distances(manifest, cfg, data_dir)
    fmt, channels = image_format(manifest), image_channels(manifest)
    # Independent streams (non-deterministic mode) must not share augmentation seeds.
    base_seed = seed + ((0 if det else shard.index) << 20)

    def decode(index, serialized):
        # Every random number of this sample, drawn once from its own seed and carried to the batch.
        u, normals = draw(tf.stack([tf.constant(base_seed, tf.int64), index]), cfg.data.augment)
        image, mask, *distances = parse_record(serialized, fmt, stored, channels)
        out = augment_sample(image, mask, size, u, cfg.data.augment, fraction, cfg.data.foreground_oversample,
                             *distances)
        return dict(zip(("image", "mask", "distances")[: len(out)], out, strict=True), u=u, normals=normals)

    def augment(batch):
        images, masks, distances = batch["image"], batch["mask"], [batch["distances"]] if stored else []
        if needs_batch_stage(cfg.data.augment):
            images, masks, *distances = augment_batch(images, masks, batch["u"], batch["normals"], cfg.data.augment,
                                                      *distances)
        out = {"image": images, "mask": _crop_labels(masks, cfg, size)}
        if weighted:
            if not stored:  # d1 + d2 of the augmented masks, per sample (scipy, mostly under the GIL)
                d = tf.numpy_function(lambda ms: batch_distance_sums(ms, cfg.train.weight_sigma), [masks],
                                      tf.float32, stateful=False)
                distances = [tf.ensure_shape(d, [local_batch, *size, 1])]
            # The distances need the whole input's objects; the weights only the labels' pixels (with
            # valid padding, 388x388 of a 572x572 input).
            out["weight"] = border_weights(out["mask"], _crop_labels(distances[0], cfg, size), class_w,
                                           cfg.train.weight_w0, cfg.train.weight_sigma)
        return out

    ds = ds.map(plain(decode), num_parallel_calls=AUTOTUNE, deterministic=det)
    if cfg.data.skip_corrupt_records:
        ds = ds.ignore_errors(log_warning=True)  # opt-in: each lost record is logged
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds.map(plain(augment), num_parallel_calls=AUTOTUNE, deterministic=det).prefetch(AUTOTUNE)
    return ds.with_options(_options(det))


def eval_dataset(data_dir: str | Path, cfg: Config, local_batch: int, shard: Shard = Shard(),
                 manifest: dict | None = None, split: str = "val") -> tf.data.Dataset:
    """One pass over `split` for one worker: every record exactly once across all workers.

    Yields dicts: image (B, H, W, C) float32, mask (B, h, w, 1) uint8, resized to data.image_size
    (no augmentation); the last batch may be smaller.
    """
    data_dir = Path(data_dir)
    manifest = manifest or load_manifest(data_dir)
    files = [str(data_dir / f) for f in manifest[split]["shards"]]
    if not files:
        raise DataError(f"{data_dir}/manifest.json: no {split} shards (convert with --val-fraction > 0)")
    size = tuple(cfg.data.image_size)

    fmt, channels = image_format(manifest), image_channels(manifest)

    def prepare(serialized):
        image, mask = parse_record(serialized, fmt, channels=channels)
        image, mask = resize_pair(image, mask, size)
        return {"image": image, "mask": _crop_labels(mask, cfg, size)}

    ds = tf.data.TFRecordDataset(files).shard(shard.count, shard.index)
    ds = ds.map(plain(prepare), num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.batch(local_batch).prefetch(AUTOTUNE).with_options(_options(True))
