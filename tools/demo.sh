#!/usr/bin/env bash
# The main job on built-in synthetic data: synthesize -> convert -> train (horovodrun -np 2 when
# Horovod is installed, else one process) -> evaluate (val records, and held-out images at their own
# sizes) -> predict on held-out images.
#   bash tools/demo.sh [RUN_DIR]      (make demo)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo}
PY=.venv/bin/python
NP=${DEMO_NP:-2}
start=$(date +%s)
mkdir -p "$RUN"

echo "== 1/5 synthetic data: 320 images in the Oxford-IIIT Pet layout ($RUN/raw)"
[ -d "$RUN/raw/images" ] || $PY -m unet_dist.synthetic "$RUN/raw" -n 320 --seed 0
$PY -m unet_dist.synthetic "$RUN/heldout" -n 32 --seed 12345 >/dev/null

echo "== 2/5 convert to TFRecord shards at 128x128 ($RUN/data)"
[ -f "$RUN/data/manifest.json" ] || $PY -m unet_dist.convert "$RUN/raw" "$RUN/data" --image-size 128 --shards 8 --workers 2

echo "== 3/5 train configs/demo.yaml"
if $PY -c "import horovod.tensorflow" 2>/dev/null && command -v .venv/bin/horovodrun >/dev/null; then
  echo "   with: horovodrun -np $NP --gloo python -m unet_dist.train (one thread per rank)"
  .venv/bin/horovodrun -np "$NP" --gloo -H "localhost:$NP" \
    $PY -m unet_dist.train --config configs/demo.yaml --data "$RUN/data" --workdir "$RUN/train"
else
  echo "   with: python -m unet_dist.train (Horovod not installed)"
  $PY -m unet_dist.train --config configs/demo.yaml --data "$RUN/data" --workdir "$RUN/train"
fi

echo "== 4/5 evaluate the best checkpoint: on the val records, and on 32 held-out images at their own sizes"
$PY -m unet_dist.evaluate --workdir "$RUN/train" --data "$RUN/data" >/dev/null
$PY -m unet_dist.evaluate --workdir "$RUN/train" --images "$RUN/heldout" >/dev/null

echo "== 5/5 predict four held-out images"
held=("$RUN"/heldout/images/*.jpg)
$PY -m unet_dist.predict --workdir "$RUN/train" "${held[@]:0:4}" --out "$RUN/predictions"

$PY - "$RUN" "$start" <<'PYEOF'
import json, sys, time
run, start = sys.argv[1], int(sys.argv[2])
ev = json.load(open(f"{run}/train/eval.json"))
s = json.load(open(f"{run}/train/summary.json"))
print(f"\ndemo: val IoU {ev['val_iou']:.4f} (pet IoU {ev.get('val_fg_iou', float('nan')):.4f}, Dice {ev['val_dice']:.4f}) "
      f"on {ev['val_records']} val images; {s['steps']} steps on {s['world_size']} process(es), "
      f"{s['images_per_s']:.1f} images/s; {time.time() - start:.0f} s in all (each val record's scores, worst "
      f"first, in {run}/train/eval.csv)")
im = json.load(open(f"{run}/train/eval_images.json"))
print(f"demo: IoU {im['iou']:.4f} (pet IoU {im['fg_iou']:.4f}) on {im['images']} held-out images at their own sizes "
      f"(240-500 px), predicted as predict does ({im['mode']} mode)")
(pet,) = im["boundary"]
print(f"demo: the pets' outlines: HD95 {pet['hd95']:.1f} px (mean over the images; median {pet['hd95_median']:.1f}), "
      f"NSD {pet['nsd']:.3f} at {pet['nsd_tolerance']:g} px; each image's scores, worst first, in "
      f"{run}/train/eval_images.csv")
print(f"demo: overlays in {run}/predictions/*_overlay.png, learning curves in {run}/train/learning_curves.png, "
      f"TensorBoard: tensorboard --logdir {run}/train/tensorboard")
PYEOF
