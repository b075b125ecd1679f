"""Where the train step's time goes: a TF-profiler trace of the step, op time summed by kind.

The trace is TensorFlow's own (tf.profiler.experimental, the data behind TensorBoard's profile
tab); we read its XSpace file with the protobuf schema TensorFlow ships and sum the kernels' times.
The step runs with one inter-op thread, so its kernels run one after another (each still on every
intra-op thread) and their times add up to the step: the breakdown then accounts for the whole
step rather than overlapping kernels.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from unet_dist.perf.common import machine

# Kernel type (as the trace names it: oneDNN kernels carry an _Mkl/_MklNative prefix) -> kind.
KINDS = {
    "convolution": ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter", "DepthwiseConv2dNative"),
    "batch norm": ("FusedBatchNormV3", "FusedBatchNormEx", "FusedBatchNormGradV3", "FusedBatchNorm",
                   "FusedBatchNormGrad"),
    "relu": ("Relu", "ReluGrad"),
    "pooling": ("MaxPool", "MaxPoolGrad"),
    "skip concat": ("ConcatV2", "Slice", "ConcatOffset"),
}


def kind_of(op_type: str) -> str:
    base = op_type.removeprefix("_MklNative").removeprefix("_Mkl").removeprefix("_Fused")
    for kind, types in KINDS.items():
        if base in types:
            return kind
    return "other"


def kernel_seconds(logdir: Path) -> Counter:
    """Seconds per kernel type over the traced interval, from the host plane of the newest XSpace.

    Kernel events are the host events named "op_name:OpType" on the executor's threads.
    """
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(Path(logdir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"the TF profiler wrote no .xplane.pb under {logdir}")
    space = xplane_pb2.XSpace()
    space.ParseFromString(files[-1].read_bytes())
    out: Counter = Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):  # the executor's threads
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "::" not in name:
                    out[name.rsplit(":", 1)[1]] += event.duration_ps * 1e-12
    return out


def run(args) -> dict:
    import tensorflow as tf

    from unet_dist import precision
    from unet_dist.config import load_config
    from unet_dist.data.pipeline import load_manifest
    from unet_dist.model import build_unet
    from unet_dist.perf.flops import forward_flops
    from unet_dist.perf.train import prepared_step

    cfg = load_config(args.config, list(args.set) + ["runtime.strategy=single", "runtime.inter_op_threads=1"])
    manifest = load_manifest(args.data)
    step, batches, global_batch, _ = prepared_step(cfg, args.data, manifest)
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        t = time.perf_counter()
        for i in range(args.steps):
            out = step(batches[i % len(batches)])
        float(out["loss"])
        wall = time.perf_counter() - t
        tf.profiler.experimental.stop()
        by_type = kernel_seconds(Path(logdir))
    precision.set_policy("float32")
    conv_flops = 3 * forward_flops(build_unet(cfg.model, tuple(cfg.data.image_size))) * global_batch * args.steps
    kinds: Counter = Counter()
    for op_type, seconds in by_type.items():
        kinds[kind_of(op_type)] += seconds
    per_step = {k: v / args.steps for k, v in kinds.most_common()}
    conv_s = kinds["convolution"]
    result = {"bench": "profile", "config": str(args.config), "precision": cfg.runtime.precision,
              "global_batch_size": global_batch, "steps": args.steps, "step_s": wall / args.steps,
              "images_per_s": args.steps * global_batch / wall, "kernel_s_per_step": per_step,
              "kernels_s_per_step": sum(per_step.values()),
              "convolution_gflop_s": conv_flops / conv_s / 1e9 if conv_s else None,
              "top_kernels_s_per_step": {k: v / args.steps for k, v in by_type.most_common(12)}}
    for kind, s in per_step.items():
        print(f"bench profile: {kind}: {s * 1e3:.0f} ms per step ({s / result['step_s']:.0%})", file=sys.stderr)
    return {**result, **machine()}
