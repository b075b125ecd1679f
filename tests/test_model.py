import re

import keras
import numpy as np
import pytest

from unet_dist.config import ModelConfig
from unet_dist.model import build_unet
from unet_dist.shapes import output_size


@pytest.mark.parametrize(
    "padding, depth, size, classes, upsample",
    [
        ("same", 1, (32, 48), 2, "transpose"),
        ("same", 2, (64, 64), 3, "bilinear"),
        ("same", 3, (64, 128), 5, "transpose"),
        ("same", 4, (64, 64), 2, "bilinear"),
        ("valid", 1, (44, 44), 2, "transpose"),  # 44 -> 40 -> 20 -> 16 -> 32 -> 28
        ("valid", 2, (92, 76), 3, "transpose"),
        ("valid", 3, (140, 140), 2, "bilinear"),
        ("valid", 4, (188, 188), 4, "transpose"),
    ],
)
def test_output_shapes(padding, depth, size, classes, upsample):
    cfg = ModelConfig(depth=depth, base_filters=2, padding=padding, num_classes=classes, upsample=upsample,
                      norm=("batch" if depth % 2 == 0 else "none"), dropout=0.1 if depth == 3 else 0.0)
    model = build_unet(cfg, size)
    x = np.random.default_rng(0).random((2, *size, 3), np.float32)
    y = model(x, training=False).numpy()
    units = 1 if classes == 2 else classes
    assert y.shape == (2, *output_size(size, depth, padding), units)
    assert y.dtype == np.float32
    if units == 1:
        assert ((y >= 0) & (y <= 1)).all()
    else:
        np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-5)
    if padding == "same":
        assert y.shape[1:3] == size


def test_ronneberger_tile_is_572_to_388():
    assert output_size((572, 572), 4, "valid") == (388, 388)


def test_pets_seed_architecture():
    cfg = ModelConfig(depth=6, base_filters=8, up_filters=[64, 32, 16, 8, 4, 2])
    model = build_unet(cfg, (256, 256))
    ups = [layer.filters for layer in model.layers if layer.name.endswith("_upconv")]
    assert ups == [64, 32, 16, 8, 4, 2]
    assert model.get_layer("bottleneck_conv0").filters == 8 * 2**6


def test_fully_convolutional_without_input_size():
    model = build_unet(ModelConfig(depth=2, base_filters=2))
    assert model(np.zeros((1, 32, 48, 3), np.float32)).shape == (1, 32, 48, 1)


def test_head_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_unet(ModelConfig(depth=2, base_filters=2), (32, 32))
    assert model.get_layer("down0_conv0").compute_dtype == "bfloat16"
    assert model(np.zeros((1, 32, 32, 3), np.float32)).dtype == "float32"


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_instance_norm_normalises_each_image_on_its_own(policy):
    # model.norm instance: each image's channels by their own statistics, so an image's output does
    # not depend on the batch it came in, training or not, and there are no moving statistics.
    keras.mixed_precision.set_global_policy(policy)
    model = build_unet(ModelConfig(depth=2, base_filters=4, norm="instance"), (32, 32))
    assert not model.non_trainable_variables
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.GroupNormalization)]
    assert len(norms) == 2 * 5 and all(layer.groups == layer.gamma.shape[0] for layer in norms)
    assert not any(layer.bias is not None for layer in model.layers if layer.name.endswith(("_conv0", "_conv1")))
    x = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
    alone = np.concatenate([np.asarray(model(x[i:i + 1], training=True)) for i in range(3)])
    tol = 1e-5 if policy == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(model(x, training=True)), alone, atol=tol)
    np.testing.assert_allclose(np.asarray(model(x, training=False)), alone, atol=tol)


