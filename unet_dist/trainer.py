"""The training loop: one code path for every backend.

The per-replica step averages the per-example loss over the *global* batch; the runtime sums
gradients and reported numbers over replicas. Model, losses and pipeline know nothing of the backend.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from unet_dist import precision
from unet_dist.atomic import atomic_write_text
from unet_dist.checkpoint import Checkpoints, check_free_space, init_weights
from unet_dist.config import OBJECT_MONITORS, Config, ConfigError, config_yaml, load_workdir_config, writable_dir
from unet_dist.data.augment import describe as describe_augmentation
from unet_dist.data.convert import ignores
from unet_dist.data.pipeline import (
    DataError,
    eval_dataset,
    image_channels,
    load_manifest,
    lost_records,
    record_stems,
    resize_census,
    train_dataset,
    unreadable_record,
)
from unet_dist.distribute import (
    CollectiveError,
    Runtime,
    collective_failures,
    each_process,
    gpu_memory_peak_mib,
    make_runtime,
)
from unet_dist.image_scores import own_scores
from unet_dist.input_bound import InputClock, advice, classify, worst_over_processes
from unet_dist.logs import Logger, panel_rows, plot_curves, read_metrics
from unet_dist.losses import class_weights, cross_entropy, training_loss
from unet_dist.metrics import confusion_matrix, predict_classes, scores
from unet_dist.model import FusedBatchNorm, build_unet, main_output, moving_statistics
from unet_dist.objects import FIELDS, object_counts, pooled
from unet_dist.optimizers import build_optimizer
from unet_dist.postprocess import parse
from unet_dist.preemption import Preempted, PreemptionWatcher
from unet_dist.schedule import scaled_learning_rate
from unet_dist.surface import FIELDS as BOUNDARY_FIELDS
from unet_dist.surface import SUMS as BOUNDARY_SUMS
from unet_dist.surface import boundary_rows, boundary_sums, per_class, pooled_boundary
from unet_dist.watchdog import Watchdog


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, too many skipped steps); the message names the step."""


def seed_everything(cfg: Config) -> None:
    """Same initial weights in every process; op determinism when asked for."""
    keras.utils.set_random_seed(cfg.runtime.seed)
    if cfg.runtime.deterministic:
        tf.config.experimental.enable_op_determinism()


def check_data_matches(cfg: Config, manifest: dict, data_dir: Path) -> None:
    if manifest["num_classes"] != cfg.model.num_classes:
        raise ConfigError(f"config key model.num_classes is {cfg.model.num_classes} but {data_dir}/manifest.json has "
                          f"{manifest['num_classes']} classes; --set model.num_classes={manifest['num_classes']}")
    channels = image_channels(manifest)
    if channels != cfg.model.in_channels:
        raise ConfigError(f"config key model.in_channels is {cfg.model.in_channels} but the images of "
                          f"{data_dir}/manifest.json have {channels} channels; --set model.in_channels={channels}")


def prepare_workdir(workdir: Path, runtime: Runtime, resume: bool) -> None:
    """Creates WORKDIR (chief), checks it is writable, and sets old results aside on --no-resume."""
    workdir = Path(workdir)
    if not runtime.is_chief:
        return
    writable_dir(workdir, "--workdir")
    if not resume and (workdir / "checkpoints").exists():
        # --no-resume starts over without destroying the earlier run: move it aside, with the
        # config.yaml and data.json that evaluate, predict and export need to use its checkpoints.
        stamp = time.strftime("previous-%Y%m%d-%H%M%S")
        old = workdir / stamp
        n = 1
        while old.exists():  # two restarts in one second
            n += 1
            old = workdir / f"{stamp}-{n}"
        old.mkdir()
        for name in ("checkpoints", "metrics.jsonl", "summary.json", "tensorboard", "learning_curves.png",
                     "config.yaml", "data.json", "eval.json", "eval_train.json", "eval_images.json"):
            if (workdir / name).exists():
                shutil.move(str(workdir / name), str(old / name))
        print(f"--no-resume: moved the earlier run in {workdir} to {old}", flush=True)


