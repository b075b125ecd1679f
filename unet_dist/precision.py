"""Mixed precision: which policy (runtime.precision, 'auto' resolved for this machine), the Keras
dtype policy (process-global, set here only) and loss scaling."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import keras

from unet_dist.config import RuntimeConfig

# x86: AVX512-BF16 (AMD Zen 4, Intel Cooper Lake) or AMX-BF16 (Intel Sapphire Rapids); Arm: BF16.
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_bf16_flag(cpuinfo: str | None = None) -> str | None:
    """The CPU feature that gives native bfloat16 arithmetic (oneDNN uses it), or None."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no way to tell here, so no
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = value.split()
            for flag in _BF16_FLAGS:
                if flag in flags:
                    return flag
            return None
    return None


@functools.cache
def _onednn_bf16_cpu() -> bool:
    """Whether this process computes on an x86 CPU with native bfloat16 (no GPU visible) through
    oneDNN (TensorFlow's default on x86 Linux, unless TF_ENABLE_ONEDNN_OPTS=0)."""
    import tensorflow as tf

    return (cpu_bf16_flag() in ("avx512_bf16", "amx_bf16") and os.environ.get("TF_ENABLE_ONEDNN_OPTS") != "0"
            and not tf.config.list_physical_devices("GPU"))


def bf16_batch_norm_kernel(channels: int) -> bool:
    """Whether bfloat16 activations of `channels` channels go straight into TensorFlow's fused batch
    norm kernel (`model.FusedBatchNorm`), rather than through float32 and back.

    oneDNN's bfloat16 kernel works on blocks of 16 channels. On an Intel Xeon with AMX (2-core VM,
    2026-12-03; forward and backward of one layer) it took 0.40-0.66x the time of float32 and back
    at 16 to 128 channels, and 7-22x the time at 8 and 24 (a slow path); on an AMD EPYC with
    avx512_bf16 and no AMX (2026-12-04) 0.48-0.68x at 16 to 128 and 7.2x at 8. With this rule the demo
    U-Net's step (16 to 256 channels) ran 1.41x faster, the paper's 1.14x (its first level, 8
    channels, stays in float32; fed bfloat16 there too, its step was 4x slower). Elsewhere (a GPU,
    Arm, oneDNN off) float32 and back, as before (docs/benchmarks.md).
    """
    return channels is not None and channels % 16 == 0 and _onednn_bf16_cpu()


def conv_bias_gradient_fused() -> bool:
    """Whether the bias gradient of a bfloat16 Conv2D is already summed in float32 in training.

    TensorFlow's own BiasAddGrad sums bfloat16 in bfloat16 on CPU (`model._bias_add`). On an x86
    CPU with oneDNN, in a tf.function that also takes the kernel's gradient (as every train step
    does), the graph rewrite folds it into the weight gradient's kernel
    (_MklNativeConv2DBackpropFilterWithBias), which sums in float32 (checked on an Intel Xeon with
    AMX; eager, or without the kernel's gradient, the sum stays in bfloat16). Summing it apart
    instead made the 2015 U-Net's step 1.15x slower there, so Conv2D keeps Keras' bias where this
    holds. Transposed convolutions get no such kernel.
    """
    return _onednn_bf16_cpu()


def batch_norm_dtype(channels: int) -> str | None:
    """The dtype policy of a batch norm of `channels` channels and the ReLU after it: None (the
    global one) or "float32".

    Under mixed_bfloat16 on a CPU where batch norm cannot take these channels in bfloat16
    (`bf16_batch_norm_kernel`), it computes in float32 anyway. Running the ReLU after it in float32
    too lets TensorFlow fuse the two into one kernel (_FusedBatchNormEx), and the ReLU's gradient
    runs on float32; before, the ReLU ran alone on bfloat16, forward and backward. The convolutions
    stay in bfloat16: the next one casts. The paper's U-Net (8 channels at its first level) then
    trained 1.13x faster on an Intel Xeon with AMX (docs/benchmarks.md). Variables are float32
    under every policy, so checkpoints do not change.
    """
    if keras.mixed_precision.global_policy().name != "mixed_bfloat16" or not _onednn_bf16_cpu():
        return None
    return None if bf16_batch_norm_kernel(channels) else "float32"


def resolve(cfg: RuntimeConfig) -> str | None:
    """Replaces runtime.precision 'auto' with this machine's policy; returns why (None when the
    config named a policy itself, which is kept).

    auto: mixed_float16 on a GPU with tensor cores (compute capability 7.0 or later), loss scaled;
    mixed_bfloat16 on a CPU with native bfloat16 instructions; float32 otherwise. On the 2-core
    VMs of docs/benchmarks.md the demo model's step ran 1.57x faster in mixed_bfloat16 on an AMD
    EPYC with avx512_bf16 and 0.65x as fast on an Intel Xeon without it (emulated conversions).
    Each process resolves for its own machine: a checkpoint resumes under any precision.
    """
    if cfg.precision != "auto":
        return None
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability") or (0, 0)
        if tuple(cc) >= (7, 0):
            cfg.precision = "mixed_float16"
            return f"auto: a GPU of compute capability {cc[0]}.{cc[1]} (tensor cores)"
        cfg.precision = "float32"
        return f"auto: a GPU of compute capability {cc[0]}.{cc[1]}, before tensor cores"
    flag = cpu_bf16_flag()
    if flag:
        cfg.precision = "mixed_bfloat16"
        return f"auto: no GPU; the CPU has {flag}"
    cfg.precision = "float32"
    return f"auto: no GPU; the CPU ({platform.machine()}) has no native bfloat16"


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
