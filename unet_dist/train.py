"""Trains a U-Net on converted shards, on any backend.

    python -m unet_dist.train --config configs/demo.yaml --data DATA --workdir RUN
    horovodrun -np 4 python -m unet_dist.train --config configs/pets_seed.yaml --data DATA --workdir RUN
    python -m unet_dist.train ... --steps 2000 --set optim.learning_rate=0.01 --no-resume

Rerunning the same command resumes from the latest checkpoint in WORKDIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unet_dist.config import ConfigError, add_config_args, add_strategy_arg, load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m unet_dist.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--data", type=Path, required=True, help="folder written by unet_dist.convert")
    p.add_argument("--workdir", type=Path, required=True, help="checkpoints, metrics.jsonl, summary.json, tensorboard/")
    p.add_argument("--steps", type=int, help="total training steps (overrides train.steps)")
    p.add_argument("--deterministic", action="store_true", help="fixed seeds and ordered data: reproducible runs")
    p.add_argument("--no-resume", action="store_true", help="start over (an earlier run is moved aside)")
    p.add_argument("--init-from", metavar="RUN", help="start from the weights of another run's workdir "
                   "(train.init_from: fine-tuning)")
    add_strategy_arg(p, "overrides runtime.strategy")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.deterministic:
        overrides.append("runtime.deterministic=true")
    if args.strategy:
        overrides.append(f"runtime.strategy={args.strategy}")
    if args.init_from:
        overrides.append(f"train.init_from={args.init_from}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    from unet_dist.checkpoint import CheckpointError  # TensorFlow loads here, after the config is valid
    from unet_dist.data.pipeline import DataError
    from unet_dist.distribute import CollectiveError
    from unet_dist.preemption import PREEMPTED_EXIT, Preempted
    from unet_dist.trainer import TrainingError, train

    try:
        train(cfg, args.data, args.workdir, resume=not args.no_resume)
    except Preempted as e:
        print(f"train: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except (ConfigError, DataError, TrainingError, CheckpointError, CollectiveError) as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
