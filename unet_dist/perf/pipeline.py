"""Input pipeline throughput against the paper's PIL generator, on the same images in one run."""

from __future__ import annotations

from unet_dist.perf.common import machine, paper_generator, source_pairs, time_iter


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
    cfg = load_config(args.config, overrides + list(args.set))
    ds = train_dataset(args.data, cfg, batch, batch, Shard(0, 1), manifest=manifest)
    it = iter(ds)
    ours = time_iter(it, args.batches, warmup=20)  # let AUTOTUNE settle
    images, masks = source_pairs(manifest, args.source)
    gen = paper_generator(images, masks, batch, size)
    paper = time_iter(gen, args.batches, warmup=1)
    ours_ips, paper_ips = args.batches * batch / ours, args.batches * batch / paper
    return {"bench": "pipeline", "images_per_s": ours_ips, "paper_pil_images_per_s": paper_ips,
            "speedup": ours_ips / paper_ips, "augment": args.augment, "image_size": size, "batch": batch,
            "batches": args.batches, **machine()}


