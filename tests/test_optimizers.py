import keras
import numpy as np
import pytest
import tensorflow as tf

from unet_dist import optimizers
from unet_dist.config import OptimConfig
from unet_dist.optimizers import build_optimizer

# (ours, Keras' own, the fused kernel expected in the step's graph or None where Keras' update runs)
CASES = {
    "adam": (lambda: optimizers.Adam(0.05, clipnorm=1.0), lambda: keras.optimizers.Adam(0.05, clipnorm=1.0),
             "ResourceApplyAdam"),
    "adamw": (lambda: optimizers.AdamW(0.05, weight_decay=0.1), lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1),
              "ResourceApplyAdam"),
    "amsgrad": (lambda: optimizers.Adam(0.05, amsgrad=True), lambda: keras.optimizers.Adam(0.05, amsgrad=True), None),
    "sgd": (lambda: optimizers.SGD(0.05), lambda: keras.optimizers.SGD(0.05), "ResourceApplyGradientDescent"),
    "momentum": (lambda: optimizers.SGD(0.05, momentum=0.99), lambda: keras.optimizers.SGD(0.05, momentum=0.99),
                 "ResourceApplyKerasMomentum"),
    "nesterov": (lambda: optimizers.SGD(0.05, momentum=0.9, nesterov=True),
                 lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True), "ResourceApplyKerasMomentum"),
    "rmsprop_momentum": (lambda: optimizers.RMSprop(0.01, momentum=0.9),
                         lambda: keras.optimizers.RMSprop(0.01, momentum=0.9), "ResourceApplyRMSProp"),
    "rmsprop": (lambda: optimizers.RMSprop(0.01), lambda: keras.optimizers.RMSprop(0.01), None),
}


def _train(make_optimizer, steps: int = 4):
    """A small two-layer model trained `steps` steps; its weights, the optimizer's variables, and
    the op types of the traced step."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    opt = make_optimizer()
    opt.build(model.trainable_variables)
    x = tf.random.stateless_normal((16, 5), (1, 2))
    y = tf.random.stateless_normal((16, 1), (3, 4))

    @tf.function(autograph=False)
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)

    for _ in range(steps):
        step()
    ops = {op.type for f in [step.get_concrete_function()] for op in f.graph.get_operations()}
    return [v.numpy() for v in model.trainable_variables], [v.numpy() for v in opt.variables], ops


@pytest.mark.parametrize("name", CASES)
def test_fused_updates_match_keras_own(name):
    ours, theirs, kernel = CASES[name]
    weights, slots, ops = _train(ours)
    k_weights, k_slots, k_ops = _train(theirs)
    # The same variables in the same order: checkpoints written before the fused kernels restore.
    assert [s.shape for s in slots] == [s.shape for s in k_slots]
    for a, b in zip(weights + slots, k_weights + k_slots, strict=True):
        # Adam's update divides by sqrt(v): rounding differences of the two orders of arithmetic
        # grow to a few 1e-6 of the weights' scale in 4 steps at this learning rate.
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * max(1.0, float(np.abs(b).max())))
    start = _train(ours, steps=0)[0]
    assert max(np.abs(a - s).max() for a, s in zip(weights, start, strict=True)) > 1e-3  # it trained
    if kernel:
        assert kernel in ops and kernel not in k_ops
    else:
        assert not any(op.startswith("ResourceApply") for op in ops)


def test_the_config_builds_the_fused_optimizers():
    for name, cls in (("adam", optimizers.Adam), ("adamw", optimizers.AdamW), ("sgd", optimizers.SGD),
                      ("rmsprop", optimizers.RMSprop)):
        opt = build_optimizer(OptimConfig(name=name), 1e-3, 10)
        assert type(opt) is cls