@pytest.mark.parametrize("onednn_fuses", [None, False])
@pytest.mark.parametrize("upsample", ["transpose", "bilinear"])
def test_bias_gradients_under_bfloat16_are_summed_in_float32(upsample, onednn_fuses, monkeypatch):
    # TensorFlow's CPU BiasAddGrad sums bfloat16 in bfloat16: a sum of 0.5s stops at 256. Every
    # layer with a bias (convolutions without batch norm, up-convolutions) must get the true sum in
    # a tf.function that also takes the kernel's gradient, as a train step does: Conv2D where
    # oneDNN's fused kernel sums it (None: as this machine decides) and where it does not (False),
    # transposed convolutions everywhere.
    import tensorflow as tf

    import unet_dist.precision

    if onednn_fuses is not None:
        monkeypatch.setattr(unet_dist.precision, "_onednn_bf16_cpu", lambda: onednn_fuses)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_unet(ModelConfig(depth=1, base_filters=2, norm="none", upsample=upsample), (64, 64))
    biased = [layer for layer in model.layers
              if getattr(layer, "bias", None) is not None and layer.compute_dtype == "bfloat16"]
    assert {"down0_conv0", "bottleneck_conv1", "up0_upconv", "up0_conv1"} <= {layer.name for layer in biased}
    for layer in biased:
        @tf.function
        def gradients(x, dy, layer=layer):  # dy an argument: a constant one would be folded away
            with tf.GradientTape() as tape:
                y = layer(x)
            return tape.gradient(y, [layer.kernel, layer.bias], output_gradients=dy)  # the kernel's too

        x = tf.random.uniform((4, *layer.input.shape[1:]))
        y = layer(x)
        _, grad = gradients(x, tf.fill(y.shape, tf.constant(0.5, y.dtype)))
        np.testing.assert_allclose(grad.numpy(), 0.5 * np.prod(y.shape[:-1]), rtol=2**-8, err_msg=layer.name)


@pytest.mark.parametrize("onednn_bf16", [True, False])
def test_batch_norm_and_its_relu_run_in_float32_where_batch_norm_cannot_take_bfloat16(onednn_bf16, monkeypatch):
    # On a CPU computing bfloat16 through oneDNN, batch norm of 8 channels (not a multiple of 16)
    # computes in float32; its ReLU stays in float32 with it, so the two fuse. 16 channels and
    # every convolution stay in bfloat16; on other machines the whole block follows the policy.
    import tensorflow as tf

    import unet_dist.precision

    monkeypatch.setattr(unet_dist.precision, "_onednn_bf16_cpu", lambda: onednn_bf16)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_unet(ModelConfig(depth=1, base_filters=8), (16, 16))
    dtype = {layer.name: layer.compute_dtype for layer in model.layers}
    eight = "float32" if onednn_bf16 else "bfloat16"
    assert dtype["down0_bn0"] == dtype["down0_relu1"] == dtype["up0_bn0"] == dtype["up0_relu1"] == eight
    assert dtype["bottleneck_bn0"] == dtype["bottleneck_relu1"] == "bfloat16"  # 16 channels
    assert dtype["down0_conv0"] == dtype["up0_conv1"] == dtype["up0_upconv"] == "bfloat16"
    x = np.random.default_rng(0).random((2, 16, 16, 3), np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None and np.isfinite(g.numpy()).all() for g in grads)


