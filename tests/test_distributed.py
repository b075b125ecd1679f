"""Distribution for real on CPU: one process, MirroredStrategy over two logical CPU devices,
horovodrun -np 2 (Gloo), mpirun -np 2, and two MultiWorkerMirroredStrategy workers (TF_CONFIG)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, model_weights, subprocess_env, tiny_overrides
from PIL import Image

from unet_dist.distribute import free_ports

pytestmark = pytest.mark.dist
BIN = Path(sys.executable).parent
HOROVODRUN = BIN / "horovodrun"
needs_horovod = pytest.mark.skipif(not HOROVODRUN.exists(), reason="Horovod not installed (run make setup)")
needs_mpi = pytest.mark.skipif(shutil.which("mpirun") is None, reason="Open MPI not installed")

# Batch norm off here: with per-replica statistics (the default) the same global batch gives a
# different model on 2 replicas than on 1. EQUIV_SYNC_BN (below) turns it on, over the global batch.
EQUIV = tiny_overrides(steps=5) + ["model.norm=none", "optim.name=sgd", "optim.learning_rate=0.05",
                                   "optim.momentum=0.9", "train.checkpoint_every_steps=5",
                                   "data.augment.elastic=true"]
EQUIV_SYNC_BN = [o for o in EQUIV if o != "model.norm=none"] + ["model.sync_batch_norm=true"]


def _args(data, workdir, overrides, module="unet_dist.train", deterministic=True):
    out = ["-m", module, "--data", str(data), "--workdir", str(workdir)] + (["--deterministic"] if deterministic else [])
    for o in overrides:
        out += ["--set", o]
    return out



def _check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def python_run(*args, timeout=600):
    """One process: `python ARGS`."""
    return _check(subprocess.run([sys.executable, *args], cwd=ROOT, env=subprocess_env(), capture_output=True,
                                 text=True, timeout=timeout))


def horovodrun(*args, np_=2, timeout=600):
    cmd = [str(HOROVODRUN), "-np", str(np_), "--gloo", "-H", f"localhost:{np_}", sys.executable, *args]
    return _check(subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout))


def mpirun(*args, np_=2, timeout=600):
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np_), "-bind-to", "none", "-map-by", "slot",
           "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL", sys.executable, *args]
    return _check(subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout))


def multiworker(*args, workers=2, chief=False, timeout=600):
    """`workers` TF_CONFIG tasks of one local cluster: all "worker", or (chief=True) a "chief" and
    workers-1 of them, as Vertex AI and Kubeflow name them. Returns their CompletedProcesses, chief first."""
    ports = free_ports(workers)
    tasks = [("chief", 0)] * chief + [("worker", i) for i in range(workers - chief)]
    cluster: dict = {}
    for (kind, _), port in zip(tasks, ports, strict=True):
        cluster.setdefault(kind, []).append(f"localhost:{port}")
    procs = []
    for kind, i in tasks:
        tf_config = json.dumps({"cluster": cluster, "task": {"type": kind, "index": i}})
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=subprocess_env(TF_CONFIG=tf_config),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(_check(subprocess.CompletedProcess(p.args, p.returncode, out, err)))
    return outs


def _losses(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def _assert_same_run(ref, other, name, rtol=1e-5):
    la, lb = _losses(ref), _losses(other)
    assert len(la) == len(lb) == 5, (name, la, lb)
    np.testing.assert_allclose(lb, la, rtol=rtol, err_msg=f"{name}: loss per step")
    wa, wb = model_weights(ref, 5), model_weights(other, 5)
    assert wa.keys() == wb.keys() and wa
    # Relative difference of the whole weight vector: float32 sums of per-replica gradients differ
    # from one full-batch sum in the last bits, which is noise relative to a tiny bias vector's
    # own scale but not relative to the model's.
    diff = np.sqrt(sum(np.sum((wb[k] - wa[k]) ** 2) for k in wa))
    norm = np.sqrt(sum(np.sum(wa[k] ** 2) for k in wa))
    worst = max(wa, key=lambda k: np.abs(wb[k] - wa[k]).max())
    assert diff / norm <= rtol, f"{name}: weights differ by {diff / norm:.2e} (relative); most in {worst}"


def _one_process(shards, tmp_path_factory, name, overrides):
    """The reference run of a module-scoped fixture: one device, in this process (the replicas are
    the runs under test; a child process would only add TensorFlow's start-up)."""
    from unet_dist.train import main

    w = tmp_path_factory.mktemp(name) / "w"
    assert main(_args(shards, w, overrides + ["runtime.strategy=single"])[2:]) == 0
    return w


def two_replicas(backend, data, workdir, overrides, deterministic=True):
    """Trains on 2 replicas: MirroredStrategy over 2 logical CPUs, horovodrun -np 2, or 2 TF_CONFIG
    workers; returns the chief's stdout. Skips Horovod where it is not installed."""
    if backend == "horovod" and not HOROVODRUN.exists():
        pytest.skip("Horovod not installed (run make setup)")
    two_cpus = ["runtime.strategy=mirrored", "runtime.cpu_devices=2"] if backend == "mirrored" else []
    args = _args(data, workdir, overrides + two_cpus, deterministic=deterministic)
    if backend == "mirrored":
        return python_run(*args).stdout
    if backend == "horovod":
        return horovodrun(*args).stdout
    return multiworker(*args)[0].stdout


@pytest.fixture(scope="module")
def single_run(shards, tmp_path_factory):
    return _one_process(shards, tmp_path_factory, "single", EQUIV)


def test_mirrored_two_logical_cpus_equals_one_device(shards, single_run, tmp_path):
    w = tmp_path / "w"
    proc = python_run(*_args(shards, w, EQUIV + ["runtime.strategy=mirrored", "runtime.cpu_devices=2"]))
    assert "replicas 2" in proc.stdout
    _assert_same_run(single_run, w, "mirrored")


@needs_horovod
def test_horovod_two_processes_equals_one_device(shards, single_run, tmp_path):
    w = tmp_path / "w"
    proc = horovodrun(*_args(shards, w, EQUIV))
    assert "strategy horovod" in proc.stdout and "world_size 2" in proc.stdout
    _assert_same_run(single_run, w, "horovod")


@needs_horovod
def test_horovod_three_processes_equals_one_device(shards, tmp_path_factory, tmp_path):
    # Deterministic with more than 2 ranks: the gradients go in one grouped allreduce (one fused
    # layout, so the same ring order in every run); 2 ranks take the per-gradient path above.
    overrides = EQUIV + ["data.global_batch_size=6"]
    ref = _one_process(shards, tmp_path_factory, "single_batch6", overrides)
    w = tmp_path / "w"
    proc = horovodrun(*_args(shards, w, overrides), np_=3)
    assert "world_size 3" in proc.stdout
    _assert_same_run(ref, w, "horovod, 3 processes")


@pytest.mark.parametrize("backend", ["mirrored", "horovod"])
def test_the_xla_step_trains_on_each_backend(backend, shards, tmp_path):
    # runtime.xla auto compiles the forward and backward pass wherever the step computes on a GPU,
    # with the all-reduce outside what is compiled. Not deterministic (TensorFlow will not compile a
    # max-pool gradient under op determinism), so the batches' order may differ from run to run:
    # the compiled step's numbers are checked against the plain one in test_train.
    w = tmp_path / "w"
    out = two_replicas(backend, shards, w, EQUIV + ["runtime.xla=true"], deterministic=False)
    assert "xla True, " in out and "replicas 2" in out, out
    losses = _losses(w)
    assert len(losses) == 5 and np.isfinite(losses).all() and losses[-1] < losses[0], losses


@pytest.mark.parametrize("backend, wire", [("mirrored", "float16"), ("horovod", "float16"),
                                           ("multiworker", "float16"), ("multiworker", "bfloat16")])
def test_16_bit_gradients_leave_the_reported_loss_in_float32(backend, wire, shards, single_run, tmp_path):
    # Gradients travel in 16 bits (close to the float32 run), the reported loss does not: the first
    # step's loss comes before any update and matches to float32 precision.
    w = tmp_path / "w"
    packs = ["runtime.allreduce_pack_mb=0.01"] if backend == "multiworker" else []
    out = two_replicas(backend, shards, w, EQUIV + [f"runtime.allreduce_dtype={wire}"] + packs)
    assert f"gradients summed in {wire}" in out, out
    assert json.loads((w / "summary.json").read_text())["allreduce_dtype"] == wire
    la, lb = _losses(single_run), _losses(w)
    np.testing.assert_allclose(lb[0], la[0], rtol=1e-6)
    np.testing.assert_allclose(lb, la, rtol=1e-2)
    assert lb[1:] != la[1:]  # the gradients did go through 16 bits


def test_multiworker_two_workers_equals_one_device(shards, single_run, tmp_path):
    w = tmp_path / "w"
    # Packs of 10 KB: the gradients are reduced in several packs, as a large model's are.
    outs = multiworker(*_args(shards, w, EQUIV + ["runtime.allreduce_pack_mb=0.01"]))
    assert "strategy multiworker" in outs[0].stdout and "world_size 2" in outs[0].stdout
    assert "strategy" not in outs[1].stdout  # only the chief prints
    _assert_same_run(single_run, w, "multiworker")


def test_gradient_accumulation_trains_what_replicas_do(shards, single_run, tmp_path_factory, tmp_path):
    # train.gradient_accumulation_steps: each replica's batch goes through the model in micro-batches,
    # one after the other, and their gradients are summed before the update. Without batch norm that
    # is the whole batch at once.
    w = _one_process(shards, tmp_path_factory, "accumulated", EQUIV + ["train.gradient_accumulation_steps=2"])
    _assert_same_run(single_run, w, "2 micro-batches")
    # With batch norm each micro-batch has its own statistics, as each replica has: one process with 2
    # micro-batches trains what 2 replicas do, moving statistics included (the replicas' copies are
    # averaged before a checkpoint; the micro-batches' moves are averaged at every step).
    bn = [o for o in EQUIV if o != "model.norm=none"]
    one = _one_process(shards, tmp_path_factory, "accumulated_bn", bn + ["train.gradient_accumulation_steps=2"])
    two = tmp_path / "two"
    out = two_replicas("mirrored", shards, two, bn)
    assert "replicas 2" in out
    _assert_same_run(two, one, "2 micro-batches against 2 replicas, batch norm")
    wa, wb = model_weights(two, 5), model_weights(one, 5)
    moving = [k for k in wa if "moving" in k]
    assert moving
    for k in moving:  # these are small beside the kernels: checked on their own scale
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert json.loads((one / "summary.json").read_text())["gradient_accumulation_steps"] == 2


@pytest.fixture(scope="module")
def single_run_sync_bn(shards, tmp_path_factory):
    return _one_process(shards, tmp_path_factory, "single_sync_bn", EQUIV_SYNC_BN)


@pytest.mark.parametrize("backend", ["mirrored", "horovod", "multiworker"])
def test_sync_batch_norm_gives_the_same_model_on_two_replicas(backend, shards, single_run_sync_bn, tmp_path):
    # One process uses the fused kernel, two replicas combine their moments in a collective. Measured
    # after 5 steps: 1.4e-4 in the losses (step 4; steps 1-3 within 3e-6), 6.3e-5 in the weights,
    # the same to the last digit on all three backends, so the replicas' path agrees with itself and
    # the gap is the fused kernel's rounding against the combined moments (batch norm makes every
    # sample's gradient depend on the whole batch, and the betas' gradients are sums that nearly
    # cancel). How far it grows depends on the batches: with the zoom as it was before session 31
    # (other augmented samples) it measured 1.4e-6 and 9.3e-6. Per-replica statistics (sync off)
    # differ by 2.8e-2, 140 times the 2e-4 allowed here.
    w = tmp_path / "w"
    out = two_replicas(backend, shards, w, EQUIV_SYNC_BN)
    assert "replicas 2" in out and "synchronized batch norm" in out, out
    _assert_same_run(single_run_sync_bn, w, f"{backend}, synchronized batch norm", rtol=2e-4)


EQUIV_FP16 = EQUIV_SYNC_BN + ["runtime.precision=mixed_float16"]


@pytest.fixture(scope="module")
def single_run_fp16(shards, tmp_path_factory):
    return _one_process(shards, tmp_path_factory, "single_fp16", EQUIV_FP16)


@pytest.mark.parametrize("backend", ["mirrored", "horovod"])
def test_mixed_float16_with_sync_batch_norm_on_two_replicas(backend, shards, single_run_fp16, tmp_path):
    # The GPU configuration (float16 compute, dynamic loss scaling, batch statistics over the global
    # batch, loss-scaled gradients summed in float16 as `allreduce_dtype: auto` picks) run on CPU:
    # the wrapped optimizer must not sum the already-summed gradients again, and the model must
    # match one process. Measured in the losses / weights: mirrored 1.1e-4 / 2.2e-4, Horovod
    # 8.4e-4 / 3.3e-4 (float16 activations and float16 sums; one process normalises in the float16
    # fused kernel, two replicas combine float32 moments); with gradients summed in float32, 2.6e-4
    # / 2.2e-4 at most. With the inner optimizer summing again: 3.8e-2.
    w = tmp_path / "w"
    out = two_replicas(backend, shards, w, EQUIV_FP16)
    assert "replicas 2" in out and "mixed_float16" in out and "gradients summed in float16" in out, out
    _assert_same_run(single_run_fp16, w, f"{backend}, mixed_float16", rtol=2e-3)


MIRRORED_AVERAGE = """
import json
import keras
import tensorflow as tf
from unet_dist.config import load_config
from unet_dist.distribute import make_runtime
from unet_dist.model import FusedBatchNorm, moving_statistics

rt = make_runtime(load_config(None, ["runtime.strategy=mirrored", "runtime.cpu_devices=2"]))
with rt.strategy.scope():
    x = keras.Input((2, 2, 3))
    model = keras.Model(x, FusedBatchNorm(momentum=0.0)(x))
batches = rt.strategy.experimental_distribute_values_from_function(
    lambda ctx: tf.fill([1, 2, 2, 3], 10.0 * (ctx.replica_id_in_sync_group + 1)))
tf.function(lambda b: rt.strategy.run(lambda b: model(b, training=True), args=(b,)))(batches)
copies = lambda: [float(c.numpy()[0]) for c in rt.strategy.experimental_local_results(moving_statistics(model)[0].value)]
before = copies()
rt.average_replicas(moving_statistics(model))
print(json.dumps([before, copies()]))
"""


def test_mirrored_average_replicas_sets_every_copy_to_the_mean():
    # Each replica's moving mean is its own batch's (10 and 20); averaged, both copies hold 15.
    proc = python_run("-c", MIRRORED_AVERAGE)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[10.0, 20.0], [15.0, 15.0]]


