# Sourced by horovodrun.sh and mpirun.sh: the Python to run, and how many processes.
# Sets PYTHON, GPUS_PER_NODE and NP (from HOSTFILE slots, or the GPUs of this node, or CPU_RANKS).
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}
GPUS_PER_NODE=${GPUS_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
for var in GPUS_PER_NODE CPU_RANKS NP; do
  [[ -z "${!var:-}" || "${!var}" =~ ^[0-9]+$ ]] || { echo "$(basename "$0"): $var=${!var}: must be a whole number" >&2; exit 2; }
done
per_node=$GPUS_PER_NODE
[ "$per_node" -gt 0 ] || per_node=${CPU_RANKS:-2}
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || { echo "$(basename "$0"): HOSTFILE $HOSTFILE not found" >&2; exit 2; }
  NP=${NP:-$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) {split($i, a, "="); s += a[2]}} END {print s + 0}' "$HOSTFILE")}
fi
NP=${NP:-$per_node}
[ "$NP" -gt 0 ] || { echo "$(basename "$0"): NP=$NP: no processes to start (HOSTFILE without slots=N?)" >&2; exit 2; }
echo "$(basename "$0"): $NP processes (${GPUS_PER_NODE} GPUs per node), ${HOSTFILE:-this node only}"
