"""Where each process runs: local rank and size from the launcher, its share of the CPUs, pinning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, subprocess_env

from unet_dist.config import ConfigError
from unet_dist.distribute import _local_rank_from_env, _local_size_from_env, cpu_share


def test_cpu_share_splits_the_set_into_one_contiguous_part_per_local_rank(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert [cpu_share(r, 2, [0, 1]) for r in range(2)] == [[0], [1]]
    assert [cpu_share(r, 2, range(8)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [cpu_share(r, 3, [2, 4, 6, 8, 10, 12, 14]) for r in range(3)] == [[2, 4], [6, 8], [10, 12]]
    assert [cpu_share(r, 4, [0, 1]) for r in range(4)] == [[0], [1], [0], [1]]  # oversubscribed
    assert cpu_share(0, 1, [0, 1, 2]) == [0, 1, 2]


def test_a_task_slurm_already_bound_keeps_its_cpus(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")
    assert cpu_share(1, 2, [4, 5, 6, 7]) == [4, 5, 6, 7]
    # The same variable with an unbound task (it sees the whole allocation): split as usual.
    assert cpu_share(1, 2, range(8)) == [4, 5, 6, 7] and cpu_share(0, 2, range(8)) == [0, 1, 2, 3]


def test_local_rank_and_size_of_tf_config_workers_count_only_this_host(monkeypatch):
    for var in ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "UNET_DIST_LOCAL_RANK",
                "SLURM_LOCALID", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                "UNET_DIST_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    cluster = {"chief": ["a:1000"], "worker": ["b:1000", "a:1001", "a:1002"]}
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 2}}))
    assert (_local_rank_from_env(), _local_size_from_env()) == (2, 3)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert (_local_rank_from_env(), _local_size_from_env()) == (0, 1)
    monkeypatch.setenv("HOROVOD_LOCAL_RANK", "1")  # a launcher's own variable wins
    assert _local_rank_from_env() == 1
    # A variable that is not a number is named in one line (the trainer prints it and exits).
    monkeypatch.setenv("UNET_DIST_LOCAL_SIZE", "two")
    with pytest.raises(ConfigError, match=r"^environment variable UNET_DIST_LOCAL_SIZE='two': expected an integer$"):
        _local_size_from_env()
    monkeypatch.delenv("UNET_DIST_LOCAL_SIZE")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "x(2)")
    with pytest.raises(ConfigError, match=r"SLURM_TASKS_PER_NODE='x\(2\)'"):
        _local_size_from_env()
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2(x3)")
    assert _local_size_from_env() == 2


PIN_PROBE = """
import json, os, sys
from unet_dist.config import load_config
from unet_dist.distribute import configure_threads
cfg = load_config(None, sys.argv[1:])
intra, inter, cpus = configure_threads(cfg, 1, 2)
import tensorflow as tf
float(tf.reduce_sum(tf.ones([64, 64]) @ tf.ones([64, 64])))  # TF's thread pools now exist
masks = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
print(json.dumps({"intra": intra, "cpus": cpus, "masks": list(masks.values())}))
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs")
@pytest.mark.parametrize("pin", [True, False])
def test_local_rank_one_of_two_runs_every_thread_on_its_half(pin):
    allowed = sorted(os.sched_getaffinity(0))
    proc = subprocess.run([sys.executable, "-c", PIN_PROBE, f"runtime.pin_cpus={str(pin).lower()}"], cwd=ROOT,
                          env={k: v for k, v in subprocess_env().items() if k != "SLURM_CPUS_PER_TASK"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    half = allowed[len(allowed) // 2:][: len(allowed) // 2]
    assert out["cpus"] == half and out["intra"] == len(half)
    assert len(out["masks"]) > 3  # the main thread and TensorFlow's pools
    assert all(m == (half if pin else allowed) for m in out["masks"]), out["masks"]


def test_slurm_cluster_outside_a_slurm_task_is_one_line(monkeypatch):
    from unet_dist.config import ConfigError, load_config
    from unet_dist.distribute import MultiWorkerRuntime

    for var in ("TF_CONFIG", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(None, ["runtime.cluster=slurm"])
    with pytest.raises(ConfigError, match="runtime.cluster is slurm, but this process is not a SLURM task"):
        MultiWorkerRuntime(cfg, "test")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("UNET_DIST_PORT_BASE", "88a")
    with pytest.raises(ConfigError, match="UNET_DIST_PORT_BASE='88a': must be a port number"):
        MultiWorkerRuntime(cfg, "test")


def test_commands_that_read_a_run_take_the_backend_from_how_they_were_started(monkeypatch):
    # A run trained by launch/slurm_multiworker.sbatch saved strategy multiworker and cluster slurm;
    # evaluate and predict of it on a login node, outside any SLURM task, run on one device.
    from unet_dist.config import load_config
    from unet_dist.distribute import _HOROVOD_ENV, make_trained_run_runtime

    for var in ("TF_CONFIG", "SLURM_PROCID", *_HOROVOD_ENV):
        monkeypatch.delenv(var, raising=False)
    saved = ["runtime.strategy=multiworker", "runtime.cluster=slurm"]
    assert make_trained_run_runtime(load_config(None, saved)).name == "single"
    with pytest.raises(ConfigError, match="runtime.cluster is slurm, but this process is not a SLURM task"):
        make_trained_run_runtime(load_config(None, saved), "multiworker")  # asked for: the run's cluster stands


def test_commands_that_read_a_run_compute_in_float32_unless_told(monkeypatch):
    # A run's config.yaml records the policy training resolved for its machine (mixed_float16 on a
    # GPU); evaluate and predict compute in float32 unless their --set asks, auto for this machine.
    from unet_dist.config import load_config
    from unet_dist.distribute import _HOROVOD_ENV, make_trained_run_runtime
    from unet_dist.precision import cpu_bf16_flag

    for var in ("TF_CONFIG", "SLURM_PROCID", *_HOROVOD_ENV):
        monkeypatch.delenv(var, raising=False)

    def precision(overrides):
        return make_trained_run_runtime(load_config(None, ["runtime.precision=mixed_float16"]), None,
                                        overrides).cfg.runtime.precision

    assert precision([]) == "float32"
    assert precision(["runtime.precision=mixed_bfloat16"]) == "mixed_bfloat16"
    assert precision(["runtime.precision=auto"]) == ("mixed_bfloat16" if cpu_bf16_flag() else "float32")


@pytest.mark.parametrize("flag, onednn, gpus, channels, expected", [
    ("amx_bf16", None, [], 16, True), ("avx512_bf16", "1", [], 256, True),
    ("amx_bf16", None, [], 8, False), ("amx_bf16", None, [], 24, False),  # oneDNN's slow path
    ("amx_bf16", "0", [], 16, False), ("bf16", None, [], 16, False), (None, None, [], 16, False),
    ("amx_bf16", None, ["GPU:0"], 16, False)])
def test_bfloat16_goes_into_the_batch_norm_kernel_where_that_is_fast(monkeypatch, flag, onednn, gpus, channels,
                                                                     expected):
    import tensorflow as tf

    from unet_dist import precision

    monkeypatch.setattr(precision, "cpu_bf16_flag", lambda: flag)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus)
    if onednn is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", onednn)
    precision._onednn_bf16_cpu.cache_clear()
    try:
        assert precision.bf16_batch_norm_kernel(channels) is expected
    finally:
        precision._onednn_bf16_cpu.cache_clear()


@pytest.mark.parametrize("tf_config,message", [
    ("{bad", "TF_CONFIG is not JSON"),
    ("[1]", "TF_CONFIG must be a JSON object"),
    ('{"cluster": {"worker": ["a:1"]}, "task": 0}', "TF_CONFIG: 'task' must be"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}',
     r"TF_CONFIG: task worker 3 is not in its cluster \(worker: 1 tasks\)"),
])
def test_bad_tf_config_is_one_line(monkeypatch, tf_config, message):
    from unet_dist.config import ConfigError, load_config
    from unet_dist.distribute import choose_backend

    monkeypatch.setenv("TF_CONFIG", tf_config)
    with pytest.raises(ConfigError, match=message):
        choose_backend(load_config(None, []))


def _fake_horovod(monkeypatch, fake) -> None:
    """Makes `import horovod.tensorflow as hvd` give `fake` (skips where Horovod is not installed)."""
    horovod = pytest.importorskip("horovod")
    monkeypatch.setitem(sys.modules, "horovod.tensorflow", fake)
    monkeypatch.setattr(horovod, "tensorflow", fake, raising=False)


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_horovod_on_cpu_lets_open_mpi_yield_the_core_before_mpi_init(monkeypatch, preset, expected):
    # Open MPI reads its MCA variables once, at MPI_Init inside hvd.init(). Busy-polling on the core
    # that computes the step cost 13 points of 2-process efficiency (docs/benchmarks.md); a value
    # the user or launcher set wins.
    import types

    import tensorflow as tf

    from unet_dist.config import load_config
    from unet_dist.distribute import HorovodRuntime

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])  # a CPU node
    # The runtime sets Horovod's variables too: keep them all out of this process's environment.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "OMPI_MCA_mpi_yield_when_idle"})
    seen = {}
    _fake_horovod(monkeypatch, types.SimpleNamespace(
        init=lambda: seen.setdefault("at_init", os.environ.get("OMPI_MCA_mpi_yield_when_idle")),
        rank=lambda: 0, size=lambda: 1, local_rank=lambda: 0, local_size=lambda: 1))
    if preset is not None:
        os.environ["OMPI_MCA_mpi_yield_when_idle"] = preset
    HorovodRuntime(load_config(None, ["runtime.strategy=horovod"]), "test")
    assert seen["at_init"] == expected


