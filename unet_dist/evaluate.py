"""Evaluates a trained workdir on the val (or train) split of converted data, on any backend.

    python -m unet_dist.evaluate --workdir RUN --data DATA [--checkpoint best|latest] [--split val|train]
        [--out FILE]
    horovodrun -np 2 python -m unet_dist.evaluate --workdir RUN --data DATA

Prints the metrics as JSON and writes them to WORKDIR/eval.json (--split train: eval_train.json), or
--out. --split train evaluates every training record (no augmentation): a held-out test set converted
with --val-fraction 0, or the training fit itself. The metric keys keep their val_ prefix either way.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unet_dist.config import ConfigError, add_workdir_args, load_workdir_config, writable_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unet_dist.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir_args(p)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--strategy", choices=("auto", "single", "mirrored", "multiworker", "horovod"))
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = args.out or args.workdir / ("eval.json" if args.split == "val" else f"eval_{args.split}.json")
    try:
        cfg = load_workdir_config(args.workdir)
        if out.is_dir():
            raise ConfigError(f"--out {out}: a folder; give the file to write the metrics to")
        writable_dir(out.parent, "--out")  # before the evaluation, so its result has somewhere to go
    except ConfigError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if args.strategy:
        cfg.runtime.strategy = args.strategy
    from unet_dist.checkpoint import CheckpointError, Checkpoints, checkpoint_path
    from unet_dist.data.pipeline import DataError, load_manifest
    from unet_dist.distribute import make_runtime
    from unet_dist.logs import atomic_write_text
    from unet_dist.trainer import build_model_and_optimizer, check_data_matches, evaluate

    try:
        runtime = make_runtime(cfg)
        manifest = load_manifest(args.data)
        check_data_matches(cfg, manifest, args.data)
        path = checkpoint_path(args.workdir, args.checkpoint)
    except (DataError, ConfigError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    model, optimizer = build_model_and_optimizer(cfg, runtime, cfg.optim.learning_rate)
    ckpts = Checkpoints(runtime, args.workdir, model, optimizer, cfg)
    try:
        ckpts.restore(path)
    except CheckpointError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    try:
        metrics, _ = evaluate(model, cfg, runtime, args.data, manifest, split=args.split)
    except DataError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    metrics.update({"split": args.split, "checkpoint": path, "step": int(ckpts.step.numpy()),
                    "world_size": runtime.world_size})
    if runtime.is_chief:
        print(json.dumps(metrics))
        atomic_write_text(out, json.dumps(metrics, indent=1))  # a kill mid-write keeps the earlier file
    return 0


if __name__ == "__main__":
    sys.exit(main())
