"""The U-Net (Ronneberger et al. 2015) and the paper's smaller Keras variant; no distribution here."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from unet_dist.config import ModelConfig
from unet_dist.precision import batch_norm_dtype, bf16_batch_norm_kernel, conv_bias_gradient_fused
from unet_dist.shapes import check_input_size, output_size

_HEAD = "aux"  # the name prefix of deep supervision's head layers
INPUT_CONV = "down0_conv0"  # the convolution that takes the image: kernel (3, 3, in_channels, base_filters)


def build_unet(cfg: ModelConfig, input_size: tuple[int, int] | None = None) -> keras.Model:
    """Builds a U-Net.

    Args:
      cfg: depth (number of 2x poolings), base_filters (doubled at each level down), padding
        ('same', or 'valid' for the unpadded 2015 network), norm (batch, instance or none), dropout (before the
        bottleneck), upsample ('transpose' or 'bilinear' + 2x2 conv), up_filters (widths of the
        up-convolutions, deepest first; default the width of the level they lead to), num_classes,
        deep_supervision (heads on decoder levels 1..depth-2 as well; see Output).
      input_size: (H, W) the model is built for; None builds a fully convolutional model that takes
        any size satisfying the constraint below (used for prediction and export).

    Input: (B, H, W, cfg.in_channels) float in [0, 1]. Output: (B, H', W', 1) sigmoid probabilities when
    num_classes == 2, else (B, H', W', num_classes) softmax probabilities, always float32 whatever
    the precision policy (so losses and metrics are computed in float32). With deep_supervision,
    a list: that output, then the same probabilities from heads on decoder levels 1..depth-2,
    (B, H / 2^l, W / 2^l, U) for level l (training's loss; `main_output` drops them).
    Constraints: with padding='same', H and W divisible by 2^depth and (H', W') == (H, W). With
    'valid', every size reaching a pooling must be even; H' = H - 184 at depth 4 (572 -> 388), see
    `unet_dist.shapes.output_size`; skip connections are centre-cropped to match.

    Example: build_unet(ModelConfig(depth=4, base_filters=64, padding="valid"), (572, 572)).

    Raises:
      ValueError: bad arguments, before any layer is built.
    """
    if cfg.depth < 1:
        raise ValueError(f"depth must be >= 1, got {cfg.depth}")
    if cfg.base_filters < 1:
        raise ValueError(f"base_filters must be >= 1, got {cfg.base_filters}")
    if cfg.padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {cfg.padding!r}")
    if cfg.upsample not in ("transpose", "bilinear"):
        raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {cfg.upsample!r}")
    if cfg.num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (2 = binary), got {cfg.num_classes}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    widths = [cfg.base_filters * 2**level for level in range(cfg.depth + 1)]
    up_filters = cfg.up_filters or widths[-2::-1]
    if len(up_filters) != cfg.depth:
        raise ValueError(f"up_filters needs {cfg.depth} widths (one per level), got {len(up_filters)}")
    if input_size is not None:
        check_input_size(tuple(input_size), cfg.depth, cfg.padding)

    if cfg.in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {cfg.in_channels}")
    shape = (None, None, cfg.in_channels) if input_size is None else (*input_size, cfg.in_channels)
    inputs = keras.Input(shape=shape, name="image")
    x = inputs
    skips = []
    for level in range(cfg.depth):
        x = _conv_block(x, widths[level], cfg, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"down{level}_pool")(x)
    if cfg.dropout:
        x = layers.Dropout(cfg.dropout, name="bottleneck_dropout")(x)
    x = _conv_block(x, widths[cfg.depth], cfg, "bottleneck")
    aux = {}  # level -> decoder output, for deep supervision
    for i, level in enumerate(reversed(range(cfg.depth))):
        name = f"up{level}"
        if cfg.upsample == "transpose":
            x = Conv2DTranspose(up_filters[i], 2, strides=2, name=f"{name}_upconv")(x)
        else:
            x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_upsample")(x)
            x = Conv2D(up_filters[i], 2, padding="same", name=f"{name}_upconv")(x)
        skip = skips[level]
        if cfg.padding == "valid":
            skip = CenterCrop2D(name=f"{name}_crop")([skip, x])
        x = layers.Concatenate(name=f"{name}_concat")([skip, x])
        x = _conv_block(x, widths[level], cfg, name)
        aux[level] = x
    units = 1 if cfg.num_classes == 2 else cfg.num_classes
    act = "sigmoid" if units == 1 else "softmax"
    # The head computes in float32 under any mixed-precision policy: the loss needs stable logs.
    logits = layers.Conv2D(units, 1, dtype="float32", name="logits")(x)
    outputs = layers.Activation(act, dtype="float32", name="probs")(logits)
    if cfg.deep_supervision:
        outputs = [outputs] + [
            layers.Activation(act, dtype="float32", name=f"{_HEAD}{level}_probs")(
                layers.Conv2D(units, 1, dtype="float32", name=f"{_HEAD}{level}_logits")(aux[level]))
            for level in supervised_levels(cfg)[1:]]
    model = keras.Model(inputs, outputs, name="unet")
    if input_size is not None:
        expect = output_size(tuple(input_size), cfg.depth, cfg.padding)
        assert tuple(main_output(model).output_shape[1:3]) == expect, (model.output_shape, expect)
    return model


def is_deep_supervision_head(layer: keras.layers.Layer) -> bool:
    """Whether `layer` is part of a deep-supervision head (training's alone; `main_output` leaves
    them out, and `checkpoint.init_weights` lets them start new)."""
    return layer.name.startswith(_HEAD)


def supervised_levels(cfg: ModelConfig) -> list[int]:
    """The decoder levels training's loss sees: 0 (the output) alone, or with deep_supervision
    0..depth-2, as nnU-Net (whose lowest output's weight is 0). Level l is 2^l times coarser."""
    return list(range(cfg.depth - 1)) if cfg.deep_supervision else [0]


def main_output(model: keras.Model) -> keras.Model:
    """`model` with its first output alone (the same layers and variables): what evaluation,
    prediction and export run. A model without deep supervision is returned as it is."""
    if len(model.outputs) == 1:
        return model
    return keras.Model(model.input, model.outputs[0], name=model.name)


def moving_statistics(model: keras.Model) -> list:
    """Batch norm's moving means and variances (float32 vectors of channels). Each replica updates
    its own copy from its own batch (model.sync_batch_norm off), so the copies drift apart."""
    return [v for v in model.non_trainable_variables if v.name in ("moving_mean", "moving_variance")]


def adapt_input_kernel(kernel: np.ndarray, channels: int) -> np.ndarray:
    """The input convolution's kernel (kh, kw, S, F), trained on images of S channels, for images of
    `channels` (fine-tuning on other data: an RGB model on gray EM slices or on RGB + near-infrared).

    To one channel: the sum over the S channels, so a gray image gives exactly the response its
    S-channel copy (equal channels, as `convert` reads a gray image into RGB) gave. To C channels:
    the S channels' weights repeated in turn, scaled by S / C, so that inputs of like statistics
    give activations of the same size (the rule timm applies to pretrained PyTorch models).
    """
    if channels == 1:
        return kernel.sum(axis=2, keepdims=True)
    s = kernel.shape[2]
    return np.tile(kernel, (1, 1, -(-channels // s), 1))[:, :, :channels] * (s / channels)


def _conv_block(x, filters: int, cfg: ModelConfig, name: str):
    # Batch norm and its ReLU in float32 where batch norm cannot take bfloat16 on this CPU (so the
    # two fuse); None elsewhere: the global policy.
    norm_dtype = batch_norm_dtype(filters) if cfg.norm == "batch" else None
    for j in range(2):
        x = Conv2D(filters, 3, padding=cfg.padding, use_bias=cfg.norm == "none",
                   kernel_initializer="he_normal", name=f"{name}_conv{j}")(x)
        if cfg.norm == "batch":
            x = FusedBatchNorm(momentum=cfg.bn_momentum, name=f"{name}_bn{j}", dtype=norm_dtype)(x)
        elif cfg.norm == "instance":
            # Each image's channels normalised by their own mean and variance over (H, W), as
            # nnU-Net and MONAI do (PyTorch's epsilon): the same in training and prediction at any
            # batch size or number of replicas, with no moving statistics. Keras' group norm with a
            # group per channel, which computes its statistics in float32 under mixed precision.
            x = layers.GroupNormalization(groups=-1, epsilon=1e-5, name=f"{name}_in{j}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{j}", dtype=norm_dtype)(x)
    return x


@tf.custom_gradient
def _bias_add(x, bias):
    """tf.nn.bias_add of (..., C) and (C,), whose bias gradient is summed in float32.

    TensorFlow's CPU BiasAddGrad sums bfloat16 in bfloat16 (tensorflow/tensorflow#86378): a sum
    stops growing once its own spacing exceeds what is added to it, so an up-convolution's bias
    gradient over a batch of 256x256 outputs came out as 256 where it was 1,048,576 (0.5 each).
    The reduce_sum is also 3-4x faster than that kernel at 2 and 4 channels (timed alone).
    """

    def grad(dy):
        db = tf.reduce_sum(tf.cast(dy, tf.float32), axis=list(range(dy.shape.rank - 1)))
        return dy, tf.cast(db, bias.dtype)

    return tf.nn.bias_add(x, bias), grad


class _BiasGradientInFloat32:
    """Keras' convolution, except that under a bfloat16 compute dtype its bias is added by
    `_bias_add` (where `_own_bias_gradient` says so). Same variables, checkpoints and forward
    values; channels last only."""

    def call(self, inputs):
        if (not self.use_bias or self.compute_dtype != "bfloat16" or self.data_format != "channels_last"
                or not self._own_bias_gradient()):
            return super().call(inputs)
        y = self._unbiased(inputs)
        return self.activation(_bias_add(y, tf.cast(keras.ops.convert_to_tensor(self.bias), y.dtype)))


@keras.saving.register_keras_serializable(package="unet_dist")
class Conv2D(_BiasGradientInFloat32, layers.Conv2D):
    """keras.layers.Conv2D with the bias gradient of `_BiasGradientInFloat32` where TensorFlow does
    not already sum it in float32 (`precision.conv_bias_gradient_fused`)."""

    def _own_bias_gradient(self) -> bool:
        return not conv_bias_gradient_fused()

    def _unbiased(self, inputs):
        return self.convolution_op(inputs, self.kernel)


@keras.saving.register_keras_serializable(package="unet_dist")
class Conv2DTranspose(_BiasGradientInFloat32, layers.Conv2DTranspose):
    """keras.layers.Conv2DTranspose with the bias gradient of `_BiasGradientInFloat32`."""

    def _own_bias_gradient(self) -> bool:
        return True

    def _unbiased(self, inputs):
        return keras.ops.conv_transpose(inputs, self.kernel, strides=list(self.strides), padding=self.padding,
                                        output_padding=self.output_padding, dilation_rate=self.dilation_rate,
                                        data_format=self.data_format)


@keras.saving.register_keras_serializable(package="unet_dist")
class FusedBatchNorm(layers.BatchNormalization):
    """BatchNormalization over the channels of (B, H, W, C) with TensorFlow's fused kernel.

    Keras 3 normalises with separate moments and arithmetic ops; TensorFlow's FusedBatchNormV3
    (oneDNN on CPU, cuDNN on GPU) does the same in one kernel forward and one backward, which made
    the paper's model train about twice as fast on our CPU (docs/benchmarks.md). Same variables,
    same checkpoints, same moving-average rule (moving = momentum * moving + (1 - momentum) * batch),
    except that the batch variance fed to it is the unbiased one (n / (n - 1)), as in tf.keras 2.

    Synchronized (model.sync_batch_norm): when `replica_sum` is set, training uses the statistics of
    the global batch. `replica_sum(list of tensors) -> list` sums tensors over every replica of the
    step and passes gradients back the same way (`Runtime.replica_sum`); the trainer sets it, and
    it is not saved with the model (prediction uses the moving statistics). Keras' own
    `synchronized=True` works under tf.distribute only; this works under every backend.
    """

    replica_sum = None

    def call(self, inputs, training=None, mask=None):
        if self.axis not in (-1, 3) or len(inputs.shape) != 4 or self.synchronized:
            return super().call(inputs, training=training, mask=mask)
        x = inputs
        if x.dtype != tf.float16 and not (x.dtype == tf.bfloat16 and bf16_batch_norm_kernel(x.shape[-1])):
            # float16 has a fused kernel of its own, and so has bfloat16 on a CPU with native
            # bfloat16, but there only for multiples of 16 channels: fed 8 it made the pets_seed step
            # 2-4x slower (docs/benchmarks.md). Otherwise it goes through float32 and back: the casts
            # cost ~11% of that step.
            x = tf.cast(x, tf.float32)
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([x.shape[-1]], tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([x.shape[-1]], tf.float32)
        if training and self.replica_sum is not None:
            # float32 moments also under mixed_float16: they are weighted by the count of values per
            # channel (n = 524,288 for 8 images of 256x256) and summed over replicas, far past
            # float16's largest value (65504).
            y = self._global_batch_norm(tf.cast(x, tf.float32), gamma, beta)
        elif training:
            y, mean, var = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=self.epsilon,
                                                            data_format="NHWC", is_training=True)
            self._update_moving(mean, var)
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32), epsilon=self.epsilon, data_format="NHWC",
                is_training=False)
        return tf.cast(y, self.compute_dtype)

    def _update_moving(self, mean: tf.Tensor, unbiased_var: tf.Tensor) -> None:
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + tf.cast(mean, self.moving_mean.dtype) * (1 - m))
        self.moving_variance.assign(
            self.moving_variance * m + tf.cast(unbiased_var, self.moving_variance.dtype) * (1 - m))

    def _global_batch_norm(self, x: tf.Tensor, gamma: tf.Tensor, beta: tf.Tensor) -> tf.Tensor:
        """x (B, H, W, C) float32 normalised with the mean and variance of every replica's (B, H, W),
        combined from each replica's own moments in one collective (Chan et al.'s pairwise rule):
        sums of n * mean, of n * variance and of n * mean^2, so the only cancellation left is in
        the spread of the replicas' means, not in a float32 sum of squares of the whole batch."""
        local_mean, local_var = tf.nn.moments(x, axes=[0, 1, 2])
        k = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)  # this replica's values per channel
        sum_mean, sum_var, sum_mean_sq, n = self.replica_sum(
            [k * local_mean, k * local_var, k * tf.square(local_mean), k])
        mean = sum_mean / n
        var = tf.maximum(sum_var / n + (sum_mean_sq / n - tf.square(mean)), 0.0)
        self._update_moving(mean, var * n / tf.maximum(n - 1.0, 1.0))
        return tf.nn.batch_normalization(x, mean, var, beta, gamma, self.epsilon)


@keras.saving.register_keras_serializable(package="unet_dist")
class CenterCrop2D(layers.Layer):
    """Crops the first input (B, H, W, C) to the spatial size of the second (B, h, w, C'), centred."""

    def call(self, inputs):
        big, ref = inputs
        shape, target = keras.ops.shape(big), keras.ops.shape(ref)
        dh = (shape[1] - target[1]) // 2
        dw = (shape[2] - target[2]) // 2
        return big[:, dh : dh + target[1], dw : dw + target[2], :]

    def compute_output_shape(self, input_shapes):
        big, ref = input_shapes
        return (big[0], ref[1], ref[2], big[3])
