# Sourced by the sbatch scripts: run the training step, forward SLURM's warning signal to it, and
# requeue the job when it was signalled or the trainer stopped early to be resumed (exit code 75).
PREEMPTED_EXIT=75

run_and_requeue() {
  "$@" &
  local pid=$! signalled=0 rc
  # SLURM sends USR1 to this batch shell (--signal=B:USR1@120) and TERM on scancel or at the time
  # limit; srun forwards them to every task, where the trainer agrees on a step and saves.
  trap 'signalled=1; echo "slurm: USR1, asking the ranks to checkpoint and stop"; kill -USR1 "$pid" 2>/dev/null' USR1
  trap 'signalled=1; echo "slurm: TERM, asking the ranks to checkpoint and stop"; kill -TERM "$pid" 2>/dev/null' TERM
  while true; do
    wait "$pid"; rc=$?
    # wait returns early (> 128) when a trapped signal arrives while the step still runs.
    kill -0 "$pid" 2>/dev/null || break
  done
  # Once one rank has exited after the agreed save, srun may end the others (--kill-on-bad-exit),
  # so its exit code alone does not say "preempted": having been signalled does.
  if [ "$signalled" = 1 ] || [ "$rc" = "$PREEMPTED_EXIT" ]; then
    echo "slurm: training was asked to stop (exit $rc); requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$rc"
}
