"""Ends a process of a multi-process run whose training loop has stopped moving, so the job ends.

A rank that stops answering (a process stopped or hung, a frozen node) leaves the others waiting in
a collective. Gloo's collectives time out after 30 s and MultiWorkerMirroredStrategy's health check
aborts them after about 10 s, but an MPI collective waits forever, and Horovod's stall shutdown
cannot end that wait: under its MPI controller (what `horovodrun` picks where Horovod has MPI, and
what `mpirun` and `srun` start) the background thread that runs the stall check is itself blocked
in the negotiation's MPI call. A rank SIGSTOPped under `horovodrun --mpi` left the job running past
180 s with the stall shutdown set to 6 s. So every process watches its own loop: when no training
step or evaluation batch has finished for `runtime.stall_shutdown_seconds`, or the first step has not
finished `runtime.stall_shutdown_start_seconds` after the backend came up (a rank that hangs in
its start-up leaves the others waiting in the first broadcast or step), it prints one line and exits,
and its launcher (horovodrun, mpirun, `srun --kill-on-bad-exit`) ends the others.

Before that, the backend's own start waits for every process of the job: a process that never
starts leaves the others in MPI_Init, or in MultiWorkerMirroredStrategy's start, which waits inside
TensorFlow holding the GIL, so no thread of the process runs (a worker whose peer never came waited
12 min, TERM included, until killed). `watched_from_outside` watches that wait from a child process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

STALLED_EXIT = 1

# The child of `watched_from_outside`: stdin closes (the block finished, or this process died) or
# the time runs out, and then it says why and kills the process it watches.
_WATCHER = """
import os, select, signal, sys
ready, _, _ = select.select([sys.stdin], [], [], float(sys.argv[2]))
if not ready:
    sys.stderr.write(sys.argv[3] + "\\n")
    sys.stderr.flush()
    os.kill(int(sys.argv[1]), signal.SIGKILL)
"""


@contextlib.contextmanager
def watched_from_outside(seconds: float, message: str):
    """Kills this process (SIGKILL, after `message` on stderr) when the block has not finished in
    `seconds`, from a child process (a bare interpreter: 10-20 ms to start on our VM), for a wait that holds
    the GIL, where no thread of this process runs. seconds 0: not watched."""
    if not seconds:
        yield
        return
    watcher = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHER, str(os.getpid()), str(seconds), message],
                               stdin=subprocess.PIPE)
    try:
        yield
    finally:
        watcher.stdin.close()
        watcher.wait()


class Watchdog:
    """Watches from `start()` (training's start-up: building, restoring, the first collectives,
    tracing and compiling the step) with `start_seconds`; `arm(step)` once the first step has
    finished, from when `seconds` applies; `beat(step)` after each finished step or evaluation
    batch; `stop()` at the end (or use it as a context manager, which starts it).
    seconds 0 (single-process runs, or runtime.stall_shutdown_seconds 0): does nothing.
    start_seconds 0: the start-up is not watched (arm starts the watch).

    The check runs on a daemon thread: TensorFlow releases the GIL while a step waits in a
    collective, so it runs while the main thread is blocked. It ends the process with os._exit,
    because the main thread cannot be interrupted there. Nothing written is lost by it: metrics.jsonl
    is line-buffered, and a checkpoint cut short is never the one a resume reads
    (tf.train.CheckpointManager names a checkpoint in its state file once it is written).
    """

    def __init__(self, seconds: float, rank: int, poll: float | None = None, start_seconds: float = 0):
        self.seconds, self.rank = seconds, rank
        self.start_seconds = start_seconds if seconds else 0
        self.poll = poll or (min(5.0, seconds / 4) if seconds else 0.0)
        self.step, self.last = 0, time.monotonic()
        self.started = self.last
        self.armed = False  # whether a step has finished (until then, start_seconds applies)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Watches the start-up, when start_seconds is set: from now until `arm`."""
        self.started = time.monotonic()
        if self.start_seconds:
            self._watch_from_now()

    def arm(self, step: int) -> None:
        self.armed = True
        self.beat(step)
        if self.seconds:
            self._watch_from_now()

    def beat(self, step: int | None = None) -> None:
        if step is not None:
            self.step = step
        self.last = time.monotonic()

    def stop(self) -> None:
        self._done.set()

    def __enter__(self) -> Watchdog:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _watch_from_now(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="unet-dist-watchdog", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(self.poll):
            now = time.monotonic()
            if self.armed and now - self.last > self.seconds:
                what = (f"nothing has finished for {now - self.last:.0f} s since step {self.step} "
                        f"(runtime.stall_shutdown_seconds {self.seconds:g})")
            elif not self.armed and self.start_seconds and now - self.started > self.start_seconds:
                what = (f"the first step has not finished {now - self.started:.0f} s after the start "
                        f"(runtime.stall_shutdown_start_seconds {self.start_seconds:g})")
            else:
                continue
            print(f"train: error: rank {self.rank}: {what}: another process stopped answering, a collective hung or "
                  "this process's input stalled; ending this process so that the launcher ends the job. Rerunning "
                  "the same command resumes from the latest checkpoint", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(STALLED_EXIT)
