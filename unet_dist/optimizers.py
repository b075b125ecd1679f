"""The optimizers, each variable updated by one of TensorFlow's fused training kernels.

Keras 3 writes every optimizer's update in backend-neutral ops: Adam is about ten small ops per
variable (powers, casts, three assigns), so the demo U-Net's 68 variables made about 700 ops a step,
each traced in Python and scheduled by the executor. TensorFlow has had one kernel per update rule
since tf.keras 2 used them (ResourceApplyAdam, ResourceApplyKerasMomentum, ResourceApplyRMSProp):
the same arithmetic in one op per variable. With them the demo's first train step (tracing
included) took 0.6 s less on our CPU, and each step after it 2-5% less (docs/benchmarks.md).

The classes below are Keras' own, with the same variables (so checkpoints are unchanged), the same
gradient clipping, loss scaling and weight decay (Keras applies those before `update_step`); only
`update_step` runs the fused kernel, where one exists for the configuration. Elsewhere (AMSGrad,
centred RMSprop, RMSprop without momentum, which has no momentum variable for the kernel to
write, sparse gradients) Keras' own update runs. The updates read Keras' lists of slot variables
(`_momentums`, `_velocities`, SGD's `momentums`), which are not public API: tests/test_optimizers.py
compares every rule with Keras' own, so a Keras release that changes them fails there.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from unet_dist.config import OptimConfig
from unet_dist.schedule import WarmupSchedule


def _handle(variable) -> tf.Tensor:
    """The resource handle of a Keras or TensorFlow variable. Inside a strategy's `update()` (where
    Keras runs `update_step` under tf.distribute) a mirrored variable gives this replica's copy."""
    return (variable.value if isinstance(variable, keras.Variable) else variable).handle


class _FusedAdamStep:
    """Adam's `update_step` as one ResourceApplyAdam per variable (Adam and AdamW share it)."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        i = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        # The same rule as keras.optimizers.Adam: lr_t = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t),
        # var -= lr_t * m / (sqrt(v) + epsilon).
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[i]), v=_handle(self._velocities[i]),
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))


@keras.saving.register_keras_serializable(package="unet_dist")
class Adam(_FusedAdamStep, keras.optimizers.Adam):
    """keras.optimizers.Adam with TensorFlow's fused update (ResourceApplyAdam)."""


@keras.saving.register_keras_serializable(package="unet_dist")
class AdamW(_FusedAdamStep, keras.optimizers.AdamW):
    """keras.optimizers.AdamW (decoupled weight decay, applied by Keras before the update) with
    TensorFlow's fused Adam update."""


@keras.saving.register_keras_serializable(package="unet_dist")
class SGD(keras.optimizers.SGD):
    """keras.optimizers.SGD with TensorFlow's fused updates: ResourceApplyKerasMomentum is Keras'
    own momentum rule (m = momentum * m - lr * g; var += m, or Nesterov's var += momentum * m - lr * g)."""

    def update_step(self, gradient, variable, learning_rate):
        if isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        lr, grad = tf.cast(learning_rate, dtype), tf.cast(gradient, dtype)
        if self.momentum == 0:
            tf.raw_ops.ResourceApplyGradientDescent(var=_handle(variable), alpha=lr, delta=grad)
            return
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(self.momentums[self._get_variable_index(variable)]), lr=lr,
            grad=grad, momentum=tf.cast(self.momentum, dtype), use_nesterov=self.nesterov)


@keras.saving.register_keras_serializable(package="unet_dist")
class RMSprop(keras.optimizers.RMSprop):
    """keras.optimizers.RMSprop with TensorFlow's fused update (ResourceApplyRMSProp) when it has
    momentum: ms = rho * ms + (1 - rho) * g^2; mom = momentum * mom + lr * g / sqrt(ms + epsilon);
    var -= mom, Keras' rule. Without momentum Keras keeps no momentum variable, so its update runs."""

    def update_step(self, gradient, variable, learning_rate):
        if self.momentum == 0 or self.centered or isinstance(gradient, tf.IndexedSlices):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        i = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyRMSProp(
            var=_handle(variable), ms=_handle(self._velocities[i]), mom=_handle(self._momentums[i]),
            lr=tf.cast(learning_rate, dtype), rho=tf.cast(self.rho, dtype), momentum=tf.cast(self.momentum, dtype),
            epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))


def build_optimizer(cfg: OptimConfig, peak_lr: float, total_steps: int) -> keras.optimizers.Optimizer:
    """The configured optimizer driven by the warmup + decay schedule."""
    lr = WarmupSchedule(peak_lr, total_steps, cfg.warmup_steps, cfg.schedule, cfg.end_learning_rate_factor,
                        cfg.power, tuple(cfg.step_boundaries), cfg.step_factor)
    common = {"learning_rate": lr, "clipnorm": cfg.clipnorm}
    if cfg.name == "sgd":
        return SGD(momentum=cfg.momentum, nesterov=cfg.nesterov, **common)
    if cfg.name == "rmsprop":
        return RMSprop(momentum=cfg.momentum, **common)
    if cfg.name == "adam":
        return Adam(**common)
    if cfg.name == "adamw":
        return AdamW(weight_decay=cfg.weight_decay, **common)
    raise ValueError(f"unknown optimizer {cfg.name!r}")
