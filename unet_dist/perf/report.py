"""Runs the benchmarks, one fresh process each, and writes docs/benchmarks.md with tables and plots.

Each benchmark's JSON is kept in OUT/bench/NAME.json with the exact command that produced it, so
the report can be re-rendered (--render-only) or one benchmark re-run (--only NAME). The FLOPs
benchmark keeps one result per CPU (`PER_CPU`). Written
findings go in OUT/benchmarks_notes.md, which is appended to the tables: never edit the rendered
OUT/benchmarks.md itself (a test checks that docs/benchmarks.md is its render).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from unet_dist.perf.common import child_failed


def commands(args) -> dict[str, list[str]]:
    py = ["python", "-m", "unet_dist.bench"]
    d, demo = str(args.data), str(args.demo_data)
    return {
        "pipeline": [*py, "pipeline", "--data", d, "--batches", "150"],
        "pipeline_off": [*py, "pipeline", "--data", d, "--batches", "150", "--augment", "off"],
        "pipeline_full": [*py, "pipeline", "--data", d, "--batches", "40", "--augment", "full"],
        "pipeline_intensity": [*py, "pipeline", "--data", d, "--batches", "150", "--augment", "intensity"],
        "train_pets_seed": [*py, "train", "--data", d, "--config", "configs/pets_seed.yaml", "--steps", "6"],
        "train_demo": [*py, "train", "--data", d, "--config", "configs/demo.yaml", "--steps", "20",
                       "--set", "data.image_size=[256, 256]"],
        "flops": [*py, "flops", "--data", d, "--config", "configs/pets_seed.yaml", "--steps", "6"],
        "profile": [*py, "profile", "--data", d, "--config", "configs/pets_seed.yaml", "--steps", "5"],
        "scaling": [*py, "scaling"],
        "scaling_pets_seed": [*py, "scaling", "--config", "configs/pets_seed.yaml"],
        "scaling_fp16": [*py, "scaling", "--backends", "multiworker", "--set", "runtime.allreduce_dtype=float16"],
        "scaling_auto": [*py, "scaling", "--set", "runtime.precision=auto"],
        "memory": [*py, "memory", "--data", demo],
        "tta": [*py, "tta", "--data", demo, "--max-steps", "600", "--every", "10", "--repeats", "5"],
    }


def gpu_commands(args) -> dict[str, list[str]]:
    """The benchmarks `report --gpu` runs, on a machine with a GPU. A report without --gpu renders
    their last results and never runs them: the VMs these reports are made on have no GPU."""
    py = ["python", "-m", "unet_dist.bench"]
    d, cells = str(args.data), str(args.cells_data)
    return {
        "gpu_train_pets_seed": [*py, "train", "--data", d, "--config", "configs/pets_seed.yaml", "--steps", "100",
                                "--variants", "float32", "float32+xla", "mixed_float16", "mixed_float16+xla"],
        "gpu_train_ronneberger": [*py, "train", "--data", cells, "--config", "configs/ronneberger.yaml", "--steps", "40",
                                  "--set", "data.global_batch_size=8", "--variants", "float32", "mixed_float16",
                                  "mixed_float16+xla"],
        "gpu_flops": [*py, "flops", "--data", d, "--config", "configs/pets_seed.yaml", "--steps", "100",
                      "--variants", "float32", "mixed_float16"],
        # Does the input pipeline (on the host's cores) keep ahead of the GPU's step?
        "gpu_pipeline_ronneberger": [*py, "pipeline", "--data", cells, "--config", "configs/ronneberger.yaml",
                                     "--image-size", "572", "--batches", "40", "--train-steps", "20"],
    }


# Benchmarks whose target is relative to the CPU they ran on (a fraction of its own matmul peak),
# while these VMs' CPUs differ from session to session: re-running one on another CPU keeps the
# previous result as OUT/bench/NAME@CPU.json, one per CPU, and its table has a row for each.
PER_CPU = ("flops",)


def _cpu_key(r: dict) -> str:
    """A file-name form of the CPU a result ran on, its matrix features included."""
    return re.sub(r"[^a-z0-9]+", "-", " ".join([str(r.get("cpu") or "unknown"), *r.get("cpu_flags", [])]).lower()).strip("-")


def _keep_per_cpu(name: str, previous: dict | None, new: dict, out: Path) -> None:
    """After `name` ran again: keeps `previous` (the result it replaced) if it ran on another CPU,
    and drops a kept result of the new one's CPU, which `new` supersedes."""
    if previous is not None and _cpu_key(previous) != _cpu_key(new):
        (out / f"{name}@{_cpu_key(previous)}.json").write_text(json.dumps(previous, indent=1))
    (out / f"{name}@{_cpu_key(new)}.json").unlink(missing_ok=True)


