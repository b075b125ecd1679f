"""Checkpoints: the last K and the best by validation IoU, with tf.train.CheckpointManager.

A checkpoint holds model weights, optimizer state (including the step count that drives the LR
schedule and, under mixed_float16, the loss scale), our own step and the seconds trained to it,
and nothing that depends on the number of workers or the precision, so a run saved on N workers
resumes on M, and a float16 run resumes in float32 and the reverse.
The runtime decides who writes: the chief (single, mirrored, Horovod), or every worker with
non-chief workers writing to a temporary folder (MultiWorkerMirroredStrategy).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from unet_dist.atomic import atomic_write_text
from unet_dist.config import Config, ConfigError, ModelConfig, load_workdir_config, upgrade_model_keys
from unet_dist.distribute import Runtime
from unet_dist.errors import tf_reason
from unet_dist.model import INPUT_CONV, adapt_input_kernel, build_unet, is_deep_supervision_head, main_output

# Config keys that change the variables of the model: a checkpoint of another shape cannot resume.
MODEL_KEYS = ("depth", "base_filters", "padding", "norm", "upsample", "up_filters", "num_classes",
              "deep_supervision", "in_channels")


def checkpoint_path(workdir: str | Path, which: str = "best") -> str:
    """WORKDIR's checkpoint to use: 'best' (by val IoU, falling back to the latest) or 'latest'."""
    ckdir = Path(workdir) / "checkpoints"
    path = tf.train.latest_checkpoint(str(ckdir / "best")) if which == "best" else None
    path = path or tf.train.latest_checkpoint(str(ckdir))
    if path is None:
        raise ConfigError(f"no checkpoint in {ckdir}")
    return path


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions) or read (damaged); names the files."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


@contextlib.contextmanager
def _unreadable(path: str):
    """Turns TensorFlow's errors on reading checkpoint `path` into a CheckpointError naming it."""
    try:
        yield
    except (tf.errors.OpError, IndexError) as e:  # IndexError: a .data file cut short
        reason = tf_reason(e)
        raise CheckpointError(f"checkpoint {path} is unreadable ({reason})", reason) from None


def read_checkpoint(ckpt: tf.train.Checkpoint, path: str) -> None:
    """Restores `ckpt` from `path` (what it holds and `ckpt` lacks is ignored); CheckpointError if damaged."""
    with _unreadable(path):
        ckpt.restore(path).expect_partial()


def check_free_space(workdir: Path, model: keras.Model, optimizer, keep: int) -> None:
    """Refuses to start when WORKDIR's disk cannot hold the checkpoints this run will keep."""
    weights = 4 * model.count_params()
    per_ckpt = weights + 4 * sum(int(np.prod(v.shape)) for v in optimizer.variables)
    need = per_ckpt * (keep + 1) + weights  # the kept ones, the one being written, and the best (weights alone)
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise ConfigError(f"--workdir {workdir}: {free / 2**20:.1f} MiB free, its checkpoints need about "
                          f"{need / 2**20:.1f} MiB ({keep} kept + best + one being written)")


def restore_trained(workdir: str | Path, which: str = "best", heads: bool = False
                    ) -> tuple[keras.Model, Config, str]:
    """(WORKDIR's fully convolutional model with the weights of its checkpoint `which`, its config,
    the checkpoint path), built under the current Keras dtype policy (variables are float32 under
    every policy). which: 'best' (by val IoU; falls back to the latest) or 'latest'. The model has
    its main output alone (`model.main_output`) unless heads: then also model.deep_supervision's.
    ConfigError when WORKDIR has no config.yaml or no checkpoint, CheckpointError when it is damaged."""
    cfg = load_workdir_config(workdir)
    path = checkpoint_path(workdir, which)
    model = build_unet(cfg.model, None)
    read_checkpoint(tf.train.Checkpoint(model=model), path)
    return model if heads else main_output(model), cfg, path


