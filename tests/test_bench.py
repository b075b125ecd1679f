"""The benchmark helpers that turn raw measurements into the numbers we publish, and the scaling bench."""

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, run_main, subprocess_env

from unet_dist.perf.profile import kernel_seconds, kind_of
from unet_dist.perf.scaling import _wait_for


def test_kernel_kinds():
    assert kind_of("_MklNativeConv2DBackpropFilter") == "convolution"
    assert kind_of("Conv2D") == "convolution"
    assert kind_of("_MklNativeFusedBatchNormGradV3") == "batch norm"
    assert kind_of("ReluGrad") == "relu"
    assert kind_of("ConcatV2") == "skip concat"
    assert kind_of("ResourceApplyAdam") == "other"


def test_kernel_seconds_reads_a_real_trace(tmp_path):
    a = tf.random.normal([512, 512])

    @tf.function
    def f(x):
        for _ in range(5):
            x = tf.matmul(x, a)
        return tf.reduce_sum(x)

    float(f(a))
    tf.profiler.experimental.start(str(tmp_path))
    float(f(a))
    tf.profiler.experimental.stop()
    seconds = kernel_seconds(tmp_path)
    matmul = sum(v for k, v in seconds.items() if "MatMul" in k)
    assert matmul > 0, dict(seconds)


@pytest.mark.dist
def test_scaling_bench_trains_the_given_config_on_one_and_two_workers(tmp_path):
    # The published scaling table comes from this command; here with a tiny model, 2 rounds of 2
    # synchronous and 2 chief-alone steps in one 2-process job.
    tiny = ["data.image_size=[64, 64]", "model.depth=2", "model.base_filters=4", "model.deep_supervision=false",
            "optim.name=sgd"]
    cmd = [sys.executable, "-m", "unet_dist.bench", "scaling", "--config", "configs/demo.yaml", "--steps", "2",
           "--rounds", "2", "--repeats", "1", "--per-replica-batch", "2", "--backends", "multiworker"]
    for o in tiny:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["config"] == "configs/demo.yaml" and res["example_size"] == [64, 64]
    # demo.yaml's precision is auto: resolved for this machine, as the workers resolve it.
    from unet_dist.precision import cpu_bf16_flag

    assert res["per_process_batch"] == 2 and res["precision"] == ("mixed_bfloat16" if cpu_bf16_flag() else "float32")
    ips = res["images_per_s"]
    assert ips["multiworker_rounds"]["n"] == 2 and len(res["runs"]["multiworker"]["efficiency"]) == 1
    assert 0 < ips["multiworker_rounds"]["min"] <= ips["multiworker_efficiency"] <= ips["multiworker_rounds"]["max"]
    assert ips["multiworker_2"] > 0 and ips["multiworker_1"] > 0
    assert [len(res["runs"]["independent"][n]) for n in ("1", "2")] == [1, 1]
    assert ips["independent_efficiency"] > 0


def test_scaling_batch_is_shaped_as_the_pipeline_delivers_for_an_unpadded_network():
    # configs/ronneberger.yaml: the mask and weight map at the model's smaller output, so the
    # scaling bench (and its GPU comparison with NVIDIA's UNet_Medical) can train it.
    from unet_dist.config import load_config
    from unet_dist.distribute import Runtime
    from unet_dist.losses import training_loss
    from unet_dist.perf.scaling import _synthetic_batch
    from unet_dist.shapes import valid_sizes_near
    from unet_dist.trainer import build_model_and_optimizer, make_train_step

    size = valid_sizes_near(64, 2)[0]
    cfg = load_config(ROOT / "configs/ronneberger.yaml", ["model.depth=2", "model.base_filters=4",
                                                          f"data.image_size=[{size}, {size}]", "runtime.precision=float32"])
    batch = _synthetic_batch(cfg, 2, 0)
    runtime = Runtime(cfg, "test")
    model, opt = build_model_and_optimizer(cfg, runtime, cfg.optim.learning_rate)
    assert batch["mask"].shape[1:3] == model.output_shape[1:3] != batch["image"].shape[1:3]
    assert batch["weight"].shape == batch["mask"].shape
    step = make_train_step(model, opt, training_loss(cfg), runtime, 2, False)
    assert math.isfinite(float(step(batch)["loss"]))


