"""Configuration: dataclasses grouped by concern, loaded from YAML plus `--set` overrides.

Every entry point calls `add_config_args(parser)` and then `load_config(args.config, args.set)`.
Loading order: dataclass defaults -> the YAML file -> each `--set section.key=value` in turn.
Nothing is built before validation: an unknown key, a wrong type or an impossible value raises
`ConfigError` with one line naming the key and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from unet_dist.shapes import check_input_size

# The most channels an image may have (model.in_channels, convert --channels): far above any stain
# or band count we know of, and a bound on what one record holds.
MAX_CHANNELS = 64


def blur_radius(sigma: float) -> int:
    """Pixels each side of the centre of data.augment's Gaussian blur kernel (3 sigma)."""
    return math.ceil(3 * sigma)


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


@dataclass
class AugmentConfig:
    """Training-time augmentation; every transform moves image and mask together."""

    flip: bool = True  # horizontal and vertical flips
    rot90: bool = False  # random multiples of 90 degrees (square inputs only)
    scale_crop: bool = True  # random zoom in [scale_min, scale_max] then a crop back to image_size
    scale_prob: float = 0.2  # share of the samples zoomed, the others kept at scale 1 (as nnU-Net)
    scale_min: float = 0.8  # below 1 zooms out, the image mirrored past its edges; at least 0.5
    scale_max: float = 1.25
    rotate_degrees: float = 0.0  # small rotations, uniform in [-d, d]; 0 disables
    elastic: bool = False  # Ronneberger et al. 2015: random displacements on a coarse grid
    elastic_grid: int = 3  # coarse grid size (the paper used 3x3)
    elastic_sigma: float = 10.0  # displacement std in pixels (the paper: 10)
    brightness: float = 0.1  # max delta on [0, 1] images; 0 disables
    contrast: float = 0.1  # factor in [1 - c, 1 + c]; 0 disables
    hue: float = 0.0  # max hue delta in [0, 0.5]; 0 disables
    # Intensity transforms for images whose quality varies (microscopy, CT, MRI), as nnU-Net's
    # training applies them, each to a share of the samples: Gaussian noise, Gaussian blur, gamma,
    # and a coarser resolution.
    noise: float = 0.0  # max std of Gaussian noise on [0, 1] images, each noisy sample's drawn in [0, noise]; 0 disables
    noise_prob: float = 0.1  # share of the samples given noise (nnU-Net: 0.1)
    blur: float = 0.0  # max Gaussian blur sigma in pixels, drawn in [blur / 2, blur] (nnU-Net: 0.5-1); 0 disables
    blur_prob: float = 0.2  # share of the samples blurred (nnU-Net: 0.2)
    gamma: float = 0.0  # x ** g, g drawn log-evenly in [1 / (1 + gamma), 1 + gamma] (nnU-Net ~0.7-1.5: 0.5); 0 disables
    gamma_prob: float = 0.3  # share of the samples given a gamma (nnU-Net: 0.3)
    gamma_inverted_prob: float = 0.0  # share given first a gamma of the inverted image, 1 - (1 - x) ** g, its own g in the same range (nnU-Net: 0.1); 0 disables
    gamma_retain_stats: bool = False  # each gamma keeps every channel's mean and std of the sample, then clips to [0, 1] (nnU-Net: true)
    lowres: float = 0.0  # down by a factor drawn in [1 - lowres, 1] (nearest), back up (bicubic) (nnU-Net: 0.5); 0 disables
    lowres_prob: float = 0.25  # share of the samples made coarse (nnU-Net: 0.25)