@needs_horovod
def test_horovodrun_end_to_end_writes_one_metrics_file(shards, pet_src, tmp_path):
    w = tmp_path / "w"
    over = tiny_overrides(steps=6) + ["train.eval_every_steps=3", "train.checkpoint_every_steps=3"]
    proc = horovodrun("-m", "unet_dist.train", "--config", "configs/demo.yaml", "--data", str(shards),
                      "--workdir", str(w), *sum((["--set", o] for o in over), []))
    assert proc.stdout.count("train: done") == 1  # other ranks print only errors
    # Two ranks on this node: the chief runs on its own half of the CPUs (runtime.pin_cpus).
    allowed = sorted(os.sched_getaffinity(0))
    half = allowed[: max(1, len(allowed) // 2)]
    assert f"on CPUs {','.join(map(str, half))};" in proc.stdout or len(half) > 8, proc.stdout
    s = json.loads((w / "summary.json").read_text())
    assert s["world_size"] == 2 and s["strategy"] == "horovod" and s["global_batch_size"] == 4
    assert 0 <= s["input_wait_fraction"] <= 1 and s["input_bound"] in ("no", "moderately", "highly"), s
    assert [r["step"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
            if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    # A 2-worker evaluation of the checkpoint equals a 1-worker one: summed confusion matrices.
    horovodrun("-m", "unet_dist.evaluate", "--workdir", str(w), "--data", str(shards), "--checkpoint", "latest",
               "--out", str(tmp_path / "eval2.json"))
    from unet_dist.evaluate import main as evaluate_main
    from unet_dist.predict import main as predict_main

    assert evaluate_main(["--workdir", str(w), "--data", str(shards), "--checkpoint", "latest",
                          "--out", str(tmp_path / "eval1.json"), "--strategy", "single"]) == 0
    e1, e2 = (json.loads((tmp_path / f"eval{i}.json").read_text()) for i in (1, 2))
    assert e2["world_size"] == 2 and e1["world_size"] == 1
    assert e1["val_records"] == e2["val_records"]
    for k in ("val_iou", "val_dice", "val_pixel_acc", "val_loss"):
        assert abs(e1[k] - e2[k]) < 1e-6, (k, e1[k], e2[k])
    assert e1["val_object_f1"] == e2["val_object_f1"] and e1["val_seg"] == pytest.approx(e2["val_seg"]), (e1, e2)
    assert e1["val_nsd"] is not None and [e1[f"val_{m}"] for m in ("hd95", "assd", "nsd")] == pytest.approx(
        [e2[f"val_{m}"] for m in ("hd95", "assd", "nsd")])
    # Each record's own row, whichever rank scored it, under its own name (rank 1's records are the
    # odd ones of the split).
    rows1, rows2 = ({r["record"]: r for r in e["per_record"]} for e in (e1, e2))
    assert len(rows1) == e1["val_records"] and rows1.keys() == rows2.keys()
    for name, r in rows1.items():
        assert r["iou_per_class"] == pytest.approx(rows2[name]["iou_per_class"], abs=1e-6), name
        assert r["hd95_per_class"] == pytest.approx(rows2[name]["hd95_per_class"]), name
        assert r["true_objects_per_class"] == rows2[name]["true_objects_per_class"], name
    # The training's last evaluation saw the model it saved: the ranks' mean of batch norm's moving
    # statistics, which each rank updates from its own batch (not rank 0's copy on half the images).
    assert abs(s["final_val_loss"] - e1["val_loss"]) < 1e-6 and abs(s["final_val_iou"] - e1["val_iou"]) < 1e-6, (s, e1)
    # predict and evaluate --images take a share of the images on each rank (one GPU per rank on a
    # GPU node) and give what one process gives; a corrupt image is skipped once.
    src = tmp_path / "src"
    shutil.copytree(pet_src, src)
    (src / "images" / sorted(p.name for p in (src / "images").iterdir())[3]).write_bytes(b"not a jpeg")
    # A stack of 3 pages, split between the ranks: the chief puts their masks together in one TIFF.
    pages = [Image.open(p).convert("RGB") for p in sorted((pet_src / "images").iterdir())[:3]]
    pages[0].save(tmp_path / "vol.tif", save_all=True, append_images=pages[1:])
    common = ["--workdir", str(w), "--strategy", "single"]
    assert predict_main([*common, str(src / "images"), str(tmp_path / "vol.tif"), "--out", str(tmp_path / "p1"),
                         "--probabilities", "--instances"]) == 0
    assert evaluate_main([*common, "--images", str(src), "--out", str(tmp_path / "e1.json"),
                          "--postprocess", "min-size:16+largest+grow:2"]) == 0
    proc = horovodrun("-m", "unet_dist.predict", "--workdir", str(w), str(src / "images"), str(tmp_path / "vol.tif"),
                      "--out", str(tmp_path / "p2"), "--probabilities", "--instances")
    assert proc.stdout.count("predict: 50 images on 2 processes") == 1, proc.stdout  # the chief's summary alone
    assert proc.stdout.count("the 3 page masks of") == 1, proc.stdout
    assert ("(their probabilities in vol_probs.tif, their instances in vol_instances.tif, their objects in "
            "vol_objects.csv)") in proc.stdout
    assert proc.stderr.count("skipping") == 1, proc.stderr
    assert f"no X_objects.csv in {tmp_path / 'p2'} for 1 of the 51 images (skipped," in proc.stderr
    horovodrun("-m", "unet_dist.evaluate", "--workdir", str(w), "--images", str(src), "--out", str(tmp_path / "e2.json"),
               "--postprocess", "min-size:16+largest+grow:2")
    masks = sorted(p.name for p in (tmp_path / "p1").glob("*_mask.png"))
    assert len(masks) == 50 and masks == sorted(p.name for p in (tmp_path / "p2").glob("*_mask.png"))
    for name in masks:
        a, b = (np.asarray(Image.open(tmp_path / d / name)) for d in ("p1", "p2"))
        assert np.array_equal(a, b), name
    with Image.open(tmp_path / "p2" / "vol_mask.tif") as stacked:
        assert stacked.n_frames == 3
        for i in range(3):
            stacked.seek(i)
            assert np.array_equal(np.asarray(stacked), np.asarray(Image.open(tmp_path / "p1" / f"vol_p{i:03d}_mask.png")))
    with Image.open(tmp_path / "p2" / "vol_probs.tif") as stacked:  # the foreground's, a page each
        assert stacked.n_frames == 3
        for i in range(3):
            stacked.seek(i)
            one = np.asarray(Image.open(tmp_path / "p1" / f"vol_p{i:03d}_probs.tif"))
            np.testing.assert_allclose(np.asarray(stacked), one, atol=1e-6)
    with Image.open(tmp_path / "p2" / "vol_instances.tif") as stacked:  # each page's objects numbered alone
        assert stacked.n_frames == 3
        for i in range(3):
            stacked.seek(i)
            labels, mask = np.asarray(stacked), np.asarray(Image.open(tmp_path / "p1" / f"vol_p{i:03d}_mask.png"))
            assert np.array_equal(labels, np.asarray(Image.open(tmp_path / "p1" / f"vol_p{i:03d}_instances.tif")))
            assert np.array_equal(labels > 0, mask > 0) and labels.max() >= 1
    # Each image's objects measured alike on 1 and 2 processes, a stack's pages' in one table.
    for name in [*masks, "vol"]:
        stem = name.removesuffix("_mask.png")
        assert (tmp_path / "p1" / f"{stem}_objects.csv").read_text() == (
            tmp_path / "p2" / f"{stem}_objects.csv").read_text(), stem
    assert (tmp_path / "p1" / "objects.csv").read_text() == (tmp_path / "p2" / "objects.csv").read_text()
    stack_rows = (tmp_path / "p2" / "vol_objects.csv").read_text().splitlines()
    assert stack_rows[0].startswith("page,label,class,area,") and {r.split(",")[0] for r in stack_rows[1:]} == {
        "0", "1", "2"}
    # --continue after a stop: the images (a stack's page too) whose files are not all there are
    # predicted again, the others left alone (the chief's view, which every rank splits alike).
    redo = {"vol_p001": "_probs.tif", masks[0][: -len("_mask.png")]: "_mask.png",
            masks[5][: -len("_mask.png")]: "_overlay.png", masks[9][: -len("_mask.png")]: "_instances.tif"}
    for stem, kind in redo.items():
        (tmp_path / "p2" / f"{stem}{kind}").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "p2").iterdir()
            if not p.name.startswith((*(f"{stem}_" for stem in redo), "vol_mask", "vol_probs", "vol_instances",
                                                                     "vol_objects", "objects.csv"))}  # stacks, table
    proc = horovodrun("-m", "unet_dist.predict", "--workdir", str(w), str(src / "images"), str(tmp_path / "vol.tif"),
                      "--out", str(tmp_path / "p2"), "--probabilities", "--instances", "--continue")
    assert f"predict: leaving out 46 of 51 images, predicted in {tmp_path / 'p2'} already (--continue)" in proc.stderr
    assert proc.stdout.count("predict: 4 images on 2 processes") == 1, proc.stdout  # and the corrupt one, skipped
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "p2").iterdir() if p.name in kept} == kept
    # The table again holds every image's objects, those predicted before the stop too.
    assert (tmp_path / "p1" / "objects.csv").read_text() == (tmp_path / "p2" / "objects.csv").read_text()
    for stem, kind in redo.items():
        assert (tmp_path / "p2" / f"{stem}{kind}").exists(), stem
        a, b = (np.asarray(Image.open(tmp_path / d / f"{stem}_mask.png")) for d in ("p1", "p2"))
        assert np.array_equal(a, b), stem
    e1, e2 = (json.loads((tmp_path / f"e{n}.json").read_text()) for n in (1, 2))
    assert (e1.pop("world_size"), e2.pop("world_size")) == (1, 2)
    assert (e1["images"], e1["skipped"]) == (47, 1)
    assert e1["postprocess"] == "min-size:16:1+largest:1+grow:2:1"
    assert e1["small_objects"][0]["by_min_size"][0]["removed_objects"] > 0
    assert e1["grown_objects"][0]["by_grow"][0]["seg"] != e1["grown_objects"][0]["seg"]
    assert e1["boundary"][0]["images"] > 40 and "hd95_per_class" in e1["per_image"][0]
    assert e1 == e2  # every count, score and per-image row, and what post-processing does
    # --predictions: the 1-process predict's masks, read on 2 ranks and post-processed as e1's, score as e1.
    horovodrun("-m", "unet_dist.evaluate", "--workdir", str(w), "--images", str(src), "--predictions",
               str(tmp_path / "p1"), "--out", str(tmp_path / "e3.json"), "--postprocess", "min-size:16+largest+grow:2")
    e3 = json.loads((tmp_path / "e3.json").read_text())
    assert (e3.pop("world_size"), e3.pop("predictions")) == (2, str(tmp_path / "p1"))
    assert e3 == {k: v for k, v in e1.items() if k not in ("mode", "why", "tta", "checkpoints", "precision")}