@pytest.mark.parametrize("precision, backend, nccl, want, expected", [
    ("float32", "multiworker", False, "auto", "float32"),
    ("mixed_bfloat16", "multiworker", False, "auto", "bfloat16"),
    ("mixed_bfloat16", "mirrored", False, "auto", "bfloat16"),
    ("mixed_bfloat16", "horovod", False, "auto", "float32"),  # Horovod has no bfloat16 allreduce
    ("mixed_bfloat16", "multiworker", True, "auto", "float32"),  # nor has TensorFlow's NCCL
    ("mixed_bfloat16", "mirrored", True, "auto", "float32"),
    ("mixed_float16", "horovod", False, "auto", "float16"),  # loss-scaled gradients
    ("mixed_float16", "mirrored", False, "auto", "float16"),
    ("mixed_float16", "multiworker", True, "auto", "float16"),
    ("float32", "multiworker", False, "bfloat16", "bfloat16"),
    ("mixed_bfloat16", "multiworker", False, "float32", "float32"),
])
def test_gradients_cross_the_wire_in_the_compute_dtype_unless_set(precision, backend, nccl, want, expected):
    from unet_dist.config import load_config
    from unet_dist.distribute import wire_dtype

    cfg = load_config(None, [f"runtime.precision={precision}", f"runtime.allreduce_dtype={want}"])
    assert wire_dtype(cfg, backend, nccl) == expected


