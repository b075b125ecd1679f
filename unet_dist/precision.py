"""Mixed precision: the Keras dtype policy (process-global, set here only) and loss scaling."""

from __future__ import annotations

import keras

from unet_dist.config import RuntimeConfig


def set_policy(precision: str) -> None:
    """Sets the global Keras dtype policy: float32, mixed_float16 or mixed_bfloat16.

    Call before building the model. Tests reset it to float32 in a fixture.
    """
    keras.mixed_precision.set_global_policy(precision)


def wrap_optimizer(optimizer: keras.optimizers.Optimizer, cfg: RuntimeConfig) -> keras.optimizers.Optimizer:
    """float16 needs dynamic loss scaling; bfloat16 has float32's range and does not."""
    if cfg.precision == "mixed_float16":
        # Dynamic scaling: the scale halves and the step is skipped when gradients overflow.
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def uses_loss_scale(optimizer: keras.optimizers.Optimizer) -> bool:
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
