#!/usr/bin/env bash
# One idempotent setup for a fresh machine: system packages (Open MPI), .venv with the package and
# its test tools, and Horovod (built once, cached outside the checkout). Called by `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TF_EXTRA=${UNET_DIST_TF:-cpu}   # cpu | gpu

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' || {
  echo "setup: Python >= 3.10 is required ($PYTHON is $("$PYTHON" -V 2>&1))" >&2; exit 1; }

# Open MPI: Horovod's MPI controller and mpirun. Install it when we can; otherwise say what is missing.
if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Open MPI (openmpi-bin libopenmpi-dev) with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
  else
    echo "setup: Open MPI is missing (mpirun/mpicxx); install openmpi-bin and libopenmpi-dev (Debian/Ubuntu)" >&2
    echo "setup: continuing with Horovod over Gloo only; mpirun launches will not work" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.unet-dist-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$TF_EXTRA,dev]"
  touch "$stamp"
fi
bash tools/build_horovod.sh .venv/bin/python
echo "setup: done (.venv ready)"