def init_weights(model: keras.Model, source: str | Path) -> str:
    """Copies the weights of workdir SOURCE's best (else latest) checkpoint into `model`, layer by
    layer by name: a run that starts from trained weights (fine-tuning, another data set). The
    output layer starts as initialised when its shape differs (another model.num_classes), as do
    model.deep_supervision's heads where SOURCE has none or other ones; the input convolution's
    kernel is adapted to another model.in_channels (`model.adapt_input_kernel`); any other layer
    that is missing there or of another shape is a ConfigError naming it, before anything is
    copied. Only weights move: the optimizer, the step and the learning-rate schedule start fresh.
    Returns the line to print.
    """
    key = f"train.init_from {source}"
    try:
        theirs, _, path = restore_trained(source, "best", heads=True)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    by_name = {layer.name: layer for layer in theirs.layers if layer.weights}
    pairs, new, problems = [], [], []
    for layer in (x for x in model.layers if x.weights):
        src = by_name.get(layer.name)
        ours_shape = [tuple(w.shape) for w in layer.weights]
        their_shape = [tuple(w.shape) for w in src.weights] if src is not None else None
        if their_shape == ours_shape:
            pairs.append((layer, src.get_weights()))
        elif (layer.name == INPUT_CONV and src is not None and len(their_shape) == len(ours_shape)
              and [s[:2] + s[3:] for s in their_shape] == [s[:2] + s[3:] for s in ours_shape]):
            # Only the kernel's input channels differ (another model.in_channels); a bias is per filter.
            kernel, *rest = src.get_weights()
            have, want = kernel.shape[2], ours_shape[0][2]
            pairs.append((layer, [adapt_input_kernel(kernel, want), *rest]))
            how = "summed over them" if want == 1 else f"repeated, scaled by {have}/{want}"
            new.append(f"the input convolution's kernel is adapted from {have} to {want} channels ({how})")
        elif layer.name == "logits" and src is not None:
            new.append(f"the output layer starts new ({their_shape[0][-1]} units there, {ours_shape[0][-1]} here)")
        elif is_deep_supervision_head(layer):
            new.append(f"the deep-supervision head {layer.name} starts new")
        else:
            problems.append(f"layer {layer.name}: {their_shape or 'absent'} there, {ours_shape} here")
    if problems:
        more = f"; and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise ConfigError(f"{key}: its model is not this one ({'; '.join(problems[:2])}{more}); only "
                          f"model.num_classes, model.deep_supervision and model.in_channels may differ (see "
                          f"{Path(source) / 'config.yaml'})")
    for layer, weights in pairs:
        layer.set_weights(weights)
    return f"weights of {len(pairs)} layers from {path}" + "".join(f"; {n}" for n in new)


