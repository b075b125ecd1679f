"""Chief-only outputs: progress bar, metrics.jsonl, TensorBoard scalars and image panels, plots.

Off the chief every method is a no-op, so the trainer never asks who it is.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from unet_dist.atomic import atomic_write_text
from unet_dist.config import OBJECT_MONITORS
from unet_dist.data.convert import IGNORE
from unet_dist.data.imageio import rgb_view
from unet_dist.progress import progress, terminal_bar, time_left


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write
                continue
    return rows


def chief_progress(runtime, prog: str, unit: str, iterable=None, total: int | None = None):
    """`progress` (over `iterable`, or of `total` updates) on the chief alone, as training's own.
    With N processes it counts the chief's share, which the split makes about 1/N of the work,
    finishing with the others'."""
    desc = prog if runtime.world_size == 1 else f"{prog} (rank 0's share)"
    return progress(iterable, total, desc, unit, shown=runtime.is_chief)


class Logger:
    def __init__(self, workdir: Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.workdir = Path(workdir)
        self.metrics_path = self.workdir / "metrics.jsonl"
        self._bar = None
        self._writer = None
        self._file = None
        if not enabled:
            return
        # Resuming at step s: drop events logged after s by the run that stopped, so the steps in
        # metrics.jsonl run on without a gap or a repeat.
        rows = [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= start_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
        self._file = self.metrics_path.open("a", buffering=1)
        self._writer = tf.summary.create_file_writer(str(self.workdir / "tensorboard"))
        self._bar = terminal_bar(True, total=total_steps, initial=start_step, unit="step")
        self._since: tuple[float, int] | None = None  # the first train event's (time, step), for the time left

    def _write(self, event: dict) -> None:
        self._file.write(json.dumps(event) + "\n")

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def train(self, step: int, epoch: int, loss: float, lr: float, images_per_s: float,
              input_wait: float | None = None) -> None:
        """input_wait: the share of the steps' time since the last event spent waiting for batches
        (input_bound.InputClock), None when no step was timed."""
        if not self.enabled:
            return
        self._write({"event": "train", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                     "images_per_s": images_per_s, "input_wait": input_wait, "time": time.time()})
        with self._writer.as_default(step=step):
            tf.summary.scalar("train/loss", loss)
            tf.summary.scalar("train/lr", lr)
            tf.summary.scalar("train/images_per_s", images_per_s)
            if input_wait is not None:
                tf.summary.scalar("train/input_wait", input_wait)
        if not self._bar.disable:
            self._bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}", refresh=False)
        else:  # a log file (a batch job's, horovodrun's): no bar to carry them, so a line each
            wait = "" if input_wait is None else f"  input_wait {input_wait:.0%}"
            # The time left at the rate since the first event (evaluations and checkpoints included;
            # the first window also holds the step's tracing, which would overstate it).
            eta, now = "", time.time()
            if self._since is None:
                self._since = (now, step)
            elif step > self._since[1]:
                eta = f"  eta {time_left(now - self._since[0], step - self._since[1], self._bar.total - step)}"
            self.message(f"step {step}/{self._bar.total}: loss {loss:.4f}  lr {lr:.3g}  "
                         f"images_per_s {images_per_s:.1f}{wait}{eta}")

    def eval(self, step: int, m: dict) -> None:
        if not self.enabled:
            return
        self._write({"event": "eval", "step": step, **m})
        with self._writer.as_default(step=step):
            for k, v in m.items():
                if isinstance(v, float):
                    tf.summary.scalar(f"val/{k.removeprefix('val_')}", v)
        self.message(f"step {step}: val_loss {m['val_loss']:.4f}  val_iou {m['val_iou']:.4f}  "
                     f"val_dice {m['val_dice']:.4f}  val_pixel_acc {m['val_pixel_acc']:.4f}"
                     + "".join(f"  {k} {m[k]:.4f}" for k in OBJECT_MONITORS if m.get(k) is not None))

    def images(self, step: int, panel: np.ndarray) -> None:
        """panel: (N, h, 4w, 3) uint8 rows of input | truth | prediction | overlay."""
        if not self.enabled or panel.size == 0:
            return
        with self._writer.as_default(step=step):
            tf.summary.image("val/input_truth_prediction_overlay", panel, max_outputs=len(panel))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None and not self._bar.disable:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._writer.flush()
        self._file.close()


def panel_rows(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, H, W, C) float images, (N, h, w) truth and prediction ids -> (N, h, 4w, 3) uint8 panels.

    Images are centre-cropped to the label size (valid padding). Class ids are shades of gray, and
    truth pixels that are not labelled (IGNORE) blue. The overlay tints predicted foreground, like
    the paper's PlotLearning callback.
    """
    img = shown_images(images, truth.shape[1:3])
    return np.concatenate([img, class_shades(truth, num_classes), class_shades(pred, num_classes),
                           tinted(img, pred > 0)], axis=2)


def shown_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, H, W, C) float images in [0, 1] -> (N, h, w, 3) uint8, centre-cropped to the label size
    (h, w) (valid padding) and shown as RGB (`rgb_view`)."""
    (H, W), (h, w) = images.shape[1:3], size
    top, left = (H - h) // 2, (W - w) // 2
    return (np.clip(rgb_view(images[:, top : top + h, left : left + w]), 0, 1) * 255).astype(np.uint8)


def class_shades(ids: np.ndarray, num_classes: int) -> np.ndarray:
    """(..., h, w) class ids -> (..., h, w, 3) uint8: shades of gray from black (class 0) to white,
    and blue where a pixel is not labelled (IGNORE, convert --ignore-value)."""
    scale = 255 // max(1, num_classes - 1)
    out = np.repeat((ids.astype(np.int32) * scale).clip(0, 255).astype(np.uint8)[..., None], 3, -1)
    out[ids == IGNORE] = (90, 90, 200)  # pixels left out of the loss and metrics
    return out


def tinted(img: np.ndarray, where: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) images with the pixels `where` (...) half red."""
    out = img.copy()
    out[where] = (0.5 * out[where] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
    return out


def plot_curves(metrics_path: Path, out_png: Path, train_loss: str = "train loss") -> None:
    """Loss and validation IoU against step, from metrics.jsonl. `train_loss`: the train curve's
    label (what the loss is); the val curve is always cross-entropy (the Evaluator's val_loss)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    tr = [r for r in rows if r.get("event") == "train"]
    ev = [r for r in rows if r.get("event") == "eval"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in tr], [r["loss"] for r in tr], label=train_loss)
    a.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val cross-entropy")
    a.set_xlabel("step")
    a.set_yscale("log")
    a.legend()
    b.plot([r["step"] for r in ev], [r["val_iou"] for r in ev], "o-", label="val IoU")
    b.plot([r["step"] for r in ev], [r["val_dice"] for r in ev], "s-", label="val Dice")
    b.set_xlabel("step")
    b.set_ylim(0, 1)
    b.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