def test_pipeline_bench_says_whether_training_waits_for_it(shards, tmp_path):
    from unet_dist.perf.report import render

    cmd = [sys.executable, "-m", "unet_dist.bench", "pipeline", "--data", str(shards), "--batches", "3",
           "--image-size", "64", "--train-steps", "2", "--set", "model.depth=2", "--set", "model.base_filters=4"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    fed = res["fed_train"]
    assert fed["steps"] == 2 and fed["images_per_s"] > 0 and 0 <= fed["input_wait_fraction"] <= 1, fed
    assert fed["input_bound"] in ("no", "moderately", "highly")
    assert res["headroom"] == pytest.approx(res["images_per_s"] / fed["images_per_s"])
    (tmp_path / "bench").mkdir()
    row = next(line for line in render({"pipeline": {**res, "command": "x"}}, tmp_path).splitlines()
               if line.startswith("| on "))
    assert f"{fed['input_wait_fraction']:.2%}: " in row and "input-bound" in row, row


def test_pipeline_bench_runs_on_data_the_papers_generator_cannot_read(tmp_path):
    # A folders-layout set (EM slices, your own data): the pipeline's speed, fed and alone, and why
    # there is no comparison with the paper's generator (it reads the Pet layout).
    from PIL import Image

    from unet_dist.data.convert import convert

    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (tmp_path / "src" / sub).mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "src" / "images" / f"x{i}.png")
        Image.fromarray((rng.random((64, 64)) > 0.5).astype(np.uint8) * 255).save(tmp_path / "src" / "masks" / f"x{i}.png")
    convert(tmp_path / "src", tmp_path / "data", layout="folders", shards=2, progress=False)
    cmd = [sys.executable, "-m", "unet_dist.bench", "pipeline", "--data", str(tmp_path / "data"), "--batches", "2",
           "--image-size", "64", "--train-steps", "1", "--set", "model.depth=2", "--set", "model.base_filters=4",
           "--augment", "intensity"]  # nnU-Net's intensity transforms on one channel
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["images_per_s"] > 0 and res["fed_train"]["steps"] == 1 and res["augment"] == "intensity", res
    assert res["paper_pil_images_per_s"] is None and res["speedup"] is None
    assert "not in the Oxford-Pet layout" in res["paper_skipped"]


def test_report_names_each_machine_when_benchmarks_ran_on_several():
    from unet_dist.perf.report import _machines

    intel = {"cpus": 2, "cpu": "Intel Xeon", "machine": "x86_64", "python": "3.11.7"}
    amd = {**intel, "cpu": "AMD EPYC"}
    one = _machines({"a": {**intel, "date": "d1"}, "b": {**intel, "date": "d1"}})
    assert one.startswith("Machine: 2 CPU cores (Intel Xeon)") and one.endswith("Date: d1.")
    two = _machines({"a": {**intel, "date": "d1"}, "b": {**intel, "date": "d2"}, "c": {**amd, "date": "d3"}})
    assert "(Intel Xeon), x86_64, Python 3.11.7, no GPU. Dates: d1 (a); d2 (b)." in two
    assert "(AMD EPYC), x86_64, Python 3.11.7, no GPU. Dates: d3 (c)." in two