class Checkpoints:
    def __init__(self, runtime: Runtime, workdir: Path, model: keras.Model, optimizer, cfg: Config):
        self.runtime = runtime
        self.dir = Path(workdir) / "checkpoints"
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.best_iou = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_val_iou")
        # Wall seconds the run had trained for when the checkpoint was written, summed over the calls
        # that resumed it, so summary.json's time to target counts a preempted run's earlier calls.
        # A checkpoint written before it existed restores none: 0.
        self.seconds = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="train_seconds")
        # The optimizer's own state is saved as "optimizer" in every precision, and mixed_float16's
        # loss-scale wrapper (its scale and step counter) beside it as "loss_scale", so a run
        # resumes under another precision (trained on a GPU in float16, continued on a CPU in
        # float32): the wrapper as "optimizer" moved the inner state one level down.
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        scale = {"loss_scale": optimizer} if inner is not optimizer else {}
        self.ckpt = tf.train.Checkpoint(model=model, optimizer=inner, step=self.step, best_iou=self.best_iou,
                                        seconds=self.seconds, **scale)
        # The best checkpoint holds the weights, the step and the best IoU, not the optimizer's
        # state: predict, export, evaluate and train.init_from read the weights alone, and a resume
        # reads the latest checkpoint. For Adam that is a third of the bytes, and each new best
        # (during the first evaluations, nearly every one) writes in 0.03 s instead of 0.06-0.12 s
        # for demo.yaml's model.
        best = tf.train.Checkpoint(model=model, step=self.step, best_iou=self.best_iou)
        self.cfg = cfg
        self._latest = self._best = None
        self._signature_written = False
        if runtime.saves():
            self._latest = tf.train.CheckpointManager(self.ckpt, str(runtime.save_dir(self.dir)),
                                                      max_to_keep=cfg.train.keep_checkpoints)
            self._best = tf.train.CheckpointManager(best, str(runtime.save_dir(self.dir / "best")),
                                                    max_to_keep=1, checkpoint_name="best")

    def _model_signature(self) -> dict:
        return {k: getattr(self.cfg.model, k) for k in MODEL_KEYS}

    def check_compatible(self) -> None:
        """Refuses to resume from checkpoints of a different model (one line, before any work)."""
        path = self.dir / "model.json"
        if not path.exists():
            return
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            # Written by an older version that a kill could catch mid-write (empty or cut short). The
            # restore below still checks the optimizer state, and the next save rewrites the file.
            self.runtime.print(f"unet_dist: {path} is unreadable ({type(e).__name__}); not checking the model "
                               "settings against it", file=sys.stderr)
            return
        # A key newer than the file (model.deep_supervision) was its default when it was written.
        defaults, saved = ModelConfig(), upgrade_model_keys(saved)
        saved = {k: saved.get(k, getattr(defaults, k)) for k in MODEL_KEYS}
        diff = [f"model.{k}: checkpoint {saved[k]!r}, config {v!r}"
                for k, v in self._model_signature().items() if saved[k] != v]
        if diff:
            raise ConfigError(f"checkpoints in {self.dir} are of another model ({'; '.join(diff)}); "
                              f"use another --workdir or --no-resume")

    def check_optimizer_state(self, path: str) -> None:
        """Refuses, in one line, a checkpoint whose optimizer state does not fit this run's optimizer
        (another optim.name, or SGD/RMSprop momentum switched on or off: other slot variables).

        Keras lists an optimizer's variables in a fixed order, the iteration count first (saved as
        optimizer/_iterations), then its slots per trainable variable (optimizer/_variables/i).
        """
        with _unreadable(path):
            reader = tf.train.load_checkpoint(path)
        shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
        ours = self.ckpt.optimizer.variables
        saved = [int(k.split("/")[2]) for k in shapes if k.startswith("optimizer/_variables/")]
        problem = None
        if 1 + max(saved, default=0) != len(ours):
            problem = f"{1 + max(saved, default=0)} optimizer variables there, {len(ours)} here"
        else:
            for i, v in enumerate(ours[1:], start=1):
                key = f"optimizer/_variables/{i}/.ATTRIBUTES/VARIABLE_VALUE"
                if key in shapes and (list(shapes[key]) != list(v.shape) or dtypes[key] != v.dtype):
                    problem = (f"optimizer variable {i} is {dtypes[key].name}{shapes[key]} there, {v.path} "
                               f"{v.dtype}{list(v.shape)} here")
                    break
        if problem:
            raise ConfigError(f"checkpoint {path} holds the state of another optimizer than this run's "
                              f"{type(self.ckpt.optimizer).__name__} ({problem}); resume with the optim.* settings "
                              f"it was written with ({self.dir.parent / 'config.yaml'}), or use another --workdir "
                              "or --no-resume")

    def latest_path(self) -> str | None:
        return tf.train.latest_checkpoint(str(self.dir))

    def restore_latest(self) -> int:
        """Restores the newest readable checkpoint in WORKDIR/checkpoints on every process; returns its step.

        A damaged one (truncated, overwritten, bad checksum) is named and passed over for the one
        before it: its steps are lost already, and a requeued job then goes on instead of failing
        at every start. With none readable it stops: starting over is --no-resume's decision.
        """
        self.check_compatible()
        state = tf.train.get_checkpoint_state(str(self.dir))
        paths = list(reversed(state.all_model_checkpoint_paths)) if state else []
        unreadable = []
        for path in paths:
            try:
                self.check_optimizer_state(path)
                read_checkpoint(self.ckpt, path)
            except CheckpointError as e:
                unreadable.append(f"{Path(path).name} ({e.reason})")
                self.runtime.print(f"unet_dist: {e}; trying the one before", file=sys.stderr)
                continue
            if unreadable:
                self.runtime.print(f"unet_dist: resuming from {path}, the newest readable checkpoint",
                                   file=sys.stderr)
            self._adopt_best_iou()
            return int(self.step.numpy())
        if unreadable:
            raise CheckpointError(f"no checkpoint in {self.dir} can be read: {'; '.join(unreadable)}; "
                                  "use --no-resume to start over (the run is moved aside) or another --workdir")
        return 0

    def _adopt_best_iou(self) -> None:
        """Takes the best checkpoint's IoU when it is higher than the restored one. A checkpoint is
        saved before its step's evaluation, so it holds the best IoU from before it; resuming
        with that lower value would let a worse model replace the saved best."""
        path = tf.train.latest_checkpoint(str(self.dir / "best"))
        if path is None:
            return
        best = tf.Variable(-1.0, dtype=tf.float64, trainable=False)
        try:
            read_checkpoint(tf.train.Checkpoint(best_iou=best), path)
        except CheckpointError as e:  # damaged: the latest checkpoint's value is what is left
            self.runtime.print(f"unet_dist: {e}; a new best is judged against the best IoU in the latest "
                               "checkpoint", file=sys.stderr)
            return
        if float(best.numpy()) > float(self.best_iou.numpy()):
            self.best_iou.assign(best)

    def restore(self, path: str) -> None:
        read_checkpoint(self.ckpt, path)

    def _write(self, manager: tf.train.CheckpointManager, step: int, directory: Path) -> None:
        """manager.save(step) for `directory`; a failed write (disk full, permissions) is a
        CheckpointError naming the folder and its last complete checkpoint, which a failed write
        never replaces."""
        try:
            manager.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as e:
            last = tf.train.latest_checkpoint(str(directory))
            raise CheckpointError(f"could not write the checkpoint of step {step} to {directory}: {tf_reason(e)}; "
                                  f"the latest complete one there is {last or 'none'}") from None
        self.runtime.cleanup_save_dir(directory)

    def save(self, step: int, seconds: float = 0.0) -> None:
        """Writes the latest checkpoint of `step`, which the run reached after `seconds` of training."""
        self.step.assign(step)
        self.seconds.assign(seconds)
        if self._latest is None:
            return
        self._write(self._latest, step, self.dir)
        if self.runtime.is_chief and not self._signature_written:
            # Atomic: a run killed while writing it must still resume (check_compatible reads it).
            # Once per run: the model settings cannot change within one.
            atomic_write_text(self.dir / "model.json", json.dumps(self._model_signature()))
            self._signature_written = True

    def save_best(self, step: int, iou: float) -> bool:
        """Saves when `iou` beats the best so far; returns whether it did."""
        if iou <= float(self.best_iou.numpy()):
            return False
        self.best_iou.assign(iou)
        self.step.assign(step)
        if self._best is not None:
            self._write(self._best, step, self.dir / "best")
        return True
