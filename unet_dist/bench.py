"""Benchmarks; each subcommand prints JSON as its last line.

    python -m unet_dist.bench pipeline --data DATA [--batches 50] [--augment on|off] [--image-size 256]
    python -m unet_dist.bench train --data DATA --config configs/pets_seed.yaml [--steps 20] [--variants ...]
    python -m unet_dist.bench scaling [--steps 20] [--per-replica-batch 8]

pipeline: images/s of our tf.data pipeline against the paper's PIL generator (open, resize, numpy
per image; batch 8; no augmentation), on the same source images in the same run.
train: images/s of our train step under several precision/XLA settings against the paper's own
Keras code (model.fit on its PIL generator), same model, data and batch, in the same run.
scaling: weak scaling of the train step (in-memory batches, one thread per process), 1 vs 2
processes, for Horovod and MultiWorkerMirroredStrategy: efficiency = ips(2) / (2 * ips(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def paper_generator(image_paths: list[Path], mask_dir: Path, batch: int, size: int):
    """The seed paper's input path, reproduced for comparison: PIL open + resize + numpy, one by one."""
    from PIL import Image

    while True:
        for i in range(0, len(image_paths) - batch + 1, batch):
            xs, ys = [], []
            for p in image_paths[i : i + batch]:
                img = Image.open(p).convert("RGB").resize((size, size))
                tri = Image.open(mask_dir / f"{p.stem}.png").resize((size, size), Image.NEAREST)
                xs.append(np.asarray(img, np.float32) / 255.0)
                ys.append((np.asarray(tri) == 1).astype(np.float32)[..., None])
            yield np.stack(xs), np.stack(ys)


def _source_pairs(manifest: dict, source: Path | None) -> tuple[list[Path], Path]:
    src = Path(source or manifest["source"])
    masks = src / "annotations" / "trimaps"
    images = sorted(p for p in (src / "images").glob("*.jpg") if (masks / f"{p.stem}.png").exists())
    if not images:
        raise SystemExit(f"bench: no Oxford-Pet layout images with trimaps under {src}")
    return images, masks


def _machine() -> dict:
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}


def _time_iter(it, n: int, warmup: int) -> float:
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return time.perf_counter() - t


def bench_pipeline(args) -> dict:
    from unet_dist.config import load_config
    from unet_dist.data.pipeline import Shard, load_manifest, train_dataset

    manifest = load_manifest(args.data)
    size, batch = args.image_size, 8
    overrides = [f"data.image_size=[{size}, {size}]", f"data.global_batch_size={batch}", "model.depth=4"]
    if args.augment == "off":
        overrides += ["data.augment.flip=false", "data.augment.scale_crop=false", "data.augment.brightness=0",
                      "data.augment.contrast=0"]
    elif args.augment == "full":
        overrides += ["data.augment.rotate_degrees=10", "data.augment.elastic=true"]
    cfg = load_config(args.config, overrides + list(args.set))
    ds = train_dataset(args.data, cfg, batch, batch, Shard(0, 1), manifest=manifest)
    it = iter(ds)
    ours = _time_iter(it, args.batches, warmup=20)  # let AUTOTUNE settle
    images, masks = _source_pairs(manifest, args.source)
    gen = paper_generator(images, masks, batch, size)
    paper = _time_iter(gen, args.batches, warmup=1)
    ours_ips, paper_ips = args.batches * batch / ours, args.batches * batch / paper
    return {"bench": "pipeline", "images_per_s": ours_ips, "paper_pil_images_per_s": paper_ips,
            "speedup": ours_ips / paper_ips, "augment": args.augment, "image_size": size, "batch": batch,
            "batches": args.batches, **_machine()}