@pytest.mark.parametrize("gpus, want, expected", [
    (0, "auto", "RING"), (2, "auto", "NCCL"), (2, "ring", "RING"), (0, "ring", "RING"), (1, "nccl", "NCCL")])
def test_multiworker_sums_with_nccl_between_gpus_and_the_ring_on_cpus(monkeypatch, gpus, want, expected):
    # TensorFlow's own AUTO stays on the ring over gRPC between GPUs too: the strategy must be
    # told NCCL.
    import tensorflow as tf

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU"] * gpus)
    given = _strategy_arguments(monkeypatch, ["runtime.strategy=multiworker", f"runtime.collective={want}"])
    assert given["communication_options"].implementation.value == expected


def _strategy_arguments(monkeypatch, overrides: list[str]) -> dict:
    """What MultiWorkerRuntime gives MultiWorkerMirroredStrategy, through a fake that records its
    arguments and stops there (no cluster is started)."""
    import tensorflow as tf

    from unet_dist.config import load_config
    from unet_dist.distribute import MultiWorkerRuntime

    given = {}

    class Stop(Exception):
        pass

    def strategy(**kwargs):
        given.update(kwargs)
        raise Stop

    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", strategy)
    with pytest.raises(Stop):
        MultiWorkerRuntime(load_config(None, overrides), "test")
    return given