def run_one(name: str, cmd: list[str], out: Path) -> dict:
    print(f"report: {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    t = time.time()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # the benchmarks run before this one keep their JSON in OUT/bench
        raise child_failed(f"report ({name})", proc.stderr, proc.returncode)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["command"] = shlex.join(cmd)
    result["bench_wall_s"] = time.time() - t
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    return result


def _bar(path: Path, title: str, labels: list[str], values: list[float], unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    bars = ax.barh(labels, values, color=["#4c72b0" if "paper" not in lab else "#c44e52" for lab in labels])
    ax.bar_label(bars, fmt="%.1f", padding=3)
    ax.set_xlabel(unit)
    ax.set_title(title)
    ax.invert_yaxis()
    ax.set_xlim(0, max(values) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _scaling_section(res: dict, title: str) -> list[str]:
    r, runs = res["images_per_s"], res.get("runs", {})
    settings = [x.split("=", 1) for x in res.get("model", []) + res.get("set", [])]
    prec = res.get("precision") or dict(settings).get("runtime.precision", "float32")  # the last --set wins
    h, w = res.get("example_size", [128, 128])
    model = f"`{res['config']}`'s U-Net and training settings" if res.get("config") else "demo-size U-Net"
    over = {"mpi": "Open MPI (`horovodrun --mpi`; on CPU ranks Open MPI yields the core between polls)",
            "gloo": "Gloo (`horovodrun --gloo`)"}[res.get("horovod_controller", "gloo")]  # Gloo before it was recorded
    horovod = (f", Horovod over {over} with `runtime.horovod_cycle_time_ms: "
               f"{dict(settings).get('runtime.horovod_cycle_time_ms', '25')}` (see the notes below)"
               if "horovod_1" in r else "")
    lines = [f"## {title}", "",
             f"The train step on in-memory batches ({res['per_process_batch']} images of {h}x{w} per process, "
             f"{model}, {prec}), one thread per process, each of 2 processes on its own core "
             f"(`runtime.pin_cpus`){horovod}. Each backend ran {res['repeats']} 2-process jobs of {res['rounds']} "
             "rounds: "
             f"{res['steps']} synchronous steps, then {res['steps']} steps of the chief alone (a single-device "
             "model in the same process) while the other rank waits outside any collective with its core "
             "idle, as in a 1-process run. Alternating in rounds of a few seconds makes the VM's drift (below) "
             "hit both alike. Each step is timed; efficiency = median over all rounds of (median step alone / "
             "median synchronous step), which is images/s(2) / (2 x images/s(1)). *independent* is 1 and 2 "
             "single-device processes at once with no communication, in alternating jobs: the machine's own "
             "ceiling for two busy cores." + (f" Overrides: `{' '.join(res['set'])}`." if res.get("set") else ""), "",
             "| backend | 1 process, images/s | 2 processes, images/s | efficiency | rounds: quartiles, range | "
             "jobs: efficiency (or images/s, 1 / 2 processes) |", "|---|---|---|---|---|---|"]
    for b in ("horovod", "multiworker", "independent"):
        if f"{b}_1" not in r:
            continue
        rounds = r.get(f"{b}_rounds")
        spread = (f"{rounds['quartiles'][0]:.1%}-{rounds['quartiles'][1]:.1%}, {rounds['min']:.1%}-"
                  f"{rounds['max']:.1%} ({rounds['n']})" if rounds else "")
        jobs = (", ".join(f"{e:.1%}" for e in runs[b]["efficiency"]) if "efficiency" in runs.get(b, {})
                else " / ".join(", ".join(f"{x:.1f}" for x in runs[b][n]) for n in ("1", "2")))
        wire = res.get("allreduce_dtype", {}).get(b)  # recorded since gradients could be summed in 16 bits
        label = f"{b} ({wire} gradients)" if wire else b
        lines.append(f"| {label} | {r[f'{b}_1']:.1f} | {r[f'{b}_2']:.1f} | {r[f'{b}_efficiency']:.1%} | {spread} | "
                     f"{jobs} |")
    return lines + ["", f"Command: `{res['command']}`", ""]


def _machines(results: dict) -> str:
    """The machine and dates of the runs. Benchmarks re-run later (--only) may have run on another
    of these VMs, whose CPUs differ from session to session: then each machine is named with the
    benchmarks it ran, and numbers compare within a table, not across machines. The GPU results
    (gpu_*) name their machine in their own section."""
    groups: dict[str, dict[str, list[str]]] = {}  # machine -> date -> benchmarks
    for name, r in results.items():
        if name.startswith("gpu_"):
            continue
        where = f"{r.get('cpus')} CPU cores ({r.get('cpu', '?')}), {r.get('machine')}, Python {r.get('python')}, no GPU"
        groups.setdefault(where, {}).setdefault(str(r.get("date")), []).append(name)

    def dates(by_date: dict, name_them: bool) -> str:
        if len(by_date) == 1 and not name_them:
            return f"Date: {next(iter(by_date))}"
        return "Dates: " + "; ".join(f"{d} ({', '.join(names)})" for d, names in sorted(by_date.items()))

    if len(groups) == 1:
        where, by_date = next(iter(groups.items()))
        return f"Machine: {where}. {dates(by_date, False)}."
    return ("Machines (these VMs' CPUs differ from session to session: compare numbers within a table, not "
            "across machines): " + " ".join(f"{where}. {dates(by_date, True)}." for where, by_date in groups.items()))


# NVIDIA's published training throughput of its UNet_Medical for TensorFlow 2 (the 2015 U-Net, 572x572
# one-channel EM tiles, batch 8 per GPU, Horovod, XLA in both precisions; DeepLearningExamples, TensorFlow2/Segmentation/
# UNet_Medical/README.md, NGC container tensorflow:20.06-tf2-py3): (GPUs, precision, images/s, what
# NVIDIA calls weak scaling: images/s over those of 1 GPU at the same precision, or None for 1 GPU).
NVIDIA_UNET_MEDICAL = [
    ("1x A100 40GB", "TF32", 46.26, None), ("1x A100 40GB", "mixed precision", 118.98, None),
    ("8x A100 40GB", "TF32", 293.64, 6.35), ("8x A100 40GB", "mixed precision", 561.77, 4.72),
    ("1x V100 16GB", "FP32", 17.91, None), ("1x V100 16GB", "mixed precision", 59.58, None),
    ("8x V100 16GB", "FP32", 137.11, 7.66), ("8x V100 16GB", "mixed precision", 368.88, 6.19),
]


def _matmul_side(flops: dict, before: int) -> str:
    """'NxN', the matrices of a flops result's peak; results from before session 40 lack the size,
    and were measured at `before` (the size then for their kind of device)."""
    n = flops.get("matmul_size") or before
    return f"{n}x{n}"


def _gpu(results: dict) -> list[str]:
    """The GPU section: what `report --gpu` measured last (gpu_*), beside NVIDIA's published figures."""
    runs = {k: r for k, r in results.items() if k.startswith("gpu_")}
    if not runs:
        return ["## On a GPU", "", "**GPU numbers are not yet measured**: no GPU was available to this project. The "
                "same commands run unchanged on a GPU (mixed_float16 with loss scaling, XLA, one GPU per Horovod "
                "rank): `python -m unet_dist.bench report --gpu ...` there.", "", *_nvidia(None)]
    first = next(iter(runs.values()))
    lines = ["## On a GPU", "",
             f"One {', '.join(first['gpus'])}, TensorFlow {first.get('tensorflow', '?')}, host {first['cpus']} cores "
             f"({first.get('cpu', '?')}), {first['date']}; how that machine was set up is in the notes below. "
             "`float32` on this GPU means TF32 in the matrix units (TensorFlow's default). The scaling across GPUs "
             "is not measured: that machine had one GPU.", ""]
    if "gpu_train_pets_seed" in runs:
        r = runs["gpu_train_pets_seed"]
        paper = r["paper_fit_images_per_s"]
        mib = r.get("gpu_peak_memory_mib")  # results from before session 39 lack it
        lines += [f"### Training step: `{r['config']}` (global batch {r['global_batch_size']}, {r['image_size']})", "",
                  "| variant | images/s | vs paper |" + (" peak GPU memory, MiB |" if mib else ""),
                  "|---|---|---|" + ("---|" if mib else ""),
                  *(f"| ours, {v} | {ips:.1f} | {ips / paper:.2f}x |" + (f" {mib[v]:,.0f} |" if mib else "")
                    for v, ips in r["images_per_s"].items()),
                  f"| paper: model.fit on the PIL generator (float32) | {paper:.1f} | 1.00x |" + (" - |" if mib else ""),
                  "", f"Command: `{r['command']}`", ""]
    if "gpu_flops" in runs:
        r = runs["gpu_flops"]
        lines += [f"### FLOPs: `{r['config']}`, {r['train_gflops_per_image']:.2f} GFLOP per training image", "",
                  f"Peak: the best of three chains of ten {_matmul_side(r, 8192)} matrix multiplies in the variant's "
                  "compute dtype.",
                  "", "| variant | images/s | achieved GFLOP/s | matmul peak GFLOP/s | fraction of peak |",
                  "|---|---|---|---|---|",
                  *(f"| {v} | {x['images_per_s']:.1f} | {x['achieved_gflop_s']:.0f} | {x['matmul_peak_gflop_s']:.0f} | "
                    f"{x['fraction_of_peak']:.1%} |" for v, x in r["variants"].items()), "",
                  f"Command: `{r['command']}`", ""]
    if "gpu_pipeline_ronneberger" in runs:
        r = runs["gpu_pipeline_ronneberger"]
        fed = r["fed_train"]
        lines += ["### Does the input pipeline keep ahead of the GPU?", "",
                  f"`configs/ronneberger.yaml`'s pipeline at {r['image_size']}x{r['image_size']}, batch {r['batch']}, "
                  f"with its augmentation (elastic deformation included), on the host's {r['cpus']} cores: "
                  f"{r['images_per_s']:.1f} images/s alone; the config's train step on the GPU (its `auto` "
                  f"precision and XLA) fed by it: {fed['images_per_s']:.1f} images/s over {fed['steps']} steps, "
                  f"waiting for input {fed['input_wait_fraction']:.1%} of the time: "
                  f"{'not' if fed['input_bound'] == 'no' else fed['input_bound']} input-bound.", "",
                  f"Command: `{r['command']}`", ""]
    return lines + _nvidia(runs.get("gpu_train_ronneberger"))


def _nvidia(ours: dict | None) -> list[str]:
    """NVIDIA's published figures, and ours on the same network where `ours` (a bench train result
    of configs/ronneberger.yaml on one GPU) has been measured."""
    rows = [f"| {gpus} | {prec} | {ips:.2f} | {'-' if up is None else f'{up:.2f}x'} |"
            for gpus, prec, ips, up in NVIDIA_UNET_MEDICAL]
    lines = ["### The 2015 U-Net beside NVIDIA's UNet_Medical", "",
             "NVIDIA's published training throughput of UNet_Medical for TensorFlow 2 (the 2015 U-Net on 572x572 "
             "one-channel tiles, batch 8 per GPU, Horovod, XLA in both precisions, AMP for mixed precision, "
             "averaged over 1000 steps after 200 of warm-up, its input pipeline included; its README in NVIDIA's "
             "DeepLearningExamples, NGC container `tensorflow:20.06-tf2-py3`):", "",
             "| GPUs | precision | NVIDIA UNet_Medical, images/s | speedup over 1 GPU |", "|---|---|---|---|",
             *rows, ""]
    if ours is None:
        return lines + [
            "Ours on the same network, on EM-like slices: `python -m unet_dist.synthetic runs/bench/cells -n 48 "
            "--cells`, `python -m unet_dist.convert runs/bench/cells runs/bench/cells572 --border-distances`, then "
            "`python -m unet_dist.bench train --data runs/bench/cells572 --config configs/ronneberger.yaml "
            "--set data.global_batch_size=8 --variants float32 mixed_float16 mixed_float16+xla` on one GPU.", ""]
    mib = ours.get("gpu_peak_memory_mib")  # results from before session 39 lack it
    return lines + [
        f"Ours on the same network (3-channel input) on one {', '.join(ours['gpus'])}, on EM-like slices "
        "(`python -m unet_dist.synthetic runs/bench/cells -n 48 --cells`, then `python -m unet_dist.convert "
        "runs/bench/cells runs/bench/cells572 --border-distances`), our train step on batches held in memory "
        f"({ours['steps']} steps after 3 of warm-up): "
        + ", ".join(f"{v} {ips:.1f} images/s" + (f" ({mib[v]:,.0f} MiB of GPU memory at most)" if mib else "")
                    for v, ips in ours["images_per_s"].items())
        + ". These are other GPUs than NVIDIA's, so the ratio is not ours against NVIDIA's code"
        + "".join(f": {spec}" for gpu, spec in _BESIDE_A100.items() if any(gpu in g for g in ours["gpus"]))
        + ".", "", f"Command: `{ours['command']}`", ""]


# What the vendors' datasheets give for a GPU beside the A100 40GB of NVIDIA's figures.
_BESIDE_A100 = {"H200": "by the datasheets an H200 has about 3.2 times an A100's dense float16 matrix rate and 3.1 "
                        "times its memory bandwidth"}


def render(results: dict, out: Path) -> str:
    """docs/benchmarks.md from the results; writes the plots beside it."""
    lines = ["# Benchmarks", "",
             "Produced by `python -m unet_dist.bench report` (unet_dist/perf/report.py): every number below comes "
             "from the run whose command is shown with it; the raw JSON is in `docs/bench/`. Comparisons are "
             "measured side by side in one run, as ratios.", "",
             "Data: `python -m unet_dist.synthetic runs/bench/raw -n 300 --seed 1` then `python -m unet_dist.convert "
             "runs/bench/raw runs/bench/data256 --image-size 256` (the `--data` below; source images 240-500 px "
             "a side, like the Pet photos), and the demo's `runs/demo/data` (128x128, from `make demo`).", ""]
    lines += [_machines(results), "", *_gpu(results)]

    pipe = {k: results[k] for k in ("pipeline", "pipeline_off", "pipeline_full", "pipeline_intensity") if k in results}
    if pipe:
        lines += ["## Input pipeline vs the paper's PIL generator", "",
                  "Images/s delivered at 256x256, batch 8. The paper's generator opens each source image with PIL, "
                  "resizes it and converts it to numpy, one by one, without augmentation; ours reads the shards "
                  "(converted once with `--image-size 256`) and augments. Then, in the same process, the config's "
                  "train step (`configs/default.yaml`'s U-Net at depth 4) fed by the same pipeline, as the trainer "
                  "runs it: *waiting for input* is the share of each step's time spent getting the next batch "
                  "(the trainer's `input_wait`), and the verdict uses TensorFlow's profiler's thresholds (5% "
                  "moderately, 20% highly input-bound).", "",
                  "| augmentation | ours, images/s | paper PIL, images/s | ratio | train step fed by it, images/s | "
                  "waiting for input | command |", "|---|---|---|---|---|---|---|"]
        names = {"pipeline": "on (flips, zoom/crop, brightness, contrast)", "pipeline_off": "off",
                 "pipeline_full": "full (+ rotation, elastic)",
                 "pipeline_intensity": "intensity (+ noise, blur, lowres, gamma on nnU-Net's shares)"}
        for k, r in pipe.items():
            fed = r.get("fed_train")  # absent from runs before the fed measurement
            fed_cells = (f"{fed['images_per_s']:.1f} ({fed['steps']} steps) | {fed['input_wait_fraction']:.2%}: "
                         f"{'not' if fed['input_bound'] == 'no' else fed['input_bound']} input-bound"
                         if fed else "not measured | not measured")
            lines.append(f"| {names[k]} | {r['images_per_s']:.0f} | {r['paper_pil_images_per_s']:.0f} | "
                         f"{r['speedup']:.2f}x | {fed_cells} | `{r['command']}` |")
        lines.append("")
        _bar(out / "bench" / "pipeline.png", "Input pipeline, images/s (256x256)",
             [f"ours, augment {k.removeprefix('pipeline').strip('_') or 'on'}" for k in pipe] + ["paper PIL generator"],
             [r["images_per_s"] for r in pipe.values()] + [pipe[next(iter(pipe))]["paper_pil_images_per_s"]], "images/s")
        lines += ["![pipeline](bench/pipeline.png)", ""]

    for key in ("train_pets_seed", "train_demo"):
        if key not in results:
            continue
        r = results[key]
        lines += [f"## Training step: `{r['config']}` vs the paper's Keras code", "",
                  f"Images/s of one training step (global batch {r['global_batch_size']}, {r['image_size']}), our "
                  "trainer on batches held in memory, against the paper's code path: the same model compiled with "
                  "RMSprop + binary cross-entropy and trained with `model.fit` on its PIL generator.", "",
                  "| variant | images/s | vs paper |", "|---|---|---|"]
        for v, ips in r["images_per_s"].items():
            lines.append(f"| ours, {v} | {ips:.2f} | {ips / r['paper_fit_images_per_s']:.2f}x |")
        lines += [f"| paper: model.fit on the PIL generator (float32) | {r['paper_fit_images_per_s']:.2f} | 1.00x |",
                  "", f"Command: `{r['command']}`", ""]
        _bar(out / "bench" / f"{key}.png", f"Training, {r['config']}, images/s",
             [f"ours, {v}" for v in r["images_per_s"]] + ["paper model.fit"],
             [*r["images_per_s"].values(), r["paper_fit_images_per_s"]], "images/s")
        lines += [f"![{key}](bench/{key}.png)", ""]

    if "flops" in results:
        r = results["flops"]
        runs = [r, *(results[k] for k in sorted(results) if k.startswith("flops@"))]
        lines += ["## FLOPs and the machine's peak", "",
                  f"`{r['config']}` at {r['image_size']}: {r['forward_gflops_per_image']:.2f} GFLOP forward per image "
                  f"(convolutions, counted from the layers), {r['train_gflops_per_image']:.2f} GFLOP per training "
                  f"image (3x forward). Peak: the best of three runs of a chain of ten {_matmul_side(r, 2048)} matrix "
                  "multiplies in the same precision, in this process. The target is a fraction of the peak of "
                  "the CPU the step ran on: a row for each CPU it has run on, the latest first.", "",
                  "| CPU (matrix features), date | variant | images/s | achieved GFLOP/s | matmul peak GFLOP/s | "
                  "fraction of peak |", "|---|---|---|---|---|---|"]
        for run_ in runs:
            flags = f" ({', '.join(run_['cpu_flags'])})" if run_.get("cpu_flags") else ""
            for v, x in run_["variants"].items():
                lines.append(f"| {run_.get('cpu', '?')}{flags}, {run_.get('date')} | {v} | {x['images_per_s']:.2f} | "
                             f"{x['achieved_gflop_s']:.1f} | {x['matmul_peak_gflop_s']:.1f} | "
                             f"{x['fraction_of_peak']:.1%} |")
        lines += ["", f"Command: `{r['command']}`", ""]

    if "profile" in results:
        r = results["profile"]
        step = r["step_s"]
        lines += ["### Where the step's time goes (TF profiler)", "",
                  f"`{r['config']}`, {r['precision']}, batch {r['global_batch_size']}, {r['steps']} steps traced with "
                  "`tf.profiler.experimental` and one inter-op thread, so kernels run one at a time and their "
                  f"times add up to the step ({r['kernels_s_per_step'] * 1e3:.0f} of {step * 1e3:.0f} ms per step "
                  f"accounted for; {r['images_per_s']:.1f} images/s under the profiler).", "",
                  "| kernels | ms per step | share of the step |", "|---|---|---|"]
        for kind, sec in r["kernel_s_per_step"].items():
            lines.append(f"| {kind} | {sec * 1e3:.0f} | {sec / step:.0%} |")
        if r.get("convolution_gflop_s"):
            lines += ["", f"Inside their own kernels the convolutions run at {r['convolution_gflop_s']:.0f} GFLOP/s "
                      "(the counted convolution FLOPs over the convolution kernels' time)."]
        lines += ["", "Largest kernels, ms per step: " + ", ".join(
            f"{k} {v * 1e3:.0f}" for k, v in list(r["top_kernels_s_per_step"].items())[:8]) + ".", "",
            f"Command: `{r['command']}`", ""]

    for name, title in (("scaling", "Weak scaling on this machine"),
                        ("scaling_pets_seed", "Weak scaling of `configs/pets_seed.yaml`"),
                        ("scaling_fp16", "Weak scaling with float16 gradients (`runtime.allreduce_dtype: float16`)"),
                        ("scaling_auto", "Weak scaling at the configs' precision (`runtime.precision: auto`)")):
        if name in results:
            lines += _scaling_section(results[name], title)

    if "memory" in results:
        r = results["memory"]
        lines += ["## Memory", "", "Peak resident memory of the largest process, each run in a fresh process.", "",
                  "| run | peak RSS, MiB |", "|---|---|"]
        for k, v in r.items():
            if k.endswith("_peak_rss_mib"):
                lines.append(f"| {k.removesuffix('_peak_rss_mib').replace('_', ' ')} | {v:.0f} |")
        lines += ["", f"Conversion memory from the smaller to the larger set: {r['convert_growth']:+.1%}.", ""]
        if "predict_bytes_per_pixel" in r:  # measured since session 28
            lines += [f"`predict --mode tile` of one image (the demo run of 20 steps; mask and overlay PNGs): "
                      f"{r['predict_bytes_per_pixel']:.0f} bytes per pixel of image beyond the 512x512 one's, "
                      "so an image of N megapixels needs about N times that many MB more.", ""]
        if "predict_no_overlay_bytes_per_pixel" in r:  # measured since session 47
            lines += [f"`predict --mode tile --no-overlay` (the mask alone): "
                      f"{r['predict_no_overlay_bytes_per_pixel']:.0f} bytes per pixel beyond the 512x512 one's.", ""]
        if "evaluate_bytes_per_pixel" in r:  # measured since session 46
            lines += [f"`evaluate --images --mode tile` of the same image and its mask (every analysis: the "
                      f"objects, their growth, the outlines): {r['evaluate_bytes_per_pixel']:.0f} bytes per pixel "
                      "beyond the 512x512 one's.", ""]
        lines += [f"Command: `{r['command']}`", ""]

    if "tta" in results:
        r = results["tta"]
        reps = r.get("repeats", 1)
        lines += ["## Time to accuracy", "",
                  f"Wall time (evaluations every {r.get('every', 25)} steps included) until val IoU >= "
                  f"{r['target_val_iou']} on the demo data, `{r['config']}` against the paper's recipe run by our "
                  "trainer on the same data and model (RMSprop lr 1e-3, binary cross-entropy, batch 32, float32, no "
                  f"augmentation). Ours is the config as it is, its `runtime.precision` included. Each recipe ran {reps} "
                  "time(s), alternating; the row is its median run.", "",
                  "| recipe | time to target, s | steps | best val IoU | every run, s |", "|---|---|---|---|---|"]
        for name in ("ours", "paper_recipe"):
            x = r[name]
            t = f"{x['time_to_target_s']:.0f}" if x["time_to_target_s"] else f"not reached in {x['wall_s']:.0f}"
            each = ", ".join(f"{y['time_to_target_s']:.0f}" if y["time_to_target_s"] else "-"
                             for y in r.get("runs", {}).get(name, []))
            label = name.replace("_", " ") + (f" ({x['precision']})" if "precision" in x else "")  # absent before
            lines.append(f"| {label} | {t} | {x['steps'] or '-'} | {x['best_val_iou']:.4f} | {each} |")
        ratio = (f"{r['speedup']:.2f}x" if "speedup" in r else
                 f"at least {r['speedup_at_least']:.2f}x" if "speedup_at_least" in r else "n/a")
        lines += ["", f"Ratio: {ratio}.", "", f"Command: `{r['command']}`", ""]
    return "\n".join(lines) + "\n"


def run(args) -> None:
    out = Path(args.out)
    (out / "bench").mkdir(parents=True, exist_ok=True)
    results = {}
    runs_here = gpu_commands(args) if args.gpu else commands(args)
    for name, cmd in {**commands(args), **gpu_commands(args)}.items():
        path = out / "bench" / f"{name}.json"
        if args.render_only or name not in runs_here or (args.only and name not in args.only):
            if path.exists():
                results[name] = json.loads(path.read_text())
            continue
        previous = json.loads(path.read_text()) if name in PER_CPU and path.exists() else None
        results[name] = run_one(name, cmd, out / "bench")
        if name in PER_CPU:
            _keep_per_cpu(name, previous, results[name], out / "bench")
    for name in PER_CPU:
        for path in sorted((out / "bench").glob(f"{name}@*.json")):
            results[path.stem] = json.loads(path.read_text())
    notes = out / "benchmarks_notes.md"
    text = render(results, out) + (("\n" + notes.read_text()) if notes.exists() else "")
    (out / "benchmarks.md").write_text(text)
    print(f"report: wrote {out / 'benchmarks.md'}", file=sys.stderr)
