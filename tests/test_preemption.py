"""Preemption without SLURM: a signal to one rank stops every rank at one agreed step, with a
checkpoint there; rerunning resumes and the run ends as if it had never stopped."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, model_weights, subprocess_env, tiny_overrides
from test_distributed import HOROVODRUN, needs_horovod

from unet_dist.config import load_config
from unet_dist.trainer import train

pytestmark = pytest.mark.dist

OVER = tiny_overrides(steps=60) + ["model.base_filters=8", "train.checkpoint_every_steps=1000", "model.norm=none",
                                   "train.log_every_steps=1", "optim.name=sgd", "optim.momentum=0.9"]


def _train_cmd(data, workdir):
    args = [sys.executable, "-m", "unet_dist.train", "--data", str(data), "--workdir", str(workdir), "--deterministic"]
    for o in OVER:
        args += ["--set", o]
    return args



def _wait_for_step(workdir, step, proc, timeout=300):
    path = workdir / "metrics.jsonl"
    t = time.time()
    while time.time() - t < timeout:
        assert proc.poll() is None, proc.communicate()
        if path.exists():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
            if steps and steps[-1] >= step:
                return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def _train_steps(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["event"] == "train"]


def _rank_pids(workdir, module="unet_dist.train"):
    """PIDs of the Python processes running `module` with `workdir` in their arguments (not
    horovodrun's shell wrappers)."""
    pids = []
    for pid in subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split():
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"python") and module.encode() in argv and b"horovodrun" not in argv[1]:
            pids.append(int(pid))
    return pids


@needs_horovod
def test_sigusr1_to_one_rank_stops_all_at_one_step_and_resumes(shards, tmp_path):
    w = tmp_path / "w"
    straight = tmp_path / "straight"
    train(load_config(None, [*OVER, "runtime.deterministic=true"]), shards, straight)  # here: no start-up to wait for
    cmd = [str(HOROVODRUN), "-np", "2", "--gloo", "-H", "localhost:2", *_train_cmd(shards, w)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(w, 5, proc)
    ranks = _rank_pids(w)
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGUSR1)  # only one rank hears it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0, "a preempted run must not look finished"
    assert "SIGUSR1 received" in err and "preempted: checkpoint of step" in out + err
    stopped = _train_steps(w)[-1]
    assert 5 <= stopped < 60
    assert (w / "checkpoints" / f"ckpt-{stopped}.index").exists()
    assert not (w / "summary.json").exists()
    # The same command again resumes at that step and finishes.
    again = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming at step {stopped}" in again.stdout
    assert _train_steps(w) == list(range(1, 61))  # no step lost or repeated
    a, b = model_weights(straight, 60), model_weights(w, 60)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_sigterm_single_process_exits_75_with_checkpoint(shards, tmp_path):
    w = tmp_path / "w"
    proc = subprocess.Popen(_train_cmd(shards, w) + ["--set", "runtime.strategy=single"], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(w, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    stopped = _train_steps(w)[-1]
    assert (w / "checkpoints" / f"ckpt-{stopped}.index").exists()


def test_ctrl_c_stops_at_a_saved_step_and_the_rerun_resumes(shards, tmp_path):
    w = tmp_path / "w"
    cmd = _train_cmd(shards, w) + ["--set", "runtime.strategy=single"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_step(w, 3, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 and "Traceback" not in err, err[-2000:]
    assert "SIGINT received" in err and "Ctrl-C again to stop at once" in err
    stopped = _train_steps(w)[-1]
    assert f"stopped at step {stopped} on SIGINT; checkpoint saved" in err
    assert (w / "checkpoints" / f"ckpt-{stopped}.index").exists()
    again = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"resuming at step {stopped}" in again.stdout, again.stderr[-2000:]
    assert _train_steps(w) == list(range(1, 61))
