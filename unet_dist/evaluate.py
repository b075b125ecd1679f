"""Evaluates a trained workdir on converted data (on any backend), or on a folder of images and masks.

    python -m unet_dist.evaluate --workdir RUN --data DATA [--checkpoint best|latest] [--split val|train]
        [--out FILE]
    horovodrun -np 2 python -m unet_dist.evaluate --workdir RUN --data DATA
    python -m unet_dist.evaluate --workdir RUN [--workdir RUN2 ...] --images SRC [--layout oxford-pet|folders]
        [--mask-suffix S] [--list FILE] [--mode auto|tile|resize] [--tile N --overlap P] [--tta none|flip]
        [--postprocess none|largest[:C,...]|min-size:N[:C,...]|grow:N[:C,...]] [--nsd-tolerance PX]
    horovodrun -np 2 python -m unet_dist.evaluate --workdir RUN --images SRC

Either source runs on as many processes as it is started with (horovodrun, mpirun, srun, TF_CONFIG):
each scores its share and the counts are summed, so the metrics do not depend on the number of
processes. The backend follows how evaluate was started (or --strategy), not how the run was trained.
--set runtime.KEY=VALUE (repeatable) changes a runtime key of the run's config for this command only:
how long the first process to finish waits for the others (runtime.stall_shutdown_seconds), threads,
and the precision, float32 unless set (runtime.precision=auto: this machine's mixed policy, as `predict`).

--data: prints the metrics as JSON and writes them to WORKDIR/eval.json (--split train: eval_train.json),
or --out, object scores included (val_object_f1, val_seg: `unet_dist/objects.py`). --split train
evaluates every training record (no augmentation): a held-out test set converted with
--val-fraction 0, or the training fit itself. The metric keys keep their val_ prefix either way.
These records are the size conversion made them (data.image_size when it resized), and must hold
images mapped to 8 bits as the run's training data did (convert --intensity; the error says how).

--images: predicts every image of SRC (laid out as for convert; the layout and classes of the run's
data by default) the way `predict` does with the same --mode, --tile, --overlap and --tta, and scores
the masks at the images' own sizes; --list FILE scores only the images FILE names (a data set's own
test or val list, read as convert --val-list reads it). Several runs (the folds of `convert --fold`)
are scored as their averaged predictions. The metrics (unprefixed) go to the first run's
eval_images.json, or --out, with each image's own scores (per_image) and, for multi-page TIFFs, each
stack's scores over all its pages (per_stack), worst first. --postprocess scores the masks as
`predict --postprocess` writes them; whatever it says, the file's largest_component gives, for each
class but the background, its IoU as predicted and with only its largest connected component kept
in each image, small_objects its object F1, SEG and IoU as predicted and without its objects under
2, 4, ... 4096 pixels, and grown_objects its object F1, SEG, panoptic quality and mean AP with its
objects grown by 1, 2, 3, 4, 6 and 8 pixels over the background (`unet_dist/postprocess.py`); a
line names the classes that each helps and the --postprocess value to pass. objects scores each
such class's connected components (grown as --postprocess grow:N says) against the truth's
(matched at IoU > 0.5): whether touching objects came out apart (`unet_dist/objects.py`), with the
panoptic quality and the matches above each IoU from 0.5 to 0.95 (by_iou, mean_ap: the cell
benchmarks' average precision, pooled and image_mean_ap each image's averaged); each per_image
and per_stack row has its object F1 per class. boundary gives, for each class but the background,
how far its outlines lie from the truth's in pixels (`unet_dist/surface.py`): the mean and median
HD95 and the mean ASSD over the images with the class in both masks, the mean NSD (the share of
outline pixels within --nsd-tolerance pixels of the other's), and the images where the class was
missed or spurious; each per_image row has them per class. The per_image rows also go to a
table beside the JSON, eval_images.csv (--out's name with .csv), a row per image and a column per
score and class (iou_NAME, dice_NAME, hd95_NAME, ..., object_f1_NAME), worst first.
Where the run's data were instance masks (convert --classes instances), the true objects are the
masks' instances themselves, whole, as the cell tracking challenge scores them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unet_dist.config import (
    Config,
    ConfigError,
    add_runtime_set_arg,
    add_strategy_arg,
    add_workdir_args,
    load_workdir_config,
    writable_dir,
)
from unet_dist.data.convert import LAYOUTS
from unet_dist.predict import add_mode_args, add_postprocess_arg, my_share, predictor_options, sum_over_processes
from unet_dist.surface import TOLERANCE


def evaluate_images(args: argparse.Namespace, cfg: Config, out: Path) -> int:
    """--images: each labelled image of args.images predicted as `predict` would, scored at its own size.

    Metrics come from one confusion matrix summed over every pixel of every image (no average of
    per-image scores), as the record evaluation does; the file also lists each image's own IoU, worst
    first. An unreadable image or mask is skipped and named. With N processes each predicts its share
    (`predict.my_share`); their per-image confusion matrices are summed in one collective (K*K numbers
    an image).
    """
    import numpy as np
    from tqdm import tqdm

    from unet_dist.atomic import atomic_write_text
    from unet_dist.checkpoint import CheckpointError
    from unet_dist.data.convert import (
        ConvertError,
        find_pairs,
        ignores,
        listed_samples,
        load_instance_pair,
        load_pair,
        read_image_list,
    )
    from unet_dist.data.imageio import BadImage, stacks_of
    from unet_dist.distribute import CollectiveError, make_trained_run_runtime
    from unet_dist.inference import PredictionError, data_info, load_predictor
    from unet_dist.logs import chief_progress
    from unet_dist.metrics import confusion_matrix, predict_classes, scores
    from unet_dist.objects import FIELDS, class_objects, matched_objects, object_counts, object_f1, object_scores
    from unet_dist.postprocess import (
        GROWS,
        SIZES,
        advice,
        grow_advice,
        grow_effect,
        moved_by_truth,
        size_advice,
        size_effect,
    )
    from unet_dist.surface import FIELDS as BOUNDARY_FIELDS
    from unet_dist.surface import boundary_rows, boundary_scores, per_class

    try:
        runtime = make_trained_run_runtime(cfg, args.strategy, args.runtime_set)
        info = data_info(args.workdir[0], "the run's classes are unknown")
        if info is None or "classes" not in info:
            raise ConfigError(f"{args.workdir[0] / 'data.json'} (written by train) has no classes: the masks "
                              "cannot be read as the run's classes")
        layout = args.layout or info.get("layout", "oxford-pet")
        instances = info["classes"] == "instances"
        samples, skipped = find_pairs(args.images, layout, args.mask_suffix)
        if not samples:
            raise ConfigError(f"--images {args.images}: no image with a mask ({layout} layout; "
                              f"{len(skipped)} files skipped)")
        if args.list:
            samples, skipped = listed_samples(samples, skipped, read_image_list(args.list, "--list"),
                                              f"--list {args.list}")
        predictor = load_predictor(args.workdir, **predictor_options(args), precision=runtime.cfg.runtime.precision,
                                   postprocess=args.postprocess)
    except (ConfigError, ConvertError, CheckpointError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if runtime.is_chief:  # the same list on every process
        for s in skipped:
            print(f"evaluate: skipping {s['file']}: {s['reason']}", file=sys.stderr)
    k = predictor.cfg.model.num_classes
    grows = predictor.postprocess.grows(k)  # the objects' growth (--postprocess grow:N), or None
    try:
        share = my_share(samples, predictor, runtime)
    except CollectiveError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    # float64: the collectives sum it on every backend, exactly up to 2**53 pixels. Each image's
    # counts of the masks as predict --postprocess writes them, for its own row:
    counts = np.zeros((len(samples), k, k), np.float64)  # confusion matrices
    objects = np.zeros((len(samples), k, FIELDS))  # `object_counts`
    seen = np.zeros(len(samples), np.float64)  # read and predicted (its pixels may all be left out)
    boundary = np.zeros((len(samples), k, BOUNDARY_FIELDS))  # `surface.boundary_rows`
    # And of the masks as predicted, what post-processing would do to them: whole numbers summed
    # over this process's images, sums of IoUs (SEG's) kept per image (then each image's come from one
    # process, and they are added in one order on any number of processes, to the same bits).
    raw = {"cm": np.zeros((k, k)), "moved": np.zeros((k, k)),  # `moved_by_truth`
           "small": np.zeros((k, len(SIZES), 3 + k)),  # `size_effect`; its SEG sums (field 2) in small_seg
           "objects": np.zeros((len(samples), k, FIELDS)), "small_seg": np.zeros((len(samples), k, len(SIZES))),
           "grow": np.zeros((len(samples), 1 + len(GROWS), k, FIELDS))}  # `grow_effect`
    for i in chief_progress(runtime, "evaluate", "img", share):
        sample = samples[i]
        try:
            # Instance masks: objects are matched to the instances, not to the components of their classes.
            if instances:
                image, truth, ids = load_instance_pair(sample.image, sample.mask, sample.page, info.get("ignore_value"),
                                                       predictor.cfg.model.in_channels, predictor.window)
            else:
                (image, truth), ids = load_pair(sample.image, sample.mask, layout, info["classes"],
                                                info.get("num_classes"), sample.page, info.get("ignore_value"),
                                                info.get("colors"), predictor.cfg.model.in_channels,
                                                predictor.window), None
            probs = predictor(image)
        except (BadImage, OSError, PredictionError) as e:
            tqdm.write(f"evaluate: skipping {sample.where}: {e}", file=sys.stderr)
            continue
        # The record evaluation's own class rule and counting, at the image's size.
        predicted = predict_classes(probs).numpy()
        raw_cm = confusion_matrix(truth, predicted, k, ignores(info)).numpy()
        # Labelled once for both tables.
        objs = class_objects(predicted, range(1, k), grows)  # grown as predict --instances grows them
        matched = [matched_objects(predicted, truth, c, ids if c == 1 else None, objects=objs[c]) for c in range(1, k)]
        raw_objects = object_counts(predicted, truth, k, matched)
        small = size_effect(predicted, truth, k, matched)
        raw["objects"][i], raw["small_seg"][i] = raw_objects, small[..., 2]
        raw["grow"][i] = grow_effect(predicted, truth, k, ids)
        raw["cm"] += raw_cm
        raw["moved"] += moved_by_truth(predicted, truth, k)
        raw["small"] += small
        written = predictor.postprocess(predicted)  # `predicted` itself where it changes no pixel (grow alone)
        if written is predicted:  # and then its objects are the raw ones, grown as the flag says
            counts[i], objects[i] = raw_cm, raw_objects
        else:
            counts[i] = confusion_matrix(truth, written, k, ignores(info)).numpy()
            objects[i] = object_counts(written, truth, k, truth_ids=ids, grows=grows)
        boundary[i] = boundary_rows(written, truth, k, args.nsd_tolerance)
        seen[i] = 1
    try:
        counts, objects, boundary, seen, *summed = summed_over_processes(
            runtime, [counts, objects, boundary, seen, *raw.values()])
        raw = dict(zip(raw, summed, strict=True))
        raw["objects"], raw["grow"] = raw["objects"].sum(axis=0), raw["grow"].sum(axis=0)
        raw["small"][..., 2] = raw.pop("small_seg").sum(axis=0)
        read = seen > 0
    except CollectiveError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    if not read.any():
        print(f"evaluate: error: --images {args.images}: none of its {len(samples)} images could be read",
              file=sys.stderr)
        return 1
    labelled = counts.sum(axis=(1, 2)) > 0  # not every pixel left out (convert --ignore-value)
    if not labelled.any():
        print(f"evaluate: error: --images {args.images}: every mask pixel of its {int(read.sum())} images is the "
              f"ignore value {info.get('ignore_value')} of the run's data.json; nothing to score", file=sys.stderr)
        return 1
    if not runtime.is_chief:
        return 0

    def own(cm, objs):  # an image's or a stack's own scores: counts and `object_counts` rows summed over it
        # The objects counted too, per class (None for the background): a count's error, where
        # cells are counted, is the number read first.
        return {**{key: v for key, v in scores(cm).items()
                   if key in ("iou", "fg_iou", "iou_per_class", "dice_per_class")},
                "object_f1_per_class": object_f1(objs),
                **{f"{what}_objects_per_class": [None, *objs[1:, field].astype(int).tolist()]
                   for field, what in ((0, "true"), (1, "predicted"))}}

    per_image = [{"image": str(samples[i].image), **({"page": samples[i].page} if samples[i].stacked else {}),
                  **own(counts[i], objects[i]), **per_class(boundary[i])} for i in np.flatnonzero(read & labelled)]
    # A stack (an EM or microscopy volume) is also scored whole, from its pages' summed counts: the
    # per-volume score nnU-Net and the EM challenges report.
    stacks = {f: kept for f, pages in stacks_of(samples).items()
              if (kept := [i for i in pages if read[i]]) and labelled[kept].any()}
    per_stack = sorted(({"image": str(f), "pages": len(pages),
                         **own(counts[pages].sum(axis=0), objects[pages].sum(axis=0))}
                        for f, pages in stacks.items()), key=lambda r: r["iou"])
    metrics = {**scores(counts[read].sum(axis=0)), "images": int(read.sum()),
               "skipped": len(skipped) + int((~read).sum()), "source": str(args.images),
               **({"list": str(args.list.resolve())} if args.list else {}), "mode": predictor.mode,
               "why": predictor.why, "tta": args.tta, "checkpoints": predictor.checkpoints,
               "world_size": runtime.world_size, "precision": predictor.precision,
               "postprocess": str(predictor.postprocess),
               "objects": object_scores(objects[read].sum(axis=0), per_image=objects[read]),
               "boundary": boundary_scores(boundary[read], args.nsd_tolerance),
               "largest_component": advice(raw["cm"].astype(np.int64), raw["moved"].astype(np.int64)),
               "small_objects": size_advice(raw["cm"], raw["objects"], raw["small"]),
               "grown_objects": grow_advice(raw["grow"])}
    names = info.get("class_names") or []
    for row in (metrics["objects"] + metrics["boundary"] + metrics["largest_component"] + metrics["small_objects"]
                + metrics["grown_objects"]):
        if row["class"] < len(names):  # the class's name, as data.json has it
            row["name"] = names[row["class"]]
    for line in postprocess_advice(metrics["largest_component"], metrics["small_objects"], metrics["grown_objects"],
                                   predictor.postprocess):
        print(line, file=sys.stderr)
    print(json.dumps(metrics))
    # The file adds each image's own scores, worst first: where to look when the mean disappoints.
    worst_first = sorted(per_image, key=lambda r: r["iou"])
    atomic_write_text(out, json.dumps({**metrics, **({"per_stack": per_stack} if per_stack else {}),
                                       "per_image": worst_first}, indent=1))
    atomic_write_text(table_path(out), per_image_csv(worst_first, [names[c] if c < len(names) else str(c)
                                                                   for c in range(k)]))
    return 0


def table_path(out: Path) -> Path:
    """Where evaluate --images writes its per-image table: --out's name with .csv for its suffix
    (eval_images.csv), or with .csv added where --out is a .csv itself."""
    return out.with_name(out.name + ".csv") if out.suffix == ".csv" else out.with_suffix(".csv")


# The per-image table's columns for each class (`per_image_csv`): the per_image rows' lists, the
# background's left out where it has none.
TABLE_FIELDS = ("iou", "dice", "hd95", "assd", "nsd", "true_objects", "predicted_objects", "object_f1")


def per_image_csv(rows: list[dict], names: list[str]) -> str:
    """The per_image rows of evaluate --images (worst first) as CSV, for a spreadsheet: image, page
    (empty for an image that is not a stack's page), mean IoU, then for each class NAME the
    columns iou_NAME, dice_NAME, ... (TABLE_FIELDS; the background's IoU and Dice alone), empty
    where the image has no such score."""
    import csv
    import io

    columns = [(f, c) for c in range(len(names)) for f in TABLE_FIELDS if c or f in ("iou", "dice")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "page", "iou", *(f"{f}_{names[c]}" for f, c in columns)])
    for r in rows:
        cells = [r[f"{f}_per_class"][c] for f, c in columns]
        writer.writerow([r["image"], r.get("page", ""), f"{r['iou']:.6g}",
                         *("" if v is None else v if isinstance(v, int) else f"{v:.6g}" for v in cells)])
    return buf.getvalue()


def summed_over_processes(runtime, arrays: list) -> list:
    """`predict.sum_over_processes` of several float64 arrays in one collective, each back in its shape."""
    import numpy as np

    total = sum_over_processes(runtime, np.concatenate([a.ravel() for a in arrays]))
    ends = np.cumsum([a.size for a in arrays])
    return [part.reshape(a.shape) for a, part in zip(arrays, np.split(total, ends[:-1]), strict=True)]


def apart(before: float, after: float, between: str = " to ") -> str:
    """'0.9618 to 0.9631': two scores to 4 decimals, or to as many more (up to 8) as tell them
    apart, so that a gain of 3e-6 does not read as none."""
    digits = 4
    while digits < 8 and f"{before:.{digits}f}" == f"{after:.{digits}f}" and before != after:
        digits += 1
    return f"{before:.{digits}f}{between}{after:.{digits}f}"


def postprocess_advice(largest: list[dict], small: list[dict], grown: list[dict], given) -> list[str]:
    """evaluate --images' lines about the classes whose largest component alone raises their IoU
    (`postprocess.advice` rows), those whose object F1 rises without their small objects
    (`postprocess.size_advice` rows), and those whose SEG rises with their objects grown
    (`postprocess.grow_advice` rows), with the --postprocess value that does it. given: the
    `postprocess.Postprocess` evaluate was given, whose growth the min-size table measured with
    (so its flag keeps it)."""
    from unet_dist.postprocess import Postprocess

    def named(row):
        return f"class {row['class']}" + (f" ({row['name']})" if "name" in row else "")

    lines = []
    helps = [a for a in largest if a["helps"]]
    if helps:
        lines.append("evaluate: keeping only the largest connected component raises the IoU of "
                     + ", ".join(f"{named(a)} from {apart(a['iou'], a['iou_largest_only'])}" for a in helps)
                     + f" on these images (predict --postprocess largest:{','.join(str(a['class']) for a in helps)})")
    for row in small:
        if row["helps"]:
            best = next(r for r in row["by_min_size"] if r["min_size"] == row["best_min_size"])
            iou = "" if row["iou"] is None or best["iou"] is None else f"; IoU {apart(row['iou'], best['iou'], ' -> ')}"
            lines.append(f"evaluate: removing the objects under {best['min_size']} pixels raises the object F1 of "
                         f"{named(row)} from {apart(row['object_f1'], best['object_f1'])} ({best['removed_objects']} "
                         f"removed{iou}) on these images (predict{' --instances' * bool(given.grown)} --postprocess "
                         f"{Postprocess(min_size=best['min_size'], small=(row['class'],), grow=given.grow, grown=given.grown)})")
    for row in grown:
        if row["helps"]:
            best = next(r for r in row["by_grow"] if r["grow"] == row["best_grow"])
            lines.append(f"evaluate: growing the objects of {named(row)} by {best['grow']} "
                         f"pixel{'s' * (best['grow'] != 1)} over the background "
                         f"raises their SEG from {apart(row['seg'], best['seg'])} (object F1 "
                         f"{apart(row['object_f1'], best['object_f1'], ' -> ')}) on these images (predict --instances "
                         f"--postprocess grow:{best['grow']}:{row['class']})"
                         + (f"; evaluate --images --postprocess grow:{best['grow']}:{row['class']} measures min-size on "
                            "the grown objects" if any(r["helps"] for r in small) and not given.grown else ""))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m unet_dist.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workdir_args(p, many=True)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="converted data: scores its val (or train) records")
    source.add_argument("--images", type=Path, help="a folder of images and masks, scored at their own sizes")
    p.add_argument("--out", type=Path)
    add_strategy_arg(p, "the backend (default: auto, from how evaluate was started)")
    add_runtime_set_arg(p)
    records = p.add_argument_group("with --data")
    records.add_argument("--split", choices=("val", "train"))
    images = p.add_argument_group("with --images")
    images.add_argument("--layout", choices=LAYOUTS, help="SRC's layout (default: that of the run's data)")
    images.add_argument("--mask-suffix", default="", help="masks named X<S>.* (as convert's)")
    images.add_argument("--list", type=Path, metavar="FILE",
                        help="score only the images FILE names, one a line (as convert --val-list: a data set's "
                             "own test or val list)")
    add_mode_args(images)
    add_postprocess_arg(images)
    images.add_argument("--nsd-tolerance", type=float, default=TOLERANCE, metavar="PX",
                        help=f"outline pixels this close to the other mask's outline count in NSD (default "
                             f"{TOLERANCE:g}; `unet_dist/surface.py`)")
    args = p.parse_args(argv)
    if not args.nsd_tolerance >= 0:
        p.error(f"--nsd-tolerance {args.nsd_tolerance}: a distance in pixels, 0 or more")
    # Flags of the other source would be ignored: say so instead.
    other = (["--split"] * bool(args.split) if args.images else
             ["--layout"] * bool(args.layout) + ["--mask-suffix"] * bool(args.mask_suffix) + ["--list"] * bool(args.list)
             + ["--mode"] * (args.mode != "auto") + ["--tile"] * (args.tile is not None)
             + ["--overlap"] * (args.overlap is not None) + ["--tta"] * (args.tta != "none")
             + ["--postprocess"] * (args.postprocess != "none") + ["--nsd-tolerance"] * (args.nsd_tolerance != TOLERANCE))
    if other:
        p.error(f"{', '.join(other)}: not used with {'--images' if args.images else '--data'}")
    if args.data and len(args.workdir) > 1:
        p.error("--data evaluates one --workdir (--images scores several runs' averaged predictions)")
    name = "eval_images.json" if args.images else "eval.json" if args.split in (None, "val") else "eval_train.json"
    workdir = args.workdir[0]  # where the result goes, and with --data the one run
    out = args.out or workdir / name
    try:
        cfg = load_workdir_config(workdir)
        if out.is_dir():
            raise ConfigError(f"--out {out}: a folder; give the file to write the metrics to")
        writable_dir(out.parent, "--out")  # before the evaluation, so its result has somewhere to go
    except ConfigError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if args.images:
        return evaluate_images(args, cfg, out)
    args.split, args.workdir = args.split or "val", workdir
    from unet_dist.atomic import atomic_write_text
    from unet_dist.checkpoint import CheckpointError, Checkpoints, checkpoint_path
    from unet_dist.data.pipeline import DataError, load_manifest
    from unet_dist.distribute import CollectiveError, make_trained_run_runtime
    from unet_dist.inference import check_intensity_matches
    from unet_dist.logs import chief_progress
    from unet_dist.trainer import Evaluator, build_model_and_optimizer, check_data_matches

    try:
        runtime = make_trained_run_runtime(cfg, args.strategy, args.runtime_set)
        manifest = load_manifest(args.data)
        check_data_matches(cfg, manifest, args.data)
        check_intensity_matches(args.workdir, manifest, args.data)
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
        evaluator = Evaluator(model, cfg, runtime, args.data, manifest, args.split, objects=True)
        with chief_progress(runtime, "evaluate", "batch", total=evaluator.batches) as bar:
            metrics, _ = evaluator(progress=bar.update)
    except DataError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    except CollectiveError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    metrics.update({"split": args.split, "checkpoint": path, "step": int(ckpts.step.numpy()),
                    "world_size": runtime.world_size, "precision": cfg.runtime.precision,
                    "object_postprocess": str(evaluator.postprocess)})  # the run's train.object_postprocess
    if runtime.is_chief:
        print(json.dumps(metrics))
        atomic_write_text(out, json.dumps(metrics, indent=1))  # a kill mid-write keeps the earlier file
    return 0


if __name__ == "__main__":
    sys.exit(main())
