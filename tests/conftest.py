"""Shared fixtures: small synthetic data sets made by the tests themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="session")
def pet_src(tmp_path_factory) -> Path:
    from unet_dist.data.synthetic import write_dataset

    src = tmp_path_factory.mktemp("pet_src")
    write_dataset(src, 48, seed=3)
    return src


@pytest.fixture(scope="session")
def shards(pet_src, tmp_path_factory) -> Path:
    """48 synthetic images converted at 64x64 into 4 train shards."""
    from unet_dist.data.convert import convert

    out = tmp_path_factory.mktemp("shards")
    convert(pet_src, out, image_size=(64, 64), shards=4, val_fraction=0.25, workers=2, progress=False, overwrite=True)
    return out


@pytest.fixture(autouse=True)
def _float32_policy():
    """The Keras dtype policy is process-global: every test starts and ends at float32."""
    yield
    if "keras" in sys.modules:
        import keras

        keras.mixed_precision.set_global_policy("float32")


def subprocess_env(**extra: str) -> dict:
    """The environment for a test's child processes: this checkout importable, TF quiet."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 600, check: bool = False):
    """Runs `python -m module args...` from the repository root; returns CompletedProcess."""
    full_env = subprocess_env(**(env or {}))
    proc = subprocess.run([PY, "-m", module, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def run_main(capsys, module: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m module args...` run in this process through the module's main(), as a
    CompletedProcess: for the error paths, whose exit code and one stderr line are what is tested,
    and for commands whose start-up is not under test, without a child process's TensorFlow start-up
    (seconds each). SystemExit ends it as it would end the interpreter: sys.exit("message") prints
    the message and exits 1. check: as run_module's."""
    import importlib

    main = importlib.import_module(module).main
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    out, err = capsys.readouterr()
    if check and code not in (0, None):
        raise AssertionError(f"{module} exited {code}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}")
    return subprocess.CompletedProcess([module, *args], code, out, err)


def tiny_overrides(steps: int = 4) -> list[str]:
    """A U-Net small enough to train in seconds on the 64x64 fixture data."""
    return [
        "data.image_size=[64, 64]", "data.global_batch_size=4", "data.shuffle_buffer=16",
        "model.depth=2", "model.base_filters=4", "model.deep_supervision=false",
        f"train.steps={steps}", "train.log_every_steps=1", "train.eval_every_steps=1000",
        "train.checkpoint_every_steps=1000", "train.image_panels=2",
        "runtime.precision=float32", "optim.warmup_steps=0",
    ]


def colour_coded_dir(tmp_path: Path, n: int = 3) -> Path:
    """A folders-layout SRC of n 16x16 images whose masks are coded by colour, as labelling tools
    export them: black (class 0) but for red rows 0-3 (class 1) and green rows 4-5 (class 2)."""
    import numpy as np
    from PIL import Image

    src = tmp_path / "colour"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(src / "images" / f"c{i}.png")
        rgb = np.zeros((16, 16, 3), np.uint8)
        rgb[:4, :, 0] = 255
        rgb[4:6, :, 1] = 255
        Image.fromarray(rgb).save(src / "masks" / f"c{i}.png")
    return src


def model_weights(workdir: Path, step: int) -> dict:
    """{variable path: value} of the model in WORKDIR/checkpoints/ckpt-STEP (trainable and not)."""
    import keras
    import tensorflow as tf
    import yaml

    from unet_dist.config import config_from_dict
    from unet_dist.model import build_unet

    cfg = config_from_dict(yaml.safe_load((workdir / "config.yaml").read_text()))
    keras.mixed_precision.set_global_policy("float32")
    model = build_unet(cfg.model, None)
    status = tf.train.Checkpoint(model=model).restore(str(workdir / "checkpoints" / f"ckpt-{step}"))
    status.expect_partial().assert_existing_objects_matched()
    weights = {v.path: v.numpy() for v in model.weights}
    assert any("kernel" in k for k in weights), weights.keys()
    return weights


def scale_loss_after(monkeypatch, after_steps: int, factor: float) -> None:
    """Makes the trainer's loss `factor` times larger from step after_steps + 1 on (a fault injector).

    The factor goes through stop_gradient, so gradients scale with it too; a tf.Variable counts
    executions of the traced step, not traces.
    """
    import tensorflow as tf

    import unet_dist.trainer as T

    real = T.training_loss

    def scaled(cfg, *args):  # training_loss(cfg, ignore, class_w)
        fn = real(cfg, *args)
        calls = tf.Variable(0)

        def loss(y, p, w=None):
            calls.assign_add(1)
            return fn(y, p, w) * tf.stop_gradient(tf.where(calls > after_steps, factor, 1.0))

        return loss

    monkeypatch.setattr(T, "training_loss", scaled)


def exit_at_once(task):
    """A conversion worker's task that ends its process, as the kernel's OOM killer would (module
    level: the spawned worker imports it by name)."""
    os._exit(9)
