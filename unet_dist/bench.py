"""Benchmarks; each subcommand prints JSON as its last line. docs/benchmarks.md comes from `report`.

    python -m unet_dist.bench pipeline --data DATA [--batches 150] [--augment on|off|full|intensity] [--train-steps 10]
    python -m unet_dist.bench train --data DATA --config configs/pets_seed.yaml [--steps 10]
    python -m unet_dist.bench flops --data DATA --config configs/pets_seed.yaml
    python -m unet_dist.bench profile --data DATA --config configs/pets_seed.yaml [--steps 5]
    python -m unet_dist.bench scaling [--steps 10] [--rounds 8] [--repeats 3] [--per-replica-batch 8] [--config CONFIG]
    python -m unet_dist.bench memory --data DATA [--predict-size 4096]
    python -m unet_dist.bench tta --data DATA [--target 0.85] [--every 25] [--repeats 1]
    python -m unet_dist.bench report --data DATA256 --demo-data DATA128 --out docs   # all of them
    python -m unet_dist.bench report --gpu --data DATA256 --demo-data DATA128 --cells-data CELLS572  # on a GPU

pipeline: images/s of our tf.data pipeline against the paper's PIL generator (open, resize, numpy
per image; batch 8; no augmentation), on the same source images in the same run; then the config's
train step fed by the pipeline: the share of its time spent waiting for batches (input-bound?).
train: images/s of our train step (float32, mixed_bfloat16, with and without XLA) against the
paper's own Keras code (model.fit on its PIL generator), same model, data and batch, in one run.
flops: the model's FLOPs per training image, the achieved FLOP/s and the measured matmul peak.
profile: the train step under the TF profiler, kernel time per step by kind (convolution, batch
norm, ...), one inter-op thread so that the kinds add up to the step.
scaling: weak scaling (in-memory batches, one thread per process), 1 vs 2 processes, Horovod and
MultiWorkerMirroredStrategy: efficiency = ips(2) / (2 * ips(1)), both measured in each 2-process job
in alternating rounds (the chief also runs the 1-process step while the other rank waits).
memory: peak RSS of training (demo, pets_seed), of conversion at two data set sizes, and of
predict and evaluate --images (tile mode) for a 512x512 image and a large one, with what each pixel
more costs.
tta: wall time to a val IoU, configs/demo.yaml against the paper's recipe (RMSprop, BCE).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VARIANTS = ["float32", "mixed_bfloat16", "float32+xla", "mixed_bfloat16+xla"]
# What --variants takes: a precision, optionally with XLA (mixed_float16 for GPUs).
ALL_VARIANTS = [p + x for p in ("float32", "mixed_bfloat16", "mixed_float16") for x in ("", "+xla")]


def positive(text: str) -> int:
    """argparse type for counts and sizes: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be > 0")
    return value


