#!/usr/bin/env bash
# Builds, on this (CPU) machine, what a GPU machine lent through this workplace's `device` tool needs
# to run our benchmarks: that machine has CUDA 13, cuDNN, Python 3.12 and no TensorFlow, reaches no
# network, and takes at most 64 MiB per call. Writes .gpu/ (git-ignored via .git/info/exclude):
#   p00..p04  TensorFlow 2.21.0's cp312 wheel, unpacked, stripped, tar.xz, cut to fit one call each
#   deps/     Keras and TensorFlow's other dependencies as cp312 wheels
#   cu12/     the CUDA 12.5 runtime library, and empty stand-ins for cuFFT, cuSOLVER and cuSPARSE,
#             which TensorFlow must load to register a GPU and a U-Net never calls
# Then copies env.sh, smoke.py and run_bench.sh beside them. tools/device_gpu/README.md says how to
# send them. About 15 minutes here (xz -9 on 2 cores); nothing on the device machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=.gpu
WORK=${WORK:-/tmp/device_gpu}
grep -qx "/$OUT/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$OUT/" >> .git/info/exclude; }
mkdir -p "$WORK" "$OUT/deps" "$OUT/cu12"
pyget() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 "$@"; }

# TensorFlow: the headers (431 MB) go; the profiler plugin (90 MB) is replaced by an empty module,
# which the import of tf.profiler needs and these benchmarks never call; tensorflow/lite stays
# (tf's API imports it). Stripping the symbol tables takes the library from 1.1 GB to 0.88 GB.
pyget -d "$WORK" tensorflow==2.21.0
rm -rf "$WORK/tf" && mkdir -p "$WORK/tf" && (cd "$WORK/tf" && unzip -q ../tensorflow-2.21.0-*.whl)
T="$WORK/tf/tensorflow"
rm -rf "$T/include" "$T/xla_aot_runtime_src"
rm "$T/python/profiler/internal/_pywrap_profiler_plugin.so"
echo "# stand-in: the profiler plugin is not carried to the device machine" > "$T/python/profiler/internal/_pywrap_profiler_plugin.py"
find "$T" -name '*.so*' -type f -exec strip --strip-unneeded {} +
(cd "$WORK/tf" && tar -cf - tensorflow) | xz -9 -T0 > "$WORK/tf.tar.xz"
rm -f "$OUT"/p0[0-9]
# The first part shares its call with deps/ and cu12/ (34 MB); the others have a call each.
head -c 29360128 "$WORK/tf.tar.xz" > "$OUT/p00"
tail -c +29360129 "$WORK/tf.tar.xz" | split -b 63963136 -d -a 2 - "$WORK/part."
i=1; for f in "$WORK"/part.*; do mv "$f" "$OUT/p0$i"; i=$((i + 1)); done

# The versions this project's .venv pins (pip freeze), for Python 3.12.
pyget -d "$OUT/deps" absl-py==2.5.1 astunparse==1.6.3 flatbuffers==25.12.19 gast==0.7.0 google-pasta==0.2.0 \
  opt_einsum==3.4.0 protobuf==7.36.2 termcolor==3.3.0 wrapt==2.5.2 grpcio==1.85.3 keras==3.15.1 numpy==2.4.6 \
  h5py==3.14.0 ml_dtypes==0.7.0 namex==0.1.0 optree==0.20.0 typing_extensions==4.16.0 six==1.17.0 packaging==26.4

pyget -d "$WORK" nvidia-cuda-runtime-cu12==12.5.82
unzip -j -o -q "$WORK"/nvidia_cuda_runtime_cu12-12.5.82-*.whl 'nvidia/cuda_runtime/lib/libcudart.so.12' -d "$OUT/cu12"
echo 'void unet_dist_stand_in(void) {}' > "$WORK/stub.c"
for lib in libcufft.so.11 libcusolver.so.11 libcusparse.so.12; do
  gcc -shared -fPIC -Wl,-soname,$lib -o "$OUT/cu12/$lib" "$WORK/stub.c"
done
cp tools/device_gpu/env.sh tools/device_gpu/smoke.py tools/device_gpu/run_bench.sh "$OUT/"
ls -l "$OUT" && du -sh "$OUT/deps" "$OUT/cu12"