@dataclass
class DataConfig:
    """Input pipeline. Say which batch you mean: exactly one of the two batch sizes is set."""

    global_batch_size: int | None = 16
    per_replica_batch_size: int | None = None
    image_size: list[int] = field(default_factory=lambda: [256, 256])  # network input [H, W]
    # Train on random [h, w] patches of the image at the image_size scale (as the 2015 U-Net and
    # nnU-Net train on tiles): fewer pixels per step; evaluation and prediction see whole images.
    patch_size: list[int] | None = None  # null = train on whole image_size inputs
    # Small objects on large images fall into few patches placed at random. nnU-Net places a third of
    # its patches on foreground (oversample_foreground_percent 0.33), of a class drawn evenly among
    # those the image has, then a pixel of it (data.augment._foreground_pixel).
    foreground_oversample: float = 0.33  # with patch_size: share of patches placed to hold a foreground pixel
    shuffle_buffer: int = 512
    cycle_length: int = 4  # shards read in parallel per worker
    skip_corrupt_records: bool = False  # opt-in: drop unreadable records instead of failing
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """U-Net architecture; see `unet_dist.model.build_unet` for the shape constraints."""

    depth: int = 4  # number of 2x down-samplings
    base_filters: int = 32  # filters at the first level, doubled at each level down
    padding: Literal["same", "valid"] = "same"
    norm: Literal["batch", "instance", "none"] = "batch"  # after each 3x3 conv; instance: per image (nnU-Net), for batch 1-2
    bn_momentum: float = 0.9  # moving-statistics momentum (Keras default 0.99 lags on short runs)
    # Batch statistics over the global batch (every replica's images) instead of each replica's own:
    # the same model for the same global batch on any number of replicas, at the price of one small
    # collective per batch-norm layer, forward and backward (a sync point each; off by default).
    sync_batch_norm: bool = False
    dropout: float = 0.0  # dropout rate before the bottleneck convolutions
    upsample: Literal["transpose", "bilinear"] = "transpose"
    up_filters: list[int] | None = None  # widths of the up-convolutions, deepest first (default: level widths)
    num_classes: int = 2  # 2 = one sigmoid output; N > 2 = softmax over N
    in_channels: int = 3  # the images' channels, as the data has them (convert --channels)
    deep_supervision: bool = False  # nnU-Net: training's loss also at decoder levels 1..depth-2 (same padding, depth >= 3)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule; learning_rate is for reference_batch_size."""

    name: Literal["sgd", "rmsprop", "adam", "adamw"] = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = False
    weight_decay: float = 0.0  # adamw
    clipnorm: float | None = None
    schedule: Literal["constant", "cosine", "polynomial", "step"] = "constant"
    warmup_steps: int = 0
    end_learning_rate_factor: float = 0.0  # cosine and polynomial: final lr = factor * peak lr
    power: float = 1.0  # polynomial
    step_boundaries: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training
    step_factor: float = 0.1  # lr multiplier at each step boundary
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # Goyal et al. 2017
    reference_batch_size: int = 16


@dataclass
class RuntimeConfig:
    """Where and how the step runs."""

    strategy: Literal["auto", "single", "mirrored", "multiworker", "horovod"] = "auto"
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"  # auto: mixed_float16 on tensor-core GPUs, mixed_bfloat16 on CPUs with native bfloat16, else float32
    xla: bool | Literal["auto"] = "auto"  # auto: on where the step computes on a GPU (1.6-2.2x on an H200), off on CPUs (0.2-0.4x there)
    deterministic: bool = False
    seed: int = 0
    cluster: Literal["none", "slurm"] = "none"
    intra_op_threads: int = 0  # 0 = this process's share of the node's cores
    inter_op_threads: int = 0
    pin_cpus: bool = True  # N processes on a node: each runs on its own 1/N of the CPUs it was given
    allreduce_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # gradients on the wire; auto: the precision's compute dtype (Horovod: float32 under bfloat16)
    allreduce_pack_mb: float = 2.0  # tf.distribute: gradient all-reduce in packs this large (0 = one)
    collective: Literal["auto", "ring", "nccl"] = "auto"  # multiworker's all-reduce; auto: nccl where the workers compute on GPUs, else ring (gRPC)
    horovod_cycle_time_ms: float | None = None  # Horovod's HOROVOD_CYCLE_TIME; null = its default. CPU: 5 (docs/benchmarks.md)
    stall_check_seconds: int = 60  # Horovod: warn when a rank has not joined a collective for this long
    stall_shutdown_seconds: int = 300  # N processes: one that finished no step for this long exits, ending the job; also how long predict and evaluate wait for the others' shares (0 = never)
    stall_shutdown_start_seconds: int = 1800  # the same for the backend's start (every process joining), then from there until the first step has finished (restoring, tracing, compiling; 0 = never)
    cpu_devices: int = 0  # mirrored without GPUs: split the CPU into N logical devices (tests, CPU nodes)


