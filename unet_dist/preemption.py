"""Preemption: SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (scancel, the limit
itself) ask training to stop at a step every rank agrees on, save, and exit to be requeued. Ctrl-C
(SIGINT) does the same once, so an interactive run stops with its steps saved; a second Ctrl-C
interrupts at once.

Every rank installs the handler; the flag rides along with each step's reported numbers, summed
over all replicas (see trainer.make_train_step), so the first step at which any rank has seen a
signal is the step at which all of them stop. No extra collective is added.
"""

from __future__ import annotations

import signal
import sys

# Exit status of a run that saved and stopped early to be resumed (EX_TEMPFAIL); the sbatch
# scripts requeue the job on it.
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """Raised by the trainer after the checkpoint of the agreed step is written."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"stopped at step {step} on {signame}; checkpoint saved, rerun the same command to resume")
        self.step = step


class PreemptionWatcher:
    """Installs handlers for SIGUSR1, SIGTERM and SIGINT while training; `requested` turns true on any."""

    SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")

    def __init__(self):
        self.requested = False
        self.signame = ""
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested = True
        self.signame = signal.Signals(signum).name
        again = ""
        if signum == signal.SIGINT:  # the next Ctrl-C raises KeyboardInterrupt: a way out that does not wait
            signal.signal(signal.SIGINT, signal.default_int_handler)
            again = " (Ctrl-C again to stop at once, without saving)"
        print(f"unet_dist: {self.signame} received; stopping at the next step all ranks agree on{again}",
              file=sys.stderr, flush=True)

    def __enter__(self):
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