def test_flops_keeps_a_result_for_each_cpu_and_shows_a_row_for_each(tmp_path):
    # The FLOPs target is a fraction of the peak of the CPU the step ran on: a run on another of
    # these VMs keeps the one it replaces (it lost the other CPU's result), and a run on a CPU that
    # has a kept result supersedes it.
    from unet_dist.perf.report import _keep_per_cpu, render

    variants = {"mixed_bfloat16": {"images_per_s": 1.0, "achieved_gflop_s": 2.0, "matmul_peak_gflop_s": 4.0,
                                   "fraction_of_peak": 0.5}}
    base = {"config": "c", "image_size": [8, 8], "forward_gflops_per_image": 1.0, "train_gflops_per_image": 3.0,
            "command": "x", "date": "d", "variants": variants}
    intel = {**base, "cpu": "Intel Xeon", "cpu_flags": ["avx512_bf16", "amx_bf16"]}
    amd = {**base, "cpu": "AMD EPYC", "cpu_flags": ["avx512_bf16"]}
    _keep_per_cpu("flops", intel, amd, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["flops@intel-xeon-avx512-bf16-amx-bf16.json"]
    _keep_per_cpu("flops", amd, {**intel, "date": "d2"}, tmp_path)
    _keep_per_cpu("flops", intel, intel, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["flops@amd-epyc-avx512-bf16.json"]
    assert json.loads((tmp_path / "flops@amd-epyc-avx512-bf16.json").read_text()) == amd
    rows = [line for line in render({"flops": intel, "flops@amd-epyc-avx512-bf16": amd}, tmp_path).splitlines()
            if line.endswith("| 50.0% |")]
    assert [row.split(",")[0] for row in rows] == ["| Intel Xeon (avx512_bf16", "| AMD EPYC (avx512_bf16)"], rows
    # The peak's matrices as measured; a result from before it was recorded was measured at 2048.
    assert "ten 2048x2048 matrix" in render({"flops": intel}, tmp_path)
    assert "ten 1024x1024 matrix" in render({"flops": {**intel, "matmul_size": 1024}}, tmp_path)


def test_report_runs_the_gpu_benchmarks_only_with_gpu_and_shows_them_beside_nvidias(tmp_path, monkeypatch):
    # The CPU VMs the report is made on have no GPU: a report there must keep the GPU results it has
    # (run elsewhere with --gpu) and not try to run them; --gpu runs those alone.
    import argparse
    from pathlib import Path

    from unet_dist.perf import report

    ran = []
    monkeypatch.setattr(report, "run_one", lambda name, cmd, out: ran.append(name) or {"cpu": "x"})
    monkeypatch.setattr(report, "render", lambda results, out: "")
    args = argparse.Namespace(out=tmp_path, render_only=False, only=None, gpu=False, data=Path("D"),
                              demo_data=Path("DEMO"), cells_data=Path("CELLS"))
    report.run(args)
    assert ran == list(report.commands(args)) and not any(n.startswith("gpu_") for n in ran), ran
    ran.clear()
    report.run(argparse.Namespace(**{**vars(args), "gpu": True}))
    assert ran == ["gpu_train_pets_seed", "gpu_train_ronneberger", "gpu_flops", "gpu_pipeline_ronneberger"], ran
    assert "--data CELLS " in " ".join(report.gpu_commands(args)["gpu_train_ronneberger"]) + " "

    monkeypatch.undo()
    gpu = {"gpus": ["NVIDIA H200"], "tensorflow": "2.21.0", "cpus": 16, "cpu": "Xeon", "machine": "x86_64",
           "python": "3.12.3", "date": "d9", "command": "bench train ronneberger", "steps": 40}
    ronneberger = {**gpu, "config": "configs/ronneberger.yaml", "images_per_s": {"mixed_float16+xla": 284.3},
                   "gpu_peak_memory_mib": {"mixed_float16+xla": 5123.4}}
    pets = {**gpu, "config": "configs/pets_seed.yaml", "global_batch_size": 32, "image_size": [256, 256],
            "images_per_s": {"float32": 893.8, "mixed_float16": 725.2}, "paper_fit_images_per_s": 136.7,
            "gpu_peak_memory_mib": {"float32": 1500.0, "mixed_float16": 1100.4}}
    cpu = {"cpus": 2, "cpu": "AMD EPYC", "machine": "x86_64", "python": "3.11.7", "date": "d1"}
    fed = {"steps": 20, "images_per_s": 250.0, "input_wait_fraction": 0.31, "input_bound": "highly"}
    pipeline = {**gpu, "image_size": 572, "batch": 8, "images_per_s": 260.0, "fed_train": fed}
    text = report.render({"memory_like": cpu, "gpu_train_ronneberger": ronneberger,
                          "gpu_pipeline_ronneberger": pipeline, "gpu_train_pets_seed": pets}, tmp_path)
    assert "| ours, mixed_float16 | 725.2 | 5.31x | 1,100 |" in text and "(float32) | 136.7 | 1.00x | - |" in text
    assert "mixed_float16+xla 284.3 images/s (5,123 MiB of GPU memory at most)" in text
    old = report.render({"gpu_train_pets_seed": {k: v for k, v in pets.items() if k != "gpu_peak_memory_mib"}},
                        tmp_path)  # measured before the bench recorded it: no column
    assert "| ours, mixed_float16 | 725.2 | 5.31x |\n" in old and "GPU memory" not in old
    assert "waiting for input 31.0% of the time: highly input-bound" in text, text[:4000]
    assert "not yet measured" not in text and "One NVIDIA H200, TensorFlow 2.21.0" in text, text[:3000]
    assert "| 1x A100 40GB | mixed precision | 118.98 | - |" in text
    assert text.count("Machine: 2 CPU cores (AMD EPYC)") == 1 and "d9" not in report._machines(
        {"a": cpu, "gpu_train_ronneberger": ronneberger})  # the GPU run names its machine in its own section
    assert "**GPU numbers are not yet measured**" in report.render({"a": cpu}, tmp_path)


def test_report_says_which_precision_each_recipe_trained_in(tmp_path):
    from unet_dist.perf.report import render

    def run(t, precision):
        return {"time_to_target_s": t, "steps": 50, "wall_s": t, "best_val_iou": 0.86, "precision": precision}

    tta = {"target_val_iou": 0.85, "config": "configs/demo.yaml", "every": 10, "repeats": 1, "speedup": 2.0,
           "ours": run(30.0, "mixed_bfloat16"), "paper_recipe": run(60.0, "float32"), "command": "x",
           "runs": {"ours": [run(30.0, "mixed_bfloat16")], "paper_recipe": [run(60.0, "float32")]}}
    text = render({"tta": tta}, tmp_path)
    assert "| ours (mixed_bfloat16) | 30 | 50 |" in text and "| paper recipe (float32) | 60 | 50 |" in text


def test_scaling_waiting_rank_stops_when_the_chief_never_signals(tmp_path):
    # A rank waiting out the chief's 1-process steps is in no collective that would fail if the
    # chief died; it must not wait for ever.
    (tmp_path / "round-0").touch()
    _wait_for(tmp_path / "round-0", deadline=time.time())  # already there: returns at once
    with pytest.raises(SystemExit, match="round-1"):
        _wait_for(tmp_path / "round-1", deadline=time.time() + 0.05)


def test_bench_bad_input_is_one_line_naming_it(tmp_path, capsys):
    for args, named in ((["scaling", "--config", str(tmp_path / "missing.yaml")], "missing.yaml"),
                        (["pipeline", "--data", str(tmp_path / "nothing")], "nothing"),
                        (["tta", "--data", str(tmp_path / "nothing")], "nothing"),  # from the trainer it runs
                        (["memory", "--data", str(tmp_path / "nothing")], "nothing")):
        proc = run_main(capsys, "unet_dist.bench", *args)  # a traceback would fail the test
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0, proc.stderr[-2000:]
        assert last.startswith(f"bench {args[0]}: ") and "error: " in last and named in last, last
    # Counts and sizes must be > 0 (--steps 0 divided by zero or failed in a child process).
    from unet_dist.bench import parser

    for args in (["scaling", "--steps", "0"], ["pipeline", "--data", "d", "--batches", "-1"],
                 ["tta", "--data", "d", "--every", "x"], ["scaling", "--backends", "mirrored"],
                 ["train", "--data", "d", "--variants", "float32+jit"], ["tta", "--data", "d", "--target", "1.5"]):
        with pytest.raises(SystemExit):
            parser().parse_args(args)
    # A benchmark name that report --only does not know stops before anything runs or is written
    # (it re-rendered docs/benchmarks.md from the stored results and said nothing).
    proc = run_main(capsys, "unet_dist.bench", "report", "--data", "d", "--demo-data", "d", "--out",
                    str(tmp_path / "docs"), "--only", "scaling", "sclaing")
    assert proc.returncode == 2 and "--only sclaing: no such benchmark" in proc.stderr, proc.stderr
    # --gpu runs the GPU benchmarks alone, and only where there is a GPU.
    proc = run_main(capsys, "unet_dist.bench", "report", "--gpu", "--data", "d", "--demo-data", "d", "--out",
                    str(tmp_path / "docs"), "--only", "flops")
    assert proc.returncode == 2 and "--only flops: no such benchmark with --gpu" in proc.stderr, proc.stderr
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        proc = run_main(capsys, "unet_dist.bench", "report", "--gpu", "--data", "d", "--demo-data", "d", "--out",
                        str(tmp_path / "docs"))
        assert proc.returncode == 2 and "report --gpu: TensorFlow sees no GPU" in proc.stderr, proc.stderr
    assert not (tmp_path / "docs").exists()


def test_benchmarks_md_is_the_report_of_its_results_and_notes(tmp_path):
    # docs/benchmarks.md is written by `bench report` from docs/bench/*.json and
    # docs/benchmarks_notes.md: a paragraph added to the rendered file alone is lost at the next run.
    import argparse
    import shutil
    from pathlib import Path

    from unet_dist.perf.report import run

    shutil.copytree(ROOT / "docs" / "bench", tmp_path / "bench")
    shutil.copy(ROOT / "docs" / "benchmarks_notes.md", tmp_path)
    run(argparse.Namespace(out=tmp_path, render_only=True, only=None, gpu=False, data=Path("DATA"),
                           demo_data=Path("DEMO"), cells_data=Path("CELLS")))
    assert (tmp_path / "benchmarks.md").read_text() == (ROOT / "docs" / "benchmarks.md").read_text(), (
        "docs/benchmarks.md differs from its render: edit docs/benchmarks_notes.md, then run "
        "python -m unet_dist.bench report --render-only --out docs --data DATA --demo-data DEMO")
