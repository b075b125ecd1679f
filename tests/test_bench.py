"""The benchmark helpers that turn raw measurements into the numbers we publish."""

import tensorflow as tf

from unet_dist.perf.profile import kernel_seconds, kind_of


def test_kernel_kinds():
    assert kind_of("_MklNativeConv2DBackpropFilter") == "convolution"
    assert kind_of("Conv2D") == "convolution"
    assert kind_of("_MklNativeFusedBatchNormGradV3") == "batch norm"
    assert kind_of("ReluGrad") == "relu"
    assert kind_of("ConcatV2") == "skip concat"
    assert kind_of("ResourceApplyAdam") == "other"


def test_kernel_seconds_reads_a_real_trace(tmp_path):
    a = tf.random.normal([512, 512])

    @tf.function
    def f(x):
        for _ in range(5):
            x = tf.matmul(x, a)
        return tf.reduce_sum(x)

    float(f(a))
    tf.profiler.experimental.start(str(tmp_path))
    float(f(a))
    tf.profiler.experimental.stop()
    seconds = kernel_seconds(tmp_path)
    matmul = sum(v for k, v in seconds.items() if "MatMul" in k)
    assert matmul > 0, dict(seconds)