def test_evaluated_and_saved_batch_norm_statistics_are_the_replicas_mean(shards, tmp_path):
    # (Also: a TF_CONFIG cluster with a chief task evaluates each record once.)
    # Without sync batch norm each worker's moving statistics come from its own batches; the
    # training's last evaluation and the saved checkpoint must both hold their mean, so a
    # 1-process evaluation of the checkpoint gives the training's figures (Horovod: the
    # horovodrun end-to-end test).
    w = tmp_path / "w"
    two_replicas("multiworker", shards, w, tiny_overrides(steps=4))
    s = json.loads((w / "summary.json").read_text())
    from unet_dist.evaluate import main as evaluate_main

    assert evaluate_main(["--workdir", str(w), "--data", str(shards), "--checkpoint", "latest",
                          "--out", str(tmp_path / "eval1.json"), "--strategy", "single"]) == 0
    e1 = json.loads((tmp_path / "eval1.json").read_text())
    assert s["num_replicas"] == 2 and e1["world_size"] == 1
    assert abs(s["final_val_loss"] - e1["val_loss"]) < 1e-6 and abs(s["final_val_iou"] - e1["val_iou"]) < 1e-6, (s, e1)
    # A TF_CONFIG with a "chief" beside the workers: the chief is rank 0 and worker 0 rank 1. Both
    # used to be rank 0 of 1 and chief: each read every record and both wrote the result.
    chief, worker = multiworker("-m", "unet_dist.evaluate", "--workdir", str(w), "--data", str(shards),
                                "--checkpoint", "latest", chief=True)
    e2 = json.loads(chief.stdout.strip().splitlines()[-1])
    assert worker.stdout.strip() == ""  # only the chief prints (and writes)
    assert e2["world_size"] == 2 and e2["val_records"] == e1["val_records"] == 12
    assert e2["val_iou"] == pytest.approx(e1["val_iou"], abs=1e-9)


