"""Train-step throughput under precision/XLA variants against the paper's own Keras code."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from unet_dist.perf.common import machine, paper_generator, source_pairs


def prepared_step(cfg, data_dir: Path, manifest: dict, runtime=None):
    """Our train step for `cfg`, traced and warmed up, and 4 real batches held in memory.

    Returns (step, batches, global batch, runtime); the runtime is reusable across calls in one process.
    """
    import keras

    from unet_dist.data.pipeline import Shard, train_dataset
    from unet_dist.distribute import make_runtime
    from unet_dist.losses import training_loss
    from unet_dist.trainer import build_model_and_optimizer, check_data_matches, make_train_step, resolve_xla

    check_data_matches(cfg, manifest, Path(data_dir))  # the model must take the data's classes and channels
    runtime = runtime or make_runtime(cfg)
    runtime.cfg = cfg
    resolve_xla(cfg)  # runtime.xla auto (pipeline, profile), as the trainer resolves it
    global_batch, _ = runtime.batch_sizes()
    keras.utils.set_random_seed(0)
    model, opt = build_model_and_optimizer(cfg, runtime, cfg.optim.learning_rate)
    step = make_train_step(model, opt, training_loss(cfg), runtime, global_batch, cfg.runtime.xla,
                           cfg.train.gradient_accumulation_steps)
    it = iter(train_dataset(data_dir, cfg, global_batch, global_batch, Shard(0, 1), manifest=manifest))
    batches = [next(it) for _ in range(4)]
    for i in range(3):  # trace, compile, warm up
        float(step(batches[i % 4])["loss"])
    return step, batches, global_batch, runtime


def step_images_per_s(cfg, data_dir: Path, manifest: dict, steps: int, runtime=None) -> tuple[float, object]:
    """images/s of our train step on 4 real batches held in memory (the step alone, not the input).

    Returns (images/s, the runtime, reusable across calls in one process).
    """
    from unet_dist import precision

    step, batches, global_batch, runtime = prepared_step(cfg, data_dir, manifest, runtime)
    t = time.perf_counter()
    for i in range(steps):
        out = step(batches[i % 4])
    float(out["loss"])
    ips = steps * global_batch / (time.perf_counter() - t)
    precision.set_policy("float32")
    return ips, runtime


def paper_model(cfg):
    """Our U-Net as the paper's code builds it: stock Keras layers (keras.layers.BatchNormalization),
    one output (no model.deep_supervision heads: model.fit trains it on the masks alone)."""
    import dataclasses

    import keras

    from unet_dist.model import FusedBatchNorm, build_unet

    def stock(layer):
        if isinstance(layer, FusedBatchNorm):
            return keras.layers.BatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    plain = dataclasses.replace(cfg.model, deep_supervision=False)
    return keras.models.clone_model(build_unet(plain, tuple(cfg.data.image_size)), clone_function=stock)


def paper_fit_images_per_s(cfg, manifest: dict, source: Path | None, steps: int) -> float:
    """The paper's code path: its Keras model compiled with RMSprop + BCE, model.fit on its PIL generator."""
    import keras

    from unet_dist import precision

    precision.set_policy("float32")
    keras.utils.set_random_seed(0)
    model = paper_model(cfg)
    model.compile(optimizer=keras.optimizers.RMSprop(1e-3), loss="binary_crossentropy")
    images, masks = source_pairs(manifest, source)
    batch = cfg.data.global_batch_size or cfg.data.per_replica_batch_size
    gen = paper_generator(images, masks, batch, cfg.data.image_size[0])
    model.fit(gen, steps_per_epoch=3, epochs=1, verbose=0)  # trace and warm up
    t = time.perf_counter()
    model.fit(gen, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch / (time.perf_counter() - t)


def variant_config(args, variant: str):
    from unet_dist.config import load_config

    prec, _, xla = variant.partition("+")
    return load_config(args.config, list(args.set) + [f"runtime.precision={prec}", "runtime.strategy=single",
                                                      f"runtime.xla={'true' if xla == 'xla' else 'false'}"])


def run(args) -> dict:
    from unet_dist.config import load_config
    from unet_dist.data.pipeline import load_manifest
    from unet_dist.distribute import gpu_memory_peak_mib, reset_gpu_memory_peak

    manifest = load_manifest(args.data)
    results: dict[str, float] = {}
    gpu_peaks: dict[str, float] = {}  # MiB each variant's step held at most on a GPU (none on a CPU)
    runtime = None
    for variant in args.variants:
        # The first variant's count starts with the process: asking TensorFlow for its GPUs before
        # make_runtime would start it with the default threads and without memory growth.
        if runtime is not None:
            reset_gpu_memory_peak()
        results[variant], runtime = step_images_per_s(variant_config(args, variant), args.data, manifest, args.steps,
                                                      runtime)
        if (peak := gpu_memory_peak_mib()) is not None:
            gpu_peaks[variant] = peak
        print(f"bench train: {variant}: {results[variant]:.2f} images/s"
              + (f", GPU memory peak {peak:,.0f} MiB" if peak is not None else ""), file=sys.stderr, flush=True)
    base = load_config(args.config, list(args.set))
    paper = None
    if base.model.padding == "same":
        paper = paper_fit_images_per_s(base, manifest, args.source, args.steps)
        print(f"bench train: paper model.fit: {paper:.2f} images/s", file=sys.stderr, flush=True)
    else:
        # The paper's code compares masks with outputs of the input's size; an unpadded network's
        # output is smaller (configs/ronneberger.yaml: 572 -> 388), so there is no paper run to compare.
        print(f"bench train: the paper's model.fit is not run: its code pads its convolutions and {args.config}'s "
              "model does not (model.padding: valid)", file=sys.stderr, flush=True)
    best = max(results, key=results.get)
    return {"bench": "train", "config": str(args.config), "images_per_s": results, "paper_fit_images_per_s": paper,
            "best_variant": best, "speedup_best": results[best] / paper if paper else None,
            "global_batch_size": base.data.global_batch_size, "image_size": base.data.image_size,
            "steps": args.steps, **({"gpu_peak_memory_mib": gpu_peaks} if gpu_peaks else {}), **machine()}
