# On the device machine, repo root: bash .gpu/run_bench.sh STEP...; STEP is smoke, demo, or one of
# bench report --gpu's benchmarks (gpu_train_pets_seed, gpu_train_ronneberger, gpu_flops,
# gpu_pipeline_ronneberger). Results in $OUT/docs/bench/*.json (report's layout) and $OUT/*.log;
# a step past its limit leaves the others.
S0=$(date +%s); source .gpu/env.sh || exit $?
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for step in "$@"; do
  case $step in
    smoke)
      TF_CPP_MIN_LOG_LEVEL=0 timeout 240 python3 .gpu/smoke.py > "$OUT/smoke.log" 2>&1 \
        || { tail -30 "$OUT/smoke.log" | cut -c1-300; t "smoke failed"; exit 5; }
      grep -E "^tf |gpus|matmul|fit jit|SMOKE" "$OUT/smoke.log" ;;
    demo)
      timeout 200 python3 -m unet_dist.train --config configs/demo.yaml --data runs/demo/data \
        --workdir /tmp/demo_run > "$OUT/demo_train.log" 2>&1; echo "rc=$?"
      grep -E "^unet_dist: strategy|val_iou|train: done" "$OUT/demo_train.log" | cut -c1-400 | tail -6
      cp /tmp/demo_run/summary.json "$OUT/demo_summary.json" 2>/dev/null ;;
    *)
      timeout 300 python3 -m unet_dist.bench report --gpu --only "$step" --data runs/bench/data256 \
        --demo-data runs/demo/data --cells-data runs/bench/cells572 --out "$OUT/docs" 2> "$OUT/$step.log"
      echo "rc=$?"; grep -E "^bench " "$OUT/$step.log"; tail -2 "$OUT/$step.log" | cut -c1-300 ;;
  esac
  t "$step done"
done