@needs_horovod
@needs_mpi
def test_mpirun_end_to_end(shards, tmp_path):
    w = tmp_path / "w"
    mpirun("-m", "unet_dist.train", "--config", "configs/demo.yaml", "--data", str(shards), "--workdir", str(w),
           *sum((["--set", o] for o in tiny_overrides(steps=3)), []))
    s = json.loads((w / "summary.json").read_text())
    assert s["world_size"] == 2 and s["strategy"] == "horovod"


@needs_horovod
def test_resume_across_world_sizes(shards, single_run, tmp_path, capsys):
    # 3 steps on 2 Horovod ranks, then steps 4-5 on one process: the same run as 5 steps on one.
    w = tmp_path / "w"
    horovodrun(*_args(shards, w, EQUIV + ["train.steps=3", "train.checkpoint_every_steps=3"]))
    from unet_dist.train import main

    capsys.readouterr()
    assert main(_args(shards, w, EQUIV + ["runtime.strategy=single"])[2:]) == 0
    out = capsys.readouterr().out
    assert "resuming at step 3" in out and "world_size 1" in out
    _assert_same_run(single_run, w, "horovod 2 -> single")


@needs_horovod
def test_two_ranks_agree_that_a_resumed_run_had_stopped(shards, tmp_path):
    # One process reaches train.target_val_iou at step 2 and stops. Rerun on 2 ranks, only rank 0
    # reads metrics.jsonl and the other takes its reading: both evaluate and neither trains (a rank
    # that decided alone to train on would wait for ever in the first step's all-reduce).
    w = tmp_path / "w"
    overrides = tiny_overrides(steps=6) + ["train.eval_every_steps=2", "train.target_val_iou=0.001"]
    from unet_dist.train import main

    assert main(_args(shards, w, overrides + ["runtime.strategy=single"])[2:]) == 0
    proc = horovodrun(*_args(shards, w, overrides))
    assert "world_size 2" in proc.stdout and "is already trained to step 2 (it stopped there: val IoU" in proc.stdout
    assert sorted(p.name for p in (w / "checkpoints").glob("ckpt-*.index")) == ["ckpt-2.index"]


@needs_horovod
@pytest.mark.parametrize("script", ["horovodrun.sh", "mpirun.sh"])
def test_launch_scripts_pass_arguments_through(shards, tmp_path, script):
    if script == "mpirun.sh" and shutil.which("mpirun") is None:
        pytest.skip("Open MPI not installed")
    w = tmp_path / "w with space"  # arguments are quoted all the way through
    args = ["--data", str(shards), "--workdir", str(w)]
    for o in tiny_overrides(steps=2):
        args += ["--set", o]
    env = {**subprocess_env(), "CPU_RANKS": "2", "PYTHON": sys.executable, "GPUS_PER_NODE": "0"}
    proc = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{script}: 2 processes" in proc.stdout + proc.stderr
    s = json.loads((w / "summary.json").read_text())
    assert s["world_size"] == 2 and "global batch 4 (2 per replica), lr" in proc.stdout
    # A bad process count is one line from the script, before anything starts.
    for np_value, said in (("two", "NP=two: must be a whole number"),
                           ("0", "NP=0: no processes to start (HOSTFILE without slots=N?)")):
        proc = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env={**env, "NP": np_value},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.strip() == f"{script}: {said}", proc.stderr[-2000:]