def make_train_step(model, optimizer, loss_fn, runtime: Runtime, global_batch: int, xla: bool,
                    micro_batches: int = 1):
    """A tf.function step(batch, stop) -> {'loss', 'nonfinite', 'stop'}, each summed over replicas.

    stop: a float32 scalar, 1.0 when this process has been asked to stop (preemption).
    micro_batches: each replica's batch (B, ...) is cut into this many equal slices (B must divide),
    each through the model forward and backward in turn, and their gradients summed before the one
    all-reduce and update (gradient accumulation: activations are held for B / micro_batches images
    at a time). Batch norm then takes its statistics from each slice, as it would from each replica
    of a world micro_batches times larger, and its moving statistics move by the slices' mean, as the
    replicas' mean copies do: one process with 2 micro-batches trains what 2 replicas do.
    """

    if not isinstance(xla, bool):  # 'auto' is truthy: it would compile on a CPU
        raise TypeError(f"make_train_step: xla must be true or false (resolve_xla resolves 'auto'), not {xla!r}")

    def forward_backward(batch):
        with tf.GradientTape() as tape:
            # (B, h, w, U) float32; with model.deep_supervision a list, which loss_fn takes as it is
            probs = model(batch["image"], training=True)
            per_example = loss_fn(batch["mask"], probs, batch.get("weight"))  # (B,)
            loss = tf.reduce_sum(per_example) / global_batch
            if model.losses:  # regularisers: counted once over all replicas and micro-batches
                loss += tf.add_n(model.losses) / (runtime.num_replicas * micro_batches)
            # mixed_float16: scale up so small gradients survive float16; apply() unscales.
            scaled = optimizer.scale_loss(loss)
        return loss, tape.gradient(scaled, model.trainable_variables)

    if xla:
        forward_backward = tf.function(forward_backward, jit_compile=True, autograph=False)

    stats = moving_statistics(model)

    def accumulated(batch):
        # A while loop of one iteration at a time: unrolled, the slices' passes have no data
        # dependence on each other and TensorFlow may run them at once, holding every slice's
        # activations, which is what accumulating is there to avoid.
        size = tf.shape(batch["image"])[0] // micro_batches
        before = [tf.identity(v) for v in stats]

        def body(i, total, grad_sums, stat_sums):
            # Each slice moves batch norm's moving statistics from where the step found them, and
            # they end at the slices' mean: the rule is linear, so that is one update by the mean
            # of the slices' moments, where slice after slice would compound the momentum.
            for v, start in zip(stats, before, strict=True):
                v.assign(start)
            loss, grads = forward_backward({key: x[i * size:(i + 1) * size] for key, x in batch.items()})
            grad_sums = [s + (tf.zeros_like(s) if g is None else tf.cast(g, s.dtype))
                         for s, g in zip(grad_sums, grads, strict=True)]
            return i + 1, total + loss, grad_sums, [s + tf.identity(v) for s, v in zip(stat_sums, stats, strict=True)]

        _, loss, grads, stat_sums = tf.while_loop(
            lambda i, *_: i < micro_batches, body,
            (tf.constant(0), tf.constant(0.0), [tf.zeros(v.shape, v.dtype) for v in model.trainable_variables],
             [tf.zeros_like(v) for v in before]), parallel_iterations=1)
        for v, total in zip(stats, stat_sums, strict=True):
            v.assign(total / micro_batches)
        return loss, grads

    def replica_step(batch, stop):
        loss, grads = (accumulated if micro_batches > 1 else forward_backward)(batch)
        # Preemption: this rank's stop request is summed with the others' like the loss.
        grads, out = runtime.reduce_step(grads, {"loss": loss, "stop": stop})
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
        optimizer.apply(grads, model.trainable_variables)
        return {**out, "nonfinite": 1.0 - tf.cast(finite, tf.float32)}

    @tf.function(autograph=False)  # Python control flow only (see data/pipeline.py: plain)
    def step(batch, stop=None):
        return runtime.run_step(replica_step, batch, tf.zeros([]) if stop is None else stop)

    return step


