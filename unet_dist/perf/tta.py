"""Time to accuracy: wall time until val IoU reaches a target, recommended settings vs the paper's recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from unet_dist.perf.common import child_failed, machine

# The paper's recipe on the same data and model size: RMSprop (lr 1e-3, no momentum), binary
# cross-entropy, batch 32, no augmentation, float32, one output. Ours: configs/demo.yaml as it is.
PAPER_RECIPE = ["optim.name=rmsprop", "optim.learning_rate=0.001", "optim.momentum=0.0", "optim.schedule=constant",
                "optim.warmup_steps=0", "optim.lr_scaling=none", "train.loss=bce", "data.global_batch_size=32",
                "runtime.precision=float32", "data.augment.flip=false", "data.augment.scale_crop=false",
                "data.augment.brightness=0", "data.augment.contrast=0", "model.deep_supervision=false"]


def _train(data: Path, workdir: Path, config: str, overrides: list[str], steps: int, target: float,
           every: int) -> dict:
    cmd = [sys.executable, "-m", "unet_dist.train", "--config", config, "--data", str(data), "--workdir",
           str(workdir), "--steps", str(steps), "--set", f"train.target_val_iou={target}",
           "--set", f"train.eval_every_steps={every}", "--set", "train.checkpoint_every_steps=100000"]
    for o in overrides:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if proc.returncode != 0:
        raise child_failed("tta", proc.stderr, proc.returncode)
    return json.loads((workdir / "summary.json").read_text())


def run(args) -> dict:
    """Both recipes `repeats` times, alternating; each row is the run with the median time to target
    (a run that never gets there counts as slower than any that does)."""
    import math

    res: dict = {"bench": "time_to_accuracy", "target_val_iou": args.target, "max_steps": args.max_steps,
                 "every": args.every, "repeats": args.repeats, "runs": {"ours": [], "paper_recipe": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for name, overrides in (("ours", []), ("paper_recipe", PAPER_RECIPE)):
                s = _train(args.data, Path(tmp) / f"{name}{rep}", args.config, overrides, args.max_steps,
                           args.target, args.every)
                row = {"time_to_target_s": s["time_to_target_s"], "steps": s["target_reached_at_step"],
                       "wall_s": s["wall_s"], "best_val_iou": s["best_val_iou"],
                       "precision": s["precision"]}  # ours: demo.yaml's auto, resolved for this machine
                res["runs"][name].append(row)
                print(f"bench tta: {name} (run {rep + 1}/{args.repeats}): {row}", file=sys.stderr, flush=True)
    for name, rows in res["runs"].items():
        ranked = sorted(rows, key=lambda r: r["time_to_target_s"] or math.inf)
        res[name] = ranked[(len(ranked) - 1) // 2]
    ours, paper = res["ours"]["time_to_target_s"], res["paper_recipe"]["time_to_target_s"]
    if ours and paper:
        res["speedup"] = paper / ours
    elif ours:  # the paper's recipe did not get there: the ratio is at least this
        res["speedup_at_least"] = res["paper_recipe"]["wall_s"] / ours
    return {**res, "config": str(args.config), "paper_recipe_overrides": PAPER_RECIPE, **machine()}
