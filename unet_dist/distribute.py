"""The one place that branches on the backend: single device, MirroredStrategy,
MultiWorkerMirroredStrategy or Horovod. The only module that imports horovod.

Everything else asks a `Runtime`: who am I (rank, world_size, num_replicas, is_chief), give me my
input (`distribute`), run a step (`run_step`), reduce gradients or numbers across processes,
broadcast the initial state, print on the chief, and where to save.

Backend contract for the train step (see trainer.py): the per-replica step returns its loss already
divided by the *global* batch size; `reduce_step` *sums* the gradients and the step's reported
scalars across replicas in one collective (for every backend: Keras' own gradient all-reduce under
tf.distribute is turned off by `adopt_optimizer`), so 1 or N replicas give one result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tensorflow as tf

from unet_dist import precision
from unet_dist.config import STRATEGIES, Config, ConfigError, with_runtime_overrides
from unet_dist.data.pipeline import Shard
from unet_dist.errors import tf_reason
from unet_dist.watchdog import watched_from_outside


class CollectiveError(RuntimeError):
    """A collective failed: another process stopped answering or exited. The message is one line,
    with the backend's reason."""


# Horovod's error in every collective once its background loop has failed (Gloo gives up on a rank
# that has not answered for HOROVOD_GLOO_TIMEOUT_SECONDS, 30 s): a page, which names the cause only
# as "an exception on one of the ranks" (the loop logged it before).
_HOROVOD_SHUT_DOWN = "Horovod has been shut down"


@contextlib.contextmanager
def collective_failures():
    """Raises CollectiveError, one line, for TensorFlow's error from a collective that another
    process left: MultiWorkerMirroredStrategy's health check aborting it (Unavailable, Aborted), or
    Horovod shut down. Any other error passes unchanged."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.AbortedError) as e:
        reason = tf_reason(e)
    except tf.errors.UnknownError as e:
        if _HOROVOD_SHUT_DOWN not in str(e):
            raise
        reason = _HOROVOD_SHUT_DOWN
    else:
        return
    raise CollectiveError(f"a collective failed, another process stopped answering or exited ({reason})")

# Variables set by the launchers Horovod supports: horovodrun (Gloo), Open MPI's mpirun, MPICH/PMI.
_HOROVOD_ENV = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def choose_backend(cfg: Config, num_gpus: int | None = None) -> tuple[str, str]:
    """(backend, why) for runtime.strategy; 'auto' looks at the launcher's environment."""
    want = cfg.runtime.strategy
    if want not in STRATEGIES:
        raise ConfigError(f"config key runtime.strategy: got {want!r}; allowed: {', '.join(STRATEGIES)}")
    if "TF_CONFIG" in os.environ:
        _tf_config()  # one line for a bad one, before TensorFlow reads it
    if want != "auto":
        return want, "asked for by runtime.strategy"
    if "TF_CONFIG" in os.environ:
        return "multiworker", "TF_CONFIG is set"
    if cfg.runtime.cluster == "slurm":
        return "multiworker", "runtime.cluster is slurm"
    launched = [v for v in _HOROVOD_ENV if v in os.environ]
    if not launched and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and _env_int("SLURM_NTASKS") > 1:
        launched = ["SLURM_PROCID"]
    if launched:
        if _horovod_available():
            return "horovod", f"started by a parallel launcher ({launched[0]} is set) and Horovod is installed"
        print(f"unet_dist: {launched[0]} is set but Horovod is not installed; not using Horovod", file=sys.stderr)
    if num_gpus is None:
        num_gpus = len(tf.config.list_physical_devices("GPU"))
    if num_gpus > 1:
        return "mirrored", f"{num_gpus} GPUs visible"
    return "single", "one process and at most one GPU"


def _horovod_available() -> bool:
    try:
        import horovod.tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def free_ports(n: int) -> list[int]:
    """n free TCP ports on localhost, for local multi-worker clusters (tests, benchmarks)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tf_config() -> dict:
    """TF_CONFIG, parsed and checked: a JSON object whose task is one of its cluster's tasks."""
    raw = os.environ["TF_CONFIG"]
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not JSON ({e}): {raw[:100]}") from None
    if not isinstance(conf, dict):
        raise ConfigError(f"TF_CONFIG must be a JSON object with 'cluster' and 'task', got {raw[:100]}")
    cluster, task = conf.get("cluster") or {}, conf.get("task", {})
    if cluster:
        if not isinstance(cluster, dict) or not all(isinstance(a, list) for a in cluster.values()):
            raise ConfigError(f"TF_CONFIG: 'cluster' must map task types to lists of host:port, got {cluster}")
        if not isinstance(task, dict):
            raise ConfigError(f"TF_CONFIG: 'task' must be {{\"type\": ..., \"index\": ...}}, got {task}")
        kind, index = task.get("type"), task.get("index")
        if kind not in cluster or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
            sizes = ", ".join(f"{k}: {len(a)}" for k, a in cluster.items())
            raise ConfigError(f"TF_CONFIG: task {kind} {index} is not in its cluster ({sizes} tasks)")
    return conf