class Evaluator:
    """Exact metrics over the whole val split, each record seen once across all processes.

    Built once per run: the eval step is traced and the dataset built once, not at every evaluation
    (re-tracing the model cost seconds per evaluation on a CPU, more than the evaluation itself for
    the demo). Call it for (metrics dict with val_* keys, panel array (N, h, 4w, 3) uint8 from this
    process). objects: also val_object_f1 and val_seg, every record's objects matched on the host
    (`unet_dist.objects`) and their counts summed with the confusion matrix; the objects are those
    `predict --postprocess` gives with train.object_postprocess (small ones removed, grown), which
    the pixel metrics do not see; and val_hd95, val_assd and val_nsd, the outlines' distances of
    those masks (`unet_dist.surface`), pooled over records and classes. per_record (with objects):
    also metrics["per_record"], each record's own scores (`image_scores.own_scores`, the outlines'
    distances per class), named by its stem and worst IoU first: evaluate --data's table.
    """

    def __init__(self, model, cfg: Config, runtime: Runtime, data_dir: Path, manifest: dict, split: str = "val",
                 objects: bool = False, per_record: bool = False):
        self.k = k = manifest["num_classes"]
        self.objects = objects
        # What predict will do to the masks and their objects: the scores (and train.monitor's
        # val_seg) are of those, where a border-weight model's cells come out short of their edges.
        self.postprocess = parse(cfg.train.object_postprocess, k, "config key train.object_postprocess")
        self.grows = self.postprocess.grows(k)
        self.ignore = ignore = ignores(manifest)
        self.runtime = runtime
        self.data_dir, self.manifest, self.split = data_dir, manifest, split
        self.per_record = per_record and objects
        _, per_replica = runtime.batch_sizes()
        self.shard = shard = runtime.process_shard
        self.dataset = eval_dataset(data_dir, cfg, per_replica, shard, manifest, split)
        model = main_output(model)  # deep supervision's heads are training's alone
        # The batches this process runs: its records are every count-th from its index (eval_dataset).
        self.batches = -(-len(range(shard.index, manifest[split]["records"], shard.count)) // per_replica)

        @tf.function(reduce_retracing=True, autograph=False)  # the last batch may be smaller: one more trace, not one per size
        def eval_step(batch):
            probs = model(batch["image"], training=False)
            pred = predict_classes(probs)
            # val_loss is the cross-entropy whatever train.loss is: one measure across runs trained
            # with different losses, and no weight map needed for the val records.
            loss_sum = tf.reduce_sum(cross_entropy(batch["mask"], probs, ignore=ignore))
            return confusion_matrix(batch["mask"], pred, k, ignore), loss_sum, tf.shape(probs)[0], pred

        self.eval_step = eval_step

    def __call__(self, panels: int = 0, progress: Callable[[], None] | None = None) -> tuple[dict, np.ndarray]:
        """progress: called after each batch (the training loop's `Watchdog.beat`)."""
        k = self.k
        cm = np.zeros((k, k), np.float64)
        objects, outlines = np.zeros((k, FIELDS)), np.zeros(BOUNDARY_SUMS)
        loss_sum, count = 0.0, 0
        panel = np.zeros((0, 1, 1, 3), np.uint8)
        # Each record's own counts at its index in the split (this process's are every shard.count-th
        # from shard.index, as eval_dataset shards them): zeros elsewhere, summed over processes.
        n = self.manifest[self.split]["records"] if self.per_record else 0
        own = [np.zeros((n, k, k)), np.zeros((n, k, FIELDS)), np.zeros((n, k, BOUNDARY_FIELDS))]
        index = self.shard.index
        try:
            for batch in self.dataset:
                c, ls, b, pred = self.eval_step(batch)
                cm += c.numpy()
                loss_sum += float(ls)
                count += int(b)
                if self.objects or (panels and panel.shape[0] == 0):  # the host's copies, taken once
                    pred, masks = pred.numpy(), batch["mask"].numpy()[..., 0]
                if self.objects:
                    for p, m in zip(pred, masks, strict=True):
                        written = self.postprocess(p)
                        counted, rows = object_counts(written, m, k, grows=self.grows), boundary_rows(written, m, k)
                        objects += counted
                        outlines += boundary_sums(rows)
                        if self.per_record:
                            own[0][index] = confusion_matrix(m, p, k, self.ignore).numpy()
                            own[1][index], own[2][index] = counted, rows
                            index += self.shard.count
                if progress:
                    progress()
                if panels and panel.shape[0] == 0:
                    panel = panel_rows(batch["image"].numpy()[:panels], masks[:panels], pred[:panels], k)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            # Never skipped (data.skip_corrupt_records is for training): metrics must count every val record.
            what = {"val": "validation", "train": "training"}[self.split]
            raise DataError(f"{what} data unreadable: {unreadable_record(self.data_dir, self.manifest, self.split, e)}"
                            "; convert again") from None
        cm, objects, outlines, (loss_sum, count), *own = self.runtime.sum_shares_each(
            [cm, objects, outlines, [loss_sum, count], *own], "their part of the evaluation")
        s = scores(cm)
        metrics = {"val_loss": float(loss_sum / max(count, 1)), "val_iou": s["iou"], "val_dice": s["dice"],
                   "val_pixel_acc": s["pixel_acc"], "val_iou_per_class": s["iou_per_class"],
                   "val_records": int(count)}
        if "fg_iou" in s:
            metrics["val_fg_iou"] = s["fg_iou"]
        if self.objects:
            metrics.update({f"val_{key}": v for key, v in {**pooled(objects), **pooled_boundary(outlines)}.items()})
        if self.per_record and self.runtime.is_chief:
            own_cm, own_objects, own_outlines = own
            stems = record_stems(self.data_dir, self.manifest, self.split)
            metrics["per_record"] = sorted(
                ({"record": stem, **own_scores(own_cm[i], own_objects[i]), **per_class(own_outlines[i])}
                 for i, stem in enumerate(stems) if own_cm[i].sum() > 0),  # not every pixel left out
                key=lambda r: r["iou"])
        return metrics, panel


def next_batch(batches, data_dir: Path, manifest: dict, step: int):
    """The next batch; unreadable data becomes one DataError naming the shard (found by a scan)."""
    try:
        return next(batches)
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        where = unreadable_record(data_dir, manifest, "train", e)
        raise DataError(f"training data unreadable at step {step}: {where}; convert again, or set "
                        f"data.skip_corrupt_records=true to skip what cannot be read") from None


def build_model_and_optimizer(cfg: Config, runtime: Runtime, peak_lr: float):
    precision.resolve(cfg.runtime)  # runtime.precision 'auto' -> this machine's (train() resolved it already)
    precision.set_policy(cfg.runtime.precision)
    with runtime.scope():
        # Patch training feeds patches and evaluates whole images: one fully convolutional model.
        model = build_unet(cfg.model, None if cfg.data.patch_size else tuple(cfg.data.image_size))
        if cfg.model.sync_batch_norm and runtime.num_replicas > 1:
            # One replica keeps the fused kernel: the same statistics, and no collective to wait for.
            for layer in model.layers:
                if isinstance(layer, FusedBatchNorm):
                    layer.replica_sum = runtime.replica_sum
        optimizer = precision.wrap_optimizer(build_optimizer(cfg.optim, peak_lr, cfg.train.steps), cfg.runtime)
        # Keras 3 under strategy.run: optimizer variables must exist before the first traced step.
        optimizer.build(model.trainable_variables)
    runtime.adopt_optimizer(optimizer)
    return model, optimizer


class StepGuard:
    """Stops training on a non-finite loss, and on non-finite gradients unless loss scaling (float16)
    is on, where a skipped step is counted and too many in a row stop the run."""

    def __init__(self, cfg: Config, optimizer, ckpts: Checkpoints):
        self.max_run = cfg.train.max_skipped_steps
        self.scaled = precision.uses_loss_scale(optimizer)
        self.ckpts = ckpts
        self.skipped = self._run = 0

    def check(self, step: int, loss: float, nonfinite: bool) -> None:
        last = self.ckpts.latest_path() or "none (no checkpoint yet)"
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at step {step}; stopped. The last good checkpoint is {last}")
        if not nonfinite:
            self._run = 0
            return
        if not self.scaled:
            raise TrainingError(f"non-finite gradients at step {step}; stopped. The last good checkpoint is {last}")
        self.skipped += 1
        self._run += 1
        if self._run > self.max_run:
            raise TrainingError(f"{self._run} consecutive steps skipped for non-finite gradients at step {step} "
                                f"(train.max_skipped_steps {self.max_run}); stopped")


class TrainLoop:
    """Steps start+1 .. total of a run: log, checkpoint, evaluate, stop at train.target_val_iou or
    when any rank is asked to stop (preemption: checkpoint, then raise Preempted).
    `average_statistics()` runs on every rank before each checkpoint and evaluation. `watchdog` is
    armed after the first step and told of each step and evaluation batch that finishes.

    evaluator None: data without a validation split, trained without evaluating.
    Create it right before `run`, after the checkpoint is restored: its clock (t_start) starts then,
    from the seconds the restored checkpoint had trained (`elapsed`). After `run`: last_eval (the
    last metrics), reached ((step, `elapsed()`) when the target was met), early_stop (the step
    train.early_stop_patience stopped at, or None) and images (trained in this call).
    """

    def __init__(self, cfg: Config, ckpts: Checkpoints, evaluator: Evaluator | None, logger: Logger, optimizer,
                 global_batch: int, steps_per_epoch: int, average_statistics: Callable[[], None],
                 watchdog: Watchdog | None = None, weights_per_sample: bool = False,
                 patience: tuple[int, float] = (0, -1.0)):
        self.cfg, self.ckpts, self.evaluator, self.logger = cfg, ckpts, evaluator, logger
        self.weights_per_sample = weights_per_sample  # for the input-bound advice
        self.watchdog = watchdog or Watchdog(0, 0)
        self.average_statistics = average_statistics
        self.optimizer, self.global_batch, self.steps_per_epoch = optimizer, global_batch, steps_per_epoch
        self.guard = StepGuard(cfg, optimizer, ckpts)
        self.last_eval: dict = {}
        self.reached: tuple[int, float] | None = None
        self.early_stop: int | None = None
        # (evaluations without a new best, the monitored value they count from): `patience_step`,
        # carried over a resume by `resumed_evaluations`.
        self._patience = patience
        self.images = 0
        self.input = InputClock()  # this process's wait for batches
        self._warned_input = False
        self.t_start = self._window_t = time.time()
        self.prior_seconds = float(ckpts.seconds.numpy())  # the earlier calls' share of a resumed run
        self._window_steps, self._window_loss = 0, 0.0  # steps and their summed loss since the last train event

    def elapsed(self) -> float:
        """Seconds of training to now: this call's, and the earlier calls' of a resumed run up to the
        checkpoint it resumed from (steps a kill lost after their last checkpoint are not counted)."""
        return self.prior_seconds + time.time() - self.t_start

    def run(self, step_fn, next_batch_fn, start: int, total: int) -> None:
        try:
            # A peer that stops answering or exits fails the collectives (the strategy's health
            # check, Horovod's Gloo timeout): one line, not TensorFlow's traceback.
            with collective_failures():
                self._run(step_fn, next_batch_fn, start, total)
        except CollectiveError as e:
            raise TrainingError(f"after step {self.watchdog.step}: {e}; rerunning the same command resumes from "
                                "the latest checkpoint") from None

    def _run(self, step_fn, next_batch_fn, start: int, total: int) -> None:
        cfg = self.cfg.train
        self.watchdog.beat(start)  # the last step finished, for messages
        with PreemptionWatcher() as watcher:
            for step in range(start + 1, total + 1):
                with self.input.waiting():
                    batch = next_batch_fn(step)
                # Reading the outputs on the host waits for the step, so the clock sees its whole time.
                out = {k: float(v) for k, v in step_fn(batch, tf.constant(1.0 if watcher.requested else 0.0)).items()}
                self.input.step_done()
                (self.watchdog.arm if step == start + 1 else self.watchdog.beat)(step)
                loss = out["loss"]
                self.guard.check(step, loss, out["nonfinite"] > 0)
                self._window_steps += 1
                self._window_loss += loss
                self.images += self.global_batch
                self.logger.advance()
                stop = out["stop"] > 0  # some rank was signalled: all stop here, after this step
                save = stop or step % cfg.checkpoint_every_steps == 0 or step == total
                evaluate = self.evaluator is not None and (step % cfg.eval_every_steps == 0 or step == total)
                if save or evaluate:
                    # What is evaluated and saved is the replicas' mean of batch norm's moving
                    # statistics, not the chief's copy alone (every rank reaches this step).
                    self.average_statistics()
                    self.watchdog.beat()
                if step % cfg.log_every_steps == 0 or step == total or stop:
                    self._log(step)
                # Saved before evaluating: the steps are kept even if the evaluation fails. The best
                # IoU that evaluation may raise is in the best checkpoint, where a resume reads it.
                if save:
                    self.ckpts.save(step, self.elapsed())
                    self.watchdog.beat()
                if stop:
                    self.logger.message(f"preempted: checkpoint of step {step} saved in {self.ckpts.dir}")
                    raise Preempted(step, watcher.signame or "a signal to another rank")
                if evaluate and self._evaluate(step):
                    if not save:  # the run ends here: its last step is the latest checkpoint
                        self.ckpts.save(step, self.elapsed())
                    break

    def _log(self, step: int) -> None:
        # The loss logged is the mean over the steps since the last train event (Keras' progress
        # bar averages too): one step's loss, at batch 1 (the 2015 recipe), mostly shows its tile.
        now = time.time()
        loss = self._window_loss / self._window_steps
        ips = self._window_steps * self.global_batch / max(now - self._window_t, 1e-9)
        wait = self.input.window()
        self.logger.train(step, (step - 1) // self.steps_per_epoch, loss, float(self.optimizer.learning_rate), ips,
                          wait)
        if classify(wait) == "highly" and not self._warned_input:
            self._warned_input = True  # once a run; metrics.jsonl has every window's share
            self.logger.message(advice(step, wait, self.weights_per_sample))
        if self.guard.skipped:
            self.logger.message(f"step {step}: {self.guard.skipped} steps skipped so far (float16 overflow)")
        self._window_t, self._window_steps, self._window_loss = now, 0, 0.0

    def _evaluate(self, step: int) -> bool:
        """Evaluates, logs, keeps the best checkpoint (by train.monitor); True when the run should stop
        here: val IoU reached the target, or train.early_stop_patience evaluations brought no new
        best. Every rank decides alike: the metrics are summed over all of them."""
        started = time.time()
        self.last_eval, panel = self.evaluator(self.cfg.train.image_panels, self.watchdog.beat)
        self.watchdog.beat()
        self.logger.eval(step, self.last_eval)
        self.logger.images(step, panel)
        before = float(self.ckpts.best_iou.numpy())  # -1 before the first evaluation
        value, name = monitored(self.cfg, self.last_eval), _monitor_name(self.cfg)
        improved = self.ckpts.save_best(step, value)
        if improved:  # which checkpoint best/ holds, for a reader of the log (as Keras' ModelCheckpoint says)
            self.logger.message(f"step {step}: new best {name} {value:.4f}" + (f" (was {before:.4f})" if before >= 0 else ""))
        self._window_t += time.time() - started  # evaluation time is not training throughput
        self._patience = patience_step(self._patience, value, self.cfg.train.early_stop_min_delta)
        patience = self.cfg.train.early_stop_patience
        if patience and self._patience[0] >= patience:
            self.early_stop = step
            self.logger.message(f"step {step}: no new best {name} in {patience} evaluations{_by_more(self.cfg)} "
                                f"(train.early_stop_patience); stopping, best {float(self.ckpts.best_iou.numpy()):.4f} "
                                f"is in {self.ckpts.dir / 'best'}")
            return True
        target = self.cfg.train.target_val_iou
        if target is None or self.last_eval["val_iou"] < target:
            return False
        self.reached = (step, self.elapsed())
        self.logger.message(f"step {step}: val IoU {self.last_eval['val_iou']:.4f} >= train.target_val_iou {target}; "
                            f"stopping after {self.reached[1]:.0f} s")
        return True


def patience_step(state: tuple[int, float], value: float, min_delta: float) -> tuple[int, float]:
    """train.early_stop_patience's count after an evaluation whose train.monitor is `value`
    (`monitored`). state: (evaluations without a new best, the value they count from; (0, -1.0)
    before the first evaluation). As Keras' EarlyStopping: a new best must beat that value by more
    than min_delta, and only one that does moves it, so a slow creep of small gains still stops the
    run. (The best checkpoint keeps any higher value.)"""
    since, best = state
    return (0, value) if value > best + min_delta else (since + 1, best)


def _by_more(cfg: Config) -> str:
    delta = cfg.train.early_stop_min_delta
    return f" by more than {delta:g} (train.early_stop_min_delta)" if delta else ""


def monitored(cfg: Config, metrics: dict) -> float:
    """The value of train.monitor in an evaluation's metrics; -1 where it has none (no object in
    the val masks or the prediction for val_object_f1): never a new best, as before any evaluation."""
    value = metrics.get(cfg.train.monitor)
    return float(value) if isinstance(value, (int, float)) else -1.0


def _monitor_name(cfg: Config) -> str:
    return "val IoU" if cfg.train.monitor == "val_iou" else cfg.train.monitor


def resumed_evaluations(workdir: Path, start: int, runtime: Runtime, cfg: Config
                        ) -> tuple[tuple[int, float], int, float, str | None]:
    """(`patience_step`'s state over train.monitor, the last evaluation's step, its val IoU; (0,
    -1.0), -1, -1.0 when there was none; what the best checkpoint was kept by where it is not what
    this config monitors, else None: the train.monitor of WORKDIR/config.yaml, with its
    train.object_postprocess where the monitor is of objects) over the eval events in
    WORKDIR/metrics.jsonl up to step `start`: the history a resumed run carries on from, so that
    train.early_stop_patience counts across resumes and a run that had stopped is not trained on by
    a rerun. The chief reads the files and every process takes its reading: the loop's stop
    decisions must be the same on all of them (the others' text of the monitor is the chief's only
    where it is the chief's to print)."""
    state, last_step, last_iou, changed, was = (0, -1.0), -1, -1.0, 0, None
    if runtime.is_chief:
        try:  # written by the run that saved the checkpoint (before train.monitor existed: val_iou)
            before = load_workdir_config(workdir).train
        except ConfigError:
            before = cfg.train
        was = _monitor_text(before)
        changed = int(was != _monitor_text(cfg.train))
        for row in read_metrics(workdir / "metrics.jsonl"):
            iou = row.get("val_iou")
            if row.get("event") != "eval" or not 0 < row.get("step", 0) <= start or not isinstance(iou, (int, float)):
                continue
            state = patience_step(state, monitored(cfg, row), cfg.train.early_stop_min_delta)
            last_step, last_iou = row["step"], iou
    mine = np.array([*state, last_step, last_iou, changed] if runtime.is_chief else [0] * 5, np.float64)
    since, best, last_step, last_iou, changed = runtime.allreduce_sum(mine)
    return (int(since), float(best)), int(last_step), float(last_iou), (was or "another metric") if changed else None


def _monitor_text(t) -> str:
    """What the best checkpoint is kept by: train.monitor, and for the objects' metrics the
    post-processing of the objects they score ('val_seg of objects after grow:2')."""
    if t.monitor in OBJECT_MONITORS and t.object_postprocess != "none":
        return f"{t.monitor} of objects after {t.object_postprocess}"
    return t.monitor


# Below this share of the training masks' labelled pixels a class is rare (README: a 0.48% class).
RARE_CLASS = 0.01


def class_balance_lines(cfg: Config, manifest: dict, class_w: np.ndarray | None) -> list[str]:
    """What training says at start about the classes' balance: the weights train.class_weights gave
    them, or where plain cross-entropy meets a rare class, what learns it sooner."""
    frac = manifest.get("class_pixel_fraction") or []
    if class_w is not None:
        return [f"unet_dist: train.class_weights {cfg.train.class_weights}: the classes' pixels weighted "
                f"{', '.join(f'{w:.4g}' for w in class_w)} in the cross-entropy"
                + (f" (their shares of the training masks: {', '.join(f'{f:.4g}' for f in frac)})" if frac else "")]
    rare = [(f, c) for c, f in enumerate(frac) if 0 < f < RARE_CLASS]
    if cfg.train.loss not in ("bce", "cce") or not rare:
        return []
    f, c = min(rare)
    name = manifest.get("class_names") or []
    return [f"unet_dist: class {c}{f' ({name[c]})' if c < len(name) else ''} is {f:.2%} of the training masks' "
            f"labelled pixels, which plain cross-entropy (train.loss {cfg.train.loss}) learns slowly; train.loss "
            "ce_dice, or train.class_weights sqrt, learns it sooner (README)"]


def resize_lines(cfg: Config, manifest: dict, data_dir: Path) -> list[str]:
    """Where data.image_size shrinks the training records (kept at the images' own size, as convert
    advises for small objects close together), a warning for each class whose objects that merges
    or breaks apart in the first records (`pipeline.resize_census`; the rule convert warns by)."""
    from unet_dist.data.convert import census_changes

    h, w = cfg.data.image_size
    big = (manifest.get("record_size") or {}).get("max")
    if not big or (big[0] <= h and big[1] <= w):
        return []
    census, n = resize_census(data_dir, manifest, (h, w))
    names = manifest.get("class_names") or []
    sizes = f"{big[1]}x{big[0]}" + (" at most" if manifest["record_size"]["min"] != big else "")
    return [f"unet_dist: warning: data.image_size [{h}, {w}] shrinks the training records ({sizes}) "
            f"{min(big[0] / h, big[1] / w):.2g}x and {verb} the objects of class {c}"
            f"{f' ({names[c]})' if c < len(names) else ''}: {census[0, c] / n:.4g} a record as stored, "
            f"{census[1, c] / n:.4g} at data.image_size (the first {n} records). Train at the records' size "
            f"(--set data.image_size=[{big[0]},{big[1]}]), on patches (data.patch_size) where whole images do not fit"
            for c, verb in census_changes(census[0].tolist(), census[1].tolist())] if n else []


def gpu_peak_over_processes(runtime: Runtime) -> float | None:
    """The largest `gpu_memory_peak_mib` of any process (every process must call it: one
    collective), None where none has a GPU: the GPU a run must fit on is its fullest one."""
    mine = gpu_memory_peak_mib()
    peak = float(each_process(runtime, [-1.0 if mine is None else mine]).max())
    return None if peak < 0 else peak


def stopped_at(cfg: Config, start: int, since_best: int, last_step: int, last_iou: float) -> str | None:
    """Why a run resumed at `start` had stopped there by its own rule, or None: its last evaluation
    was of step `start` and met train.early_stop_patience or train.target_val_iou as this config
    sets them (a rerun with a larger patience or target trains on)."""
    if last_step != start:
        return None
    patience, target = cfg.train.early_stop_patience, cfg.train.target_val_iou
    if patience and since_best >= patience:
        return (f"no new best {_monitor_name(cfg)} in {since_best} evaluations{_by_more(cfg)} (train.early_stop_patience "
                f"{patience})")
    if target is not None and last_iou >= target:
        return f"val IoU {last_iou:.4f} >= train.target_val_iou {target}"
    return None


def _cpu_list(cpus: list[int]) -> str:
    if len(cpus) <= 8:
        return "CPUs " + ",".join(map(str, cpus))
    return f"{len(cpus)} CPUs ({cpus[0]}..{cpus[-1]})"


def resolve_xla(cfg: Config) -> str | None:
    """Replaces runtime.xla 'auto' with this process's choice; returns why (None when the config
    said true or false, which is kept). Call it once the runtime has given this process its GPUs.

    auto: on where the step computes on a GPU, off on a CPU. Under XLA the train step ran 1.6-2.2x
    as fast on an NVIDIA H200 and 0.2-0.4x as fast on the 2-core CPU VMs (docs/benchmarks.md). Off
    too with model.sync_batch_norm, whose collectives XLA cannot compile, and with
    runtime.deterministic, under which TensorFlow will not compile a max-pool gradient.
    """
    if cfg.runtime.xla != "auto":
        return None
    cfg.runtime.xla = False
    if cfg.model.sync_batch_norm:
        return "auto: model.sync_batch_norm's collectives cannot be compiled"
    if cfg.runtime.deterministic:
        return "auto: runtime.deterministic, and XLA has no deterministic max-pool gradient"
    if not tf.config.get_visible_devices("GPU"):
        return "auto: no GPU, and on CPUs the step is slower compiled"
    cfg.runtime.xla = True
    return "auto: the step computes on a GPU"


def announce(cfg: Config, runtime: Runtime, global_batch: int, per_replica: int, peak_lr: float, start: int,
             precision_why: str | None = None, xla_why: str | None = None) -> None:
    """The start line: backend and why, world size, batch and learning rate after scaling, precision
    and XLA (and why, when the config said auto)."""
    by = " by NCCL" if runtime.nccl else ""
    runtime.print(
        f"unet_dist: strategy {runtime.name} ({runtime.reason}); world_size {runtime.world_size}, "
        f"replicas {runtime.num_replicas}, global batch {global_batch} ({per_replica} per replica"
        + (f" in {k} micro-batches of {per_replica // k}" if (k := cfg.train.gradient_accumulation_steps) > 1 else "")
        + "), "
        f"lr {peak_lr:g} (base {cfg.optim.learning_rate:g} at batch {cfg.optim.reference_batch_size}, "
        f"scaling {cfg.optim.lr_scaling}), warmup {cfg.optim.warmup_steps} steps, precision "
        f"{cfg.runtime.precision}{f' ({precision_why})' if precision_why else ''}, "
        f"{f'gradients summed in {runtime.wire_dtype()}{by}, ' if runtime.num_replicas > 1 else ''}xla {cfg.runtime.xla}"
        f"{f' ({xla_why})' if xla_why else ''}, "
        f"{'synchronized batch norm, ' if cfg.model.sync_batch_norm else ''}threads {runtime.threads[0]}+{runtime.threads[1]} "
        f"on {_cpu_list(runtime.cpus)}; "
        + (f"resuming at step {start}" if start else "starting at step 0") + f" of {cfg.train.steps}")


def write_run_files(cfg: Config, workdir: Path, data_dir: Path, manifest: dict) -> None:
    """config.yaml, and data.json: what prediction needs to know of the data (resized at conversion?)."""
    atomic_write_text(workdir / "config.yaml", config_yaml(cfg))
    data_meta = {k: manifest.get(k) for k in ("layout", "classes", "num_classes", "class_names", "image_size",
                                              "record_size", "ignore_value", "colors", "channels", "intensity")}
    atomic_write_text(workdir / "data.json", json.dumps({**data_meta, "data": str(data_dir.resolve())}))


def train(cfg: Config, data_dir: str | Path, workdir: str | Path, resume: bool = True,
          runtime: Runtime | None = None) -> dict:
    """Trains to cfg.train.steps (resuming from WORKDIR's latest checkpoint) and returns summary.json.

    A WORKDIR already trained to cfg.train.steps, or stopped by train.early_stop_patience or
    train.target_val_iou (`stopped_at`), is evaluated, and its config.yaml and summary.json stay
    those of the run that trained it; the summary returned is this call's (start_step, no speed).
    """
    runtime = runtime or make_runtime(cfg)
    # Each process of a multi-process run watches its own progress from here (a single process has
    # no peer to wait for): the start-up's collectives (the barrier, the broadcast, the first step)
    # wait for every rank too.
    watchdog = Watchdog(runtime.stall_seconds, runtime.rank, start_seconds=cfg.runtime.stall_shutdown_start_seconds)
    with watchdog:
        return _train(cfg, Path(data_dir), Path(workdir), resume, runtime, watchdog)


def _train(cfg: Config, data_dir: Path, workdir: Path, resume: bool, runtime: Runtime, watchdog: Watchdog) -> dict:
    precision_why = precision.resolve(cfg.runtime)  # before config.yaml records what runs
    xla_why = resolve_xla(cfg)
    manifest = load_manifest(data_dir)
    check_data_matches(cfg, manifest, data_dir)
    class_w = class_weights(cfg.train, manifest)
    # Data converted with --val-fraction 0 (a final model on every image, as nnU-Net's fold "all"):
    # train without evaluating; there is no best checkpoint, and predict and export take the latest.
    validate = manifest["val"]["records"] > 0
    if not validate and (cfg.train.target_val_iou is not None or cfg.train.early_stop_patience):
        key = "target_val_iou" if cfg.train.target_val_iou is not None else "early_stop_patience"
        raise ConfigError(f"config key train.{key} needs a validation split, but {data_dir}/manifest.json "
                          "has no val records; convert with --val-fraction > 0, or leave the key unset")
    prepare_workdir(workdir, runtime, resume)
    runtime.barrier()
    seed_everything(cfg)
    global_batch, per_replica = runtime.batch_sizes()
    peak_lr = scaled_learning_rate(cfg.optim, global_batch)
    model, optimizer = build_model_and_optimizer(cfg, runtime, peak_lr)
    stats = moving_statistics(model)
    ckpts = Checkpoints(runtime, workdir, model, optimizer, cfg)
    if runtime.is_chief:
        check_free_space(workdir, model, optimizer, cfg.train.keep_checkpoints)
    start = ckpts.restore_latest() if resume else 0
    if start == 0 and cfg.train.init_from:  # every rank reads them: the strategies then hold the same copy
        runtime.print(f"unet_dist: train.init_from: {init_weights(model, cfg.train.init_from)}")
    lost = 0
    if cfg.data.skip_corrupt_records:
        lost, lines = lost_records(data_dir, manifest)
        for line in lines:
            runtime.print(f"unet_dist: data.skip_corrupt_records: {line}")
        runtime.print(f"unet_dist: skipping {lost} unreadable of {manifest['train']['records']} training records")
    runtime.broadcast_state(model.variables + optimizer.variables)
    # `start` is the same on every process (they all restore the same checkpoint).
    patience, last_step, last_iou, monitor_was = (resumed_evaluations(workdir, start, runtime, cfg)
                                                  if validate and start else ((0, -1.0), -1, -1.0, None))
    stopped = stopped_at(cfg, start, patience[0], last_step, last_iou)
    total = start if stopped else cfg.train.steps
    if monitor_was:  # the best checkpoint's value is of another metric: the next evaluation is a new best
        ckpts.best_iou.assign(-1.0)
        if start < total:
            runtime.print(f"unet_dist: train.monitor is {_monitor_text(cfg.train)}, and was {monitor_was} when "
                          f"{workdir / 'checkpoints' / 'best'} was kept: the next evaluation replaces it")
    announce(cfg, runtime, global_batch, per_replica, peak_lr, start, precision_why, xla_why)
    if not validate:
        runtime.print(f"unet_dist: {data_dir} has no validation split (converted with --val-fraction 0): training "
                      "without evaluation; no best checkpoint is kept, so predict and export use the latest")
    # Nothing to train (a rerun, a requeued job that had finished): evaluate, and keep the files of
    # the run that trained it, whose summary.json has its speed and time to target.
    keep = start >= total and (workdir / "summary.json").exists()
    if runtime.is_chief and not keep:
        write_run_files(cfg, workdir, data_dir, manifest)
    if start >= total:
        runtime.print(f"unet_dist: {workdir} is already trained to step {start} "
                      + (f"(it stopped there: {stopped})" if stopped else f"(train.steps {total})")
                      + ("; evaluating it, and keeping the config.yaml and summary.json of the run that trained it"
                         if keep else ""))

    for line in class_balance_lines(cfg, manifest, class_w) + (resize_lines(cfg, manifest, data_dir)
                                                               if runtime.is_chief else []):
        runtime.print(line)
    runtime.print(f"unet_dist: data.augment: {describe_augmentation(cfg.data.augment)}")
    step_fn = make_train_step(model, optimizer, training_loss(cfg, ignores(manifest), class_w), runtime, global_batch,
                              cfg.runtime.xla, cfg.train.gradient_accumulation_steps)
    batches = [iter(runtime.distribute(  # a list, emptied when the loop ends (below)
        lambda shard, b: train_dataset(data_dir, cfg, b, global_batch, shard, start, manifest)))]
    evaluator = Evaluator(model, cfg, runtime, data_dir, manifest, objects=cfg.train.object_metrics) if validate else None
    loop = TrainLoop(cfg, ckpts, evaluator,
                     Logger(workdir, runtime.is_chief, total, start), optimizer, global_batch,
                     steps_per_epoch=max(1, manifest["train"]["records"] // global_batch),
                     average_statistics=lambda: runtime.average_replicas(stats), watchdog=watchdog,
                     weights_per_sample=cfg.train.loss == "weighted_ce" and not manifest.get("border_distances"),
                     patience=patience)
    try:
        loop.run(step_fn, lambda step: next_batch(batches[0], data_dir, manifest, step), start, total)
    finally:
        loop.logger.close()
        # The training iterator goes now, while its map calls in flight can finish. Whatever still
        # holds the lambda (a reference cycle) would keep it to the interpreter's last garbage
        # collection, where it waited at exit for a numpy_function call (the per-sample border
        # weight map) whose thread Python had already stopped: the process hung after its last line.
        batches.clear()
    wall = time.time() - loop.t_start
    last_eval, reached = loop.last_eval, loop.reached
    if not last_eval and start >= total and validate:
        watchdog.arm(start)  # no step to wait for: the evaluation's batches are the progress watched
        last_eval, _ = loop.evaluator(progress=watchdog.beat)
    input_wait = worst_over_processes(loop.input, runtime)
    gpu_peak = gpu_peak_over_processes(runtime)
    best = max(float(ckpts.best_iou.numpy()), monitored(cfg, last_eval)) if validate else None
    summary = {
        "steps": reached[0] if reached else loop.early_stop or total,
        "start_step": start,
        # train.monitor's best: the best checkpoint's (a rerun's evaluation of the last step counted);
        # best_val_iou is the same number where the monitor is val IoU, the default.
        "monitor": cfg.train.monitor,
        "best_monitored": best,
        "best_val_iou": best if cfg.train.monitor == "val_iou" else None,
        "final_val_iou": last_eval.get("val_iou"),
        "final_val_dice": last_eval.get("val_dice"),
        "final_val_loss": last_eval.get("val_loss"),
        "final_val_object_f1": last_eval.get("val_object_f1"),  # with train.object_metrics
        "wall_s": wall,  # this call's, as images_per_s
        # Over every call that trained the run: a resumed one's earlier calls up to its checkpoint.
        "run_wall_s": loop.prior_seconds + wall,
        "images_per_s": loop.images / wall if wall > 0 else 0.0,
        "world_size": runtime.world_size,
        "num_replicas": runtime.num_replicas,
        "global_batch_size": global_batch,
        "per_replica_batch_size": per_replica,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "learning_rate": peak_lr,
        "class_weights": None if class_w is None else [float(w) for w in class_w],
        "lr_scaling": cfg.optim.lr_scaling,
        "warmup_steps": cfg.optim.warmup_steps,
        "precision": cfg.runtime.precision,
        "allreduce_dtype": runtime.wire_dtype(),
        "xla": cfg.runtime.xla,
        "strategy": runtime.name,
        "skipped_steps": loop.guard.skipped,
        "lost_records": lost,
        "target_val_iou": cfg.train.target_val_iou,
        "target_reached_at_step": reached[0] if reached else None,
        "time_to_target_s": reached[1] if reached else None,
        "early_stopped_at_step": loop.early_stop,
        # The largest share of step time any process spent waiting for its next batch.
        "input_wait_fraction": input_wait,
        "input_bound": classify(input_wait),
        # The most GPU memory any process held at once (TensorFlow's allocator), MiB; None on CPUs.
        "gpu_peak_memory_mib": gpu_peak,
    }
    if runtime.is_chief and not keep:
        atomic_write_text(workdir / "summary.json", json.dumps(summary, indent=1))
        deep = ", deep supervision" if cfg.model.deep_supervision else ""
        plot_curves(workdir / "metrics.jsonl", workdir / "learning_curves.png", f"train loss ({cfg.train.loss}{deep})")
    ious = (f"final val IoU {summary['final_val_iou']:.4f}, best {_monitor_name(cfg)} {summary['best_monitored']:.4f}"
            if validate
            else "no validation split")
    runtime.print(f"train: done: {summary['steps']} steps, {ious}"
                  + (f", {summary['images_per_s']:.1f} images/s" if start < total else ", nothing left to train")
                  + (f" ({summary['input_bound']} input-bound: {input_wait:.0%} of step time waiting for data)"
                     if summary["input_bound"] in ("moderately", "highly") else "")
                  + (f", GPU memory peak {gpu_peak:,.0f} MiB" if gpu_peak is not None else "") + f"; results in {workdir}")
    runtime.barrier()
    return summary