# runtime.strategy's values, for the check of a config and the --strategy flags.
STRATEGIES: tuple[str, ...] = typing.get_args(typing.get_type_hints(RuntimeConfig)["strategy"])


@dataclass
class TrainConfig:
    """Loop, loss, evaluation and checkpoints."""

    steps: int = 1000
    loss: Literal["bce", "cce", "dice", "ce_dice", "focal", "weighted_ce"] = "bce"
    focal_gamma: float = 2.0
    class_weights: Literal["none", "balanced", "sqrt"] | list[float] = "none"  # each class's pixels' weight in the cross-entropy (bce, cce, focal, ce_dice's): balanced 1/frequency, sqrt 1/sqrt(frequency), from the training masks, the mean pixel weight kept 1; or one weight a class
    weight_w0: float = 10.0  # 2015 border weight
    weight_sigma: float = 5.0
    log_every_steps: int = 20  # a train event (metrics.jsonl, TensorBoard, log line): mean loss and speed since the last
    eval_every_steps: int = 200
    checkpoint_every_steps: int = 200
    keep_checkpoints: int = 3
    image_panels: int = 4  # images in the TensorBoard panel at each evaluation
    object_metrics: bool = False  # evaluations also match the val masks' objects (connected components): val_object_f1, val_seg (and the outlines' val_hd95, val_assd, val_nsd); for touching objects (cells)
    object_postprocess: str = "none"  # with object_metrics: the objects scored are those predict --postprocess with this value gives (min-size:N, largest, grow:N, joined by +); pixel metrics stay as predicted
    monitor: Literal["val_iou", "val_fg_iou", "val_dice", "val_object_f1", "val_seg"] = "val_iou"  # the evaluation metric (higher is better) that picks the best checkpoint and that early_stop_patience counts
    target_val_iou: float | None = None  # stop once an evaluation reaches this val IoU (time-to-accuracy)
    early_stop_patience: int = 0  # stop after this many evaluations in a row without a new best train.monitor (0: off; counted across resumes)
    early_stop_min_delta: float = 0.0  # for the patience, a new best must beat the last one it counted from by more than this (Keras' min_delta)
    max_skipped_steps: int = 50  # mixed_float16: consecutive skipped (non-finite) steps before stopping
    gradient_accumulation_steps: int = 1  # each replica's batch in this many micro-batches, one after the other, gradients summed: the same step in less memory
    init_from: str | None = None  # a workdir whose best (else latest) model weights start this run (fine-tuning; a run that resumes ignores it); only model.num_classes (the output layer then starts new), model.deep_supervision (its heads) and model.in_channels (the input convolution's kernel is adapted) may differ


# train.monitor's metrics of objects, which train.object_metrics computes (`objects.pooled`).
OBJECT_MONITORS = ("val_object_f1", "val_seg")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against the annotation `tp`; returns it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                continue
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key {key}: got {value!r}; allowed: {_type_name(tp)}")


# Keys of earlier versions, and what says the same now.
_RENAMED = {"runtime.fp16_allreduce": "runtime.allreduce_dtype (float16 for true, float32 for false)"}


def upgrade_model_keys(mapping: dict, prefix: str = "model.") -> dict:
    """A model section (a config's, or a checkpoint's model.json) with model.batch_norm true/false,
    the key before model.norm, read as norm batch/none: earlier runs' config.yaml still resume,
    evaluate and predict, and their configs still load."""
    if "batch_norm" not in mapping:
        return mapping
    out = dict(mapping)
    old = _coerce(f"{prefix}batch_norm", out.pop("batch_norm"), bool)
    if "norm" in out:
        raise ConfigError(f"config keys {prefix}batch_norm and {prefix}norm: give one ({prefix}batch_norm is the "
                          f"earlier name: true is norm batch, false is norm none)")
    out["norm"] = "batch" if old else "none"
    return out