def _tf_config_local() -> tuple[int, int]:
    """(local rank, local size) of this TF_CONFIG task among the tasks on its host."""
    tf_config = _tf_config()
    cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
    tasks = [(kind, i, addr.rsplit(":", 1)[0]) for kind, addrs in cluster.items() for i, addr in enumerate(addrs)]
    mine = next((t for t in tasks if t[:2] == (task.get("type"), task.get("index"))), None)
    if mine is None:
        return 0, 1
    here = [t for t in tasks if t[2] == mine[2]]
    return here.index(mine), len(here)


def _env_int(var: str, text: str | None = None) -> int:
    """An integer environment variable (or `text`, the part of it that holds one); ConfigError naming it."""
    value = os.environ[var]
    try:
        return int(value if text is None else text)
    except ValueError:
        raise ConfigError(f"environment variable {var}={value!r}: expected an integer") from None


def _local_size_from_env() -> int:
    for var in ("HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "UNET_DIST_LOCAL_SIZE"):
        if var in os.environ:
            return max(1, _env_int(var))
    if "SLURM_NTASKS_PER_NODE" in os.environ:
        return max(1, _env_int("SLURM_NTASKS_PER_NODE", os.environ["SLURM_NTASKS_PER_NODE"].split("(")[0]))
    if "SLURM_TASKS_PER_NODE" in os.environ:  # e.g. "2(x3)" or "2,1"
        var = "SLURM_TASKS_PER_NODE"
        return max(1, _env_int(var, os.environ[var].split("(")[0].split(",")[0]))
    if "TF_CONFIG" in os.environ:  # workers of one cluster on the same host share its cores
        return _tf_config_local()[1]
    return 1


def _local_rank_from_env() -> int:
    for var in ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "UNET_DIST_LOCAL_RANK",
                "SLURM_LOCALID"):
        if var in os.environ:
            return _env_int(var)
    if "TF_CONFIG" in os.environ:
        return _tf_config_local()[0]
    return 0


def _affinity() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cpu_share(local_rank: int, local_size: int, cpus: list[int] | None = None) -> list[int]:
    """The CPUs of `cpus` (default: this process's affinity) that are this local rank's share.

    The processes on a node split the CPU set they were started with into equal contiguous parts,
    one per local rank (more ranks than CPUs: ranks share CPUs round-robin). A task that SLURM
    already bound to its own CPUs (the set is SLURM_CPUS_PER_TASK large) keeps them all.
    """
    cpus = _affinity() if cpus is None else sorted(cpus)
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if local_size <= 1 or (per_task.isdigit() and int(per_task) == len(cpus)):
        return cpus
    n = max(1, len(cpus) // local_size)
    start = (local_rank % local_size) * n
    return [cpus[(start + i) % len(cpus)] for i in range(n)]


def _pin(cpus: list[int]) -> None:
    # Every thread of the process, not only the caller: importing TensorFlow has already started
    # some, and the ones started later (TF's pools, gRPC, Horovod's) inherit the mask.
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that has exited meanwhile
            os.sched_setaffinity(int(tid), cpus)


def configure_threads(cfg: Config, local_rank: int, local_size: int) -> tuple[int, int, list[int]]:
    """Gives this process its share of the node's cores, so N ranks on a node do not oversubscribe
    it: TF's intra-op threads = the share's size, and with runtime.pin_cpus the process runs on
    those cores only (its threads do not migrate onto a neighbour's core and slow both: that
    steadied the 2-process step in docs/benchmarks.md). Returns (intra, inter, CPUs).

    Must run before TensorFlow starts its thread pools (before the first op).
    """
    allowed = _affinity()
    share = cpu_share(local_rank, local_size, allowed)
    if cfg.runtime.pin_cpus and local_size > 1 and hasattr(os, "sched_setaffinity") and share != allowed:
        _pin(share)
    intra = cfg.runtime.intra_op_threads or len(share)
    inter = cfg.runtime.inter_op_threads or max(1, min(2, intra))
    with contextlib.suppress(RuntimeError):  # already initialised (tests in one process): keep
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    return intra, inter, share


def _gpu_memory_growth(gpus) -> None:
    # Allocate GPU memory as needed instead of all of it, so data loading and other ranks fit.
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)


def gpu_memory_peak_mib() -> float | None:
    """The most memory TensorFlow's allocator has held at once on any one of this process's GPUs
    (since it started, or since `reset_gpu_memory_peak`), in MiB; None without GPUs. With memory
    growth on, this is what a run needs of a GPU, not what the allocator happened to reserve."""
    n = len(tf.config.list_logical_devices("GPU"))
    if not n:
        return None
    return max(tf.config.experimental.get_memory_info(f"GPU:{i}")["peak"] for i in range(n)) / 2**20


def each_process(runtime: Runtime, values) -> np.ndarray:
    """Every process's `values` (n floats), one row each in rank order: (world_size, n). Every
    process must call it: one `allreduce_sum` of a vector in which each process fills its own row."""
    values = np.asarray(values, np.float64).ravel()
    rows = np.zeros((runtime.world_size, values.size))
    rows[runtime.rank] = values
    return np.asarray(runtime.allreduce_sum(rows.ravel())).reshape(rows.shape)


