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

# Without --config: the demo-size model. float32: the CPU default (configs/demo.yaml; measured faster
# here than mixed_bfloat16), so its shorter step is the one the communication is measured against.
SCALING_MODEL = ["model.depth=4", "model.base_filters=16", "data.image_size=[128, 128]",
                 "runtime.precision=float32", "optim.name=adam", "train.loss=bce"]
# Every run, with or without --config: one thread per process, Horovod's cycle as recommended for
# CPU ranks (docs/benchmarks.md).
BENCH_RUNTIME = ["runtime.intra_op_threads=1", "runtime.inter_op_threads=1", "runtime.horovod_cycle_time_ms=25"]


def _config(args, backend: str):
    """The scaling run's config: --config (or the demo-size model), one thread, the backend, the batch."""
    from unet_dist.config import load_config

    return load_config(args.config, ([] if args.config else SCALING_MODEL) + BENCH_RUNTIME + [
        f"runtime.strategy={backend}", "data.global_batch_size=null",
        f"data.per_replica_batch_size={args.per_replica_batch}", *args.set])


def worker(args) -> dict:
    """One process of a scaling run: the train step on an in-memory batch, timed after warm-up."""
    import keras
    import tensorflow as tf

    from unet_dist.distribute import make_runtime
    from unet_dist.losses import get_loss
    from unet_dist.trainer import build_model_and_optimizer, make_train_step

    cfg = _config(args, args.backend)
    runtime = make_runtime(cfg)
    global_batch, per_replica = runtime.batch_sizes()
    keras.utils.set_random_seed(0)
    model, opt = build_model_and_optimizer(cfg, runtime, cfg.optim.learning_rate)
    runtime.broadcast_state(model.variables + opt.variables)
    h, w = cfg.data.patch_size or cfg.data.image_size  # what one training example is
    rng = np.random.default_rng(runtime.rank)
    batch = {"image": tf.constant(rng.random((per_replica, h, w, 3), np.float32)),
             "mask": tf.constant((rng.random((per_replica, h, w, 1)) > 0.5).astype(np.uint8))}
    data = iter(runtime.distribute(lambda shard, b: tf.data.Dataset.from_tensors(batch).repeat()))
    step = make_train_step(model, opt, get_loss(cfg.train), runtime, global_batch, False)
    for _ in range(3):
        float(step(next(data))["loss"])
    # Each step timed on its own (the loss is read, so the step is finished on every rank): the
    # median step ignores the bursts in which this shared 2-core VM runs other work, which moved
    # whole-run means by 10 points between identical runs.
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        float(step(next(data))["loss"])
        times.append(time.perf_counter() - t)
    return {"bench": "scaling_worker", "backend": args.backend, "world_size": runtime.world_size,
            "images_per_s": global_batch / float(np.median(times)),
            "mean_images_per_s": global_batch * len(times) / sum(times), "chief": runtime.is_chief}


def _launch(backend: str, n: int, worker: list[str], env: dict) -> list[dict]:
    """Runs `n` processes of the scaling worker; returns every rank's result.

    backend "independent": n single-device processes at once with no communication, the
    machine's own ceiling for n processes (shared memory bandwidth and caches, other tenants).
    """
    from unet_dist.distribute import free_ports

    if backend == "horovod":
        horovodrun = str(Path(sys.executable).parent / "horovodrun")
        cmd = [horovodrun, "-np", str(n), "--gloo", "-H", f"localhost:{n}", *worker, "--backend", "horovod"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    else:
        envs = [env] * n
        if backend == "multiworker":
            cluster = {"worker": [f"localhost:{p}" for p in free_ports(n)]}
            envs = [{**env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
                    for i in range(n)]
        kind = "single" if backend == "independent" else backend
        procs = [subprocess.Popen([*worker, "--backend", kind], stdout=subprocess.PIPE, text=True, env=e)
                 for e in envs]
        out = "".join(p.communicate()[0] for p in procs)
        if any(p.returncode for p in procs):
            raise SystemExit(f"bench scaling: a {backend} worker failed (exit {[p.returncode for p in procs]})")
    return [json.loads(line.split(">:", 1)[-1]) for line in out.splitlines() if '"scaling_worker"' in line]


def run(args) -> dict:
    """Weak scaling: the same per-process batch on 1 and 2 processes, one thread each.

    Each backend runs 1 and 2 processes alternately, `repeats` times; the efficiency is that of the
    medians, median ips(2) / (2 median ips(1)), and every run's numbers are kept. The same is
    measured for two independent processes (no communication) as the machine's ceiling.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    worker = [sys.executable, "-m", "unet_dist.bench", "scaling-worker", "--steps", str(args.steps),
              "--per-replica-batch", str(args.per_replica_batch), *sum((["--set", s] for s in args.set), []),
              *(["--config", str(args.config)] if args.config else [])]
    cfg = _config(args, "single")  # what the workers will train, for the record
    runs: dict = {}
    results: dict = {}
    for backend in [*args.backends, "independent"]:
        for rep in range(args.repeats):
            for n in (1, 2):
                rows = _launch(backend, n, worker, env)
                # Synchronous backends: the chief's rate is the job's. Independent: the total.
                ips = (sum(r["images_per_s"] for r in rows) if backend == "independent"
                       else next(r for r in rows if r["chief"])["images_per_s"])
                runs.setdefault(backend, {}).setdefault(str(n), []).append(ips)
                print(f"bench scaling: {backend} x{n} (run {rep + 1}/{args.repeats}): {ips:.2f} images/s",
                      file=sys.stderr, flush=True)
        one, two = (float(np.median(runs[backend][k])) for k in ("1", "2"))
        results[f"{backend}_1"], results[f"{backend}_2"] = one, two
        results[f"{backend}_efficiency"] = two / (2 * one)
    return {"bench": "scaling", "images_per_s": results, "runs": runs, "repeats": args.repeats,
            "per_process_batch": args.per_replica_batch, "steps": args.steps, "statistic": "median step",
            "config": str(args.config) if args.config else None, "model": [] if args.config else SCALING_MODEL,
            "set": list(args.set), "example_size": list(cfg.data.patch_size or cfg.data.image_size),
            "precision": cfg.runtime.precision, **machine()}