@pytest.mark.parametrize("overrides, message", [
    (["runtime.collective=nccl"], r"^config key runtime.collective: nccl needs GPUs and this worker sees none"),
    (["runtime.allreduce_dtype=bfloat16"], r"^config key runtime.allreduce_dtype: bfloat16 is not supported by NCCL"),
])
def test_what_nccl_cannot_do_is_one_line_before_the_strategy_starts(monkeypatch, overrides, message):
    import tensorflow as tf

    from unet_dist.config import ConfigError, load_config
    from unet_dist.distribute import MirroredRuntime, MultiWorkerRuntime

    gpus = [] if "collective" in overrides[0] else ["GPU", "GPU"]
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus)
    for name in ("MultiWorkerMirroredStrategy", "MirroredStrategy"):
        monkeypatch.setattr(tf.distribute, name, lambda **kw: pytest.fail("the strategy started"))
    with pytest.raises(ConfigError, match=message):
        MultiWorkerRuntime(load_config(None, ["runtime.strategy=multiworker", *overrides]), "test")
    if gpus:  # MirroredStrategy between GPUs sums with NCCL as well
        with pytest.raises(ConfigError, match=message):
            MirroredRuntime(load_config(None, ["runtime.strategy=mirrored", *overrides]), "test")


@pytest.mark.parametrize("slurm, env, visible, local_rank, local_size, mine", [
    (True, {}, 4, 0, 1, [0, 1, 2, 3]),  # one task per node (the sbatch script) drives them all
    (True, {"SLURM_GPUS_ON_NODE": "4"}, 4, 2, 4, [2]),  # four tasks seeing the node's four: one each
    (True, {}, 4, 1, 2, [2, 3]),
    (True, {"SLURM_GPUS_ON_NODE": "4"}, 1, 3, 4, [0]),  # srun --gpus-per-task=1 bound the task to its own
    (True, {"SLURM_GPUS_ON_NODE": "4"}, 2, 1, 2, [0, 1]),  # --gpus-per-task=2
    (True, {}, 0, 1, 2, []),  # CPU nodes
    (False, {}, 4, 0, 1, [0, 1, 2, 3]),  # one TF_CONFIG worker per host (a pod, a VM) drives them all
    (False, {}, 4, 1, 2, [2, 3]),  # two workers of one TF_CONFIG on one host: half each
    (False, {"CUDA_VISIBLE_DEVICES": "2,3"}, 2, 1, 2, [0, 1]),  # chosen for the worker
])
def test_each_worker_computes_on_its_own_gpus(monkeypatch, slurm, env, visible, local_rank, local_size, mine):
    from unet_dist.distribute import worker_gpus

    for var in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    gpus = [f"GPU:{i}" for i in range(visible)]
    assert worker_gpus(gpus, local_rank, local_size, slurm) == [f"GPU:{i}" for i in mine]


def test_a_tf_config_worker_computes_on_its_share_of_its_hosts_gpus(monkeypatch):
    # Two workers of one TF_CONFIG on one host, each seeing its four GPUs: the strategy would put
    # both on all four. Worker 1 takes the second half.
    import json

    import tensorflow as tf

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:1111", "localhost:2222"]},
                                                "task": {"type": "worker", "index": 1}}))
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [f"GPU:{i}" for i in range(4)])
    pinned = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind: pinned.extend(devices))
    _strategy_arguments(monkeypatch, ["runtime.strategy=multiworker"])
    assert pinned == ["GPU:2", "GPU:3"]


def test_more_workers_than_the_gpus_they_share_is_one_line(monkeypatch):
    from unet_dist.config import ConfigError
    from unet_dist.distribute import worker_gpus

    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ConfigError, match=r"^SLURM runs 4 workers on this host and they share 2 GPU\(s\)"):
        worker_gpus(["GPU:0", "GPU:1"], 3, 4, slurm=True)
    with pytest.raises(ConfigError, match=r"^TF_CONFIG puts 3 workers on this host and they share 2 GPU\(s\).*"
                                          r"CUDA_VISIBLE_DEVICES$"):
        worker_gpus(["GPU:0", "GPU:1"], 2, 3, slurm=False)