def _apply(obj: Any, mapping: dict[str, Any], prefix: str) -> None:
    if not isinstance(mapping, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<top>'}: expected a mapping, got {mapping!r}")
    if prefix == "model.":
        mapping = upgrade_model_keys(mapping, prefix)
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in names:
            if full in _RENAMED:
                raise ConfigError(f"config key {full} was renamed: use {_RENAMED[full]}")
            raise ConfigError(f"unknown config key {full}; allowed in {prefix.rstrip('.') or 'the top level'}: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(cfg: Config, keys: list[str], value: Any) -> None:
    """One `_parse_override` result (section.key path, value) applied to `cfg` (not yet validated)."""
    nested: Any = value
    for k in reversed(keys):
        nested = {k: nested}
    _apply(cfg, nested, "")


def _parse_yaml(text: str, path: Path):
    """yaml.safe_load, or a ConfigError naming the file and line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Builds a validated Config from defaults, an optional YAML file and `section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"config file {path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start}); is it the YAML file?") from None
        raw = _parse_yaml(text, path) or {}
        try:
            _apply(cfg, raw, "")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for item in overrides or []:
        _apply_override(cfg, *_parse_override(item))
    validate(cfg)
    return cfg


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """A validated Config from a mapping (e.g. a workdir's saved config.yaml)."""
    cfg = Config()
    try:
        _apply(cfg, raw or {}, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    validate(cfg)
    return cfg


def load_workdir_config(workdir: str | Path) -> Config:
    """The config a training run saved in WORKDIR/config.yaml; ConfigError when there is none."""
    path = Path(workdir) / "config.yaml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        raise ConfigError(f"{path} not found: is {workdir} a training workdir?") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start}): not a training run's config") from None
    raw = _parse_yaml(text, path)
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: not a training run's config (no sections)")
    return config_from_dict(raw, str(path))


def validate(cfg: Config) -> None:
    """Checks values that types alone cannot; raises ConfigError naming the key."""

    def need(ok: bool, key: str, allowed: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"config key {key}: got {value!r}; allowed: {allowed}")

    d, m, o, r, t = cfg.data, cfg.model, cfg.optim, cfg.runtime, cfg.train
    if (d.global_batch_size is None) == (d.per_replica_batch_size is None):
        raise ConfigError(
            "config keys data.global_batch_size / data.per_replica_batch_size: set exactly one (the other to null)"
        )
    for key in ("global_batch_size", "per_replica_batch_size"):
        v = getattr(d, key)
        need(v is None or v > 0, f"data.{key}", "an integer > 0", v)
    need(len(d.image_size) == 2 and all(s > 0 for s in d.image_size), "data.image_size", "[H, W], both > 0", d.image_size)
    need(d.shuffle_buffer >= 1, "data.shuffle_buffer", ">= 1", d.shuffle_buffer)
    need(0 <= d.foreground_oversample <= 1, "data.foreground_oversample", "0 to 1", d.foreground_oversample)
    need(d.cycle_length >= 1, "data.cycle_length", ">= 1", d.cycle_length)
    a = d.augment
    need(0 < a.scale_prob <= 1, "data.augment.scale_prob", "0 < scale_prob <= 1", a.scale_prob)
    need(0.5 <= a.scale_min <= a.scale_max, "data.augment.scale_min", "0.5 <= scale_min <= scale_max", a.scale_min)
    need(0 <= a.rotate_degrees <= 45, "data.augment.rotate_degrees", "0 to 45", a.rotate_degrees)
    need(a.elastic_grid >= 2, "data.augment.elastic_grid", ">= 2", a.elastic_grid)
    need(a.elastic_sigma >= 0, "data.augment.elastic_sigma", ">= 0", a.elastic_sigma)
    need(0 <= a.brightness <= 1, "data.augment.brightness", "0 to 1", a.brightness)
    need(0 <= a.contrast < 1, "data.augment.contrast", "0 to <1", a.contrast)
    need(0 <= a.hue <= 0.5, "data.augment.hue", "0 to 0.5", a.hue)
    need(0 <= a.noise <= 1, "data.augment.noise", "0 to 1", a.noise)
    need(0 <= a.blur <= 5, "data.augment.blur", "0 to 5 (pixels)", a.blur)
    need(0 <= a.gamma <= 4, "data.augment.gamma", "0 to 4", a.gamma)
    need(0 <= a.lowres <= 0.9, "data.augment.lowres", "0 to 0.9", a.lowres)
    for key in ("noise_prob", "blur_prob", "gamma_prob", "lowres_prob"):
        need(0 < getattr(a, key) <= 1, f"data.augment.{key}", f"0 < {key} <= 1", getattr(a, key))
    need(0 <= a.gamma_inverted_prob <= 1, "data.augment.gamma_inverted_prob", "0 to 1", a.gamma_inverted_prob)
    need(a.gamma > 0 or not (a.gamma_inverted_prob or a.gamma_retain_stats), "data.augment.gamma",
         "> 0 where gamma_inverted_prob or gamma_retain_stats is set (the range of g)", a.gamma)
    # rot90 turns what is trained on: the patch when there is one (checked below), else the image.
    need(a.rot90 is False or d.patch_size is not None or d.image_size[0] == d.image_size[1], "data.augment.rot90",
         "false unless image_size (or patch_size when set) is square", a.rot90)

    need(1 <= m.depth <= 8, "model.depth", "1 to 8", m.depth)
    need(m.base_filters >= 1, "model.base_filters", ">= 1", m.base_filters)
    need(0 < m.bn_momentum < 1, "model.bn_momentum", "0 < bn_momentum < 1", m.bn_momentum)
    need(m.norm == "batch" or not m.sync_batch_norm, "model.sync_batch_norm", "false unless model.norm is batch",
         m.sync_batch_norm)
    # The statistics' collectives sit inside the forward pass, which runtime.xla compiles; Horovod's
    # ops have no XLA kernels.
    need(not (m.sync_batch_norm and r.xla is True), "model.sync_batch_norm",
         "false when runtime.xla is true (its collectives cannot be compiled by XLA)", m.sync_batch_norm)
    # TensorFlow refuses to compile a max-pool gradient under op determinism ("do not yet have a
    # deterministic XLA implementation"), at the first step.
    need(not (r.deterministic and r.xla is True), "runtime.xla",
         "false or auto when runtime.deterministic is true (XLA has no deterministic max-pool gradient)", r.xla)
    need(0 <= m.dropout < 1, "model.dropout", "0 <= dropout < 1", m.dropout)
    need(m.num_classes >= 2, "model.num_classes", ">= 2 (2 = binary)", m.num_classes)
    need(1 <= m.in_channels <= MAX_CHANNELS, "model.in_channels", f"1 to {MAX_CHANNELS}", m.in_channels)
    need(a.hue == 0 or m.in_channels == 3, "data.augment.hue", "0 unless model.in_channels is 3 (hue is of RGB)",
         a.hue)
    need(not m.deep_supervision or (m.padding == "same" and m.depth >= 3), "model.deep_supervision",
         "false unless model.padding is same and model.depth >= 3 (its outputs are at levels 1..depth-2)",
         m.deep_supervision)
    need(m.up_filters is None or (len(m.up_filters) == m.depth and all(f > 0 for f in m.up_filters)),
         "model.up_filters", f"null or {m.depth} positive widths (one per level)", m.up_filters)

    def fits_network(key: str) -> None:
        try:
            check_input_size(tuple(getattr(d, key)), m.depth, m.padding)
        except ValueError as e:
            raise ConfigError(f"config key data.{key}: {e}") from None

    fits_network("image_size")
    if d.patch_size is not None:
        need(len(d.patch_size) == 2 and all(0 < p <= s for p, s in zip(d.patch_size, d.image_size, strict=False)),
             "data.patch_size", f"null or [h, w] with 0 < h <= {d.image_size[0]} and 0 < w <= {d.image_size[1]} "
             "(data.image_size)", d.patch_size)
        need(a.rot90 is False or d.patch_size[0] == d.patch_size[1], "data.augment.rot90",
             "false unless patch_size is square", a.rot90)
        fits_network("patch_size")
    # The blur mirrors the image past its edges by its kernel's radius, which must stay inside it.
    trained = d.patch_size if d.patch_size is not None else d.image_size
    need(a.blur == 0 or blur_radius(a.blur) < min(trained), "data.augment.blur",
         f"at most {(min(trained) - 1) / 3:g}: its kernel's radius (3 sigma) must be under the trained size {trained}",
         a.blur)

    need(o.learning_rate > 0, "optim.learning_rate", "> 0", o.learning_rate)
    need(0 <= o.momentum < 1, "optim.momentum", "0 <= momentum < 1", o.momentum)
    need(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    need(o.clipnorm is None or o.clipnorm > 0, "optim.clipnorm", "null or > 0", o.clipnorm)
    need(o.warmup_steps >= 0, "optim.warmup_steps", ">= 0", o.warmup_steps)
    need(0 <= o.end_learning_rate_factor <= 1, "optim.end_learning_rate_factor", "0 to 1", o.end_learning_rate_factor)
    need(o.reference_batch_size > 0, "optim.reference_batch_size", "> 0", o.reference_batch_size)
    need(o.power > 0, "optim.power", "> 0", o.power)
    need(o.step_factor > 0, "optim.step_factor", "> 0", o.step_factor)
    need(all(0 < b < 1 for b in o.step_boundaries) and o.step_boundaries == sorted(o.step_boundaries),
         "optim.step_boundaries", "increasing fractions of training in (0, 1)", o.step_boundaries)

    need(0 <= r.seed < 2**32, "runtime.seed", "0 to 2**32 - 1 (numpy's seed range)", r.seed)
    need(r.intra_op_threads >= 0, "runtime.intra_op_threads", ">= 0 (0 = auto)", r.intra_op_threads)
    need(r.allreduce_pack_mb >= 0, "runtime.allreduce_pack_mb", ">= 0", r.allreduce_pack_mb)
    need(r.horovod_cycle_time_ms is None or r.horovod_cycle_time_ms > 0, "runtime.horovod_cycle_time_ms",
         "null or > 0", r.horovod_cycle_time_ms)
    need(r.stall_check_seconds >= 1, "runtime.stall_check_seconds", ">= 1", r.stall_check_seconds)
    need(r.stall_shutdown_seconds == 0 or r.stall_shutdown_seconds > r.stall_check_seconds,
         "runtime.stall_shutdown_seconds", "0 or more than runtime.stall_check_seconds", r.stall_shutdown_seconds)
    need(r.stall_shutdown_start_seconds >= 0, "runtime.stall_shutdown_start_seconds", ">= 0 (0 = never)",
         r.stall_shutdown_start_seconds)
    need(r.cpu_devices >= 0, "runtime.cpu_devices", ">= 0", r.cpu_devices)
    need(r.inter_op_threads >= 0, "runtime.inter_op_threads", ">= 0 (0 = auto)", r.inter_op_threads)

    need(t.steps >= 1, "train.steps", ">= 1", t.steps)
    need(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", ">= 1 (1 = off)",
         t.gradient_accumulation_steps)
    # Synchronized batch norm's collective would run inside the accumulation's loop, where
    # tf.distribute cannot synchronise replicas (its merge_call is refused there).
    need(t.gradient_accumulation_steps == 1 or not m.sync_batch_norm, "train.gradient_accumulation_steps",
         "1 with model.sync_batch_norm (micro-batches keep their own statistics, as replicas do without it)",
         t.gradient_accumulation_steps)
    for key in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints", "max_skipped_steps"):
        need(getattr(t, key) >= 1, f"train.{key}", ">= 1", getattr(t, key))
    need(t.image_panels >= 0, "train.image_panels", ">= 0", t.image_panels)
    need(t.early_stop_patience >= 0, "train.early_stop_patience", ">= 0 (0 = off)", t.early_stop_patience)
    need(0 <= t.early_stop_min_delta < 1, "train.early_stop_min_delta", "in [0, 1)", t.early_stop_min_delta)
    need(t.monitor not in OBJECT_MONITORS or t.object_metrics, "train.monitor",
         "val_object_f1 or val_seg only with train.object_metrics: true (which computes them)", t.monitor)
    if t.object_postprocess != "none":
        from unet_dist.postprocess import parse  # here: postprocess imports this module

        parse(t.object_postprocess, m.num_classes, "config key train.object_postprocess")
    need(t.object_postprocess == "none" or t.object_metrics, "train.object_postprocess",
         "none unless train.object_metrics is true (the post-processing shapes the objects it scores)",
         t.object_postprocess)
    need(t.monitor != "val_fg_iou" or m.num_classes == 2, "train.monitor",
         "val_fg_iou (the foreground's IoU) only with model.num_classes 2", t.monitor)
    need(t.loss not in ("bce",) or m.num_classes == 2, "train.loss", "'bce' only with model.num_classes 2; use 'cce'", t.loss)
    need(t.target_val_iou is None or 0 < t.target_val_iou <= 1, "train.target_val_iou", "null or in (0, 1]",
         t.target_val_iou)
    need(t.weight_sigma > 0, "train.weight_sigma", "> 0", t.weight_sigma)
    need(t.weight_w0 >= 0, "train.weight_w0", ">= 0", t.weight_w0)
    need(t.focal_gamma >= 0, "train.focal_gamma", ">= 0", t.focal_gamma)
    cw = t.class_weights
    need(cw == "none" or t.loss not in ("dice", "weighted_ce"), "train.class_weights",
         "none with train.loss dice (no cross-entropy to weight) or weighted_ce (its w_c balances the classes)", cw)
    need(not isinstance(cw, list) or (len(cw) == m.num_classes and min(cw) >= 0 and max(cw) > 0),
         "train.class_weights", f"none, balanced, sqrt, or {m.num_classes} weights >= 0 (model.num_classes), "
         "not all 0", cw)
    need(t.init_from is None or t.init_from.strip() != "", "train.init_from", "null or a workdir", t.init_from)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config file (see configs/default.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable (e.g. --set optim.learning_rate=0.01)")


def add_workdir_args(parser: argparse.ArgumentParser, many: bool = False) -> None:
    """--workdir and --checkpoint: the trained run that evaluate, predict and export read.

    many: --workdir may be repeated for several runs, whose predictions are averaged (args.workdir is
    then a list). Repeated, not nargs="+", which would swallow predict's images.
    """
    parser.add_argument("--workdir", type=Path, required=True, action="append" if many else "store",
                        help="a training run's --workdir" + ("; repeat it for several runs, whose "
                                                             "predictions are averaged" if many else ""))
    parser.add_argument("--checkpoint", choices=("best", "latest"), default="best",
                        help="the best-val-IoU checkpoint or the latest one")


def add_strategy_arg(parser: argparse.ArgumentParser, help: str) -> None:
    """--strategy, one of runtime.strategy's values (`STRATEGIES`)."""
    parser.add_argument("--strategy", choices=STRATEGIES, help=help)


def add_runtime_set_arg(parser: argparse.ArgumentParser) -> None:
    """--set runtime.KEY=VALUE (args.runtime_set) for a command that runs a trained run (evaluate,
    predict): how this command runs, for this command only (`with_runtime_overrides`)."""
    parser.add_argument("--set", action="append", default=[], dest="runtime_set", metavar="runtime.KEY=VALUE",
                        help="override one runtime.* value of the run's config.yaml for this command only; "
                             "repeatable (e.g. --set runtime.stall_shutdown_seconds=900); the run's files are "
                             "left as they are")


def with_runtime_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` (a trained run's) with --set runtime.KEY=VALUE items applied and validated. Only runtime
    keys: the rest of a run's config is what its model was trained with, and its checkpoints need it.
    ConfigError naming the item otherwise."""
    for item in overrides:
        keys, value = _parse_override(item)
        if len(keys) != 2 or keys[0] != "runtime":
            raise ConfigError(f"--set {item}: only runtime.KEY=VALUE can be set for a trained run (its other keys "
                              "are what its model was trained with)")
        if keys[1] == "strategy":
            raise ConfigError(f"--set {item}: use --strategy")
        _apply_override(cfg, keys, value)
    validate(cfg)
    return cfg


def writable_dir(path: Path, flag: str) -> None:
    """Creates folder `path` (and its parents) and checks it can be written, before any work;
    ConfigError naming `flag` otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        # mkdir says only "File exists" when the path, or a folder above it, is a file.
        blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            where = "" if blocking == path else f"{blocking} "
            raise ConfigError(f"{flag} {path}: {where}is a file, not a folder") from None
        raise ConfigError(f"{flag} {path}: not writable ({e.strerror})") from None


def config_yaml(cfg: Config) -> str:
    """The config as YAML that load_config reads back to an equal Config (the run's config.yaml)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
