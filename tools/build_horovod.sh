#!/usr/bin/env bash
# Installs Horovod 0.28.1 into the given Python environment, building its wheel once and caching it
# outside the checkout, keyed by the Horovod, TensorFlow and Python versions.
#
#   tools/build_horovod.sh [PYTHON]        # PYTHON defaults to .venv/bin/python
#
# Why a patched build: Horovod 0.28.1 (its newest release, source only on PyPI) does not compile
# against TF 2.21, because horovod/tensorflow/xla_mpi_ops.cc includes XLA headers TF no longer ships.
# That file only registers XLA ops used on GPU with HOROVOD_ENABLE_XLA_OPS=1, so we drop it from the
# CMake source list (see ../shared/notes/stack-facts.md). Gloo is always built; MPI when Open MPI is
# installed. GPU collectives only when asked: HOROVOD_GPU_OPERATIONS=NCCL in the environment (with
# the CUDA toolkit and NCCL that Horovod's build finds, e.g. HOROVOD_NCCL_HOME) builds NCCL in and
# keys the cached wheel apart; without it GPU ranks sum their gradients in host memory.
set -euo pipefail

HOROVOD_VERSION=0.28.1
PY=$(realpath -s "${1:-.venv/bin/python}")
CACHE_ROOT=${UNET_DIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/unet_dist}

tf_version=$("$PY" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null) || {
  echo "build_horovod: TensorFlow is not importable from $PY; install it first" >&2; exit 1; }
py_version=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
with_mpi=0
command -v mpicxx >/dev/null 2>&1 && with_mpi=1
gpu_ops=${HOROVOD_GPU_OPERATIONS:-}
key="horovod-${HOROVOD_VERSION}_tf-${tf_version}_py-${py_version}_mpi-${with_mpi}${gpu_ops:+_gpu-$gpu_ops}"
wheel_dir="$CACHE_ROOT/wheels/$key"

if "$PY" -c "import horovod, horovod.tensorflow as h; assert horovod.__version__ == '$HOROVOD_VERSION'" 2>/dev/null \
   && [ -f "$wheel_dir/.installed-from" ] && [ -f "$("$PY" -c 'import sys; print(sys.prefix)')/.horovod-$key" ]; then
  echo "build_horovod: horovod $HOROVOD_VERSION already installed ($key)"
  exit 0
fi

if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
  echo "build_horovod: building horovod $HOROVOD_VERSION wheel ($key); about 3 minutes on 2 cores" >&2
  for tool in cmake g++ make; do
    command -v "$tool" >/dev/null || { echo "build_horovod: '$tool' is required to build Horovod" >&2; exit 1; }
  done
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "$PY" -m pip install -q setuptools wheel cloudpickle psutil pyyaml packaging
  "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
  tar -xzf "$work"/horovod-"$HOROVOD_VERSION".tar.gz -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"
  cml="$src/horovod/tensorflow/CMakeLists.txt"
  grep -q 'xla_mpi_ops.cc' "$cml" || { echo "build_horovod: expected xla_mpi_ops.cc in $cml" >&2; exit 1; }
  sed -i '/xla_mpi_ops\.cc/d' "$cml"
  mkdir -p "$wheel_dir.tmp"
  (cd "$src" && HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
     HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=$with_mpi HOROVOD_WITHOUT_MPI=$((1 - with_mpi)) \
     MAKEFLAGS="-j$(nproc)" "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$wheel_dir.tmp")
  # Rename into place only when complete, so an interrupted build is never mistaken for a cached one.
  rm -rf "$wheel_dir" && mv "$wheel_dir.tmp" "$wheel_dir"
fi

"$PY" -m pip install -q --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
"$PY" -m pip install -q cloudpickle psutil pyyaml packaging
echo "$wheel_dir" > "$wheel_dir/.installed-from"
touch "$("$PY" -c 'import sys; print(sys.prefix)')/.horovod-$key"
"$PY" -c "import horovod.tensorflow as hvd; print('build_horovod: horovod', hvd.__version__ if hasattr(hvd, '__version__') else '', 'gloo', hvd.gloo_built(), 'mpi', hvd.mpi_built(), 'nccl', hvd.nccl_built())"