def reset_gpu_memory_peak() -> None:
    """Starts `gpu_memory_peak_mib`'s count again on every GPU of this process (a benchmark's
    variants, one after another in one process)."""
    for i in range(len(tf.config.list_logical_devices("GPU"))):
        tf.config.experimental.reset_memory_stats(f"GPU:{i}")


def collective_implementation(cfg: Config, num_gpus: int) -> str:
    """'nccl' or 'ring': runtime.collective for MultiWorkerMirroredStrategy, 'auto' resolved.

    TensorFlow's own AUTO keeps the workers on its ring over gRPC even between GPUs: it takes NCCL
    only when asked (the op's communication hint, or ConfigProto's collective_nccl, which the
    strategy sets in graph mode only). So auto asks for NCCL where this worker computes on GPUs.
    """
    want = cfg.runtime.collective
    if want == "auto":
        return "nccl" if num_gpus else "ring"
    if want == "nccl" and not num_gpus:
        raise ConfigError("config key runtime.collective: nccl needs GPUs and this worker sees none; "
                          "use ring or auto")
    return want


def wire_dtype(cfg: Config, backend: str, nccl: bool = False) -> str:
    """float32, float16 or bfloat16: runtime.allreduce_dtype, with 'auto' resolved for
    runtime.precision (already resolved itself) and the backend. nccl: the gradients are summed by
    NCCL (tf.distribute between GPUs), whose TensorFlow kernels have no bfloat16."""
    want = cfg.runtime.allreduce_dtype
    if want == "auto":
        # The dtype the step computes in (as PyTorch FSDP's reduce_dtype follows its param_dtype).
        # Under mixed_bfloat16 a convolution's gradient is the float32 cast of a bfloat16 one, so
        # sending it as bfloat16 loses nothing; the batch norms' and the float32 output layer's few
        # values are rounded to 8 significant bits, and so is every sum (measured: val IoU after
        # the demo on 2 workers 0.975-0.977 either way, docs/benchmarks.md). Under
        # mixed_float16 the gradients are still loss-scaled when summed (apply() unscales them), so
        # small ones survive float16, and an overflow on the wire is caught like any other: the
        # scale halves and the step is skipped.
        want = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(cfg.runtime.precision, "float32")
        if want == "bfloat16" and (backend == "horovod" or nccl):
            # Horovod 0.28's allreduce and TensorFlow's NCCL kernels take float16 and float32 but
            # not bfloat16.
            want = "float32"
    return want


def _refuse_bfloat16_wire(cfg: Config, by: str) -> None:
    """One line for gradients asked to cross an all-reduce without bfloat16 (`by` names it) in
    bfloat16, before the backend starts (`wire_dtype`'s auto sends float32 there)."""
    if cfg.runtime.allreduce_dtype == "bfloat16":
        raise ConfigError(f"config key runtime.allreduce_dtype: bfloat16 is not supported by {by}; "
                          "use float16, float32 or auto")


_NCCL = "NCCL in TensorFlow (the all-reduce between GPUs)"


