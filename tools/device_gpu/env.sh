# Sourced on the device machine (bash, repo root): puts what earlier calls carried in place, and sets
# up TensorFlow 2.21 (a CUDA 12.5 build) to run on the machine's own CUDA 13 cuDNN and cuBLAS.
S0=${S0:-$(date +%s)}
t() { echo "[$(( $(date +%s) - S0 ))s] $*"; }
mkdir -p /tmp/parts /tmp/store
for p in .gpu/p0[0-9]; do [ -f "$p" ] && cp -n "$p" /tmp/parts/ 2>/dev/null; done
for d in deps cu12; do [ -d ".gpu/$d" ] && [ ! -d "/tmp/store/$d" ] && cp -r ".gpu/$d" /tmp/store/; done
[ "${1:-}" = "stash" ] && { ls -l /tmp/parts; return 0 2>/dev/null || exit 0; }
if [ ! -f /tmp/tfroot/tensorflow/__init__.py ]; then
  t "assembling tensorflow from $(ls /tmp/parts/p0[0-9] | wc -l) parts"
  mkdir -p /tmp/tfroot && cat /tmp/parts/p0[0-9] | xz -d -T0 | tar -x -C /tmp/tfroot || { echo "ASSEMBLE FAILED"; exit 3; }
fi
if [ ! -d /tmp/site/keras ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/store/deps/*.whl \
    || { echo "PIP FAILED"; exit 4; }
fi
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
NVLIBS=$(find "$SP/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
[ -d /usr/local/cuda/lib64 ] && NVLIBS=$NVLIBS/usr/local/cuda/lib64:
mkdir -p /tmp/cu12 && cp -n /tmp/store/cu12/* /tmp/cu12/ 2>/dev/null
# TensorFlow asks for libcublas.so.12; the machine has cuBLAS 13 (its v2 API under the same names).
CUBLAS=$(find "$SP/nvidia" /usr/local/cuda/lib64/ -name 'libcublas.so.13*' 2>/dev/null | head -1)
CUBLASLT=$(find "$SP/nvidia" /usr/local/cuda/lib64/ -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
ln -sf "$CUBLAS" /tmp/cu12/libcublas.so.12; ln -sf "$CUBLASLT" /tmp/cu12/libcublasLt.so.12
export LD_LIBRARY_PATH=/tmp/cu12:$NVLIBS${LD_LIBRARY_PATH:-}
# XLA compiles with ptxas and links libdevice: CUDA 13.0's.
PTXAS=$(command -v ptxas || ls /usr/local/cuda/bin/ptxas 2>/dev/null)
LIBDEVICE=$(find /usr/local/cuda*/ "$SP/nvidia" -name 'libdevice.10.bc' 2>/dev/null | head -1)
export XLA_FLAGS="--xla_gpu_cuda_data_dir=$(dirname "$(dirname "$(dirname "$LIBDEVICE")")")"
export PATH=$(dirname "${PTXAS:-/usr/local/cuda/bin/ptxas}"):$PATH
export PYTHONPATH=/tmp/tfroot:/tmp/site:$PWD KERAS_BACKEND=tensorflow PYTHONUNBUFFERED=1
# TensorFlow ships compute_90 PTX for this GPU: the driver compiles it once, kept across processes.
export CUDA_CACHE_MAXSIZE=4294967296 CUDA_CACHE_PATH=/tmp/nvcache
t "env: cublas=$CUBLAS ptxas=$PTXAS libdevice=$LIBDEVICE"