def iou(text: str) -> float:
    """argparse type for a target IoU: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value}: must be in (0, 1]")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unet_dist.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    pp = sub.add_parser("pipeline", help="tf.data pipeline vs the paper's PIL generator")
    pp.add_argument("--data", type=Path, required=True)
    pp.add_argument("--source", type=Path, help="the raw Pet-layout folder (default: the manifest's source)")
    pp.add_argument("--batches", type=positive, default=150)
    pp.add_argument("--augment", choices=("on", "off", "full", "intensity"), default="on",
                    help="on: the config's augmentation (default: flips, zoom/crop, brightness, contrast); "
                         "full: plus rotation and elastic deformation; intensity: plus noise, blur, lowres "
                         "and gamma on nnU-Net's shares of the samples")
    pp.add_argument("--image-size", type=positive, default=256)
    pp.add_argument("--train-steps", type=positive, default=10,
                    help="steps of the config's train step fed by the pipeline (is it input-bound?)")
    pp.add_argument("--config", type=Path)
    pp.add_argument("--set", action="append", default=[])
    for name, help_ in (("train", "train-step images/s vs the paper's model.fit"),
                        ("flops", "FLOPs per image, achieved FLOP/s, matmul peak"),
                        ("profile", "TF-profiler breakdown of the train step by kernel kind")):
        pt = sub.add_parser(name, help=help_)
        pt.add_argument("--data", type=Path, required=True)
        pt.add_argument("--source", type=Path)
        pt.add_argument("--config", type=Path, default=Path("configs/pets_seed.yaml"))
        pt.add_argument("--steps", type=positive, default=5 if name == "profile" else 10)
        pt.add_argument("--variants", nargs="+", choices=ALL_VARIANTS,
                        default=VARIANTS if name == "train" else ["float32", "mixed_bfloat16"])
        pt.add_argument("--set", action="append", default=[])
    ps = sub.add_parser("scaling", help="weak scaling, 1 vs 2 processes, Horovod and MultiWorkerMirrored")
    ps.add_argument("--per-replica-batch", type=positive, default=8)
    ps.add_argument("--config", type=Path, help="train this config's model, size, precision, optimizer and loss "
                                                "(default: the demo-size U-Net in float32)")
    ps.add_argument("--backends", nargs="+", choices=["horovod", "multiworker"], default=["horovod", "multiworker"])
    ps.add_argument("--steps", type=positive, default=10, help="timed steps of each kind per round")
    ps.add_argument("--rounds", type=positive, default=8, help="rounds of synchronous and 1-process steps per job")
    ps.add_argument("--repeats", type=positive, default=3, help="2-process jobs per backend")
    ps.add_argument("--horovod-controller", choices=["mpi", "gloo"], default="mpi",
                    help="horovodrun --mpi or --gloo (horovodrun itself picks MPI where Horovod has it)")
    ps.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override for every worker, e.g. runtime.pin_cpus=false")
    pw = sub.add_parser("scaling-worker", help=argparse.SUPPRESS)
    pw.add_argument("--backend", required=True)
    pw.add_argument("--steps", type=positive, default=20)
    pw.add_argument("--per-replica-batch", type=positive, default=8)
    pw.add_argument("--config", type=Path)
    pw.add_argument("--set", action="append", default=[])
    pw.add_argument("--rounds", type=int, default=0)
    pw.add_argument("--pause-dir")
    pm = sub.add_parser("memory", help="peak RSS of training, conversion, prediction and evaluation")
    pm.add_argument("--data", type=Path, required=True)
    pm.add_argument("--steps", type=positive, default=20)
    pm.add_argument("--convert-sizes", type=positive, nargs=2, default=[200, 2000])
    pm.add_argument("--predict-size", type=positive, default=4096,
                    help="predict's and evaluate's memory for an image this large (square, tile mode) over a 512x512 one")
    pa = sub.add_parser("tta", help="time to a val IoU: ours vs the paper's recipe")
    pa.add_argument("--data", type=Path, required=True)
    pa.add_argument("--config", default="configs/demo.yaml")
    pa.add_argument("--target", type=iou, default=0.85)
    pa.add_argument("--every", type=positive, default=25, help="evaluate every N steps")
    pa.add_argument("--max-steps", type=positive, default=1500)
    pa.add_argument("--repeats", type=positive, default=1, help="runs of each recipe, alternating; the median is reported")
    pr = sub.add_parser("report", help="run the benchmarks and write docs/benchmarks.md")
    pr.add_argument("--data", type=Path, required=True, help="shards converted at 256x256 (pipeline, train, flops)")
    pr.add_argument("--demo-data", type=Path, required=True, help="shards converted at 128x128 (memory, tta)")
    pr.add_argument("--out", type=Path, default=Path("docs"))
    pr.add_argument("--only", nargs="+", help="run only these benchmarks; the others are read from OUT/bench/")
    pr.add_argument("--render-only", action="store_true", help="write the report from OUT/bench/*.json")
    pr.add_argument("--gpu", action="store_true",
                    help="run the GPU benchmarks (gpu_*) instead of the CPU ones; needs a GPU")
    pr.add_argument("--cells-data", type=Path, default=Path("runs/bench/cells572"),
                    help="EM-like slices converted at 572x572 with --border-distances (gpu_train_ronneberger)")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.bench == "report":
        from unet_dist.perf.report import commands, gpu_commands
        from unet_dist.perf.report import run as report

        names = list(gpu_commands(args) if args.gpu else commands(args))
        unknown = [n for n in args.only or () if n not in names]
        if unknown:  # before anything runs: a typo would re-render the report without running anything
            p.error(f"report --only {' '.join(unknown)}: no such benchmark{' with --gpu' if args.gpu else ''}; "
                    f"the benchmarks are {', '.join(names)}")
        if args.gpu and not args.render_only:
            import tensorflow as tf

            if not tf.config.list_physical_devices("GPU"):
                p.error("report --gpu: TensorFlow sees no GPU on this machine")
        report(args)
        return 0
    from unet_dist.config import ConfigError
    from unet_dist.data.pipeline import DataError
    from unet_dist.perf import flops, memory, pipeline, profile, scaling, train, tta

    run = {"pipeline": pipeline.run, "train": train.run, "flops": flops.run, "profile": profile.run, "scaling": scaling.run,
           "scaling-worker": scaling.worker, "memory": memory.run, "tta": tta.run}[args.bench]
    try:
        print(json.dumps(run(args)))
    except (ConfigError, DataError) as e:
        print(f"bench {args.bench}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