class Runtime:
    """The single-device runtime; the others override what differs."""

    name = "single"

    def __init__(self, cfg: Config, reason: str):
        self.cfg = cfg
        self.reason = reason
        self.rank, self.world_size = 0, 1
        self.local_rank, self.local_size = 0, 1
        self.strategy: tf.distribute.Strategy | None = None
        self.threads = (0, 0)
        self.cpus: list[int] = []  # the CPUs this process runs on (configure_threads)
        self.nccl = False  # gradients summed by NCCL (tf.distribute between GPUs)

    # -- identity
    @property
    def is_chief(self) -> bool:
        return self.rank == 0

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync if self.strategy else self.world_size

    @property
    def stall_seconds(self) -> int:
        """runtime.stall_shutdown_seconds where there are other processes to wait for; 0 (nothing
        watched) for one process."""
        return self.cfg.runtime.stall_shutdown_seconds if self.world_size > 1 else 0

    @property
    def process_shard(self) -> Shard:
        """This process's share of a data set that is read once per process (evaluation)."""
        return Shard(self.rank, self.world_size)

    def print(self, *args, **kwargs) -> None:
        """Prints on the chief only; other ranks print only errors (to stderr, themselves)."""
        if self.is_chief:
            print(*args, **kwargs, flush=True)

    # -- batch arithmetic
    def batch_sizes(self) -> tuple[int, int]:
        """(global, per-replica) batch sizes from data.global_batch_size or data.per_replica_batch_size.
        The per-replica batch must split into train.gradient_accumulation_steps equal micro-batches."""
        d, n, k = self.cfg.data, self.num_replicas, self.cfg.train.gradient_accumulation_steps
        if d.per_replica_batch_size is not None:
            sizes = d.per_replica_batch_size * n, d.per_replica_batch_size
        elif d.global_batch_size % n:
            raise ConfigError(f"config key data.global_batch_size: {d.global_batch_size} is not divisible by the "
                              f"{n} replicas; use a multiple of {n} or set data.per_replica_batch_size")
        else:
            sizes = d.global_batch_size, d.global_batch_size // n
        if sizes[1] % k:
            raise ConfigError(f"config key train.gradient_accumulation_steps: {k} does not divide the per-replica batch "
                              f"{sizes[1]} (global batch {sizes[0]} over {n} replica{'s' * (n != 1)}) into equal micro-batches")
        return sizes

    # -- execution
    def scope(self):
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()

    def distribute(self, dataset_fn: Callable[[Shard, int], tf.data.Dataset]):
        """dataset_fn(shard, per_pipeline_batch) -> Dataset; returns what `run_step` takes as its batch."""
        global_batch, _ = self.batch_sizes()
        return dataset_fn(Shard(0, 1), global_batch)

    def run_step(self, step_fn: Callable, *args) -> dict:
        """Calls step_fn(*args) on every replica, where step_fn returns values that are already the
        same on every replica (sums from `reduce_step`); returns them once."""
        return step_fn(*args)

    def reduce_step(self, grads: list, scalars: dict) -> tuple[list, dict]:
        """Inside `run_step`: sums this replica's gradients and the step's scalars (name -> scalar)
        over all replicas, in as few round trips as the backend allows while letting the last
        layers' gradients travel before backprop has reached the first layers (tf.distribute: one
        all-reduce in packs; Horovod: per-gradient allreduces that it fuses per cycle).
        Returns (summed gradients, summed scalars)."""
        return grads, scalars

    def wire_dtype(self) -> str:
        """The dtype this backend's gradients cross the wire in (`wire_dtype`); call after
        precision.resolve. One process sends nothing; this is what it would send."""
        return wire_dtype(self.cfg, self.name, self.nccl)

    def replica_sum(self, tensors: list) -> list:
        """Inside `run_step`, in the forward pass: sums float32 tensors over all replicas, one
        collective; differentiable (the gradient is summed the same way). For statistics of the
        global batch (model.sync_batch_norm)."""
        return list(tensors)

    def adopt_optimizer(self, optimizer) -> None:
        """Prepares a Keras optimizer for gradients that `reduce_step` has already summed."""

    def allreduce_sum(self, value: np.ndarray) -> np.ndarray:
        """Sums a host array over processes (every process must call it)."""
        return np.asarray(value)

    def sum_shares(self, value: np.ndarray, what: str, hint: str = "") -> np.ndarray:
        """`allreduce_sum` of what each process computed from its own share of some work (an
        evaluation's counts, predict's), where a process that has finished waits for the others.
        That wait is watched (`watched_from_outside`) for runtime.stall_shutdown_seconds: a process
        that stopped answering would leave it waiting for ever under Horovod's MPI controller, and
        under MultiWorkerMirroredStrategy a peer that is alive but hung. `what` is what the others have
        not finished and `hint` what to change when a share is that slow by right, for the line.
        Raises CollectiveError when another process left the sum (`collective_failures`)."""
        seconds = self.stall_seconds
        with watched_from_outside(seconds, f"{_prog()}: error: rank {self.rank}: the other processes have not "
                                           f"finished {what} {seconds:g} s after this one did "
                                           f"(runtime.stall_shutdown_seconds {seconds:g}): one of them stopped "
                                           f"answering, or its share takes that much longer{hint}; ending this "
                                           "process so that the launcher ends the job"):
            with collective_failures():
                return self.allreduce_sum(value)

    def sum_shares_each(self, arrays: list, what: str, hint: str = "") -> list[np.ndarray]:
        """`sum_shares` of several float64 arrays (or numbers) in one collective, each back in its
        shape."""
        total = self.sum_shares(np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64, copy=False), what,
                                hint)
        ends = np.cumsum([np.size(a) for a in arrays])
        return [part.reshape(np.shape(a)) for a, part in zip(arrays, np.split(total, ends[:-1]), strict=True)]

    def broadcast_state(self, variables: list) -> None:
        """Makes every process start from rank 0's values (Horovod only; tf.distribute syncs itself)."""

    def average_replicas(self, variables: list) -> None:
        """Sets each float32 variable to its mean over every replica's copy (every process must
        call it): for state each replica updates on its own, batch norm's moving statistics, before
        they are evaluated or saved. One collective."""

    def barrier(self) -> None:
        pass

    # -- saving
    def saves(self) -> bool:
        """Whether this process takes part in checkpoint saves."""
        return self.is_chief

    def save_dir(self, directory: Path) -> Path:
        """Where this process writes a checkpoint meant for `directory`."""
        return directory

    def cleanup_save_dir(self, directory: Path) -> None:
        pass


def _flatten(variables: list) -> tf.Tensor:
    """The variables' values, concatenated into one float32 vector (one collective for all)."""
    return tf.concat([tf.reshape(tf.convert_to_tensor(v.value), [-1]) for v in variables], 0)


def _assign_flat(variables: list, flat: tf.Tensor) -> None:
    """Assigns `_flatten`'s layout back: each variable its slice, in its shape."""
    for v, part in zip(variables, tf.split(flat, [int(np.prod(v.shape)) for v in variables]), strict=True):
        v.assign(tf.reshape(part, v.shape))


class _Packed:
    """Named scalars as one (n,) float32 vector, so that summing them over replicas takes one
    collective, not one per key (or none of its own: `reduce_step` adds it to the gradients').
    Keys are fixed when the step traces.
    """

    def __init__(self):
        self.keys: list[str] = []

    def pack(self, out: dict) -> tf.Tensor:
        self.keys = sorted(out)
        return tf.stack([tf.cast(out[k], tf.float32) for k in self.keys])

    def unpack(self, vector: tf.Tensor) -> dict:
        return dict(zip(self.keys, tf.unstack(vector, num=len(self.keys)), strict=True))


