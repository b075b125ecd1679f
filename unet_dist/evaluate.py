"""Evaluates a trained workdir on converted data (on any backend), or on a folder of images and masks.

    python -m unet_dist.evaluate --workdir RUN --data DATA [--checkpoint best|latest] [--split val|train]
        [--out FILE]
    horovodrun -np 2 python -m unet_dist.evaluate --workdir RUN --data DATA
    python -m unet_dist.evaluate --workdir RUN [--workdir RUN2 ...] --images SRC [--layout oxford-pet|folders]
        [--mask-suffix S] [--list FILE] [--mode auto|tile|resize] [--tile N --overlap P] [--tta none|flip]
        [--postprocess none|largest[:C,...]|min-size:N[:C,...]|grow:N[:C,...]] [--nsd-tolerance PX]
    python -m unet_dist.evaluate --workdir RUN --images SRC --predictions PRED [--prediction-suffix S]
        [--predicted-instances | --postprocess ...]
    horovodrun -np 2 python -m unet_dist.evaluate --workdir RUN --images SRC

Either source runs on as many processes as it is started with (horovodrun, mpirun, srun, TF_CONFIG):
each scores its share and the counts are summed, so the metrics do not depend on the number of
processes. The backend follows how evaluate was started (or --strategy), not how the run was trained.
--set runtime.KEY=VALUE (repeatable) changes a runtime key of the run's config for this command only:
how long the first process to finish waits for the others (runtime.stall_shutdown_seconds), threads,
and the precision, float32 unless set (runtime.precision=auto: this machine's mixed policy, as `predict`).

--data: prints the metrics as JSON and writes them to WORKDIR/eval.json (--split train: eval_train.json),
or --out, object scores included (val_object_f1, val_seg: `unet_dist/objects.py`) and the outlines'
distances (val_hd95, val_assd, val_nsd: `unet_dist/surface.py`, pooled over records and classes). The file
also holds each record's own scores (per_record, named by the image it was converted from, worst IoU
first: IoU and Dice, object F1 and counts, HD95, ASSD and NSD per class), and so does a table beside
it, eval.csv (--out's name with .csv), a row per record as evaluate --images writes its. --split train
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
--predictions PRED scores masks made already instead of predicting: PRED/STEM_mask.png as predict
wrote them (with other flags, another checkpoint, or on another machine), else PRED/STEM.* from
another tool (PRED/STEM<S>.* with --prediction-suffix S), class ids in one channel (0/255 for two
classes), in the run's classes; the run gives the classes, their names and the ignore value, and
its model is not loaded. --postprocess then
post-processes the masks read, and the tables measure what post-processing would do to them.
--predicted-instances (a run of two classes) reads label images instead, STEM_instances.tif of
predict --instances or STEM.* of another tool (Cellpose's and StarDist's masks): each object its
own number, 0 the background, scored as numbered, so that touching objects stay apart (the
objects of a class mask are its connected components), and grown from their numbers.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

import numpy as np

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
from unet_dist.predict import add_mode_args, add_postprocess_arg, my_share, predictor_options
from unet_dist.surface import TOLERANCE


def read_predicted(folder: Path, sample, k: int, shape: tuple[int, int], labels: bool = False,
                   suffix: str = "") -> np.ndarray:
    """--predictions: the predicted class ids (H, W) int32 of `sample` (an `imageio.Sample`, NAME
    its name), from FOLDER/NAME_mask.png (what predict writes), else FOLDER/NAME.* (another
    tool's): a one-channel image of ids 0..k-1 (predict's masks are palette images of ids), or
    0/255 for two classes; a stack's page, also from the same page of another tool's stack
    FOLDER/STEM.* (a multi-page TIFF as the input was). labels (--predicted-instances): a label
    image instead, each object its own number and 0 the background, from
    FOLDER/NAME_instances.tif (predict --instances), else as above. suffix (--prediction-suffix):
    another tool's files are NAME<suffix>.* (Cellpose's NAME_cp_masks.png), STEM<suffix>.*.
    Raises BadImage naming the file where there is none, or it is not such an image of `shape`."""
    from PIL import Image

    from unet_dist.data.imageio import IMAGE_SUFFIXES, BadImage
    from unet_dist.predict import INSTANCES, MASK

    def named(stem):
        return sorted(p for p in folder.glob(f"{glob.escape(stem + suffix)}.*") if p.suffix.lower() in IMAGE_SUFFIXES)

    own = f"{sample.name}{INSTANCES if labels else MASK}"
    # (a file, the page of it: None for an image of its own)
    found = [(folder / own, None), *((p, None) for p in named(sample.name)),
             *((p, sample.page) for p in (named(sample.image.stem) if sample.stacked else []))]
    path, page = next(((p, page) for p, page in found if p.is_file()), (None, None))
    if path is None:
        stack = f" or {sample.image.stem}{suffix}.* (page {sample.page})" if sample.stacked else ""
        raise BadImage(f"no predicted {'objects' if labels else 'mask'} {own} or {sample.name}{suffix}.*{stack} in "
                       f"--predictions {folder}")
    where = str(path) if page is None else f"{path} (page {page})"
    try:
        with Image.open(path) as image:
            if image.mode not in ("1", "L", "P", "I;16", "I"):
                raise BadImage(f"predicted mask {where} is a {image.mode} image; give class ids in one channel "
                               "(as predict's masks)")
            image.seek(page or 0)
            ids = np.asarray(image)
    except EOFError:
        raise BadImage(f"predicted mask {path} has no page {page}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"predicted mask {where} unreadable ({e})") from None
    if ids.shape != tuple(shape):
        raise BadImage(f"predicted mask {where} is {ids.shape[1]}x{ids.shape[0]}, its mask {shape[1]}x{shape[0]}")
    if labels:
        if ids.dtype == bool or ids.min(initial=0) < 0:
            raise BadImage(f"predicted mask {where} is not a label image (objects numbered from 1, 0 the background)")
        if ids.max(initial=0) > ids.size:  # numbers past the pixels' count: renumbered 1.., or the counts' bins
            values, order = np.unique(ids, return_inverse=True)  # would be as many
            ids = order.reshape(ids.shape) + (values[0] != 0)  # 0 stays 0
        return ids.astype(np.int32)
    top = int(ids.max())
    if k == 2 and top == 255 and not ((ids != 0) & (ids != 255)).any():
        ids = ids > 0  # 0/255, as masks of two classes are often saved
    elif top >= k:
        raise BadImage(f"predicted mask {where} holds {top}; the run's {k} classes are 0..{k - 1}"
                       + " (or 0/255)" * (k == 2))
    return ids.astype(np.int32)


def predicted_cost(size: tuple[int, int]) -> int:
    """--predictions: an image's share of the work (`predict.my_share`), which is reading it and its
    masks and scoring them: its pixels."""
    return size[0] * size[1]


def evaluate_images(args: argparse.Namespace, cfg: Config, out: Path) -> int:
    """--images: each labelled image of args.images predicted as `predict` would (or its mask read
    from --predictions, `read_predicted`), scored at its own size (`image_scores.ImageScores`). An
    unreadable image or mask is skipped and named. With N processes each scores its share
    (`predict.my_share`), and their counts are summed in one collective."""
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
    from unet_dist.image_scores import ImageScores, per_image_csv, postprocess_advice, table_path
    from unet_dist.inference import PredictionError, data_info, intensity_window, load_predictor
    from unet_dist.logs import chief_progress
    from unet_dist.metrics import predict_classes
    from unet_dist.postprocess import parse

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
        k, in_channels = cfg.model.num_classes, cfg.model.in_channels
        if args.predictions:  # masks made already: read, not predicted
            postprocess, window = parse(args.postprocess, k), intensity_window(args.workdir[0])
            if args.predicted_instances and k != 2:
                raise ConfigError(f"--predicted-instances: for a run of two classes (background and objects); "
                                  f"{args.workdir[0]} has {k}")
            about = {"predictions": str(args.predictions), **({"predicted_instances": True} if args.predicted_instances
                                                               else {})}
            cost = predicted_cost
        else:
            predictor = load_predictor(args.workdir, **predictor_options(args),
                                       precision=runtime.cfg.runtime.precision, postprocess=args.postprocess)
            postprocess, window, cost = predictor.postprocess, predictor.window, predictor.cost
            about = {"mode": predictor.mode, "why": predictor.why, "tta": args.tta,
                     "checkpoints": predictor.checkpoints, "precision": predictor.precision}
    except (ConfigError, ConvertError, CheckpointError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if runtime.is_chief:  # the same list on every process
        for s in skipped:
            print(f"evaluate: skipping {s['file']}: {s['reason']}", file=sys.stderr)
    try:
        share = my_share(samples, cost, runtime)
    except CollectiveError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    image_scores = ImageScores(len(samples), k, postprocess, ignores(info), args.nsd_tolerance)
    for i in chief_progress(runtime, "evaluate", "img", share):
        sample = samples[i]
        try:
            # Instance masks: objects are matched to the instances, not to the components of their classes.
            if instances:
                image, truth, ids = load_instance_pair(sample.image, sample.mask, sample.page, info.get("ignore_value"),
                                                       in_channels, window)
            else:
                (image, truth), ids = load_pair(sample.image, sample.mask, layout, info["classes"],
                                                info.get("num_classes"), sample.page, info.get("ignore_value"),
                                                info.get("colors"), in_channels, window), None
            predicted_ids = None
            if args.predicted_instances:
                predicted_ids = read_predicted(args.predictions, sample, k, truth.shape, True,
                                               args.prediction_suffix)
                predicted = (predicted_ids > 0).astype(np.int32)
            elif args.predictions:
                predicted = read_predicted(args.predictions, sample, k, truth.shape,
                                           suffix=args.prediction_suffix)
            else:
                probs = predictor(image)
                predicted = predict_classes(probs).numpy()  # the record evaluation's class rule
                del probs  # not held while the image is scored: 8 bytes a pixel in two classes
        except (BadImage, OSError, PredictionError) as e:
            tqdm.write(f"evaluate: skipping {sample.where}: {e}", file=sys.stderr)
            continue
        del image  # nor the image: 3 bytes a pixel of an RGB image
        image_scores.add(i, predicted, truth, ids, predicted_ids)
    try:
        image_scores.sum_over(runtime)
    except CollectiveError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    read = image_scores.read
    if not read.any():
        print(f"evaluate: error: --images {args.images}: none of its {len(samples)} images could be "
              + ("read and scored against --predictions (the lines above say why)" if args.predictions else "read"),
              file=sys.stderr)
        return 1
    if not image_scores.labelled.any():
        print(f"evaluate: error: --images {args.images}: every mask pixel of its {int(read.sum())} images is the "
              f"ignore value {info.get('ignore_value')} of the run's data.json; nothing to score", file=sys.stderr)
        return 1
    if not runtime.is_chief:
        return 0
    names = info.get("class_names") or []
    summary = image_scores.summary(names)
    tables = {key: summary.pop(key) for key in ("objects", "boundary", "largest_component", "small_objects",
                                                 "grown_objects")}
    metrics = {**summary, "images": int(read.sum()), "skipped": len(skipped) + int((~read).sum()),
               "source": str(args.images), **({"list": str(args.list.resolve())} if args.list else {}),
               **about, "world_size": runtime.world_size, "postprocess": str(postprocess), **tables}
    for line in postprocess_advice(metrics["largest_component"], metrics["small_objects"], metrics["grown_objects"],
                                   postprocess):
        print(line, file=sys.stderr)
    print(json.dumps(metrics))
    per_image, per_stack = image_scores.per_image(samples), image_scores.per_stack(stacks_of(samples))
    atomic_write_text(out, json.dumps({**metrics, **({"per_stack": per_stack} if per_stack else {}),
                                       "per_image": per_image}, indent=1))
    atomic_write_text(table_path(out), per_image_csv(per_image, names, k))
    return 0


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
    images.add_argument("--predictions", type=Path, metavar="PRED",
                        help="score the masks in PRED instead of predicting: predict's STEM_mask.png, or STEM.* of "
                             "another tool (class ids in one channel; 0/255 for two classes), in the run's classes")
    images.add_argument("--predicted-instances", action="store_true",
                        help="with --predictions, for a run of two classes: PRED holds label images (STEM_instances"
                             ".tif of predict --instances, or another tool's STEM.*: each object its own number, 0 "
                             "the background), whose objects are scored as numbered, touching ones apart")
    images.add_argument("--prediction-suffix", default="", metavar="S",
                        help="with --predictions: another tool's files are named STEM<S>.* (Cellpose's "
                             "STEM_cp_masks.png: _cp_masks)")
    add_mode_args(images)
    add_postprocess_arg(images)
    images.add_argument("--nsd-tolerance", type=float, default=TOLERANCE, metavar="PX",
                        help=f"outline pixels this close to the other mask's outline count in NSD (default "
                             f"{TOLERANCE:g}; `unet_dist/surface.py`)")
    args = p.parse_args(argv)
    if not args.nsd_tolerance >= 0:
        p.error(f"--nsd-tolerance {args.nsd_tolerance}: a distance in pixels, 0 or more")
    # How the masks are predicted (add_mode_args' flags), where they are given.
    modes = (["--mode"] * (args.mode != "auto") + ["--tile"] * (args.tile is not None)
             + ["--overlap"] * (args.overlap is not None) + ["--tta"] * (args.tta != "none"))
    # Flags of the other source would be ignored: say so instead.
    other = (["--split"] * bool(args.split) if args.images else
             ["--predictions"] * bool(args.predictions) + ["--predicted-instances"] * args.predicted_instances
             + ["--prediction-suffix"] * bool(args.prediction_suffix) + ["--layout"] * bool(args.layout)
             + ["--mask-suffix"] * bool(args.mask_suffix) + ["--list"] * bool(args.list) + modes
             + ["--postprocess"] * (args.postprocess != "none") + ["--nsd-tolerance"] * (args.nsd_tolerance != TOLERANCE))
    if other:
        p.error(f"{', '.join(other)}: not used with {'--images' if args.images else '--data'}")
    if args.predictions:
        model = (modes + ["--checkpoint"] * (args.checkpoint != "best")
                 + ["--workdir (more than one)"] * (len(args.workdir) > 1))
        if model:
            p.error(f"{', '.join(model)}: not used with --predictions (its masks are made already)")
        if not args.predictions.is_dir():
            p.error(f"--predictions {args.predictions}: not a folder")
    for flag, given in (("--predicted-instances", args.predicted_instances),
                        ("--prediction-suffix", args.prediction_suffix)):
        if given and not args.predictions:
            p.error(f"{flag}: used with --predictions only")
    if args.predicted_instances and args.postprocess != "none":
        p.error("--postprocess: not used with --predicted-instances (the objects are scored as numbered)")
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
        evaluator = Evaluator(model, cfg, runtime, args.data, manifest, args.split, objects=True, per_record=True)
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
        from unet_dist.image_scores import per_image_csv, table_path

        per_record = metrics.pop("per_record")
        print(json.dumps(metrics))
        atomic_write_text(out, json.dumps({**metrics, "per_record": per_record}, indent=1))  # a kill mid-write keeps the earlier file
        atomic_write_text(table_path(out), per_image_csv(per_record, manifest.get("class_names") or [],
                                                         manifest["num_classes"], "record"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