@pytest.mark.parametrize("gpus, replicas", [(4, 1), (0, 0)])
def test_a_slurm_worker_has_one_replica_per_gpu_it_computes_on(monkeypatch, gpus, replicas):
    # MultiWorkerMirroredStrategy makes a replica per GPU the resolver reports. TensorFlow's
    # resolver reported the GPUs seen divided by the tasks on the node (four tasks seeing four GPUs:
    # one each, all on GPU 0; bound to one each: none), and set CUDA_VISIBLE_DEVICES too late to
    # matter.
    import tensorflow as tf

    for var in ("TF_CONFIG", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS",
                "UNET_DIST_LOCAL_SIZE", "HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                "UNET_DIST_LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    slurm = {"SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS_PER_NODE": "4",
             "SLURM_STEP_NODELIST": "gpu[1-2]", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_GPUS_ON_NODE": str(gpus),
             "UNET_DIST_PORT_BASE": "30000", "CUDA_VISIBLE_DEVICES": "0,1,2,3" if gpus else ""}
    for var, value in slurm.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [f"GPU:{i}" for i in range(gpus)])
    pinned = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda devices, kind: pinned.extend(devices))
    resolver = _strategy_arguments(monkeypatch, ["runtime.strategy=multiworker", "runtime.cluster=slurm"])[
        "cluster_resolver"]
    assert resolver.num_accelerators() == {"GPU": replicas}
    assert pinned == (["GPU:2"] if gpus else [])
    workers = resolver.cluster_spec().as_dict()["worker"]
    assert workers == [f"gpu{n}:{30000 + i}" for n in (1, 2) for i in range(4)]
    assert (resolver.task_type, resolver.task_id) == ("worker", 6)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == slurm["CUDA_VISIBLE_DEVICES"]  # SLURM's, as it was


@pytest.mark.parametrize("nccl_built, rank, local_size, warned", [
    (0, 0, 2, "built without NCCL"), (1, 0, 2, None), (0, 1, 2, None),
    (1, 0, 4, "4 Horovod ranks on this node share its 2 GPUs"), (1, 1, 4, None)])
def test_horovod_on_gpus_warns_once_of_what_slows_it(monkeypatch, capsys, nccl_built, rank, local_size, warned):
    # A Horovod built without HOROVOD_GPU_OPERATIONS sums GPU gradients through host memory, and
    # more ranks than the GPUs they see double up on them: one line each, on the chief; the run
    # goes on.
    import types

    import tensorflow as tf

    from unet_dist import distribute
    from unet_dist.config import load_config

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0", "GPU:1"])
    pinned = []
    monkeypatch.setattr(tf.config, "set_visible_devices", lambda device, kind: pinned.append(device))
    monkeypatch.setattr(distribute, "_gpu_memory_growth", lambda gpus: None)
    monkeypatch.setattr(os, "environ", dict(os.environ))
    _fake_horovod(monkeypatch, types.SimpleNamespace(
        init=lambda: None, nccl_built=lambda: nccl_built,
        rank=lambda: rank, size=lambda: local_size, local_rank=lambda: rank, local_size=lambda: local_size))
    distribute.HorovodRuntime(load_config(None, ["runtime.strategy=horovod"]), "test")
    assert pinned == [f"GPU:{rank % 2}"]  # one GPU per local rank, round the GPUs
    err = capsys.readouterr().err
    assert (warned in err) if warned else err == "", err
    assert len(err.strip().splitlines()) == int(warned is not None)


def test_horovod_asked_for_bfloat16_gradients_is_one_line(monkeypatch):
    import types

    from unet_dist.config import ConfigError, load_config
    from unet_dist.distribute import HorovodRuntime

    _fake_horovod(monkeypatch, types.SimpleNamespace(init=lambda: pytest.fail("hvd.init before the config was checked")))
    with pytest.raises(ConfigError, match=r"^config key runtime.allreduce_dtype: bfloat16 is not supported by Horovod"):
        HorovodRuntime(load_config(None, ["runtime.strategy=horovod", "runtime.allreduce_dtype=bfloat16"]), "test")