def _already_reduced(grads_and_vars):
    return list(grads_and_vars)


class MirroredRuntime(Runtime):
    """tf.distribute: MirroredStrategy (one process, all local devices) and the multi-worker base."""

    name = "mirrored"

    def __init__(self, cfg: Config, reason: str, strategy: tf.distribute.Strategy | None = None,
                 nccl: bool = False):
        """strategy: a strategy built by a subclass, which says whether it sums with NCCL (`nccl`)."""
        super().__init__(cfg, reason)
        if strategy is None:
            gpus = tf.config.list_physical_devices("GPU")
            nccl = bool(gpus)  # MirroredStrategy's default between GPUs is NcclAllReduce
            if nccl:
                _refuse_bfloat16_wire(cfg, _NCCL)
            devices = None
            if cfg.runtime.cpu_devices > 1 and not gpus:
                devices = [d.name for d in tf.config.list_logical_devices("CPU")]
            strategy = tf.distribute.MirroredStrategy(devices=devices)
        self.nccl = nccl
        self.strategy = strategy
        self._averager = None

    def distribute(self, dataset_fn):
        _, per_replica = self.batch_sizes()

        def fn(ctx: tf.distribute.InputContext):
            return dataset_fn(Shard(ctx.input_pipeline_id, ctx.num_input_pipelines), per_replica)

        return self.strategy.distribute_datasets_from_function(fn)

    def run_step(self, step_fn, *args):
        out = self.strategy.run(step_fn, args=args)
        return {k: self.strategy.experimental_local_results(v)[0] for k, v in out.items()}

    def reduce_step(self, grads, scalars):
        # Packs of runtime.allreduce_pack_mb: the first packs (the last layers' gradients, which
        # backprop computes first) are reduced while the earlier layers' are still being computed.
        packed = _Packed()
        options = tf.distribute.experimental.CommunicationOptions(
            bytes_per_pack=int(self.cfg.runtime.allreduce_pack_mb * 2**20))
        ctx, vector = tf.distribute.get_replica_context(), packed.pack(scalars)
        wire = self.wire_dtype()
        if wire == "float32":
            *grads, vector = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [*grads, vector], options=options)
            return grads, packed.unpack(vector)
        # 16 bits on the wire halve the bytes (the all-reduce of 6.7 M gradients between two CPU
        # workers: 58-66 ms in float32, 31-34 in float16, 35-38 in bfloat16, docs/benchmarks.md). A
        # pack holds one dtype, and the scalars stay float32 (the loss in 16 bits has 3 digits or
        # fewer): they go in a small collective of their own, issued first. Collectives run in the
        # order they are issued, so it runs as soon as the forward pass has the loss, during
        # backprop, instead of adding a round trip after the last gradient pack.
        vector = ctx.all_reduce(tf.distribute.ReduceOp.SUM, vector)
        sent = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [tf.cast(g, wire) for g in grads], options=options)
        return [tf.cast(w, g.dtype) for w, g in zip(sent, grads, strict=True)], packed.unpack(vector)

    def replica_sum(self, tensors):
        # all_reduce's SUM has a custom gradient that all-reduces the incoming gradients.
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, list(tensors))

    def average_replicas(self, variables):
        if not variables or self.num_replicas == 1:
            return
        if self._averager is None:  # traced once: the trainer passes the same variables each time
            @tf.function(autograph=False)
            def average():
                # A MirroredVariable read in replica context is that replica's copy; assigned in
                # cross-replica context, every copy (of every worker) takes the value.
                local = self.strategy.run(lambda: _flatten(variables))
                _assign_flat(variables, self.strategy.reduce(tf.distribute.ReduceOp.MEAN, local, axis=None))

            self._averager = average
        self._averager()

    def adopt_optimizer(self, optimizer):
        # Keras 3 sums the gradients over replicas itself inside apply(), in a collective of its own
        # with default options. reduce_step has summed them already (with the step's scalars, in
        # packs), so Keras' sum must be skipped: it is a private method, so check it is there; the
        # equivalence tests fail if gradients were summed twice or not at all.
        for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
            if opt is None:
                continue
            if not callable(getattr(opt, "_all_reduce_sum_gradients", None)):
                import keras

                raise RuntimeError(f"unet_dist: Keras {keras.__version__}'s {type(opt).__name__} has no "
                                   "_all_reduce_sum_gradients to turn off, which the tf.distribute backends need "
                                   "(tested with Keras 3.15); use the Keras version tools/setup.sh installs")
            opt._all_reduce_sum_gradients = _already_reduced


