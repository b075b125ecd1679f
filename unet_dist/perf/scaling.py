"""Weak scaling of the train step: 1 vs 2 processes, Horovod and MultiWorkerMirroredStrategy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from unet_dist.perf.common import machine

# Without --config: the demo-size model, in float32 on every machine (not runtime.precision's auto,
# which picks bfloat16 where the CPU has it) so that tables from different VMs measure the same step.
SCALING_MODEL = ["model.depth=4", "model.base_filters=16", "data.image_size=[128, 128]",
                 "runtime.precision=float32", "optim.name=adam", "train.loss=bce"]
# Every run, with or without --config: one thread per process, Horovod's cycle as recommended for
# CPU ranks (docs/benchmarks.md).
BENCH_RUNTIME = ["runtime.intra_op_threads=1", "runtime.inter_op_threads=1", "runtime.horovod_cycle_time_ms=5"]


def _config(args, backend: str):
    """The scaling run's config: --config (or the demo-size model), one thread, the backend, the batch."""
    from unet_dist.config import load_config

    return load_config(args.config, ([] if args.config else SCALING_MODEL) + BENCH_RUNTIME + [
        f"runtime.strategy={backend}", "data.global_batch_size=null",
        f"data.per_replica_batch_size={args.per_replica_batch}", *args.set])


def _timed(step, batches, n: int) -> list[float]:
    """n steps, each timed on its own: reading the loss makes the step finish on every rank."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        float(step(next(batches))["loss"])
        times.append(time.perf_counter() - t)
    return times


def worker(args) -> dict:
    """One process of a scaling run: the train step on an in-memory batch, timed after warm-up.

    With --rounds and more than one process: `rounds` rounds of `steps` synchronous steps, each
    followed by `steps` steps of the chief alone (`_alone_step`: a single-device model and step
    in this process) while the other ranks wait outside any collective, polling for a file in
    --pause-dir, so that their cores idle as in a 1-process run and no pending collective keeps
    the chief's Horovod thread negotiating. Returns the chief's median step of each kind per round.
    Otherwise `steps` timed steps.
    """
    import keras
    import tensorflow as tf

    from unet_dist.distribute import make_runtime
    from unet_dist.losses import training_loss
    from unet_dist.trainer import build_model_and_optimizer, make_train_step

    cfg = _config(args, args.backend)
    runtime = make_runtime(cfg)
    global_batch, per_replica = runtime.batch_sizes()
    keras.utils.set_random_seed(0)
    model, opt = build_model_and_optimizer(cfg, runtime, cfg.optim.learning_rate)
    runtime.broadcast_state(model.variables + opt.variables)
    batch = _synthetic_batch(cfg, per_replica, runtime.rank)
    data = iter(runtime.distribute(lambda shard, b: tf.data.Dataset.from_tensors(batch).repeat()))
    step = make_train_step(model, opt, training_loss(cfg), runtime, global_batch, False)
    _timed(step, data, 3)
    out = {"bench": "scaling_worker", "backend": args.backend, "world_size": runtime.world_size,
           "chief": runtime.is_chief}
    if not (args.rounds and runtime.world_size > 1):
        # The median step ignores the bursts in which this shared 2-core VM runs other work, which
        # moved whole-run means by 10 points between identical runs.
        times = _timed(step, data, args.steps)
        return {**out, "images_per_s": global_batch / float(np.median(times))}
    alone = _alone_step(cfg, batch) if runtime.is_chief else None
    runtime.barrier()
    pause, rounds = Path(args.pause_dir), []
    for k in range(args.rounds):
        sync = _timed(step, data, args.steps)
        if runtime.is_chief:
            solo = _timed(*alone, args.steps)
            rounds.append({"sync_s": float(np.median(sync)), "alone_s": float(np.median(solo))})
            (pause / f"round-{k}").touch()
        else:
            _wait_for(pause / f"round-{k}", deadline=time.time() + 60 + 20 * sum(sync))
    return {**out, "rounds": rounds}


def _synthetic_batch(cfg, per_replica: int, seed: int) -> dict:
    """A random batch shaped as the pipeline delivers one: the image at the training example's size,
    the mask (and the weight map, for train.loss weighted_ce) at the model's output size, which an
    unpadded network (model.padding: valid) makes smaller."""
    import tensorflow as tf

    from unet_dist.data.pipeline import label_size, train_size

    h, w = train_size(cfg)  # what one training example is
    out = label_size(cfg, (h, w))
    rng = np.random.default_rng(seed)
    batch = {"image": tf.constant(rng.random((per_replica, h, w, 3), np.float32)),
             "mask": tf.constant((rng.random((per_replica, *out, 1)) > 0.5).astype(np.uint8))}
    if cfg.train.loss == "weighted_ce":
        batch["weight"] = tf.constant(1 + rng.random((per_replica, *out, 1), np.float32))
    return batch


def _wait_for(path: Path, deadline: float) -> None:
    """Polls for `path` without using a core; a chief that dies mid-round would otherwise leave the
    other ranks here for ever (they are in no collective that would fail)."""
    while not path.exists():
        if time.time() > deadline:
            raise SystemExit(f"bench scaling: the chief did not finish its steps alone ({path.name}); stopped")
        time.sleep(0.005)


def _alone_step(cfg, batch) -> tuple:
    """(step, batches) of a single-device model of the same config, warmed up: what one process
    alone would run."""
    import tensorflow as tf

    from unet_dist.distribute import Runtime
    from unet_dist.losses import training_loss
    from unet_dist.trainer import build_model_and_optimizer, make_train_step

    single = Runtime(cfg, "alone, for the 1-process step")
    model, opt = build_model_and_optimizer(cfg, single, cfg.optim.learning_rate)
    step = make_train_step(model, opt, training_loss(cfg), single, int(batch["image"].shape[0]), False)
    batches = iter(tf.data.Dataset.from_tensors(batch).repeat())
    _timed(step, batches, 3)
    return step, batches


def _launch(backend: str, n: int, worker: list[str], env: dict, controller: str | None = None) -> list[dict]:
    """Runs `n` processes of the scaling worker; returns every rank's result.

    backend "independent": n single-device processes at once with no communication, the
    machine's own ceiling for n processes (shared memory bandwidth and caches, other tenants).
    controller: Horovod's, "mpi" or "gloo" (horovodrun --mpi / --gloo); only read for "horovod".
    """
    from unet_dist.distribute import free_ports

    if backend == "horovod":
        horovodrun = str(Path(sys.executable).parent / "horovodrun")
        cmd = [horovodrun, "-np", str(n), f"--{controller}", "-H", f"localhost:{n}", *worker, "--backend", "horovod"]
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
    # Each rank's line, after horovodrun's "[1,0]<stdout>:" tag; under --mpi Open MPI may end it with
    # the next tag, so read one JSON object and ignore what follows.
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(line, line.index("{"))[0] for line in out.splitlines() if '"scaling_worker"' in line]


def _summary(rounds: list[dict], per_process_batch: int) -> dict:
    """Of paired rounds: images/s of 1 process ("1") and of 2 ("2") from the median steps, and the
    efficiency, the median of the rounds' alone / synchronous step ratios."""
    return {"1": per_process_batch / float(np.median([r["alone_s"] for r in rounds])),
            "2": 2 * per_process_batch / float(np.median([r["sync_s"] for r in rounds])),
            "efficiency": float(np.median([r["alone_s"] / r["sync_s"] for r in rounds]))}


