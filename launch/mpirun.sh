#!/usr/bin/env bash
# Horovod training started by Open MPI's mpirun, with the flags Horovod recommends.
#
#   launch/mpirun.sh --config configs/pets_seed.yaml --data DATA --workdir RUN
#   NP=16 HOSTFILE=hosts.txt launch/mpirun.sh --config configs/pets_seed.yaml --data DATA --workdir RUN
#
# Everything after the script name goes to `python -m unet_dist.train`.
# Variables (all optional):
#   NP             processes in all (default: GPUs per node x nodes, or CPU_RANKS per node without GPUs)
#   HOSTFILE       Open MPI hostfile, "hostname slots=N" per line. Default: this node.
#   GPUS_PER_NODE  default: counted with nvidia-smi -L.
#   CPU_RANKS      processes per node without GPUs (default 2).
#   PYTHON         default: the checkout's .venv/bin/python, else python3.
#   MPIRUN_ARGS    extra mpirun flags (e.g. "--mca btl_tcp_if_include eth0").
# -bind-to none -map-by slot: the trainer itself pins each rank to its share of the cores and sizes its threads;
# -x: the environment every rank needs; pml ob1 / btl ^openib: plain TCP unless you know better.
# The trainer prints the effective world size, global batch and learning rate when it starts.
set -euo pipefail
source "$(dirname "$0")/common.sh"
host_args=()
[ -n "${HOSTFILE:-}" ] && host_args=(-hostfile "$HOSTFILE")
root_args=()
[ "$(id -u)" = 0 ] && root_args=(--allow-run-as-root)
set -x
# shellcheck disable=SC2086  # MPIRUN_ARGS is a list of flags on purpose
exec mpirun -np "$NP" "${host_args[@]}" "${root_args[@]}" --oversubscribe -bind-to none -map-by slot \
  -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH -x TF_CPP_MIN_LOG_LEVEL -x NCCL_DEBUG -x HOROVOD_STALL_CHECK_TIME_SECONDS \
  -x HOROVOD_STALL_SHUTDOWN_TIME_SECONDS -mca pml ob1 -mca btl ^openib ${MPIRUN_ARGS:-} \
  "$PYTHON" -m unet_dist.train "$@"