def worker_gpus(gpus: list, local_rank: int, local_size: int, slurm: bool) -> list:
    """The GPUs, of those this MultiWorker worker sees (`gpus`), that it computes on.

    All of them where they were chosen for it, or where it is the only worker on its host; else
    worker `local_rank` of the `local_size` on its host takes its share, in order, as Horovod's ranks
    take one GPU each. Chosen: under SLURM (`slurm`), a task bound to GPUs of its own
    (--gpus-per-task, --gpu-bind) sees fewer than SLURM_GPUS_ON_NODE, the step's GPUs on the node;
    under TF_CONFIG, CUDA_VISIBLE_DEVICES is set. TensorFlow itself gives every worker all it sees
    (TF_CONFIG), or (its SLURM resolver) the GPUs it sees divided by the tasks on its node, which is
    none for a task bound to one GPU, and names them in CUDA_VISIBLE_DEVICES after TensorFlow has
    read it.
    """
    if not gpus or local_size <= 1:
        return list(gpus)
    if slurm:
        chosen = "SLURM_GPUS_ON_NODE" in os.environ and len(gpus) < _env_int("SLURM_GPUS_ON_NODE")
    else:
        chosen = "CUDA_VISIBLE_DEVICES" in os.environ
    if chosen:
        return list(gpus)
    share = len(gpus) // local_size
    if not share:
        who = "SLURM runs" if slurm else "TF_CONFIG puts"
        fix = ("run one task per node, which then drives all of the node's GPUs (launch/slurm_multiworker.sbatch), or "
               "bind them with srun --gpus-per-task") if slurm else "give each worker its GPUs in CUDA_VISIBLE_DEVICES"
        raise ConfigError(f"{who} {local_size} workers on this host and they share {len(gpus)} GPU(s): "
                          f"MultiWorkerMirroredStrategy needs a GPU per worker; {fix}")
    return list(gpus[local_rank * share:(local_rank + 1) * share])


class _SlurmResolver(tf.distribute.cluster_resolver.SlurmClusterResolver):
    """SLURM's cluster, its workers computing on the `gpus` GPUs worker_gpus chose (CPUs at 0).

    MultiWorkerMirroredStrategy makes one replica per GPU that num_accelerators reports. The
    resolver's own hand-out of GPUs is switched off: it is given one placeholder GPU per task,
    which only spaces the tasks' ports (it lists no task on a node without GPUs).
    """

    def __init__(self, port_base: int, gpus: int):
        tasks = _env_int("SLURM_STEP_NUM_TASKS") if "SLURM_STEP_NUM_TASKS" in os.environ else _local_size_from_env()
        super().__init__(port_base=port_base, gpus_per_node=tasks, gpus_per_task=1, auto_set_gpu=False)
        self._gpus = gpus

    def num_accelerators(self, task_type=None, task_id=None, config_proto=None):
        return {"GPU": self._gpus}


class MultiWorkerRuntime(MirroredRuntime):
    """MultiWorkerMirroredStrategy; the cluster from TF_CONFIG or SLURM's environment."""

    name = "multiworker"

    def __init__(self, cfg: Config, reason: str):
        resolver, gpus = None, tf.config.list_physical_devices("GPU")
        seen = gpus
        if "TF_CONFIG" not in os.environ and cfg.runtime.cluster == "slurm":
            if "SLURM_PROCID" not in os.environ:
                raise ConfigError("config key runtime.cluster is slurm, but this process is not a SLURM task (no "
                                  "SLURM_PROCID): start it with srun, as launch/slurm_multiworker.sbatch does, or "
                                  "set runtime.cluster=none")
            port = os.environ.get("UNET_DIST_PORT_BASE", "8888")
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"UNET_DIST_PORT_BASE={port!r}: must be a port number (the first worker's)")
            gpus = worker_gpus(gpus, _local_rank_from_env(), _local_size_from_env(), slurm=True)
            resolver = _SlurmResolver(int(port), len(gpus))
        elif "TF_CONFIG" in os.environ:  # the strategy computes on every GPU left visible
            gpus = worker_gpus(gpus, *_tf_config_local(), slurm=False)
        if gpus != seen:
            tf.config.set_visible_devices(gpus, "GPU")  # before TensorFlow starts its devices
        implementation = collective_implementation(cfg, len(gpus))
        if implementation == "nccl":
            _refuse_bfloat16_wire(cfg, _NCCL)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=tf.distribute.experimental.CommunicationImplementation[implementation.upper()]))
        super().__init__(cfg, reason, strategy, nccl=implementation == "nccl")
        resolver = strategy.cluster_resolver
        # Every "chief" and "worker" task computes (a TF_CONFIG may name one chief beside the
        # workers, as Vertex AI's and Kubeflow's do): ranks count the chief first, as TensorFlow
        # numbers the tasks of a collective. Worker 0 is the chief only where there is no chief.
        spec = resolver.cluster_spec().as_dict()
        tasks = [(kind, i) for kind in ("chief", "worker") for i in range(len(spec.get(kind, [])))]
        me = (resolver.task_type, int(resolver.task_id or 0))
        self.rank = tasks.index(me) if me in tasks else 0
        self.world_size = max(1, len(tasks))

    def allreduce_sum(self, value):
        value = np.asarray(value)
        local = len(self.strategy.extended.worker_devices)

        # Each worker contributes its value once, however many local replicas it has.
        def fn(ctx):
            keep = ctx.replica_id_in_sync_group % local == 0
            return tf.constant(value if keep else np.zeros_like(value))

        per_replica = self.strategy.experimental_distribute_values_from_function(fn)
        try:
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()
        except tf.errors.OpError as e:
            # Eagerly, TensorFlow sums across workers in a multiprocessing ThreadPool that it leaves
            # open when the collective fails (a peer stopped). The traceback's frames hold it until
            # the interpreter exits, where its __del__ writes to a pipe already closed and prints
            # "Exception ignored in: <function Pool.__del__>" and a traceback after our one-line
            # error. Clearing those frames lets it go now, quietly.
            traceback.clear_frames(e.__traceback__)
            raise

    def barrier(self):
        self.allreduce_sum(np.zeros(1, np.float32))

    # MultiWorkerMirroredStrategy: every worker must take part in a save (the variables' values
    # are gathered collectively); non-chief workers write to a temporary folder and delete it.
    def saves(self) -> bool:
        return True

    def save_dir(self, directory: Path) -> Path:
        if self.is_chief:
            return directory
        return Path(tempfile.gettempdir()) / f"unet_dist_worker{self.rank}_{os.getpid()}" / directory.name

    def cleanup_save_dir(self, directory: Path) -> None:
        if not self.is_chief:
            shutil.rmtree(self.save_dir(directory).parent, ignore_errors=True)


