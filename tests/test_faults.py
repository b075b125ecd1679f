"""Faults and bad input: nothing lost, no hang, a clear error. See docs/reliability.md."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, model_weights, scale_loss_after, subprocess_env, tiny_overrides
from test_distributed import HOROVODRUN, needs_horovod
from test_preemption import _rank_pids, _train_steps, _wait_for_step

from unet_dist.config import ConfigError, load_config
from unet_dist.data.pipeline import DataError, load_manifest
from unet_dist.distribute import free_ports
from unet_dist.trainer import TrainingError, train

OVER = tiny_overrides(steps=40) + ["model.base_filters=8", "model.norm=none", "optim.name=sgd",
                                   "optim.momentum=0.9", "train.checkpoint_every_steps=5"]


def _cmd(data, workdir, over=OVER, *extra):
    args = [sys.executable, "-m", "unet_dist.train", "--data", str(data), "--workdir", str(workdir), "--deterministic"]
    for o in [*over, *extra]:
        args += ["--set", o]
    return args


def _hvd(cmd):
    return [str(HOROVODRUN), "-np", "2", "--gloo", "-H", "localhost:2", *cmd]


@pytest.mark.dist
@needs_horovod
def test_killed_rank_ends_the_job_and_rerun_resumes_exactly(shards, tmp_path):
    straight, w = tmp_path / "straight", tmp_path / "w"
    train(load_config(None, [*OVER, "runtime.deterministic=true"]), shards, straight)  # here: no start-up to wait for
    proc = subprocess.Popen(_hvd(_cmd(shards, w)), cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(w, 12, proc)
    victim = max(_rank_pids(w))
    os.kill(victim, signal.SIGKILL)
    t = time.time()
    out, err = proc.communicate(timeout=120)  # bounded: no hang
    assert time.time() - t < 120 and proc.returncode != 0
    assert "exit with status code" in out + err or "exited" in out + err, (out + err)[-2000:]
    assert not (w / "summary.json").exists()
    # Rerun the same command: resumes from the last checkpoint, replays the data order from there.
    again = subprocess.run(_hvd(_cmd(shards, w)), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming at step" in again.stdout
    assert _train_steps(w) == list(range(1, 41))
    a, b = model_weights(straight, 40), model_weights(w, 40)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_kill_while_writing_checkpoints_keeps_the_latest_restorable(shards, tmp_path):
    w = tmp_path / "w"
    over = tiny_overrides(steps=400) + ["model.base_filters=32", "train.checkpoint_every_steps=1",
                                        "runtime.strategy=single"]
    rng = np.random.default_rng(0)
    for _ in range(3):
        proc = subprocess.Popen(_cmd(shards, w, over), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        start = len(_train_steps(w)) if (w / "metrics.jsonl").exists() else 0
        _wait_for_step(w, start + 3, proc)
        time.sleep(rng.uniform(0.0, 0.5))  # every step writes a checkpoint: often killed mid-write
        proc.kill()
        proc.wait()
        import tensorflow as tf

        latest = tf.train.latest_checkpoint(str(w / "checkpoints"))
        assert latest is not None
        model_weights(w, int(latest.rsplit("-", 1)[1]))  # restores completely
    # And training goes on from there.
    done = subprocess.run(_cmd(shards, w, over, "train.steps=12"), cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "resuming at step" in done.stdout, done.stderr[-2000:]


def test_run_resumes_past_a_model_json_cut_short_by_a_kill(shards, tmp_path):
    # An older version wrote checkpoints/model.json in place at every save, so a kill could leave it
    # empty (seen in test_kill_while_writing_...): resume names it and goes on, and the next save
    # writes it whole again.
    w = tmp_path / "w"
    first = subprocess.run(_cmd(shards, w, OVER, "train.steps=5"), cwd=ROOT, env=subprocess_env(),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    signature = w / "checkpoints" / "model.json"
    whole = json.loads(signature.read_text())
    signature.write_text("")
    again = subprocess.run(_cmd(shards, w, OVER, "train.steps=10"), cwd=ROOT, env=subprocess_env(),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resuming at step 5" in again.stdout, again.stderr[-2000:]
    assert "model.json is unreadable" in again.stderr
    assert json.loads(signature.read_text()) == whole


def _copy(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    return copy, json.loads((copy / "manifest.json").read_text())


def test_truncated_shard_is_named_before_work(shards, tmp_path):
    copy, m = _copy(shards, tmp_path)
    victim = copy / m["train"]["shards"][2]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(DataError, match=rf"{victim.name} is \d+ bytes .* truncated"):
        load_manifest(copy)


def test_corrupt_shard_is_named_and_skipping_is_opt_in(shards, tmp_path):
    copy, m = _copy(shards, tmp_path)
    victim = copy / m["train"]["shards"][1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # same size, bad CRC in the middle
    victim.write_bytes(bytes(data))
    cfg = load_config(None, tiny_overrides(steps=30) + ["runtime.deterministic=true"])
    with pytest.raises(DataError, match=rf"training data unreadable at step \d+: .*{victim.name}: corrupt after \d+ "
                                        r"records, \d+ lost .*skip_corrupt_records"):
        train(cfg, copy, tmp_path / "w")
    cfg = load_config(None, tiny_overrides(steps=30) + ["runtime.deterministic=true",
                                                        "data.skip_corrupt_records=true"])
    s = train(cfg, copy, tmp_path / "w2")
    assert 0 < s["lost_records"] < m["train"]["records_per_shard"][1] + 1


def test_corrupt_val_shard_is_named_in_one_line_after_the_checkpoint(shards, tmp_path, capsys):
    copy, m = _copy(shards, tmp_path)
    victim = copy / m["val"]["shards"][0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
    victim.write_bytes(bytes(data))
    over = tiny_overrides(steps=4) + ["train.eval_every_steps=2", "train.checkpoint_every_steps=2"]
    # Validation records are never skipped: metrics must count every one.
    with pytest.raises(DataError, match=rf"validation data unreadable: .*{victim.name}: corrupt after \d+ records, "
                                        r"\d+ lost \(corrupted record at \d+\); convert again$"):
        train(load_config(None, over + ["data.skip_corrupt_records=true"]), copy, tmp_path / "w")
    assert (tmp_path / "w" / "checkpoints" / "ckpt-2.index").exists()  # saved before the evaluation failed
    from unet_dist import evaluate

    capsys.readouterr()
    assert evaluate.main(["--workdir", str(tmp_path / "w"), "--data", str(copy), "--checkpoint", "latest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate: error: validation data unreadable: ") and victim.name in err[0]
    assert not (tmp_path / "w" / "eval.json").exists()


def test_too_many_skipped_float16_steps_stop_with_a_message(shards, tmp_path, monkeypatch):
    scale_loss_after(monkeypatch, 2, 1e30)  # finite loss, gradients overflow float16 from step 3 on
    cfg = load_config(None, tiny_overrides(steps=30) + ["runtime.precision=mixed_float16", "train.max_skipped_steps=4"])
    with pytest.raises(TrainingError, match=r"5 consecutive steps skipped .* at step 7"):
        train(cfg, shards, tmp_path / "w")
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] <= 7


@pytest.mark.dist
@needs_horovod
def test_workers_with_unequal_shards_never_hang(pet_src, tmp_path):
    from unet_dist.data.convert import convert

    data = tmp_path / "uneven"
    convert(pet_src, data, image_size=(64, 64), shards=5, val_fraction=0.25, workers=1, progress=False)
    m = json.loads((data / "manifest.json").read_text())
    per_rank = [sum(m["train"]["records_per_shard"][i::2]) for i in range(2)]
    assert per_rank[0] != per_rank[1]  # rank 0 reads more records than rank 1
    over = tiny_overrides(steps=20) + ["train.eval_every_steps=7"]  # not --deterministic: split by file
    cmd = [sys.executable, "-m", "unet_dist.train", "--data", str(data), "--workdir", str(tmp_path / "w")]
    for o in over:
        cmd += ["--set", o]
    proc = subprocess.run(_hvd(cmd), cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "w" / "summary.json").read_text())["steps"] == 20


@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["horovodrun --mpi", "horovodrun --mpi, before the first step", "multiworker"])
def test_a_stalled_rank_ends_the_job(shards, tmp_path, launcher):
    # A rank stopped (alive but silent: the worst kind of failure for a collective) leaves the other
    # waiting in a collective. Under Horovod's MPI controller (what horovodrun, mpirun and srun use
    # where Horovod has MPI) nothing ended that wait: the job ran past 180 s with Horovod's stall
    # shutdown at 6 s. Each rank's own watchdog (runtime.stall_shutdown_seconds) now ends it, and
    # one stopped before the first step has finished (the others wait in the first step's
    # collectives) ends it after runtime.stall_shutdown_start_seconds.
    # MultiWorkerMirroredStrategy's health check aborts the collective by itself (the watchdog is
    # off here): that ends in one line instead of TensorFlow's traceback.
    w = tmp_path / "w"
    over = tiny_overrides(steps=2000) + ["runtime.stall_check_seconds=2", "runtime.stall_shutdown_start_seconds=15"]
    over.append("runtime.stall_shutdown_seconds=" + ("6" if launcher.startswith("horovodrun") else "0"))
    early = launcher.endswith("before the first step")
    cmd = [sys.executable, "-m", "unet_dist.train", "--data", str(shards), "--workdir", str(w)]
    for o in over:
        cmd += ["--set", o]
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("HOROVOD_STALL")}
    if launcher.startswith("horovodrun"):
        if not HOROVODRUN.exists() or shutil.which("mpirun") is None:
            pytest.skip("Horovod or Open MPI not installed (run make setup)")
        procs = [subprocess.Popen([str(HOROVODRUN), "-np", "2", "--mpi", "-H", "localhost:2", *cmd], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
        if early:  # the chief writes config.yaml after the broadcast, before the first step
            while not (w / "config.yaml").exists():
                assert procs[0].poll() is None, procs[0].communicate()
                time.sleep(0.05)
            assert not (w / "metrics.jsonl").exists() or not (w / "metrics.jsonl").read_text()
        else:
            _wait_for_step(w, 3, procs[0])
        victim = max(_rank_pids(w))
    else:
        cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
        procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
            for i in range(2)]
        _wait_for_step(w, 3, procs[0])
        victim = procs.pop().pid
    os.kill(victim, signal.SIGSTOP)
    t = time.time()
    try:
        out, err = procs[0].communicate(timeout=180)
    finally:
        os.kill(victim, signal.SIGKILL)
        procs[0].kill()
    assert procs[0].returncode != 0 and time.time() - t < 180, (out + err)[-3000:]
    if early:
        assert re.search(r"train: error: rank \d: the first step has not finished \d+ s after the start "
                         r"\(runtime.stall_shutdown_start_seconds 15\): another process stopped answering", err), \
            err[-3000:]
    elif launcher.startswith("horovodrun"):
        assert re.search(r"train: error: rank \d: nothing has finished for \d+ s since step \d+ "
                         r"\(runtime.stall_shutdown_seconds 6\): another process stopped answering", err), err[-3000:]
    else:
        assert re.search(r"\ntrain: error: after step \d+: a collective failed, another process stopped answering "
                         r"or exited \(Collective ops is aborted by: .*unhealthy.*\); rerunning", err), err[-3000:]
        assert "Traceback" not in err


@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["mpirun", "multiworker"])
def test_a_process_whose_peer_never_starts_ends(shards, tmp_path, launcher):
    # A process of the job that never starts (a node that does not come up, a pod left pending)
    # left the others waiting in the backend's own start for good: MPI_Init, or MultiWorkerMirroredStrategy's
    # cluster (12 min, TERM included, until killed). A child process now watches that start (the
    # strategy holds the GIL while it waits, so no thread of the process runs).
    cmd = [sys.executable, "-m", "unet_dist.train", "--data", str(shards), "--workdir", str(tmp_path / "w"),
           "--set", "runtime.stall_shutdown_start_seconds=8", *(a for o in tiny_overrides(2) for a in ("--set", o))]
    env = subprocess_env()
    if launcher == "mpirun":
        if shutil.which("mpirun") is None or not HOROVODRUN.exists():
            pytest.skip("Horovod or Open MPI not installed (run make setup)")
        # Rank 1 is a process that never calls MPI_Init.
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL",
               "-np", "1", *cmd, ":", "-np", "1", "sleep", "300"]
        said = "train: error: horovod has not come up 8 s"
    else:  # a cluster of two workers, one of which never starts
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{port}" for port in free_ports(2)]},
                                       "task": {"type": "worker", "index": 0}})
        said = "train: error: multiworker has not come up 8 s"
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.time() - t < 60, (proc.stdout + proc.stderr)[-3000:]
    assert (f"{said} after its start (runtime.stall_shutdown_start_seconds 8): another process of the job did not "
            "start or cannot be reached; ending this process so that the launcher ends the job\n") in proc.stderr, \
        proc.stderr[-3000:]
    assert not (tmp_path / "w" / "config.yaml").exists()


@pytest.fixture(scope="module")
def watched_run(shards, tmp_path_factory):
    """A trained run whose config ends a wait for the other processes after 5 s."""
    w = tmp_path_factory.mktemp("watched") / "run"
    train(load_config(None, [*tiny_overrides(2), "runtime.stall_check_seconds=2", "runtime.stall_shutdown_seconds=5"]),
          shards, w)
    return w


@pytest.mark.dist
@pytest.mark.parametrize("case", ["a slow share", "a stopped process", "a stopped process, multiworker",
                                  "a stopped process, horovodrun --gloo"])
def test_predict_waits_for_a_slow_share_and_ends_on_a_stopped_process(watched_run, tmp_path, case):
    # predict on N processes: each predicts its share, then all sum their counts, and the first to
    # finish waits for the others. That wait is watched (runtime.stall_shutdown_seconds, 5 s here),
    # else a stopped process would leave the others in the sum for good under MPI. The shares are
    # split by image size: large and small images in turn, split every N-th image, gave one process
    # every large one, and the other waited past 5 s (and Horovod's own stall shutdown ended the job).
    # MultiWorkerMirroredStrategy's health check aborts the sum by itself (about 10 s), and Gloo
    # gives up on a silent rank (HOROVOD_GLOO_TIMEOUT_SECONDS, 30 s; 4 here): one line too.
    from PIL import Image

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    sides = [2000, 64, 2000] if case == "a slow share" else [800] * 4
    rng = np.random.default_rng(0)
    for i, side in enumerate(sides):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), np.uint8)).save(src / f"{'abcd'[i]}.png")
    cmd = [sys.executable, "-m", "unet_dist.predict", "--workdir", str(watched_run), str(src), "--out", str(out),
           "--mode", "tile", "--tta", "flip"]
    if case.endswith(("multiworker", "--gloo")):  # theirs first: our limit longer than theirs, for this command
        cmd += ["--set", "runtime.stall_shutdown_seconds=60"]
    env = {k: v for k, v in subprocess_env().items() if not k.startswith("HOROVOD_STALL")}
    env["HOROVOD_GLOO_TIMEOUT_SECONDS"] = "4"
    if case.endswith("multiworker"):
        cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
        procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
            **env, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})})
            for i in range(2)]
    else:
        if not HOROVODRUN.exists() or shutil.which("mpirun") is None:
            pytest.skip("Horovod or Open MPI not installed (run make setup)")
        procs = [subprocess.Popen([str(HOROVODRUN), "-np", "2", "--gloo" if case.endswith("--gloo") else "--mpi",
                                   "-H", "localhost:2", *cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)]
    victim = None
    try:
        if case != "a slow share":  # once an image is done, with one more for each process to do
            while not list(out.glob("*_mask.png")):
                assert procs[0].poll() is None, procs[0].communicate()
                time.sleep(0.02)
            victim = procs.pop().pid if len(procs) == 2 else max(_rank_pids(out, "unet_dist.predict"))
            os.kill(victim, signal.SIGSTOP)
        t = time.time()
        _, err = procs[0].communicate(timeout=300)
    finally:
        if victim:
            os.kill(victim, signal.SIGKILL)
        for proc in procs:
            proc.kill()
    if case == "a slow share":
        assert procs[0].returncode == 0, err[-3000:]
        assert sorted(p.name for p in out.glob("*_mask.png")) == ["a_mask.png", "b_mask.png", "c_mask.png"]
        return
    assert procs[0].returncode != 0 and time.time() - t < 60, err[-3000:]
    if case.endswith("multiworker"):
        assert re.search(r"\npredict: error: a collective failed, another process stopped answering or exited "
                         rf"\(Collective ops is aborted by: .*unhealthy.*\); the masks written in {out} are whole\n",
                         err), err[-3000:]
        assert "Traceback" not in err
    elif case.endswith("--gloo"):
        assert re.search(r"\]<stderr>:predict: error: a collective failed, another process stopped answering or "
                         rf"exited \(Horovod has been shut down\); the masks written in {out} are whole\n", err), \
            err[-3000:]
        assert "<stderr>:Traceback" not in err  # horovodrun's own traceback (the job failed) follows
    else:
        assert re.search(r"predict: error: rank \d: the other processes have not finished their images 5 s after this "
                         r"one did \(runtime.stall_shutdown_seconds 5\): one of them stopped answering, "
                         r"or its share takes that much longer \(an image that takes longer than that to predict "
                         r"needs a larger limit: --set runtime.stall_shutdown_seconds=N\); ending this process so "
                         r"that the launcher ends the job\n", err), err[-3000:]
    masks = list(out.glob("*_mask.png"))
    assert masks and all(Image.open(m).size == (800, 800) for m in masks)  # what was written is whole


def test_the_watchdog_ends_a_process_whose_loop_stopped_and_spares_one_that_moves(monkeypatch, capsys):
    import threading

    import unet_dist.watchdog as W

    exits = []
    ended = threading.Event()
    monkeypatch.setattr(W.os, "_exit", lambda code: (exits.append(code), ended.set()))
    with W.Watchdog(0.4, rank=1, poll=0.05) as dog:  # beats every 0.1 s for 1 s: never idle for 0.4 s
        dog.arm(7)
        for step in range(8, 18):
            time.sleep(0.1)
            dog.beat(step)
    time.sleep(0.6)  # stopped: idle now, but no longer watching
    assert exits == [] and capsys.readouterr().err == ""
    dog = W.Watchdog(0.3, rank=1, poll=0.05)
    dog.arm(5)
    dog.beat()  # an evaluation batch: time, not a step
    assert ended.wait(5) and exits[0] == W.STALLED_EXIT
    dog.stop()
    assert re.match(r"train: error: rank 1: nothing has finished for 0 s since step 5 \(runtime.stall_shutdown_seconds "
                    r"0.3\): another process stopped answering", capsys.readouterr().err)
    # The start-up is watched from start() to the first step with its own limit; beats before the
    # first step (the loop's start) do not restart that clock.
    exits.clear()
    ended.clear()
    with W.Watchdog(0.2, rank=0, poll=0.05, start_seconds=0.6) as dog:
        for _ in range(5):
            time.sleep(0.1)
            dog.beat(3)  # longer than 0.2 s in all, but the start-up has 0.6 s
        assert exits == []
        dog.arm(4)
        for step in range(5, 10):
            time.sleep(0.1)
            dog.beat(step)
    assert exits == []
    dog = W.Watchdog(0.2, rank=0, poll=0.05, start_seconds=0.6)
    dog.start()
    for _ in range(4):
        time.sleep(0.1)
        dog.beat(3)
    assert ended.wait(5) and exits == [W.STALLED_EXIT]
    dog.stop()
    assert re.match(r"train: error: rank 0: the first step has not finished 1 s after the start "
                    r"\(runtime.stall_shutdown_start_seconds 0.6\): another process", capsys.readouterr().err)
    off = W.Watchdog(0, rank=0, start_seconds=60)
    off.start()
    off.arm(1)
    assert off._thread is None  # one process (or stall_shutdown_seconds 0): nothing watches


def test_a_wait_that_holds_the_gil_is_ended_from_outside():
    # watched_from_outside: a child process kills the process when the block has not finished in
    # time (a wait inside TensorFlow holding the GIL, which no thread of the process can end), and
    # goes away when it has.
    code = ("import sys, time\nfrom unet_dist.watchdog import watched_from_outside\n"
            "with watched_from_outside(0.5, 'the block took too long'):\n    time.sleep(float(sys.argv[1]))\n"
            "print('after')")
    quick = subprocess.run([sys.executable, "-c", code, "0.1"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (quick.returncode, quick.stdout, quick.stderr) == (0, "after\n", "")
    t = time.time()
    slow = subprocess.run([sys.executable, "-c", code, "30"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert slow.returncode == -signal.SIGKILL and time.time() - t < 20
    assert (slow.stdout, slow.stderr) == ("", "the block took too long\n")


def test_bad_workdir_and_data_fail_in_one_line_before_work(shards, tmp_path, monkeypatch):
    cfg = load_config(None, tiny_overrides(steps=2))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"^--workdir {blocker / 'w'}: {blocker} is a file, not a folder$"):
        train(cfg, shards, blocker / "w")
    with pytest.raises(ConfigError, match=f"^--workdir {blocker}: is a file, not a folder$"):
        train(cfg, shards, blocker)
    with pytest.raises(DataError, match="does not exist"):
        train(cfg, tmp_path / "missing", tmp_path / "w")
    import unet_dist.checkpoint as C

    monkeypatch.setattr(C.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ConfigError, match=r"MiB free, its checkpoints need about"):
        train(cfg, shards, tmp_path / "full")
    assert not list((tmp_path / "full").glob("checkpoints/ckpt-*"))


def test_cli_reports_bad_input_in_one_line(shards, tmp_path):
    from conftest import run_module

    proc = run_module("unet_dist.train", "--data", str(tmp_path / "nope"), "--workdir", str(tmp_path / "w"))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1 and "nope" in lines[0] and "Traceback" not in proc.stderr


def test_damaged_checkpoints_are_named_and_passed_over(shards, tmp_path, capsys):
    from unet_dist.checkpoint import CheckpointError

    over = tiny_overrides(steps=3) + ["train.checkpoint_every_steps=1"]
    train(load_config(None, over), shards, tmp_path / "w")
    ck = tmp_path / "w" / "checkpoints"
    data3 = next(ck.glob("ckpt-3.data-*"))
    damaged = bytearray(data3.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, bad checksum
    data3.write_bytes(bytes(damaged))
    (ck / "ckpt-2.index").write_text("x")  # not a checkpoint index
    capsys.readouterr()
    summary = train(load_config(None, tiny_overrides(steps=4) + ["train.checkpoint_every_steps=1"]), shards,
                    tmp_path / "w")
    err = capsys.readouterr().err
    assert summary["start_step"] == 1, err
    assert f"checkpoint {ck / 'ckpt-3'} is unreadable (" in err and "Checksum does not match" in err
    assert f"checkpoint {ck / 'ckpt-2'} is unreadable (file is too short" in err
    assert f"resuming from {ck / 'ckpt-1'}, the newest readable checkpoint" in err
    # None readable: one line naming each, and nothing is started over behind the user's back.
    for index in ck.glob("ckpt-*.index"):
        index.write_text("x")
    with pytest.raises(CheckpointError,
                       match=r"no checkpoint in .* can be read: ckpt-4 \(file is too short.*\); .*ckpt-2 .*--no-resume"):
        train(load_config(None, tiny_overrides(steps=6)), shards, tmp_path / "w")
    # Evaluation, prediction and export name the damaged file in one line too.
    from unet_dist.inference import load_trained

    with pytest.raises(CheckpointError, match=r"checkpoint .*ckpt-4 is unreadable \(file is too short"):
        load_trained(tmp_path / "w", "latest")