@pytest.mark.parametrize(
    "kwargs, size, words",
    [
        ({"depth": 0}, None, "depth"),
        ({"base_filters": 0}, None, "base_filters"),
        ({"padding": "reflect"}, None, "padding"),
        ({"upsample": "nearest"}, None, "upsample"),
        ({"num_classes": 1}, None, "num_classes"),
        ({"dropout": 1.0}, None, "dropout"),
        ({"depth": 2, "up_filters": [4]}, None, "up_filters"),
        ({"depth": 3}, (60, 64), "divisible by 2^depth = 8"),
        ({"depth": 2, "padding": "valid"}, (90, 90), "valid padding"),
    ],
)
def test_bad_arguments_raise_before_building(kwargs, size, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        build_unet(ModelConfig(**kwargs), size)


@pytest.mark.parametrize("policy, channels", [("float32", 5), ("mixed_bfloat16", 5), ("mixed_bfloat16", 16)])
def test_fused_batch_norm_matches_keras_batch_norm(policy, channels, monkeypatch):
    import tensorflow as tf

    import unet_dist.precision
    from unet_dist.model import FusedBatchNorm

    # bfloat16 goes into the fused kernel as it is at 16 channels on a CPU where that is fast
    # (precision.bf16_batch_norm_kernel), through float32 otherwise: both paths, on any machine.
    monkeypatch.setattr(unet_dist.precision, "_onednn_bf16_cpu", lambda: True)
    keras.mixed_precision.set_global_policy(policy)
    x = np.random.default_rng(0).normal(2.0, 3.0, (4, 8, 8, channels)).astype(np.float32)
    ours, ref = FusedBatchNorm(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
    ours.build(x.shape)
    ref.build(x.shape)
    for layer in (ours, ref):
        layer.gamma.assign(np.linspace(0.5, 1.5, channels))
        layer.beta.assign(np.linspace(-1, 1, channels))
    graph = tf.function(lambda v: ours(v, training=True)).get_concrete_function(
        tf.TensorSpec(x.shape, ours.compute_dtype)).graph
    kernel = [op.get_attr("T") for op in graph.get_operations() if op.type == "FusedBatchNormV3"]
    assert kernel == [tf.bfloat16 if policy == "mixed_bfloat16" and channels == 16 else tf.float32]
    tol = 1e-4 if policy == "float32" else 3e-2
    for _ in range(3):  # training mode, and the moving statistics it leaves behind
        np.testing.assert_allclose(np.asarray(ours(x, training=True), np.float32),
                                   np.asarray(ref(x, training=True), np.float32), atol=tol, rtol=tol)
    np.testing.assert_allclose(ours.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-4)
    n = x.size // channels  # the fused kernel keeps the unbiased variance, Keras the biased one
    np.testing.assert_allclose(ours.moving_variance.numpy(), 0.9**3 + (ref.moving_variance.numpy() - 0.9**3) * n / (n - 1),
                               rtol=1e-3)
    np.testing.assert_allclose(np.asarray(ours(x, training=False), np.float32),
                               np.asarray(ref(x, training=False), np.float32), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_synchronized_batch_norm_on_one_replica_matches_the_fused_kernel(policy):
    # model.sync_batch_norm combines every replica's moments (one collective); on one replica it
    # must give what the fused kernel gives: output, gradients, moving statistics. mixed_float16
    # is the GPU precision: its float16 activations must reach the collective as float32.
    import tensorflow as tf

    from unet_dist.model import FusedBatchNorm

    keras.mixed_precision.set_global_policy(policy)
    dtype = keras.mixed_precision.dtype_policy().compute_dtype
    x = tf.cast(np.random.default_rng(1).normal(2.0, 3.0, (4, 8, 8, 5)).astype(np.float32), dtype)
    fused, synced = FusedBatchNorm(momentum=0.9), FusedBatchNorm(momentum=0.9)
    calls = []
    synced.replica_sum = lambda ts: calls.append(len(ts)) or list(ts)
    upstream = tf.cast(np.random.default_rng(2).normal(size=(4, 8, 8, 5)).astype(np.float32), dtype)
    results = []
    for layer in (fused, synced):
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 1.5, 5))
        layer.beta.assign(np.linspace(-1, 1, 5))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        results.append([y, *tape.gradient(loss, [x, layer.gamma, layer.beta])])
    assert calls == [4]  # the moments and the count in one collective
    # 16-bit outputs and input gradients are rounded to 8 (bfloat16) or 11 (float16) bits.
    tol = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}[dtype]
    for a, b, name in zip(*results, ["output", "d/dx", "d/dgamma", "d/dbeta"], strict=True):
        assert b.dtype == a.dtype, name
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32), rtol=tol, atol=tol,
                                   err_msg=name)
    np.testing.assert_allclose(synced.moving_mean.numpy(), fused.moving_mean.numpy(), rtol=tol / 10)
    np.testing.assert_allclose(synced.moving_variance.numpy(), fused.moving_variance.numpy(), rtol=tol / 10)


def test_deep_supervision_adds_heads_at_decoder_levels_one_to_depth_minus_two():
    # nnU-Net's deep supervision: training's loss also sees the decoder's coarser levels. The main
    # output stays first; main_output gives evaluation, prediction and export the one they use.
    from unet_dist.model import main_output, supervised_levels

    cfg = ModelConfig(depth=4, base_filters=4, deep_supervision=True)
    model = build_unet(cfg, (64, 64))
    assert supervised_levels(cfg) == [0, 1, 2]
    assert [tuple(o.shape[1:]) for o in model.outputs] == [(64, 64, 1), (32, 32, 1), (16, 16, 1)]
    main = main_output(model)
    assert tuple(main.output.shape[1:]) == (64, 64, 1) and {v.path for v in main.weights} < {
        v.path for v in model.weights}
    x = np.random.default_rng(0).random((1, 64, 64, 3), np.float32)
    np.testing.assert_array_equal(main(x).numpy(), model(x)[0].numpy())
    plain = build_unet(ModelConfig(depth=4, base_filters=4), (64, 64))
    assert main_output(plain) is plain and supervised_levels(ModelConfig()) == [0]
    # The same layers but the heads: a plain model's checkpoint names are the deep one's, less these.
    assert {w.path for w in model.weights} - {w.path for w in plain.weights} == {
        f"aux{level}_logits/{v}" for level in (1, 2) for v in ("kernel", "bias")}
