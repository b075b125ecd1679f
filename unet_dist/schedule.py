"""Learning rate: the batch-size scaling rule, warmup, and decay (Goyal et al. 2017)."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from unet_dist.config import OptimConfig


def scaled_learning_rate(cfg: OptimConfig, global_batch_size: int) -> float:
    """learning_rate is for reference_batch_size; scale it to the run's global batch."""
    ratio = global_batch_size / cfg.reference_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.lr_scaling]
    return cfg.learning_rate * factor


@keras.saving.register_keras_serializable(package="unet_dist")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from peak/warmup_steps to `peak` over warmup_steps, then `decay`.

    decay: constant | cosine | polynomial | step, over the steps after warmup.
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, decay: str, end_factor: float = 0.0,
                 power: float = 1.0, boundaries: tuple[float, ...] = (), step_factor: float = 0.1):
        self.peak, self.total_steps, self.warmup_steps = float(peak), int(total_steps), int(warmup_steps)
        self.decay, self.end_factor, self.power = decay, float(end_factor), float(power)
        self.boundaries, self.step_factor = tuple(boundaries), float(step_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak = tf.constant(self.peak, tf.float32)
        decay_steps = float(max(1, self.total_steps - self.warmup_steps))
        t = tf.clip_by_value((step - self.warmup_steps) / decay_steps, 0.0, 1.0)  # progress after warmup
        end = peak * self.end_factor
        if self.decay == "cosine":
            lr = end + (peak - end) * 0.5 * (1.0 + tf.cos(math.pi * t))
        elif self.decay == "polynomial":
            lr = end + (peak - end) * tf.pow(1.0 - t, self.power)
        elif self.decay == "step":
            passed = tf.add_n([tf.cast(t >= b, tf.float32) for b in self.boundaries]) if self.boundaries else 0.0
            lr = peak * tf.pow(self.step_factor, passed)
        else:
            lr = peak
        if self.warmup_steps > 0:
            warm = peak * tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
            lr = tf.where(step < self.warmup_steps, warm, lr)
        return lr

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "decay": self.decay, "end_factor": self.end_factor, "power": self.power,
                "boundaries": list(self.boundaries), "step_factor": self.step_factor}
