"""The real sbatch scripts on a real (local, single-node) SLURM: Horovod and MultiWorkerMirrored
with 2 tasks, and a preempted job that checkpoints, requeues itself and resumes."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, tiny_overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm():
    proc = subprocess.run(["bash", str(ROOT / "tools/local_slurm.sh"), "start"], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 3:  # not installable here (no root or no apt): the only reason to skip
        pytest.skip(f"SLURM cannot be started on this machine: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    conf = re.search(r"SLURM_CONF=(\S+)", proc.stderr + proc.stdout).group(1)
    return {**os.environ, "SLURM_CONF": conf, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable,
            "TF_CPP_MIN_LOG_LEVEL": "2"}


def sbatch(env, script, workdir, train_args, extra=()):
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", "-N", "1", "-n", "2", "--ntasks-per-node=2", "--cpus-per-task=1",
           "--time=15", f"--output={workdir}/slurm-%j.out", *extra, str(ROOT / "launch" / script), *train_args]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    return out.strip().split(";")[0]


def job_state(env, job):
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\w+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "GONE"), int(restarts.group(1)) if restarts else 0


def wait(env, job, timeout=900, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "GONE")):
    t = time.time()
    while time.time() - t < timeout:
        state, restarts = job_state(env, job)
        if state in until:
            return state, restarts
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} still {state} after {timeout} s")


def _log(workdir):
    return "".join(p.read_text() for p in Path(workdir).glob("slurm-*.out"))


def _args(data, workdir, overrides):
    out = ["--data", str(data), "--workdir", str(workdir)]
    for o in overrides:
        out += ["--set", o]
    return out


@pytest.mark.parametrize("script, strategy", [("slurm_horovod.sbatch", "horovod"),
                                              ("slurm_multiworker.sbatch", "multiworker")])
def test_sbatch_runs_with_two_tasks(slurm, shards, tmp_path, script, strategy):
    w = tmp_path / "w"
    job = sbatch(slurm, script, w, _args(shards, w / "run", tiny_overrides(steps=4)))
    state, _ = wait(slurm, job)
    assert state == "COMPLETED", _log(w)[-4000:]
    s = json.loads((w / "run" / "summary.json").read_text())
    assert s["world_size"] == 2 and s["strategy"] == strategy, s
    assert 0 <= s["input_wait_fraction"] <= 1, s  # gathered from both tasks
    # The job's log (no terminal) shows each train event, once: the chief's line alone.
    log = _log(w)
    assert log.count("step 2/4: loss ") == 1 and "step 4/4: loss " in log, log[-4000:]


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, shards, tmp_path):
    w = tmp_path / "w"
    run = w / "run"
    over = tiny_overrides(steps=300) + ["model.base_filters=8", "train.checkpoint_every_steps=1000"]
    job = sbatch(slurm, "slurm_horovod.sbatch", w, _args(shards, run, over))
    metrics = run / "metrics.jsonl"
    t = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert time.time() - t < 600, _log(w)[-3000:]
        assert job_state(slurm, job)[0] in ("PENDING", "RUNNING", "CONFIGURING"), _log(w)[-3000:]
        time.sleep(0.5)
    # What SLURM does before a time limit (--signal=B:USR1@120), sent now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    state, restarts = wait(slurm, job, timeout=900, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "GONE"))
    log = _log(w)
    assert state == "COMPLETED" and restarts >= 1, log[-4000:]
    assert "requeueing job" in log and "resuming at step" in log, log[-4000:]
    stopped = int(re.search(r"preempted: checkpoint of step (\d+)", log).group(1))
    assert (run / "checkpoints" / "checkpoint").exists()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in rows if r["event"] == "train"]
    assert steps == list(range(1, 301)), "steps must run on without gap or repeat"
    assert f"resuming at step {stopped}" in log
    assert json.loads((run / "summary.json").read_text())["start_step"] == stopped