def bench_train(args) -> dict:
    """Train-step images/s for our trainer under variants, and for the paper's model.fit on its generator."""
    import keras
    import tensorflow as tf

    from unet_dist import precision
    from unet_dist.config import load_config
    from unet_dist.data.pipeline import Shard, load_manifest, train_dataset
    from unet_dist.distribute import make_runtime
    from unet_dist.losses import get_loss
    from unet_dist.trainer import build_model_and_optimizer, make_train_step

    manifest = load_manifest(args.data)
    base = load_config(args.config, list(args.set))
    results = {}
    runtime = None
    for variant in args.variants:
        prec, xla = variant.split("+") if "+" in variant else (variant, "noxla")
        cfg = load_config(args.config, list(args.set) + [f"runtime.precision={prec}",
                                                         f"runtime.xla={'true' if xla == 'xla' else 'false'}",
                                                         "runtime.strategy=single"])
        runtime = runtime or make_runtime(cfg)
        runtime.cfg = cfg
        global_batch, _ = runtime.batch_sizes()
        keras.utils.set_random_seed(0)
        model, opt = build_model_and_optimizer(cfg, runtime, cfg.optim.learning_rate)
        step = make_train_step(model, opt, get_loss(cfg.train), runtime, global_batch, cfg.runtime.xla)
        it = iter(train_dataset(args.data, cfg, global_batch, global_batch, Shard(0, 1), manifest=manifest))
        batches = [next(it) for _ in range(4)]  # in memory: measure the step, not the input
        for i in range(3):
            step(batches[i % 4])
        t = time.perf_counter()
        for i in range(args.steps):
            out = step(batches[i % 4])
        float(out["loss"])
        dt = time.perf_counter() - t
        results[variant] = args.steps * global_batch / dt
        print(f"bench train: {variant}: {results[variant]:.2f} images/s", file=sys.stderr, flush=True)
        precision.set_policy("float32")

    # The paper's code: its Keras model compiled with RMSprop + BCE, model.fit on the PIL generator.
    cfg = base
    size = cfg.data.image_size[0]
    precision.set_policy("float32")
    keras.utils.set_random_seed(0)
    from unet_dist.model import build_unet

    paper_model = build_unet(cfg.model, tuple(cfg.data.image_size))
    paper_model.compile(optimizer=keras.optimizers.RMSprop(1e-3), loss="binary_crossentropy")
    images, masks = _source_pairs(manifest, args.source)
    gb = base.data.global_batch_size or base.data.per_replica_batch_size
    gen = paper_generator(images, masks, gb, size)
    paper_model.fit(gen, steps_per_epoch=3, epochs=1, verbose=0)  # warm-up: trace and compile
    t = time.perf_counter()
    paper_model.fit(gen, steps_per_epoch=args.steps, epochs=1, verbose=0)
    paper_ips = args.steps * gb / (time.perf_counter() - t)
    best = max(results, key=results.get)
    del tf
    return {"bench": "train", "config": str(args.config), "images_per_s": results,
            "paper_fit_images_per_s": paper_ips, "best_variant": best, "speedup_best": results[best] / paper_ips,
            "global_batch_size": gb, "steps": args.steps, **_machine()}


SCALING_MODEL = ["model.depth=4", "model.base_filters=16", "data.image_size=[128, 128]",
                 "runtime.precision=mixed_bfloat16", "runtime.intra_op_threads=1", "runtime.inter_op_threads=1",
                 "optim.name=adam"]


def scaling_worker(args) -> dict:
    """One process of a scaling run: the train step on an in-memory batch, timed after warm-up."""
    import keras
    import tensorflow as tf

    from unet_dist.config import load_config
    from unet_dist.distribute import make_runtime
    from unet_dist.losses import get_loss
    from unet_dist.trainer import build_model_and_optimizer, make_train_step

    cfg = load_config(None, SCALING_MODEL + [f"runtime.strategy={args.backend}", "data.global_batch_size=null",
                                             f"data.per_replica_batch_size={args.per_replica_batch}",
                                             "train.loss=bce"] + list(args.set))
    runtime = make_runtime(cfg)
    global_batch, per_replica = runtime.batch_sizes()
    keras.utils.set_random_seed(0)
    model, opt = build_model_and_optimizer(cfg, runtime, 1e-3)
    runtime.broadcast_state(model.variables + opt.variables)
    h, w = cfg.data.image_size
    rng = np.random.default_rng(runtime.rank)
    batch = {"image": tf.constant(rng.random((per_replica, h, w, 3), np.float32)),
             "mask": tf.constant((rng.random((per_replica, h, w, 1)) > 0.5).astype(np.uint8))}
    data = iter(runtime.distribute(lambda shard, b: tf.data.Dataset.from_tensors(batch).repeat()))
    step = make_train_step(model, opt, get_loss(cfg.train), runtime, global_batch, False)
    for _ in range(3):
        float(step(next(data))["loss"])
    t = time.perf_counter()
    for _ in range(args.steps):
        out = step(next(data))
    float(out["loss"])
    dt = time.perf_counter() - t
    return {"bench": "scaling_worker", "backend": args.backend, "world_size": runtime.world_size,
            "images_per_s": args.steps * global_batch / dt, "chief": runtime.is_chief}