class HorovodRuntime(Runtime):
    """Horovod: one process per device, gradients summed with allreduce (`reduce_step`)."""

    name = "horovod"

    def __init__(self, cfg: Config, reason: str):
        super().__init__(cfg, reason)
        _refuse_bfloat16_wire(cfg, "Horovod (its allreduce takes float16 or float32)")
        import horovod.tensorflow as hvd

        # Horovod: a rank that stops answering (hung, stopped, lost) ends the job after the stall
        # shutdown time instead of leaving the others waiting in a collective forever. Ours
        # (watchdog.py) ends it first, in one line and under the MPI controller too; Horovod's, one
        # stall check later, is the backstop. Variables already set in the environment (by a
        # launcher or the user) win, as in Horovod itself.
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(cfg.runtime.stall_check_seconds))
        if cfg.runtime.stall_shutdown_seconds:
            os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
                                  str(cfg.runtime.stall_shutdown_seconds + cfg.runtime.stall_check_seconds))
        if cfg.runtime.horovod_cycle_time_ms:
            # Horovod: with one core per rank its background thread competes with the compute
            # thread; a longer cycle leaves the core to the step (docs/benchmarks.md).
            os.environ.setdefault("HOROVOD_CYCLE_TIME", str(cfg.runtime.horovod_cycle_time_ms))
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            # Horovod over MPI: Open MPI busy-polls while a rank waits in a collective, on the core
            # that also computes this rank's step when training on CPU. Yielding between polls
            # gives the core back: 2-process efficiency 93.4% in the scaling bench, against 82% in
            # a paired job busy-polling (docs/benchmarks.md). Read at MPI_Init, in hvd.init() below;
            # on GPU ranks the core is otherwise idle, and polling keeps the latency low.
            os.environ.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
        self.hvd = hvd
        hvd.init()
        self.rank, self.world_size = hvd.rank(), hvd.size()
        self.local_rank, self.local_size = hvd.local_rank(), hvd.local_size()
        if gpus:
            # Horovod: pin one GPU per local rank.
            tf.config.set_visible_devices(gpus[self.local_rank % len(gpus)], "GPU")
            _gpu_memory_growth([gpus[self.local_rank % len(gpus)]])
            if self.is_chief and 1 < len(gpus) < self.local_size:
                # Horovod: ranks that each see one GPU (srun --gpus-per-task=1) were given theirs;
                # ranks that see several and outnumber them double up, competing for each GPU.
                print(f"{_prog()}: warning: {self.local_size} Horovod ranks on this node share its {len(gpus)} GPUs "
                      f"(GPU i computes for local ranks i, i + {len(gpus)}, ...); start one rank per GPU",
                      file=sys.stderr, flush=True)
            if not hvd.nccl_built() and self.is_chief:
                # Such a build (tools/build_horovod.sh without HOROVOD_GPU_OPERATIONS=NCCL) still
                # trains, but every allreduce copies the gradients to host memory and sums them there.
                print(f"{_prog()}: warning: Horovod was built without NCCL, so the GPUs' gradients are summed in "
                      "host memory; for NCCL rebuild it with HOROVOD_GPU_OPERATIONS=NCCL (README, Scaling out)",
                      file=sys.stderr, flush=True)

    def distribute(self, dataset_fn):
        _, per_replica = self.batch_sizes()
        return dataset_fn(Shard(self.rank, self.world_size), per_replica)

    def reduce_step(self, grads, scalars):
        # Horovod: each rank's loss is already divided by the global batch, so the sum is the mean
        # gradient. Keras 3 variables break DistributedGradientTape (stack-facts.md): reduce directly.
        # The scalars (from the forward pass) go first and in float32: float16 suits gradients on
        # the wire, not the loss (3 digits; inf above 65504).
        packed = _Packed()
        vector = self.hvd.allreduce(packed.pack(scalars), op=self.hvd.Sum, name="report")
        compression = self.hvd.Compression.fp16 if self.wire_dtype() == "float16" else self.hvd.Compression.none
        if self.cfg.runtime.deterministic and self.world_size > 2:
            # One group has one fused layout, so each value is summed in the same ring order in
            # every run; with 2 ranks a + b == b + a whatever the layout.
            grads = self.hvd.grouped_allreduce(grads, op=self.hvd.Sum, compression=compression)
        else:
            # One allreduce per gradient: each is enqueued as backprop produces it and Horovod fuses
            # those ready in the same cycle, so the last layers' gradients are negotiated and summed
            # while the first layers' are still computed. A single group waits for the last
            # gradient and then for a whole negotiation cycle (docs/benchmarks_notes.md: 0.8-4.7
            # points of 2-process efficiency on CPU, in-job comparisons).
            grads = [self.hvd.allreduce(g, op=self.hvd.Sum, compression=compression) for g in grads]
        return grads, packed.unpack(vector)

    def replica_sum(self, tensors):
        # Horovod registers the gradient of a grouped allreduce: a grouped allreduce of the gradients.
        return self.hvd.grouped_allreduce(list(tensors), op=self.hvd.Sum)

    def allreduce_sum(self, value):
        value = np.asarray(value)
        out = self.hvd.allreduce(tf.constant(value.astype(np.float64)), op=self.hvd.Sum, name="host_sum")
        return out.numpy().astype(value.dtype)

    def average_replicas(self, variables):
        if not variables or self.world_size == 1:
            return
        _assign_flat(variables, self.hvd.allreduce(_flatten(variables), op=self.hvd.Average, name="average_replicas"))

    def broadcast_state(self, variables):
        # Horovod: start every rank from rank 0's weights and optimizer state (also after a restore).
        # Broadcast the backing tf.Variables: Keras 3 variables are not assignable by Horovod.
        backing = [getattr(v, "value", v) for v in variables]
        self.hvd.broadcast_variables(backing, root_rank=0)

    def barrier(self):
        self.hvd.allreduce(tf.zeros([1]), name="barrier")