def test_under_mixed_bfloat16_convolution_gradients_are_bfloat16_values():
    # Why `allreduce_dtype: auto` sends bfloat16 under mixed_bfloat16: casting a convolution's
    # gradient to bfloat16 for the wire loses nothing (it is the float32 cast of a bfloat16 one).
    # Batch norm and the float32 output layer are rounded; so is every sum.
    import keras
    import tensorflow as tf

    from unet_dist.config import load_config
    from unet_dist.model import build_unet

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_unet(load_config(None, ["model.depth=2", "model.base_filters=4"]).model, (32, 32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.cast(model(tf.random.uniform([2, 32, 32, 3]), training=True), tf.float32) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    convs = [(v.path, g) for v, g in zip(model.trainable_variables, grads, strict=True)
             if v.path.endswith("kernel") and not v.path.startswith("logits")]
    assert len(convs) >= 8
    for path, g in convs:
        assert g.dtype == tf.float32 and bool(tf.reduce_all(tf.cast(tf.cast(g, tf.bfloat16), tf.float32) == g)), path


def test_the_batch_splits_into_replicas_and_micro_batches_or_names_the_key():
    from unet_dist.config import load_config
    from unet_dist.distribute import Runtime

    def sizes(*overrides, world=2):
        runtime = Runtime(load_config(None, list(overrides)), "test")
        runtime.world_size = world  # replicas, as a 2-process Horovod run has
        return runtime.batch_sizes()

    assert sizes("data.global_batch_size=16", "train.gradient_accumulation_steps=4") == (16, 8)
    assert sizes("data.global_batch_size=null", "data.per_replica_batch_size=6",
                 "train.gradient_accumulation_steps=3") == (12, 6)
    with pytest.raises(ConfigError, match=r"^config key train.gradient_accumulation_steps: 3 does not divide the "
                                          r"per-replica batch 8 \(global batch 16 over 2 replicas\) into equal"):
        sizes("data.global_batch_size=16", "train.gradient_accumulation_steps=3")
    with pytest.raises(ConfigError, match=r"^config key data.global_batch_size: 15 is not divisible by the 2 replicas"):
        sizes("data.global_batch_size=15")
    with pytest.raises(ConfigError, match=r"batch 6 \(global batch 6 over 1 replica\) into"):
        sizes("data.global_batch_size=6", "train.gradient_accumulation_steps=4", world=1)


def test_gpu_memory_peak_is_the_fullest_gpus_and_the_fullest_processes(monkeypatch):
    # No GPU here: the allocator's counts are faked, two GPUs in this process and a peer on rank 1.
    import numpy as np
    import tensorflow as tf

    from unet_dist.distribute import gpu_memory_peak_mib, reset_gpu_memory_peak
    from unet_dist.trainer import gpu_peak_over_processes

    class Peer:  # rank 0 of 2; rank 1's GPU peaked at 900 MiB, or it has none (-1)
        world_size, rank = 2, 0

        def __init__(self, other):
            self.other = other

        def allreduce_sum(self, value):
            return np.asarray(value) + np.array([0.0, self.other])

    assert gpu_memory_peak_mib() is None and gpu_peak_over_processes(Peer(-1.0)) is None
    assert gpu_peak_over_processes(Peer(900.0)) == 900.0  # a CPU chief still reports its peers' GPUs
    peaks, reset = {"GPU:0": 300 * 2**20, "GPU:1": 700 * 2**20}, []
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["/device:GPU:0", "/device:GPU:1"] if kind == "GPU" else [])
    monkeypatch.setattr(tf.config.experimental, "get_memory_info", lambda d: {"current": 0, "peak": peaks[d]})
    monkeypatch.setattr(tf.config.experimental, "reset_memory_stats", reset.append)
    assert gpu_memory_peak_mib() == 700.0
    assert gpu_peak_over_processes(Peer(900.0)) == 900.0 and gpu_peak_over_processes(Peer(-1.0)) == 700.0
    reset_gpu_memory_peak()
    assert reset == ["GPU:0", "GPU:1"]
