"""Is training waiting for its input? The share of each step's time spent getting the next batch.

A step here is fetching its batch plus the train step itself, up to reading its outputs on the host
(so the step has finished); evaluation, logging and checkpoints between steps are not counted. The
verdict uses the thresholds of TensorFlow's profiler (its input-pipeline analysis): under 5% of the
step time waiting for input is not input-bound, 5-20% moderately, 20% or more highly input-bound.
"""

from __future__ import annotations

import contextlib
import time

from unet_dist.distribute import each_process

MODERATELY, HIGHLY = 0.05, 0.20


def classify(fraction: float | None) -> str | None:
    """'no', 'moderately' or 'highly' (input-bound) for a wait fraction in [0, 1]; None for None."""
    if fraction is None:
        return None
    if fraction >= HIGHLY:
        return "highly"
    return "moderately" if fraction >= MODERATELY else "no"


def advice(step: int, fraction: float, weights_per_sample: bool = False) -> str:
    """The one-line warning for a highly input-bound stretch of training that ended at `step`.
    weights_per_sample: the pipeline computes the 2015 border weight map from each mask (the
    records hold no border distances), most often the costliest part of it."""
    fixes = ["convert at the training size (convert --image-size)",
             "drop costly augmentation (data.augment.rotate_degrees, elastic, hue)",
             "give each process more CPU cores"]
    if weights_per_sample:
        fixes.insert(0, "convert with --border-distances (the border weight map is then not computed per sample)")
    todo = ", ".join(fixes[:-1]) + " or " + fixes[-1]
    return (f"step {step}: input-bound: {fraction:.0%} of each step's time went to waiting for the next batch "
            f"(20% or more is highly input-bound); the input pipeline does not keep ahead of the train step. "
            f"{todo[0].upper()}{todo[1:]}")


class InputClock:
    """Times each step's wait for its batch against the step's whole time, per window and in total.

        with clock.waiting():
            batch = next(batches)
        out = step(batch); float(out["loss"])  # finished
        clock.step_done()

    The first step a clock sees is left out: it fills the pipeline's buffers (shuffle, prefetch)
    and traces the step function, which says nothing of the steady state.
    """

    def __init__(self):
        self.wait_s = self.step_s = 0.0  # totals over the counted steps
        self._win_wait = self._win_step = 0.0
        self._t0 = self._t1 = 0.0
        self._skip = 1

    @contextlib.contextmanager
    def waiting(self):
        self._t0 = time.perf_counter()
        yield
        self._t1 = time.perf_counter()

    def step_done(self) -> None:
        if self._skip:
            self._skip -= 1
            return
        wait, step = self._t1 - self._t0, time.perf_counter() - self._t0
        self.wait_s += wait
        self.step_s += step
        self._win_wait += wait
        self._win_step += step

    def window(self) -> float | None:
        """The wait fraction since the last call (None if no step was counted); starts a new window."""
        frac = self._win_wait / self._win_step if self._win_step > 0 else None
        self._win_wait = self._win_step = 0.0
        return frac

    def fraction(self) -> float | None:
        """The wait fraction over every counted step."""
        return self.wait_s / self.step_s if self.step_s > 0 else None


def worst_over_processes(clock: InputClock, runtime) -> float | None:
    """The largest wait fraction of any process (every process must call it: one collective). A rank
    whose input lags holds up every synchronous step, so the slowest pipeline is the one to report."""
    fractions = [wait / step for wait, step in each_process(runtime, [clock.wait_s, clock.step_s]) if step > 0]
    return max(fractions) if fractions else None