def _prog() -> str:
    """The command this process runs (train, predict, evaluate), for the lines it prints."""
    return Path(sys.argv[0]).stem if sys.argv and sys.argv[0] not in ("", "-c") else "unet_dist"


def make_runtime(cfg: Config) -> Runtime:
    """Creates the runtime: call first, before any other TensorFlow work (threads, devices)."""
    backend, why = choose_backend(cfg)
    local = backend in ("horovod", "multiworker")
    local_size = _local_size_from_env() if local else 1
    *threads, cpus = configure_threads(cfg, _local_rank_from_env() if local else 0, local_size)
    if cfg.runtime.cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        with contextlib.suppress(RuntimeError):  # already initialised: keep what exists
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * cfg.runtime.cpu_devices)
    if backend != "horovod":
        _gpu_memory_growth(tf.config.list_physical_devices("GPU"))
    if backend == "single":
        rt = Runtime(cfg, why)
    elif backend == "mirrored":
        rt = MirroredRuntime(cfg, why)
    elif backend == "horovod" and not _horovod_available():
        raise ConfigError("config key runtime.strategy: horovod is not installed (run make setup)")
    elif backend in ("multiworker", "horovod"):
        # Their start waits for every process of the job (MPI_Init, the strategy's cluster), for
        # ever where one never starts, and the strategy holds the GIL while it waits: watched from
        # a child process, with the start-up's limit.
        start = cfg.runtime.stall_shutdown_start_seconds if cfg.runtime.stall_shutdown_seconds else 0
        with watched_from_outside(start, f"{_prog()}: error: {backend} has not come up {start:g} s after its start "
                                         f"(runtime.stall_shutdown_start_seconds {start:g}): another process of the job "
                                         "did not start or cannot be reached; ending this process so that the launcher "
                                         "ends the job"):
            rt = (MultiWorkerRuntime if backend == "multiworker" else HorovodRuntime)(cfg, why)
    else:  # choose_backend validated the name
        raise AssertionError(backend)
    rt.threads, rt.cpus = tuple(threads), cpus
    rt.local_size = max(rt.local_size, local_size)
    return rt


def make_trained_run_runtime(cfg: Config, strategy: str | None = None, overrides: list[str] | None = None) -> Runtime:
    """`make_runtime` for a command that reads a trained run (evaluate, predict): the backend follows
    how this command was started, not how the training was. `cfg` is the run's config; its
    runtime.strategy becomes `strategy` (a --strategy flag), else auto. Without a --strategy the
    run's runtime.cluster is dropped too: a run trained by launch/slurm_multiworker.sbatch says
    slurm, and `evaluate` on a login node, outside any SLURM task, would be refused. `overrides`:
    the command's --set runtime.KEY=VALUE items, applied last (ConfigError naming a wrong one).

    runtime.precision is float32 unless `overrides` set it (auto is resolved for this machine): the
    run's config records the policy its training resolved for the machine it trained on, and a
    GPU's mixed_float16 would be emulated, slowly, on a CPU. The caller builds its models under
    runtime.cfg.runtime.precision."""
    cfg.runtime.strategy = strategy or "auto"
    if strategy is None:
        cfg.runtime.cluster = "none"
    cfg.runtime.precision = "float32"
    cfg = with_runtime_overrides(cfg, overrides or [])
    precision.resolve(cfg.runtime)
    return make_runtime(cfg)
