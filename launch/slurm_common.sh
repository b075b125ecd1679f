# Sourced by the sbatch scripts: run the training step, forward SLURM's warning signal to it, and
# requeue the job when the trainer stopped early to be resumed (exit code 75).
PREEMPTED_EXIT=75

run_and_requeue() {
  "$@" &
  local pid=$!
  # SLURM sends USR1 to this batch shell (--signal=B:USR1@120) and TERM on scancel or at the time
  # limit; srun forwards them to every task, where the trainer agrees on a step and saves.
  trap 'echo "slurm: USR1, asking the ranks to checkpoint and stop"; kill -USR1 "$pid" 2>/dev/null' USR1
  trap 'echo "slurm: TERM, asking the ranks to checkpoint and stop"; kill -TERM "$pid" 2>/dev/null' TERM
  local rc
  while true; do
    wait "$pid"; rc=$?
    # wait returns > 128 when a trapped signal interrupts it while the step still runs.
    kill -0 "$pid" 2>/dev/null || break
  done
  if [ "$rc" = "$PREEMPTED_EXIT" ]; then
    echo "slurm: training saved its state and stopped early; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$rc"
}
