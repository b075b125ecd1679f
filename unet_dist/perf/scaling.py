"""Weak scaling of the train step: 1 vs 2 processes, Horovod and MultiWorkerMirroredStrategy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from unet_dist.perf.common import machine

SCALING_MODEL = ["model.depth=4", "model.base_filters=16", "data.image_size=[128, 128]",
                 "runtime.precision=mixed_bfloat16", "runtime.intra_op_threads=1", "runtime.inter_op_threads=1",
                 "optim.name=adam", "runtime.horovod_cycle_time_ms=25"]


def worker(args) -> dict:
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


def run(args) -> dict:
    """Weak scaling: the same per-process batch on 1 and 2 processes, one thread each."""
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
            "steps": args.steps, "model": SCALING_MODEL, **machine()}


