"""Input pipeline throughput against the paper's PIL generator, on the same images in one run, and
whether the pipeline keeps ahead of the train step it feeds."""

from __future__ import annotations

from unet_dist.perf.common import machine, paper_generator, source_pairs, time_iter


def fed_training(cfg, data_dir, manifest: dict, steps: int) -> dict:
    """The config's train step fed by the pipeline, as in the trainer, both sharing this process's
    cores: the share of each step spent waiting for the next batch (input_bound.InputClock) says
    whether the pipeline keeps ahead, which its rate alone (no training beside it) does not."""
    from unet_dist.data.pipeline import Shard, train_dataset
    from unet_dist.input_bound import InputClock, classify
    from unet_dist.perf.train import prepared_step

    step, _, batch, _ = prepared_step(cfg, data_dir, manifest)
    batches, clock = iter(train_dataset(data_dir, cfg, batch, batch, Shard(0, 1), manifest=manifest)), InputClock()
    for _ in range(steps + 1):  # the clock leaves out the first (the pipeline's buffers filling)
        with clock.waiting():
            b = next(batches)
        float(step(b)["loss"])
        clock.step_done()
    frac = clock.fraction()
    return {"steps": steps, "images_per_s": steps * batch / clock.step_s, "input_wait_fraction": frac,
            "input_bound": classify(frac)}


def run(args) -> dict:
    from unet_dist.config import load_config
    from unet_dist.data.pipeline import Shard, load_manifest, train_dataset

    manifest = load_manifest(args.data)
    size, batch = args.image_size, 8
    overrides = [f"data.image_size=[{size}, {size}]", f"data.global_batch_size={batch}", "model.depth=4"]
    if args.augment == "off":
        overrides += ["data.augment.flip=false", "data.augment.scale_crop=false", "data.augment.brightness=0",
                      "data.augment.contrast=0"]
    elif args.augment == "full":
        overrides += ["data.augment.rotate_degrees=10", "data.augment.elastic=true"]
    elif args.augment == "intensity":  # nnU-Net's intensity transforms at its shares of the samples
        overrides += ["data.augment.noise=0.1", "data.augment.blur=1", "data.augment.lowres=0.5",
                      "data.augment.gamma=0.5"]
    cfg = load_config(args.config, overrides + list(args.set))
    ds = train_dataset(args.data, cfg, batch, batch, Shard(0, 1), manifest=manifest)
    it = iter(ds)
    ours_ips = args.batches * batch / time_iter(it, args.batches, warmup=20)  # let AUTOTUNE settle
    del it  # its prefetching threads would compete with what is measured next
    paper_ips = paper_skipped = None
    if args.source is None and manifest.get("layout") != "oxford-pet":
        # Other data (EM slices, your own folders): the pipeline's own speed, fed and alone.
        paper_skipped = f"{args.data} is not in the Oxford-Pet layout the paper's generator reads"
    else:
        images, masks = source_pairs(manifest, args.source)
        gen = paper_generator(images, masks, batch, size)
        paper_ips = args.batches * batch / time_iter(gen, args.batches, warmup=1)
    fed = fed_training(cfg, args.data, manifest, args.train_steps)
    return {"bench": "pipeline", "images_per_s": ours_ips, "paper_pil_images_per_s": paper_ips,
            "speedup": ours_ips / paper_ips if paper_ips else None, "paper_skipped": paper_skipped,
            "augment": args.augment, "image_size": size, "batch": batch, "batches": args.batches,
            "fed_train": fed, "headroom": ours_ips / fed["images_per_s"], **machine()}