def run(args) -> dict:
    """Weak scaling: the same per-process batch on 1 and 2 processes, one thread each.

    Horovod and MultiWorker: `repeats` 2-process jobs of `rounds` rounds each (see `worker`): every
    round times `steps` synchronous steps and then the chief's 1-process step in the same job, so
    that the VM's drift (a core's speed moves by up to 40% over minutes, see docs/benchmarks.md)
    hits both alike. The efficiency is the median over all rounds of alone / synchronous step time
    (weak scaling: images/s(2) / (2 images/s(1)) at the same per-process batch).
    independent: 1 and 2 single-device processes with no communication in alternating jobs, the
    machine's own ceiling for two busy cores.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    worker = [sys.executable, "-m", "unet_dist.bench", "scaling-worker", "--steps", str(args.steps),
              "--per-replica-batch", str(args.per_replica_batch), *sum((["--set", s] for s in args.set), []),
              *(["--config", str(args.config)] if args.config else [])]
    from unet_dist import precision
    from unet_dist.distribute import wire_dtype

    cfg = _config(args, "single")  # what the workers will train, for the record
    precision.resolve(cfg.runtime)  # as each worker will ('auto' on the same machine)
    runs: dict = {}
    results: dict = {}
    for backend in args.backends:
        rows: list[dict] = []
        for rep in range(args.repeats):
            with tempfile.TemporaryDirectory() as pause:
                chief = next(r for r in _launch(backend, 2, [*worker, "--rounds", str(args.rounds),
                                                             "--pause-dir", pause], env, args.horovod_controller)
                             if r["chief"])
            rows += chief["rounds"]
            job = _summary(chief["rounds"], args.per_replica_batch)
            for k, v in job.items():
                runs.setdefault(backend, {"1": [], "2": [], "efficiency": []})[k].append(v)
            print(f"bench scaling: {backend} (job {rep + 1}/{args.repeats}): alone {job['1']:.2f}, "
                  f"2 processes {job['2']:.2f} images/s, efficiency {job['efficiency']:.1%}",
                  file=sys.stderr, flush=True)
        total = _summary(rows, args.per_replica_batch)
        ratios = [r["alone_s"] / r["sync_s"] for r in rows]
        results.update({f"{backend}_1": total["1"], f"{backend}_2": total["2"],
                        f"{backend}_efficiency": total["efficiency"],
                        f"{backend}_rounds": {"n": len(ratios), "min": min(ratios), "max": max(ratios),
                                              "quartiles": [float(q) for q in np.percentile(ratios, [25, 75])]}})
    for rep in range(args.repeats):
        for n in (1, 2):
            ips = sum(r["images_per_s"] for r in _launch("independent", n, worker, env))
            runs.setdefault("independent", {"1": [], "2": []})[str(n)].append(ips)
            print(f"bench scaling: independent x{n} (run {rep + 1}/{args.repeats}): {ips:.2f} images/s",
                  file=sys.stderr, flush=True)
    one, two = (float(np.median(runs["independent"][k])) for k in ("1", "2"))
    results["independent_1"], results["independent_2"], results["independent_efficiency"] = one, two, two / (2 * one)
    return {"bench": "scaling", "method": "paired rounds", "images_per_s": results, "runs": runs,
            "repeats": args.repeats, "rounds": args.rounds, "per_process_batch": args.per_replica_batch,
            "steps": args.steps, "statistic": "median step",
            "config": str(args.config) if args.config else None, "model": [] if args.config else SCALING_MODEL,
            "set": list(args.set), "example_size": list(cfg.data.patch_size or cfg.data.image_size),
            "precision": cfg.runtime.precision,
            "allreduce_dtype": {b: wire_dtype(cfg, b) for b in args.backends if b != "independent"},
            **({"horovod_controller": args.horovod_controller} if "horovod" in args.backends else {}), **machine()}
