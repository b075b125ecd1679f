"""FLOPs per training image counted from the layers, achieved FLOP/s, and the machine's matmul peak."""

from __future__ import annotations

import sys
import time

from unet_dist.perf.common import machine


def forward_flops(model) -> int:
    """Multiply-adds x 2 of the convolutions for one image (the rest of a U-Net is well under 1%).

    Conv2D: 2 k_h k_w C_in C_out H_out W_out; Conv2DTranspose: 2 k_h k_w C_in C_out H_in W_in.
    """
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2DTranspose):
            kh, kw, c_out, c_in = layer.kernel.shape
            _, h, w, _ = layer.input.shape
            total += 2 * kh * kw * c_in * c_out * h * w
        elif isinstance(layer, keras.layers.Conv2D):
            kh, kw, c_in, c_out = layer.kernel.shape
            _, h, w, _ = layer.output.shape
            total += 2 * kh * kw * c_in * c_out * h * w
    return int(total)


def matmul_size() -> int:
    """The side of `matmul_peak`'s matrices here: 2048 on a CPU, 8192 on a GPU (below)."""
    import tensorflow as tf

    return 8192 if tf.config.list_physical_devices("GPU") else 2048


def matmul_peak(dtype: str, n: int | None = None, reps: int = 10) -> float:
    """FLOP/s of a chain of n x n matrix multiplies in `dtype` with this process's threads, or on its GPU.

    A chain (each product feeds the next) so that no multiply can be merged with another or cut
    short by the graph optimiser; the matrix is scaled to keep values bounded. n defaults to 2048
    on a CPU and 8192 on a GPU, where a 2048 product takes well under a millisecond and the
    launch and the host's clock would be a large part of what is timed.
    """
    import tensorflow as tf

    n = n or matmul_size()
    rng = tf.random.Generator.from_seed(0)
    a = tf.cast(rng.normal([n, n]), dtype)
    b = tf.cast(rng.normal([n, n]) / n**0.5, dtype)

    @tf.function(autograph=False)
    def chain(x, y):
        for _ in range(reps):
            x = tf.matmul(x, y)
        return tf.reduce_sum(tf.cast(x, tf.float32))

    float(chain(a, b))
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        float(chain(a, b))
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def run(args) -> dict:
    import keras

    from unet_dist.config import load_config
    from unet_dist.data.pipeline import load_manifest
    from unet_dist.model import build_unet
    from unet_dist.perf.train import step_images_per_s, variant_config

    cfg = load_config(args.config, list(args.set))
    fwd = forward_flops(build_unet(cfg.model, tuple(cfg.data.image_size)))
    train_flops = 3 * fwd  # forward + backward (gradients w.r.t. inputs and weights: 2x forward)
    manifest = load_manifest(args.data)
    out = {"bench": "flops", "config": str(args.config), "image_size": cfg.data.image_size,
           "forward_gflops_per_image": fwd / 1e9, "train_gflops_per_image": train_flops / 1e9, "matmul_size": None,
           "variants": {}}
    runtime = None
    for variant in args.variants:
        vcfg = variant_config(args, variant)
        ips, runtime = step_images_per_s(vcfg, args.data, manifest, args.steps, runtime)
        out["matmul_size"] = n = matmul_size()  # after the first step: the runtime has set up the devices
        peak = matmul_peak(keras.DTypePolicy(vcfg.runtime.precision).compute_dtype, n)  # the variant's compute dtype
        achieved = ips * train_flops
        out["variants"][variant] = {"images_per_s": ips, "achieved_gflop_s": achieved / 1e9,
                                    "matmul_peak_gflop_s": peak / 1e9, "fraction_of_peak": achieved / peak}
        print(f"bench flops: {variant}: {achieved / 1e9:.1f} GFLOP/s of {peak / 1e9:.1f} ({achieved / peak:.0%})",
              file=sys.stderr, flush=True)
    return {**out, **machine()}