def bench_scaling(args) -> dict:
    """Weak scaling: the same per-process batch on 1 and 2 processes, one thread each."""
    import subprocess

    from unet_dist.distribute import free_ports

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    worker = [sys.executable, "-m", "unet_dist.bench", "scaling-worker", "--steps", str(args.steps),
              "--per-replica-batch", str(args.per_replica_batch)]
    results: dict = {}

    def last_json(text: str) -> dict:
        rows = [json.loads(line.split(">:", 1)[-1]) for line in text.splitlines() if '"scaling_worker"' in line]
        return next(r for r in rows if r["chief"])

    for backend in args.backends:
        for n in (1, 2):
            if backend == "horovod":
                horovodrun = str(Path(sys.executable).parent / "horovodrun")
                cmd = [horovodrun, "-np", str(n), "--gloo", "-H", f"localhost:{n}", *worker, "--backend", "horovod"]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            else:
                ports = free_ports(n)
                cluster = {"worker": [f"localhost:{p}" for p in ports]}
                procs = [subprocess.Popen([*worker, "--backend", "multiworker"], stdout=subprocess.PIPE, text=True,
                                          env={**env, "TF_CONFIG": json.dumps(
                                              {"cluster": cluster, "task": {"type": "worker", "index": i}})})
                         for i in range(n)]
                out = "".join(p.communicate()[0] for p in procs)
            r = last_json(out)
            results[f"{backend}_{n}"] = r["images_per_s"]
            print(f"bench scaling: {backend} x{n}: {r['images_per_s']:.2f} images/s", file=sys.stderr, flush=True)
        results[f"{backend}_efficiency"] = results[f"{backend}_2"] / (2 * results[f"{backend}_1"])
    return {"bench": "scaling", "images_per_s": results, "per_process_batch": args.per_replica_batch,
            "steps": args.steps, "model": SCALING_MODEL, **_machine()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unet_dist.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    pp = sub.add_parser("pipeline", help="tf.data pipeline vs the paper's PIL generator")
    pp.add_argument("--data", type=Path, required=True)
    pp.add_argument("--source", type=Path, help="the raw Pet-layout folder (default: manifest's source)")
    pp.add_argument("--batches", type=int, default=50)
    pp.add_argument("--augment", choices=("on", "off", "full"), default="on",
                    help="on: the config's augmentation (default: flips, zoom/crop, brightness, contrast); "
                         "full: plus rotation and elastic deformation")
    pp.add_argument("--image-size", type=int, default=256)
    pp.add_argument("--config", type=Path)
    pp.add_argument("--set", action="append", default=[])
    pt = sub.add_parser("train", help="train-step images/s vs the paper's model.fit")
    pt.add_argument("--data", type=Path, required=True)
    pt.add_argument("--source", type=Path)
    pt.add_argument("--config", type=Path, default=Path("configs/pets_seed.yaml"))
    pt.add_argument("--steps", type=int, default=10)
    pt.add_argument("--variants", nargs="+", default=["float32", "mixed_bfloat16", "float32+xla",
                                                      "mixed_bfloat16+xla"])
    pt.add_argument("--set", action="append", default=[])
    ps = sub.add_parser("scaling", help="weak scaling, 1 vs 2 processes, Horovod and MultiWorkerMirrored")
    ps.add_argument("--steps", type=int, default=20)
    ps.add_argument("--per-replica-batch", type=int, default=8)
    ps.add_argument("--backends", nargs="+", default=["horovod", "multiworker"])
    pw = sub.add_parser("scaling-worker", help=argparse.SUPPRESS)
    pw.add_argument("--backend", required=True)
    pw.add_argument("--steps", type=int, default=20)
    pw.add_argument("--per-replica-batch", type=int, default=8)
    pw.add_argument("--set", action="append", default=[])
    args = p.parse_args(argv)
    result = {"pipeline": bench_pipeline, "train": bench_train, "scaling": bench_scaling,
              "scaling-worker": scaling_worker}[args.bench](args)
    result["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
