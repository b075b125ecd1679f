#!/usr/bin/env bash
# Horovod training with horovodrun, on this node or on the hosts of a hostfile.
#
#   launch/horovodrun.sh --config configs/pets_seed.yaml --data DATA --workdir RUN
#   NP=8 HOSTFILE=hosts.txt launch/horovodrun.sh --config configs/pets_seed.yaml --data DATA --workdir RUN
#
# Everything after the script name goes to `python -m unet_dist.train`.
# Variables (all optional):
#   NP               processes in all. Default: GPUs per node x nodes (one process per GPU);
#                    without GPUs, CPU_RANKS per node.
#   HOSTFILE         one "hostname slots=N" line per node (N = processes on it). Default: this node.
#   GPUS_PER_NODE    default: counted with nvidia-smi -L (0 when there is none).
#   CPU_RANKS        processes per node without GPUs (default 2); each gets cores / CPU_RANKS threads.
#   PYTHON           default: the checkout's .venv/bin/python, else python3.
#   HOROVODRUN_ARGS  extra horovodrun flags, e.g. "--gloo" or "--network-interface eth0".
# The trainer prints the effective world size, global batch and learning rate when it starts:
# with data.global_batch_size fixed, each rank gets global / NP; with per_replica_batch_size the
# global batch grows with NP and optim.lr_scaling scales the learning rate.
set -euo pipefail
source "$(dirname "$0")/common.sh"
HOROVODRUN=${HOROVODRUN:-$(dirname "$PYTHON")/horovodrun}
command -v "$HOROVODRUN" >/dev/null || HOROVODRUN=horovodrun
hosts_args=(-H "localhost:$NP")
[ -n "${HOSTFILE:-}" ] && hosts_args=(--hostfile "$HOSTFILE")
set -x
# shellcheck disable=SC2086  # HOROVODRUN_ARGS is a list of flags on purpose
exec "$HOROVODRUN" -np "$NP" "${hosts_args[@]}" ${HOROVODRUN_ARGS:-} "$PYTHON" -m unet_dist.train "$@"
