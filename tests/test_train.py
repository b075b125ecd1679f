"""Training on one process: it learns, it resumes exactly, it stops on NaN, it predicts and exports."""

import json
import re
import shutil
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import colour_coded_dir, model_weights, run_main, run_module, scale_loss_after, tiny_overrides

from unet_dist.config import ConfigError, load_config
from unet_dist.input_bound import InputClock, classify, worst_over_processes
from unet_dist.trainer import TrainingError, train


def test_training_learns(shards, tmp_path, capsys):
    cfg = load_config(None, tiny_overrides(steps=150) + ["model.depth=3",
        "model.base_filters=8", "optim.learning_rate=0.003", "train.loss=ce_dice", "train.eval_every_steps=150",
        "data.augment.scale_crop=false"])
    s = train(cfg, shards, tmp_path / "w")
    manifest = json.loads((shards / "manifest.json").read_text())
    bg = manifest["class_pixel_fraction"][0]
    baseline = bg / 2  # mean IoU of predicting background everywhere: (bg + 0) / 2
    assert s["final_val_iou"] > baseline + 0.3, (s, baseline)
    events = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    for key in ("steps", "best_val_iou", "final_val_iou", "wall_s", "run_wall_s", "images_per_s", "world_size",
                "global_batch_size", "precision", "input_wait_fraction", "input_bound"):
        assert key in s
    assert s["gpu_peak_memory_mib"] is None  # no GPU here
    assert (tmp_path / "w" / "learning_curves.png").exists()
    assert list((tmp_path / "w" / "tensorboard").iterdir())
    # No terminal (a batch job's log): a line at each logged step says what the bar would.
    out = capsys.readouterr().out
    assert "train: done: 150 steps" in out and "GPU memory" not in out
    lines = [line for line in out.splitlines() if ": loss " in line]
    train_events = [e for e in events if e["event"] == "train"]
    assert [line.split(":")[0] for line in lines] == [f"step {e['step']}/150" for e in train_events]
    assert f"loss {train_events[-1]['loss']:.4f}  lr " in lines[-1] and "images_per_s" in lines[-1]
    # The time left, from the second event on (the first one's steps include tracing).
    assert "eta" not in lines[0] and "  eta 0:00:" in lines[1] and lines[-1].endswith("  eta 0:00:00")
    # The one evaluation is the first best (which best/ now holds).
    assert f"step 150: new best val IoU {s['best_val_iou']:.4f}\n" in out, out


def test_input_clock_and_its_verdict():
    assert [classify(f) for f in (None, 0.0, 0.049, 0.05, 0.199, 0.2, 1.0)] == [
        None, "no", "no", "moderately", "moderately", "highly", "highly"]
    clock = InputClock()
    for wait in (0.2, 0.02, 0.0):  # the first step (buffers, tracing) is left out
        with clock.waiting():
            time.sleep(wait)
        time.sleep(0.02)  # the step itself
        clock.step_done()
    assert 0.2 < clock.window() < 0.8  # (0.02 + 0) / (0.04 + 0.02), give or take the sleeps
    assert clock.window() is None  # a new window, no step in it yet
    assert clock.fraction() < 0.8 and clock.step_s < 0.2


def test_the_slowest_process_input_is_reported():
    class Rank1Of2:  # the other process waited 30% of 10 s
        rank, world_size = 1, 2

        def allreduce_sum(self, value):
            return value + np.array([3.0, 10.0, 0.0, 0.0])

    clock = InputClock()
    clock.wait_s, clock.step_s = 1.0, 10.0
    assert worst_over_processes(clock, Rank1Of2()) == pytest.approx(0.3)
    clock.wait_s = 5.0
    assert worst_over_processes(clock, Rank1Of2()) == pytest.approx(0.5)


def _with_input(monkeypatch, wrap):
    """The trainer's training batches, passed through wrap(dataset) -> dataset."""
    import unet_dist.trainer

    real = unet_dist.trainer.train_dataset
    monkeypatch.setattr(unet_dist.trainer, "train_dataset", lambda *a, **k: wrap(real(*a, **k)))


@pytest.mark.parametrize("loss", ["bce", "weighted_ce"])
def test_a_slow_input_pipeline_is_flagged(shards, tmp_path, monkeypatch, capsys, loss):
    # 0.15 s per batch, one batch at a time: far slower than this tiny model's step.
    def slow(image):
        time.sleep(0.15)
        return image

    _with_input(monkeypatch, lambda ds: ds.map(
        lambda b: {**b, "image": tf.numpy_function(slow, [b["image"]], tf.float32, stateful=True)}))
    s = train(load_config(None, tiny_overrides(steps=7) + ["train.log_every_steps=3", f"train.loss={loss}"]),
              shards, tmp_path / "w")
    assert s["input_bound"] == "highly" and s["input_wait_fraction"] > 0.5, s
    waits = [e["input_wait"] for e in map(json.loads, (tmp_path / "w" / "metrics.jsonl").read_text().splitlines())
             if e["event"] == "train"]
    assert len(waits) == 3 and min(waits) > 0.5, waits
    out = capsys.readouterr()
    assert (out.out + out.err).count("input-bound: ") == 2, out  # the warning once, and the summary line
    # Weight maps computed per sample (records without border distances): the warning names the cure.
    assert ("Convert with --border-distances" in out.out + out.err) == (loss == "weighted_ce"), out


def test_a_pipeline_that_keeps_ahead_is_not_flagged(shards, tmp_path, monkeypatch, capsys):
    # One batch held in memory: getting the next one costs next to nothing against a train step.
    _with_input(monkeypatch, lambda ds: ds.take(1).cache().repeat().prefetch(2))
    over = tiny_overrides(steps=12) + ["train.log_every_steps=4", "model.depth=3", "model.base_filters=16"]
    s = train(load_config(None, over), shards, tmp_path / "w")
    assert s["input_bound"] == "no" and s["input_wait_fraction"] < 0.05, s
    out = capsys.readouterr()
    assert "input-bound" not in out.out + out.err


def test_cpu_bfloat16_is_read_from_the_cpu_flags():
    from unet_dist.precision import cpu_bf16_flag

    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512vl\n\nprocessor\t: 1\n"
    assert cpu_bf16_flag(zen4) == "avx512_bf16"
    assert cpu_bf16_flag("flags\t\t: fpu avx512f amx_tile amx_bf16\n") == "amx_bf16"
    assert cpu_bf16_flag("flags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n") is None  # e.g. Cascade Lake
    assert cpu_bf16_flag("Features\t: fp asimd sve bf16 i8mm\n") == "bf16"  # Arm (Graviton 3)
    assert cpu_bf16_flag("") is None


def test_auto_precision_is_resolved_for_this_machine_and_recorded(shards, tmp_path, capsys):
    from unet_dist.precision import cpu_bf16_flag

    expected = "mixed_bfloat16" if cpu_bf16_flag() else "float32"  # no GPU on the test machines
    over = [o for o in tiny_overrides(steps=2) if not o.startswith("runtime.precision")]
    cfg = load_config(None, over)
    assert cfg.runtime.precision == "auto"  # the default
    s = train(cfg, shards, tmp_path / "w")
    assert s["precision"] == expected
    assert load_config(tmp_path / "w" / "config.yaml").runtime.precision == expected  # what ran, for resume/predict
    out = capsys.readouterr().out
    assert f"precision {expected} (auto: no GPU; the CPU " in out
    # runtime.xla auto too: off without a GPU (the step is slower compiled on a CPU), and recorded.
    assert cfg.runtime.xla is False and s["xla"] is False and "xla False (auto: no GPU" in out, out
    assert load_config(tmp_path / "w" / "config.yaml").runtime.xla is False
    # A policy the config names is kept, whatever the machine.
    s = train(load_config(None, over + ["runtime.precision=float32", "train.steps=3"]), shards, tmp_path / "w")
    assert s["precision"] == "float32" and s["start_step"] == 2


def test_auto_xla_is_on_where_the_step_computes_on_a_gpu(monkeypatch):
    from unet_dist.trainer import resolve_xla

    def resolved(*over, gpus=()):
        monkeypatch.setattr(tf.config, "get_visible_devices", lambda kind=None: list(gpus) if kind == "GPU" else [])
        cfg = load_config(None, list(over))
        why = resolve_xla(cfg)
        return cfg.runtime.xla, why

    gpu = ["/physical_device:GPU:0"]
    assert resolved(gpus=gpu) == (True, "auto: the step computes on a GPU")
    assert resolved()[0] is False
    assert resolved("model.sync_batch_norm=true", gpus=gpu)[0] is False  # XLA cannot compile its collectives
    assert resolved("runtime.deterministic=true", gpus=gpu)[0] is False
    assert resolved("runtime.xla=false", gpus=gpu) == (False, None)  # what the config says is kept
    assert resolved("runtime.xla=true") == (True, None)
    with pytest.raises(ConfigError, match=r"runtime.xla: got 'often'; allowed: bool or 'auto'"):
        load_config(None, ["runtime.xla=often"])
    # 'auto' is truthy: a step built from an unresolved config would compile on a CPU (the pipeline
    # and profile benchmarks' steps did, until they resolved it as the trainer does).
    from unet_dist.trainer import make_train_step

    with pytest.raises(TypeError, match="resolve_xla resolves 'auto'"):
        make_train_step(None, None, None, None, 4, "auto")


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_the_xla_step_computes_what_the_plain_one_does(micro_batches):
    # runtime.xla auto compiles the forward and backward pass on a GPU: on the same batches the
    # compiled step must give the plain step's loss and updates (to float32 rounding: XLA fuses and
    # reorders), also inside gradient accumulation's loop, batch norm's moving statistics included.
    cfg = load_config(None, tiny_overrides() + ["optim.name=sgd", "optim.momentum=0.9"])
    rng = np.random.default_rng(0)
    batches = [{"image": tf.constant(rng.random((4, 64, 64, 3)), tf.float32),
                "mask": tf.constant(rng.integers(0, 2, (4, 64, 64, 1)), tf.uint8)} for _ in range(3)]
    # Op determinism, which deterministic runs earlier in this process turned on for the whole
    # process, keeps XLA from compiling the max-pool gradient (runtime.xla: true is refused with it).
    # TensorFlow's public API can only turn it on.
    from tensorflow.python.framework import config as tf_config

    determinism = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    try:
        runs = _plain_and_xla_runs(cfg, batches, micro_batches)
    finally:
        if determinism:
            tf_config.enable_op_determinism()
    (plain, plain_w, _), (xla, xla_w, _) = runs
    np.testing.assert_allclose(xla, plain, rtol=1e-5)
    # The whole weight vector's relative difference: single weights near 0 differ relatively more.
    diff = np.sqrt(sum(np.sum((b - a) ** 2) for a, b in zip(plain_w, xla_w, strict=True)))
    moved = np.sqrt(sum(np.sum((a - w0) ** 2) for a, w0 in zip(plain_w, runs[0][2], strict=True)))
    assert diff <= 1e-3 * moved, (diff, moved)  # small beside what the three steps changed
    assert plain[-1] != plain[0]  # it trained


def _plain_and_xla_runs(cfg, batches, micro_batches):
    """[(losses, weights after, initial weights)] of the plain step, then of the XLA step, from the
    same initial weights on the same batches."""
    from unet_dist.distribute import make_runtime
    from unet_dist.losses import training_loss
    from unet_dist.trainer import build_model_and_optimizer, make_train_step

    runs = []
    for xla in (False, True):
        runtime = make_runtime(cfg)
        model, optimizer = build_model_and_optimizer(cfg, runtime, 0.05)
        init_weights = [v.numpy() for v in model.weights] if not runs else runs[0][2]
        for v, w in zip(model.weights, init_weights, strict=True):
            v.assign(w)
        step = make_train_step(model, optimizer, training_loss(cfg), runtime, 4, xla, micro_batches)
        losses = [float(step(b)["loss"]) for b in batches]
        runs.append((losses, [v.numpy() for v in model.weights], init_weights))
    return runs


def test_resume_gives_the_same_weights_as_a_straight_run(shards, tmp_path, capsys):
    over = tiny_overrides(steps=6) + ["runtime.deterministic=true", "train.checkpoint_every_steps=3",
                                      "data.augment.elastic=true", "optim.name=sgd", "optim.momentum=0.9",
                                      "optim.schedule=cosine", "optim.warmup_steps=2"]
    train(load_config(None, over), shards, tmp_path / "straight")
    train(load_config(None, over + ["train.steps=3"]), shards, tmp_path / "split")
    s = train(load_config(None, over), shards, tmp_path / "split")
    assert s["start_step"] == 3
    a, b = model_weights(tmp_path / "straight", 6), model_weights(tmp_path / "split", 6)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]  # no gap, no repeat across the resume
    # Run again with nothing left to train: evaluated, and the trained run's files are kept.
    files = {n: (tmp_path / "straight" / n).read_bytes() for n in ("summary.json", "config.yaml", "metrics.jsonl")}
    capsys.readouterr()
    again = train(load_config(None, over), shards, tmp_path / "straight")
    assert again["start_step"] == 6 and again["final_val_iou"] is not None
    assert {n: (tmp_path / "straight" / n).read_bytes() for n in files} == files
    assert json.loads(files["summary.json"])["images_per_s"] > 0
    assert "keeping the config.yaml and summary.json of the run that trained it" in capsys.readouterr().out


def test_the_logged_loss_is_the_mean_since_the_last_train_event(shards, tmp_path):
    over = tiny_overrides(steps=6) + ["runtime.deterministic=true", "train.log_every_steps=4"]

    def logged(workdir):
        rows = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows if r["event"] == "train"}

    train(load_config(None, over + ["train.log_every_steps=1"]), shards, tmp_path / "each")
    train(load_config(None, over), shards, tmp_path / "windows")
    each, windows = logged(tmp_path / "each"), logged(tmp_path / "windows")
    assert list(windows) == [4, 6]  # every 4 steps, and the last
    assert windows[4] == pytest.approx(np.mean([each[k] for k in (1, 2, 3, 4)]), rel=1e-6)
    assert windows[6] == pytest.approx(np.mean([each[5], each[6]]), rel=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    over = tiny_overrides(steps=6) + ["train.checkpoint_every_steps=2"]
    scale_loss_after(monkeypatch, 3, np.nan)  # three good steps, then NaN
    with pytest.raises(TrainingError, match=r"loss is nan at step 4.*ckpt-2"):
        train(load_config(None, over), shards, tmp_path / "w")
    assert tf.train.latest_checkpoint(str(tmp_path / "w" / "checkpoints")).endswith("ckpt-2")


def test_mismatched_model_optimizer_or_classes_fail_before_work(shards, tmp_path):
    train(load_config(None, tiny_overrides(steps=1)), shards, tmp_path / "w")
    with pytest.raises(ConfigError, match="model.base_filters: checkpoint 4, config 8"):
        train(load_config(None, tiny_overrides(steps=2) + ["model.base_filters=8"]), shards, tmp_path / "w")
    # Adam's state (two slots per variable) does not fit SGD with momentum (one) or RMSprop with
    # momentum (two, in another order): one line, and the run's files stay as they were.
    before = (tmp_path / "w" / "config.yaml").read_text()
    for other in ("optim.name=sgd", "optim.name=rmsprop"):
        with pytest.raises(ConfigError, match=r"ckpt-1 holds the state of another optimizer than this run's"):
            train(load_config(None, tiny_overrides(steps=2) + [other, "optim.momentum=0.9"]), shards, tmp_path / "w")
    assert (tmp_path / "w" / "config.yaml").read_text() == before
    # AdamW keeps Adam's slots: it resumes.
    assert train(load_config(None, tiny_overrides(steps=2) + ["optim.name=adamw"]), shards,
                 tmp_path / "w")["start_step"] == 1
    with pytest.raises(ConfigError, match="model.num_classes is 3 .* has 2 classes"):
        train(load_config(None, tiny_overrides(steps=2) + ["model.num_classes=3", "train.loss=cce"]), shards,
              tmp_path / "w2")


def test_instance_norm_trains_and_a_model_json_of_batch_norm_resumes(shards, tmp_path):
    # 160 steps: at 100 the one trajectory of runtime.seed 0 ended at val IoU 0.686 on an AMD EPYC VM
    # (0.77-0.84 with seeds 1-3), under the bar; at 160, 0.77-0.83 with seeds 0-2.
    cfg = load_config(None, tiny_overrides(steps=160) + ["model.depth=3", "model.base_filters=8", "model.norm=instance",
        "optim.learning_rate=0.003", "train.loss=ce_dice", "train.eval_every_steps=160", "data.augment.scale_crop=false"])
    s = train(cfg, shards, tmp_path / "w")
    bg = json.loads((shards / "manifest.json").read_text())["class_pixel_fraction"][0]
    assert s["final_val_iou"] > bg / 2 + 0.3, s  # mean IoU of predicting background everywhere: bg / 2
    # Checkpoints of an earlier version name model.batch_norm in their model.json, not model.norm.
    signature = tmp_path / "w" / "checkpoints" / "model.json"
    saved = {k: v for k, v in json.loads(signature.read_text()).items() if k != "norm"}
    for old in (True, False):
        signature.write_text(json.dumps({**saved, "batch_norm": old}))
        with pytest.raises(ConfigError, match=f"model.norm: checkpoint '{'batch' if old else 'none'}', "
                                              "config 'instance'"):
            train(cfg, shards, tmp_path / "w")
    plain = load_config(None, tiny_overrides(steps=1))
    train(plain, shards, tmp_path / "plain")
    signature = tmp_path / "plain" / "checkpoints" / "model.json"
    saved = {k: v for k, v in json.loads(signature.read_text()).items() if k != "norm"}
    signature.write_text(json.dumps({**saved, "batch_norm": True}))
    plain.train.steps = 2
    assert train(plain, shards, tmp_path / "plain")["start_step"] == 1


def test_valid_padding_and_weighted_loss_train(shards, tmp_path):
    over = tiny_overrides(steps=2) + ["model.padding=valid", "data.image_size=[60, 60]", "train.loss=weighted_ce",
                                      "data.augment.elastic=true"]
    s = train(load_config(None, over), shards, tmp_path / "w")
    assert s["final_val_iou"] is not None


def test_class_weights_come_from_the_training_masks_and_are_said(shards, tmp_path, capsys):
    frac = json.loads((shards / "manifest.json").read_text())["class_pixel_fraction"]
    s = train(load_config(None, tiny_overrides(steps=1) + ["train.class_weights=balanced"]), shards, tmp_path / "w")
    want = [1 / (2 * f) for f in frac]
    assert s["class_weights"] == pytest.approx(want, rel=1e-6)
    out = capsys.readouterr().out
    assert (f"train.class_weights balanced: the classes' pixels weighted {want[0]:.4g}, {want[1]:.4g} in the "
            f"cross-entropy (their shares of the training masks: {frac[0]:.4g}, {frac[1]:.4g})") in out
    assert "unet_dist: data.augment: flips, zoom 0.8-1.25 on 20%, brightness 0.1, contrast 0.1\n" in out  # the defaults
    # Without weights, a class under 1% of the pixels meets plain cross-entropy: the start says what helps.
    from unet_dist.trainer import class_balance_lines

    sparse = {"num_classes": 3, "class_pixel_fraction": [0.985, 0.01, 0.005], "class_names": ["bg", "pet", "tag"]}
    assert class_balance_lines(load_config(None, ["model.num_classes=3", "train.loss=cce"]), sparse, None) == [
        "unet_dist: class 2 (tag) is 0.50% of the training masks' labelled pixels, which plain cross-entropy "
        "(train.loss cce) learns slowly; train.loss ce_dice, or train.class_weights sqrt, learns it sooner (README)"]
    assert class_balance_lines(load_config(None, ["model.num_classes=3", "train.loss=ce_dice"]), sparse, None) == []
    assert class_balance_lines(load_config(None, ["train.loss=bce"]), {"class_pixel_fraction": [0.9, 0.1]}, None) == []


def check_per_record(rows: list[dict], metrics: dict, shards, manifest: dict, table) -> None:
    """evaluate --data's per_record rows: one for each val record, named by its stem (read here from
    the records themselves), worst IoU first, adding up to the pooled scores, and the same in the CSV."""
    import tensorflow as tf

    stems = []
    for f in manifest["val"]["shards"]:
        for raw in tf.data.TFRecordDataset(str(shards / f)).as_numpy_iterator():
            stems.append(tf.train.Example.FromString(raw).features.feature["stem"].bytes_list.value[0].decode())
    assert sorted(r["record"] for r in rows) == sorted(stems) and len(stems) == metrics["val_records"]
    ious = [r["iou"] for r in rows]
    assert ious == sorted(ious) and all(0 <= v <= 1 for v in ious)
    # The pooled outline distances are the means over every (record, class) pair that has them,
    # and the pooled object F1 is 2 TP / (true + predicted) over every record's objects.
    hd95 = [v for r in rows for v in r["hd95_per_class"] if v is not None]
    assert metrics["val_hd95"] == pytest.approx(sum(hd95) / len(hd95)) if hd95 else metrics["val_hd95"] is None
    nsd = [v for r in rows for v in r["nsd_per_class"] if v is not None]
    assert metrics["val_nsd"] == pytest.approx(sum(nsd) / len(nsd))
    counts = [(f or 0, t + p) for r in rows for f, t, p in zip(
        r["object_f1_per_class"][1:], r["true_objects_per_class"][1:], r["predicted_objects_per_class"][1:], strict=True)]
    found, matched = sum(n for _, n in counts), sum(f * n / 2 for f, n in counts)
    assert metrics["val_object_f1"] == pytest.approx(2 * matched / found)
    lines = table.read_text().splitlines()
    assert lines[0].startswith("record,iou,iou_rest,dice_rest,iou_pet,dice_pet,hd95_pet,") and "page" not in lines[0]
    assert [line.split(",")[0] for line in lines[1:]] == [r["record"] for r in rows]


def test_cli_train_evaluate_predict_export(shards, pet_src, tmp_path, capsys, monkeypatch):
    w = tmp_path / "w"
    args = ["--data", str(shards), "--workdir", str(w), "--deterministic"]
    for o in tiny_overrides(steps=3) + ["train.object_metrics=true"]:
        args += ["--set", o]
    run_module("unet_dist.train", *args, check=True)  # one real `python -m`; the rest run main() here
    summary = json.loads((w / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 1
    (last,) = [e for e in map(json.loads, (w / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"]
    assert {"val_object_f1", "val_seg"} <= set(last) and summary["final_val_object_f1"] == last["val_object_f1"]
    again = run_main(capsys, "unet_dist.train", *args, check=True)  # already done: resumes at 3, trains nothing
    assert "resuming at step 3" in again.stdout
    ev = run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--data", str(shards), check=True)
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    written = json.loads((w / "eval.json").read_text())
    per_record = written.pop("per_record")
    assert written == metrics and not list(w.glob(".eval.json.*"))
    manifest = json.loads((shards / "manifest.json").read_text())
    assert metrics["val_records"] == manifest["val"]["records"]
    assert abs(metrics["val_iou"] - summary["final_val_iou"]) < 1e-6 or metrics["step"] != 3
    assert metrics["val_object_f1"] == last["val_object_f1"] and metrics["val_seg"] == last["val_seg"]
    check_per_record(per_record, metrics, shards, manifest, w / "eval.csv")
    # Predict on odd sizes and modes.
    from PIL import Image

    img = np.asarray(Image.open(pet_src / "images" / "synth_00000.jpg"))
    Image.fromarray(img[..., 0], "L").save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([img, np.full(img.shape[:2], 200, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    rotated = Image.fromarray(img)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(tmp_path / "exif.jpg", exif=exif.tobytes())
    out = tmp_path / "pred"
    for mode in ("tile", "resize"):
        run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "gray.png"),
                 str(tmp_path / "rgba.png"), str(tmp_path / "exif.jpg"), "--out", str(out / mode), "--mode", mode,
                 check=True)
        for stem, shape in (("gray", img.shape[:2]), ("rgba", img.shape[:2]), ("exif", img.shape[1::-1])):
            mask = Image.open(out / mode / f"{stem}_mask.png")
            assert mask.size == (shape[1], shape[0]), (mode, stem)
            assert (out / mode / f"{stem}_overlay.png").exists()
    # float32 unless --set says otherwise; in bfloat16 the probabilities move by its rounding, no more.
    from unet_dist.predict import PROBS

    for precision, extra in (("float32", []), ("mixed_bfloat16", ["--set", "runtime.precision=mixed_bfloat16"])):
        ran = run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "gray.png"), "--probabilities",
                       "--out", str(out / precision), *extra, check=True)
        assert f"; precision {precision}) -> " in ran.stdout, ran.stdout
    f32, bf16 = (np.asarray(Image.open(out / p / f"gray{PROBS}")) for p in ("float32", "mixed_bfloat16"))
    assert 0 < np.abs(f32 - bf16).max() < 0.05, np.abs(f32 - bf16).max()
    # A folder stands for the image files directly in it (the .txt and the subfolder are not images).
    (tmp_path / "folder" / "deeper").mkdir(parents=True)
    for name in ("a.png", "b.jpg"):
        Image.fromarray(img).save(tmp_path / "folder" / name)
    (tmp_path / "folder" / "notes.txt").write_text("x")
    run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "folder"), "--out", str(out / "folder"),
             check=True)
    assert sorted(p.name for p in (out / "folder").iterdir()) == ["a_mask.png", "a_overlay.png", "b_mask.png",
                                                                  "b_overlay.png"]
    # --continue finishes a predict that was stopped: an image whose files are all there is left out.
    (out / "folder" / "b_overlay.png").unlink()  # stopped between b's two files
    before = (out / "folder" / "a_mask.png").stat().st_mtime_ns
    again = run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "folder"), "--out",
                     str(out / "folder"), "--continue", check=True)
    assert f"predict: leaving out 1 of 2 images, predicted in {out / 'folder'} already (--continue)" in again.stderr
    assert "predict: 1 images (" in again.stdout and (out / "folder" / "b_overlay.png").exists()
    assert (out / "folder" / "a_mask.png").stat().st_mtime_ns == before
    again = run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "folder"), "--out",
                     str(out / "folder"), "--continue", check=True)
    assert "leaving out 2 of 2 images" in again.stderr and "predict: 0 images (" in again.stdout  # all done: exit 0
    # --no-overlay: the masks alone, the same ones; --continue then counts an image done without its overlay.
    run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "folder"), "--out", str(out / "plain"),
             "--no-overlay", check=True)
    assert sorted(p.name for p in (out / "plain").iterdir()) == ["a_mask.png", "b_mask.png"]
    for name in ("a_mask.png", "b_mask.png"):
        assert (out / "plain" / name).read_bytes() == (out / "folder" / name).read_bytes(), name
    (out / "plain" / "b_mask.png").unlink()
    again = run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "folder"), "--out",
                     str(out / "plain"), "--no-overlay", "--continue", check=True)
    assert "leaving out 1 of 2 images" in again.stderr and sorted(p.name for p in (out / "plain").iterdir()) == [
        "a_mask.png", "b_mask.png"]
    empty = run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "folder" / "deeper"), "--out",
                     str(out / "empty"))
    assert empty.returncode == 2 and "deeper: a folder without image files (.bmp" in empty.stderr, empty.stderr
    bad = run_main(capsys, "unet_dist.predict", "--workdir", str(tmp_path / "nope"), str(tmp_path / "gray.png"),
                   "--out", str(out))
    assert bad.returncode == 2 and "config.yaml not found" in bad.stderr
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "gray.png").write_bytes((tmp_path / "gray.png").read_bytes())
    clash = run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "gray.png"),
                     str(tmp_path / "sub" / "gray.png"), "--out", str(tmp_path / "clash"))
    assert clash.returncode == 2 and "would both write gray_mask.png" in clash.stderr
    assert not (tmp_path / "clash").exists()
    bad_tile = run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "gray.png"), "--mode", "tile",
                        "--tile", "66", "--out", str(tmp_path / "badtile"))
    assert bad_tile.returncode == 2 and "predict: error: --tile 66: [66, 66] must be divisible" in bad_tile.stderr
    unused = run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "gray.png"), "--tile", "32",
                      "--out", str(tmp_path / "unused"))  # auto takes resize here: no tiles
    assert unused.returncode == 2 and "predict: error: --tile: used in tile mode only, and this is resize mode (the " \
        "training data was resized" in unused.stderr, unused.stderr
    # A write that fails (a full disk) stops predict with one line (the writes are on background threads).
    import unet_dist.atomic

    def full_disk(path):
        raise OSError(28, "No space left on device", str(path))

    with monkeypatch.context() as m:
        m.setattr(unet_dist.atomic, "atomic_path", full_disk)
        full = run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(tmp_path / "gray.png"), "--out",
                        str(tmp_path / "full"))
    assert full.returncode == 1 and full.stdout == "", full.stdout
    assert f"predict: error: writing into {tmp_path / 'full'}: [Errno 28] No space left on device: " in full.stderr
    # Output paths are checked before any work, and nothing the user put there is lost.
    (tmp_path / "afile").write_text("x")
    for module, extra in (("unet_dist.predict", [str(tmp_path / "gray.png")]),
                          ("unet_dist.evaluate", ["--data", str(shards)])):
        bad_out = run_main(capsys, module, "--workdir", str(w), *extra, "--out", str(tmp_path / "afile" / "x"))
        last = bad_out.stderr.strip().splitlines()[-1]
        assert bad_out.returncode == 2 and last.startswith(f"{module[10:]}: error: --out {tmp_path / 'afile'}") \
            and last.endswith("is a file, not a folder"), bad_out.stderr
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    refused = run_main(capsys, "unet_dist.export", "--workdir", str(w), "--out", str(tmp_path / "mine"))
    assert refused.returncode == 2 and "a folder holding more than an earlier export" in refused.stderr
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    from unet_dist.inference import classes_from_probs, load_trained, resize_predict_fn, tile_predict_fn

    model, cfg, _ = load_trained(w)
    images = np.random.default_rng(0).integers(0, 255, (2, 70, 90, 3), dtype=np.uint8)
    # auto takes resize here (the data was resized at conversion); the second export, in tile mode
    # with test-time mirroring, replaces the first, and serves what predict's tiles give.
    for flags, says, fn in (([], "resize mode: the training data was resized", resize_predict_fn(model, cfg)),
                            (["--mode", "tile", "--overlap", "8", "--tta", "flip"],
                             "tile mode: as --mode asks; averaged over 4 mirror images",
                             tile_predict_fn(model, cfg, overlap=8, flip=True))):
        done = run_main(capsys, "unet_dist.export", "--workdir", str(w), "--out", str(tmp_path / "export"), *flags,
                        check=True)
        assert says in done.stdout, done.stdout
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".export.tmp")]
        loaded = tf.saved_model.load(str(tmp_path / "export"))  # held: serve needs its variables alive
        served = loaded.serve(tf.constant(images))
        expect = fn(tf.constant(images))
        assert served["mask"].shape == (2, 70, 90)
        np.testing.assert_allclose(served["probabilities"].numpy(), expect.numpy(), atol=1e-5)
        np.testing.assert_array_equal(served["mask"].numpy(), classes_from_probs(expect).numpy())
    # --precision: the served models compute in that policy; the probabilities move by its rounding.
    done = run_main(capsys, "unet_dist.export", "--workdir", str(w), "--out", str(tmp_path / "export_bf16"),
                    "--precision", "mixed_bfloat16", check=True)
    assert "; precision mixed_bfloat16) -> " in done.stdout, done.stdout
    loaded = tf.saved_model.load(str(tmp_path / "export_bf16"))
    served = loaded.serve(tf.constant(images))["probabilities"]
    assert served.dtype == tf.float32
    diff = np.abs(served.numpy() - resize_predict_fn(model, cfg)(tf.constant(images)).numpy()).max()
    assert 0 < diff < 0.05, diff
    bad_overlap = run_main(capsys, "unet_dist.export", "--workdir", str(w), "--out", str(tmp_path / "export"),
                           "--mode", "tile", "--overlap", "-1")
    assert bad_overlap.returncode == 2 and "export: error: --overlap -1: must be >= 0" in bad_overlap.stderr
    assert (tmp_path / "export" / "saved_model.pb").exists()  # the earlier export is left whole


def test_evaluator_traces_its_step_once(shards):
    from unet_dist.data.pipeline import load_manifest
    from unet_dist.distribute import make_runtime
    from unet_dist.trainer import Evaluator, build_model_and_optimizer

    cfg = load_config(None, tiny_overrides())
    runtime = make_runtime(cfg)
    model, _ = build_model_and_optimizer(cfg, runtime, 1e-3)
    evaluator = Evaluator(model, cfg, runtime, shards, load_manifest(shards))
    first, _ = evaluator()
    again, _ = evaluator()
    assert first == again and first["val_records"] > 0
    # One trace for full batches and at most one for a smaller last batch, whatever the number of calls.
    assert evaluator.eval_step.experimental_get_tracing_count() <= 2


def test_deep_supervision_trains_its_heads_and_serves_the_main_output(shards, tmp_path):
    # model.deep_supervision: the heads on decoder levels 1..depth-2 are trained through the loss,
    # saved and resumed with the model, and left out of evaluation, prediction and export.
    from unet_dist.checkpoint import init_weights, restore_trained
    from unet_dist.distribute import make_runtime
    from unet_dist.inference import load_predictor, load_trained
    from unet_dist.losses import training_loss
    from unet_dist.model import build_unet
    from unet_dist.trainer import build_model_and_optimizer, make_train_step

    deep = tiny_overrides(steps=2) + ["model.depth=3", "model.deep_supervision=true", "train.eval_every_steps=2"]
    cfg = load_config(None, deep)
    runtime = make_runtime(cfg)
    model, optimizer = build_model_and_optimizer(cfg, runtime, 1e-2)
    step = make_train_step(model, optimizer, training_loss(cfg), runtime, 4, False)
    rng = np.random.default_rng(0)
    batch = {"image": tf.constant(rng.random((4, 64, 64, 3)), tf.float32),
             "mask": tf.constant(rng.integers(0, 2, (4, 64, 64, 1)), tf.uint8)}
    before = {v.path: v.numpy() for v in model.trainable_variables}
    step(batch)
    moved = {v.path for v in model.trainable_variables if not np.array_equal(before[v.path], v.numpy())}
    assert {"aux1_logits/kernel", "aux1_logits/bias", "logits/kernel", "up1_conv0/kernel"} <= moved
    # Through the trainer, then the CLIs' view of the run: the main output alone.
    s = train(cfg, shards, tmp_path / "deep")
    assert s["final_val_iou"] is not None
    served, _, _ = load_trained(tmp_path / "deep")
    assert len(served.outputs) == 1 and len(restore_trained(tmp_path / "deep", heads=True)[0].outputs) == 2
    assert load_predictor([tmp_path / "deep"])(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).shape == (40, 56, 1)
    with pytest.raises(ConfigError, match=r"model.deep_supervision: checkpoint True, config False"):
        train(load_config(None, deep[:-2] + ["model.deep_supervision=false"]), shards, tmp_path / "deep")
    # A plain run resumes from a model.json written before the key (its default then).
    plain = load_config(None, tiny_overrides(steps=1) + ["model.depth=3"])
    train(plain, shards, tmp_path / "plain")
    signature = tmp_path / "plain" / "checkpoints" / "model.json"
    signature.write_text(json.dumps({k: v for k, v in json.loads(signature.read_text()).items()
                                     if k != "deep_supervision"}))
    plain.train.steps = 2
    assert train(plain, shards, tmp_path / "plain")["start_step"] == 1
    # Fine-tuning between the two: the heads start new where the source has none.
    assert init_weights(build_unet(cfg.model, (64, 64)), tmp_path / "plain").endswith(
        "; the deep-supervision head aux1_logits starts new")
    assert "starts new" not in init_weights(build_unet(plain.model, (64, 64)), tmp_path / "deep")


def test_patch_training_evaluates_whole_images(shards, tmp_path):
    cfg = load_config(None, tiny_overrides(steps=3) + ["data.patch_size=[32, 32]", "train.eval_every_steps=3"])
    s = train(cfg, shards, tmp_path / "w")
    assert s["final_val_iou"] is not None and s["steps"] == 3
    # The checkpoint serves whole images: evaluation saw every val record at 64x64.
    events = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [e["val_records"] for e in events if e["event"] == "eval"][-1] == json.loads(
        (shards / "manifest.json").read_text())["val"]["records"]


def _model_and_checkpoints(workdir, precision: str = "float32"):
    """(model, optimizer, Checkpoints of WORKDIR) of the tiny U-Net, built as training builds them."""
    from unet_dist.checkpoint import Checkpoints
    from unet_dist.distribute import Runtime
    from unet_dist.trainer import build_model_and_optimizer

    cfg = load_config(None, tiny_overrides() + [f"runtime.precision={precision}"])
    model, opt = build_model_and_optimizer(cfg, Runtime(cfg, "test"), 1e-3)
    return model, opt, Checkpoints(Runtime(cfg, "test"), workdir, model, opt, cfg)


@pytest.mark.parametrize("first,second", [("float32", "mixed_float16"), ("mixed_float16", "float32"),
                                          ("mixed_float16", "mixed_float16")])
def test_checkpoints_resume_under_another_precision(tmp_path, first, second):
    # A run trained on a GPU in float16 continues on a CPU in float32, and the reverse: the
    # optimizer's state is restored whether or not a loss-scale wrapper is around it, and the
    # loss scale itself when both sides have one. (Saving the wrapper in the optimizer's place
    # made the float32 <-> float16 restores fail on mismatched dtypes.)
    model, opt, ckpts = _model_and_checkpoints(tmp_path, first)
    grads = [tf.random.stateless_normal(v.shape, seed=(i, 0)) for i, v in enumerate(model.trainable_variables)]
    for _ in range(2):
        opt.apply(grads, model.trainable_variables)
    if first == "mixed_float16":
        opt.dynamic_scale.assign(1024.0)
    ckpts.save(2)
    inner = getattr(opt, "inner_optimizer", opt)
    saved = {"weights": [v.numpy() for v in model.weights], "optimizer": [v.numpy() for v in inner.variables]}

    model2, opt2, ckpts2 = _model_and_checkpoints(tmp_path, second)
    assert ckpts2.restore_latest() == 2
    inner2 = getattr(opt2, "inner_optimizer", opt2)
    assert int(inner2.iterations.numpy()) == 2
    for a, b in zip(saved["weights"], [v.numpy() for v in model2.weights], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(saved["optimizer"], [v.numpy() for v in inner2.variables], strict=True):
        np.testing.assert_array_equal(a, b)
    if second == "mixed_float16":
        assert float(opt2.dynamic_scale.numpy()) == (1024.0 if first == "mixed_float16" else 32768.0)


def test_training_stops_at_the_target_val_iou_with_a_checkpoint(shards, tmp_path):
    # Any IoU reaches a target this low: the first evaluation (step 2) stops the run and saves it.
    cfg = load_config(None, tiny_overrides(steps=10) + ["train.eval_every_steps=2", "train.target_val_iou=0.001"])
    s = train(cfg, shards, tmp_path / "w")
    assert s["steps"] == s["target_reached_at_step"] == 2 and 0 < s["time_to_target_s"] <= s["wall_s"], s
    assert tf.train.latest_checkpoint(str(tmp_path / "w" / "checkpoints")).endswith("ckpt-2")
    events = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert max(e["step"] for e in events if e["event"] == "train") == 2
    # Rerun (a requeued job): it had stopped at its target, so it is evaluated and trains no further.
    again = train(cfg, shards, tmp_path / "w")
    assert again["start_step"] == again["steps"] == 2, again
    assert tf.train.latest_checkpoint(str(tmp_path / "w" / "checkpoints")).endswith("ckpt-2")


def test_a_resumed_run_judges_a_new_best_against_the_best_so_far(tmp_path):
    # The training loop saves a step before evaluating it, so the latest checkpoint holds the best
    # IoU from before that evaluation and the best checkpoint the one after. A resume must take the
    # higher, or a worse model replaces the saved best.
    *_, ckpts = _model_and_checkpoints(tmp_path)
    ckpts.save(2)
    assert ckpts.save_best(2, 0.7)
    *_, resumed = _model_and_checkpoints(tmp_path)
    assert resumed.restore_latest() == 2 and float(resumed.best_iou.numpy()) == pytest.approx(0.7)
    assert not resumed.save_best(4, 0.6)
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints" / "best")).endswith("best-2")


def test_the_best_checkpoint_holds_the_weights_and_the_latest_the_optimizer_too(tmp_path):
    # The best checkpoint is read for its weights (predict, export, evaluate, init_from) and its
    # best IoU (a resume); the optimizer's state is the latest checkpoint's, for resuming.
    from unet_dist.checkpoint import restore_trained
    from unet_dist.config import config_yaml

    model, opt, ckpts = _model_and_checkpoints(tmp_path)
    opt.apply([tf.ones_like(v) for v in model.trainable_variables], model.trainable_variables)
    ckpts.save(1)
    assert ckpts.save_best(1, 0.5)
    (tmp_path / "config.yaml").write_text(config_yaml(ckpts.cfg))

    def names(folder):
        return {n for n, _ in tf.train.list_variables(tf.train.latest_checkpoint(str(folder)))}

    best, latest = names(tmp_path / "checkpoints" / "best"), names(tmp_path / "checkpoints")
    assert not any(n.startswith("optimizer/") for n in best), sorted(best)
    assert any(n.startswith("optimizer/") for n in latest)
    assert {"step/.ATTRIBUTES/VARIABLE_VALUE", "best_iou/.ATTRIBUTES/VARIABLE_VALUE"} <= best
    trained, _, path = restore_trained(tmp_path, "best", heads=True)
    assert path.endswith("best-1")
    for ours, theirs in zip(model.weights, trained.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def test_no_resume_moves_the_earlier_run_aside_usable(shards, tmp_path, monkeypatch):
    import unet_dist.trainer as T
    from unet_dist.distribute import Runtime
    from unet_dist.inference import load_trained

    cfg = load_config(None, tiny_overrides(steps=2))
    train(cfg, shards, tmp_path / "w")
    monkeypatch.setattr(T.time, "strftime", lambda fmt: "previous-20261202-120000")
    T.prepare_workdir(tmp_path / "w", Runtime(cfg, "test"), resume=False)
    old = tmp_path / "w" / "previous-20261202-120000"
    for name in ("checkpoints", "metrics.jsonl", "summary.json", "config.yaml", "data.json"):
        assert (old / name).exists() and not (tmp_path / "w" / name).exists(), name
    # What evaluate, predict and export need to use the moved run: its own config and checkpoints.
    model, moved_cfg, path = load_trained(old, "latest")
    assert moved_cfg.model.base_filters == 4 and path.endswith("ckpt-2")
    # A second restart in the same second gets a folder of its own.
    (tmp_path / "w" / "checkpoints").mkdir()
    (tmp_path / "w" / "config.yaml").write_text("second")
    T.prepare_workdir(tmp_path / "w", Runtime(cfg, "test"), resume=False)
    assert (old.parent / f"{old.name}-2" / "config.yaml").read_text() == "second"
    assert (old / "config.yaml").read_text() != "second"


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_last(tmp_path, monkeypatch):
    import errno

    from unet_dist.checkpoint import CheckpointError

    *_, ckpts = _model_and_checkpoints(tmp_path)
    ckpts.save(1)
    assert ckpts.save_best(1, 0.5)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for manager in (ckpts._latest, ckpts._best):
        monkeypatch.setattr(manager, "save", full)
    with pytest.raises(CheckpointError, match=r"^could not write the checkpoint of step 2 to .*checkpoints: .*No "
                                              r"space left on device.*; the latest complete one there is .*ckpt-1$"):
        ckpts.save(2)
    with pytest.raises(CheckpointError, match=r"^could not write the checkpoint of step 2 to .*checkpoints/best: "
                                              r".*No space left.*; the latest complete one there is .*best-1$"):
        ckpts.save_best(2, 0.9)
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-1")


def test_data_without_a_validation_split_trains_without_evaluating(pet_src, tmp_path):
    # --val-fraction 0 (a final model on every image): training used to stop at its first
    # evaluation with "no val shards"; it now trains, evaluates nothing and keeps no best checkpoint.
    from unet_dist.data.convert import convert
    from unet_dist.inference import load_trained

    data, w = tmp_path / "all", tmp_path / "w"
    convert(pet_src, data, image_size=(64, 64), shards=2, val_fraction=0, workers=1, progress=False)
    with pytest.raises(ConfigError, match=r"train.target_val_iou needs a validation split, but .* no val records"):
        train(load_config(None, tiny_overrides(steps=3) + ["train.target_val_iou=0.5"]), data, w)
    with pytest.raises(ConfigError, match=r"train.early_stop_patience needs a validation split"):
        train(load_config(None, tiny_overrides(steps=3) + ["train.early_stop_patience=2"]), data, w)
    assert not w.exists()  # refused before any work
    s = train(load_config(None, tiny_overrides(steps=3) + ["train.eval_every_steps=1",
                                                           "train.checkpoint_every_steps=2"]), data, w)
    assert s["steps"] == 3 and s["final_val_iou"] is None and s["best_val_iou"] is None
    events = [json.loads(line)["event"] for line in (w / "metrics.jsonl").read_text().splitlines()]
    assert events.count("train") == 3 and "eval" not in events
    assert sorted(p.name for p in (w / "checkpoints").glob("ckpt-*.index")) == ["ckpt-2.index", "ckpt-3.index"]
    assert not list((w / "checkpoints").glob("best/*.index"))
    assert load_trained(w)[2].endswith("ckpt-3")  # predict and export: 'best' falls back to the latest
    again = train(load_config(None, tiny_overrides(steps=3)), data, w)  # already trained: nothing to evaluate
    assert again["start_step"] == 3 and again["final_val_iou"] is None
    ev = run_module("unet_dist.evaluate", "--workdir", str(w), "--data", str(data))
    assert ev.returncode == 2 and ev.stderr.strip().splitlines()[-1] == (
        f"evaluate: error: {data}/manifest.json: no val shards (convert with --val-fraction > 0)"), ev.stderr
    # --split train evaluates every training record: how a test set converted with --val-fraction 0
    # is scored. Its own file, so eval.json (the validation result) is never overwritten by it.
    ev = run_module("unet_dist.evaluate", "--workdir", str(w), "--data", str(data), "--split", "train", check=True)
    metrics = json.loads((w / "eval_train.json").read_text())
    per_record = metrics.pop("per_record")
    assert metrics == json.loads(ev.stdout.strip().splitlines()[-1]) and not (w / "eval.json").exists()
    assert metrics["split"] == "train" and metrics["val_records"] == 48 and 0 <= metrics["val_iou"] <= 1
    assert len(per_record) == 48 and len((w / "eval_train.csv").read_text().splitlines()) == 1 + 48


def test_training_and_evaluation_leave_out_the_ignored_pixels(pet_src, tmp_path, capsys):
    # Data converted with --ignore-value 3 (the trimaps' border): training runs on it, and evaluate
    # --data counts the labelled pixels alone, as a count made here from the records shows;
    # evaluate --images reads the masks the same way, from the run's data.json.
    from PIL import Image

    from unet_dist.data.convert import IGNORE, convert
    from unet_dist.data.pipeline import eval_dataset
    from unet_dist.inference import load_trained
    from unet_dist.metrics import predict_classes

    data, w = tmp_path / "data", tmp_path / "w"
    convert(pet_src, data, image_size=(64, 64), shards=2, val_fraction=0.25, workers=1, progress=False,
            ignore_value=3)
    s = train(load_config(None, tiny_overrides(steps=3) + ["train.eval_every_steps=3"]), data, w)
    assert np.isfinite(s["final_val_loss"]) and json.loads((w / "data.json").read_text())["ignore_value"] == 3
    ev = run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--data", str(data), check=True)
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])
    model, cfg, _ = load_trained(w)
    right = labelled = 0
    for batch in eval_dataset(data, cfg, 8):
        truth = batch["mask"].numpy()[..., 0]
        pred = predict_classes(model(batch["image"], training=False)).numpy()
        right += int(((pred == truth) & (truth != IGNORE)).sum())
        labelled += int((truth != IGNORE).sum())
    assert 0 < labelled < metrics["val_records"] * 64 * 64
    assert abs(metrics["val_pixel_acc"] - right / labelled) < 1e-9, (metrics["val_pixel_acc"], right / labelled)
    # evaluate --images: the border left out of every image's count, and counted when data.json no longer says so.
    images = tmp_path / "images"
    for sub in ("images", "annotations/trimaps"):
        (images / sub).mkdir(parents=True)
    for path in sorted((pet_src / "images").iterdir())[:4]:
        shutil.copy(path, images / "images")
        shutil.copy(pet_src / "annotations" / "trimaps" / f"{path.stem}.png", images / "annotations" / "trimaps")
    mask = np.asarray(Image.open(images / "annotations" / "trimaps" / f"{path.stem}.png"))
    assert (mask == 3).any()
    left_out = json.loads(run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--images", str(images),
                                   check=True).stdout.strip().splitlines()[-1])
    meta = json.loads((w / "data.json").read_text())
    (w / "data.json").write_text(json.dumps({**meta, "ignore_value": None}))
    counted = json.loads(run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--images", str(images),
                                  check=True).stdout.strip().splitlines()[-1])
    assert left_out["images"] == counted["images"] == 4 and left_out["pixel_acc"] != counted["pixel_acc"]
    # Masks that are the border alone leave nothing to score: one line, not NaN scores.
    (w / "data.json").write_text(json.dumps(meta))
    for trimap in (images / "annotations" / "trimaps").iterdir():
        Image.fromarray(np.full_like(np.asarray(Image.open(trimap)), 3)).save(trimap)
    void = run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--images", str(images))
    assert void.returncode == 1 and void.stderr.strip().splitlines()[-1] == (
        f"evaluate: error: --images {images}: every mask pixel of its 4 images is the ignore value 3 of the "
        "run's data.json; nothing to score"), void.stderr


def test_colour_coded_masks_train_evaluate_and_predict_in_their_colours(tmp_path, capsys):
    # convert --colors: the run's data.json keeps the colours, evaluate --images reads new colour masks
    # with them, and predict's masks are coded in them (a palette PNG that reads back as the colours).
    from PIL import Image

    from unet_dist.data.convert import convert

    src = colour_coded_dir(tmp_path, n=4)
    colors = tmp_path / "colors.txt"
    colors.write_text("0 0 0 background\n255 0 0 car\n0 255 0 road\n")
    data, w = tmp_path / "data", tmp_path / "w"
    convert(src, data, layout="folders", classes="multiclass", colors=colors, image_size=(64, 64), shards=1,
            val_fraction=0.25, workers=1, progress=False)
    train(load_config(None, tiny_overrides(steps=3) + ["model.num_classes=3", "train.loss=cce"]), data, w)
    assert json.loads((w / "data.json").read_text())["colors"] == [[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    scored = json.loads(run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--images", str(src),
                                 check=True).stdout.strip().splitlines()[-1])
    assert scored["images"] == 4 and len(scored["iou_per_class"]) == 3
    run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(src / "images"), "--out", str(tmp_path / "pred"),
             check=True)
    with Image.open(tmp_path / "pred" / "c0_mask.png") as mask:
        ids, shown, coded = np.asarray(mask), np.asarray(mask.convert("RGB")), mask.getpalette()[:9]
    assert coded == [0, 0, 0, 255, 0, 0, 0, 255, 0], coded
    expected = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)[ids]
    np.testing.assert_array_equal(shown, expected)
    # The SavedModel serves the same colours beside the class ids.
    run_main(capsys, "unet_dist.export", "--workdir", str(w), "--out", str(tmp_path / "export"), check=True)
    loaded = tf.saved_model.load(str(tmp_path / "export"))  # held: its variables live as long as it does
    with Image.open(src / "images" / "c0.png") as im:
        served = loaded.serve(np.asarray(im.convert("RGB"))[None])
    np.testing.assert_array_equal(served["mask"].numpy()[0], ids)
    np.testing.assert_array_equal(served["colors"].numpy()[0], expected)


def test_init_from_another_run_copies_its_weights_layer_by_layer(shards, tmp_path, capsys):
    # Fine-tuning: a new run starts from another run's weights (best, else latest checkpoint) with a
    # fresh optimizer and step 0. Only model.num_classes may differ; the output layer then starts new.
    from unet_dist.checkpoint import init_weights
    from unet_dist.inference import load_trained
    from unet_dist.model import build_unet

    src = tmp_path / "src"
    train(load_config(None, tiny_overrides(steps=2)), shards, src)
    trained, _, path = load_trained(src)
    theirs = {layer.name: layer.get_weights() for layer in trained.layers}

    def copied(model):
        return {layer.name for layer in model.layers if layer.weights
                and all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), theirs[layer.name], strict=True))}

    with_weights = {layer.name for layer in trained.layers if layer.weights}
    same = build_unet(load_config(None, tiny_overrides()).model, (64, 64))
    assert copied(same) == set()  # freshly initialised
    assert init_weights(same, src) == f"weights of {len(with_weights)} layers from {path}"
    assert copied(same) == with_weights
    three = build_unet(load_config(None, tiny_overrides() + ["model.num_classes=3", "train.loss=cce"]).model, (64, 64))
    line = init_weights(three, src)
    assert line.endswith("; the output layer starts new (1 units there, 3 here)")
    assert copied(three) == with_weights - {"logits"}
    # Another model.in_channels: the input convolution's kernel is adapted. To one channel, summed:
    # a gray image then gives exactly what its RGB copy gave.
    gray = build_unet(load_config(None, tiny_overrides() + ["model.in_channels=1"]).model, (64, 64))
    assert init_weights(gray, src).endswith("; the input convolution's kernel is adapted from 3 to 1 channels "
                                            "(summed over them)")
    assert copied(gray) == with_weights - {"down0_conv0"}
    x = np.random.default_rng(0).random((2, 64, 64, 1)).astype(np.float32)
    np.testing.assert_allclose(gray(x, training=False), trained(np.repeat(x, 3, axis=-1), training=False), atol=1e-5)
    four = build_unet(load_config(None, tiny_overrides() + ["model.in_channels=4"]).model, (64, 64))
    assert "adapted from 3 to 4 channels (repeated, scaled by 3/4)" in init_weights(four, src)
    kernel = theirs["down0_conv0"][0]
    np.testing.assert_allclose(four.get_layer("down0_conv0").get_weights()[0],
                               np.concatenate([kernel, kernel[:, :, :1]], axis=2) * 0.75, rtol=1e-6)
    wider = build_unet(load_config(None, tiny_overrides() + ["model.base_filters=8"]).model, (64, 64))
    with pytest.raises(ConfigError, match=rf"^train.init_from {src}: its model is not this one \(layer down0_conv0: "
                                          r"\[\(3, 3, 3, 4\)\] there, \[\(3, 3, 3, 8\)\] here; .*only model.num_classes"):
        init_weights(wider, src)
    assert copied(wider) == set()  # nothing copied before the check
    with pytest.raises(ConfigError, match=rf"^train.init_from {tmp_path}: .*config.yaml not found"):
        init_weights(same, tmp_path)
    # Through the trainer: the run says where its weights came from; a resumed run does not re-read them.
    cfg = load_config(None, tiny_overrides(steps=1) + [f"train.init_from={src}"])
    capsys.readouterr()
    train(cfg, shards, tmp_path / "tuned")
    assert f"unet_dist: train.init_from: weights of {len(with_weights)} layers from {path}" in capsys.readouterr().out
    cfg.train.steps = 2
    assert train(cfg, shards, tmp_path / "tuned")["start_step"] == 1
    assert "train.init_from" not in capsys.readouterr().out


def _evaluations_scoring(monkeypatch, ious: list[float], dice: list[float] | None = None) -> None:
    """Makes the trainer's evaluations return these val IoUs (and val Dice, else the IoUs), one after the other."""
    import unet_dist.trainer as T

    it = iter(zip(ious, dice or ious, strict=True))

    def fake(self, panels=0, progress=None):
        iou, d = next(it)
        return {"val_loss": 1 - iou, "val_iou": iou, "val_dice": d, "val_pixel_acc": iou}, np.zeros((0, 1, 1, 3),
                                                                                                    np.uint8)

    monkeypatch.setattr(T.Evaluator, "__call__", fake)


def test_time_to_target_counts_the_calls_before_a_resume(shards, tmp_path, monkeypatch):
    # A preempted run's time to target is the time it trained, all calls included; wall_s and
    # images_per_s stay this call's. The seconds trained travel in the checkpoint.
    _evaluations_scoring(monkeypatch, [0.5, 0.95])
    target = tiny_overrides(steps=2) + ["train.eval_every_steps=2", "train.target_val_iou=0.9"]
    first = train(load_config(None, target), shards, tmp_path / "w")
    ckdir = str(tmp_path / "w" / "checkpoints")
    saved = tf.train.load_checkpoint(tf.train.latest_checkpoint(ckdir)).get_tensor("seconds/.ATTRIBUTES/VARIABLE_VALUE")
    assert 0 < saved <= first["wall_s"] and first["run_wall_s"] == first["wall_s"], (saved, first)
    # As if the first call had trained for 1000 s: the second one's clock goes on from there.
    *_, ckpts = _model_and_checkpoints(tmp_path / "w")
    assert ckpts.restore_latest() == 2
    ckpts.save(2, 1000.0)
    s = train(load_config(None, target + ["train.steps=4"]), shards, tmp_path / "w")
    assert s["start_step"] == 2 and s["target_reached_at_step"] == 4, s
    assert s["run_wall_s"] == pytest.approx(1000 + s["wall_s"]) and s["wall_s"] < 1000, s
    assert 1000 < s["time_to_target_s"] <= s["run_wall_s"], s
    later = tf.train.load_checkpoint(tf.train.latest_checkpoint(ckdir)).get_tensor("seconds/.ATTRIBUTES/VARIABLE_VALUE")
    assert 1000 < later <= s["run_wall_s"], later


def test_early_stop_patience_stops_after_evaluations_without_a_new_best(shards, tmp_path, monkeypatch, capsys):
    # Evaluations every step with val IoUs 0.5, 0.6, 0.55, 0.58, 0.7, ...: with patience 2 the run
    # stops at step 4 (two evaluations after the best of step 2), saves that step, and says so.
    _evaluations_scoring(monkeypatch, [0.5, 0.6, 0.55, 0.58, 0.7, 0.8, 0.9, 0.95])
    cfg = load_config(None, tiny_overrides(steps=8) + ["train.eval_every_steps=1", "train.early_stop_patience=2"])
    s = train(cfg, shards, tmp_path / "w")
    assert s["steps"] == 4 and s["early_stopped_at_step"] == 4 and s["best_val_iou"] == 0.6
    assert s["final_val_iou"] == 0.58 and s["target_reached_at_step"] is None
    events = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [1, 2, 3, 4]
    assert "step 4: no new best val IoU in 2 evaluations (train.early_stop_patience); stopping, best 0.6000" \
        in capsys.readouterr().out
    assert (tmp_path / "w" / "checkpoints" / "ckpt-4.index").exists()
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints" / "best").glob("*.index")) == ["best-2.index"]


def test_early_stop_patience_counts_across_a_resume_and_a_stopped_run_stays_stopped(shards, tmp_path, monkeypatch,
                                                                                     capsys):
    # The val IoUs of the test above, with patience 2, trained in two runs: to step 3 (the last two
    # evaluations 0.6, 0.55: one without a new best), then on to 8. The second run stops at step 4
    # as the uninterrupted run does. A third, rerun as a requeued job would be, trains no further.
    _evaluations_scoring(monkeypatch, [0.5, 0.6, 0.55, 0.58, 0.7, 0.59])
    w = tmp_path / "w"
    patience = tiny_overrides(steps=8) + ["train.eval_every_steps=1", "train.early_stop_patience=2"]
    first = train(load_config(None, patience + ["train.steps=3"]), shards, w)
    assert first["steps"] == 3 and first["early_stopped_at_step"] is None
    s = train(load_config(None, patience), shards, w)
    assert s["start_step"] == 3 and s["steps"] == 4 and s["early_stopped_at_step"] == 4 and s["best_val_iou"] == 0.6
    assert tf.train.latest_checkpoint(str(w / "checkpoints")).endswith("ckpt-4")
    capsys.readouterr()
    again = train(load_config(None, patience), shards, w)  # evaluates step 4's model (0.7), trains nothing
    assert again["start_step"] == again["steps"] == 4 and again["final_val_iou"] == 0.7
    assert (f"{w} is already trained to step 4 (it stopped there: no new best val IoU in 2 evaluations "
            "(train.early_stop_patience 2))") in capsys.readouterr().out
    assert tf.train.latest_checkpoint(str(w / "checkpoints")).endswith("ckpt-4")
    assert json.loads((w / "summary.json").read_text())["early_stopped_at_step"] == 4  # the run's own, kept
    events = [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "eval"] == [1, 2, 3, 4]
    # A larger patience trains on from there, still counting the evaluations since step 2's best:
    # step 5's is the third.
    more = train(load_config(None, patience + ["train.early_stop_patience=3"]), shards, w)
    assert more["start_step"] == 4 and more["steps"] == more["early_stopped_at_step"] == 5


def test_early_stop_min_delta_asks_more_than_a_creep_of_small_gains_also_across_a_resume(shards, tmp_path,
                                                                                         monkeypatch, capsys):
    # 0.605 and 0.608 are new bests for the best checkpoint but not by more than 0.01 over 0.6, so
    # with patience 2 the run stops at step 4, also when it was resumed at step 3 in between.
    _evaluations_scoring(monkeypatch, [0.5, 0.6, 0.605, 0.608, 0.9])
    w = tmp_path / "w"
    patience = tiny_overrides(steps=8) + ["train.eval_every_steps=1", "train.early_stop_patience=2",
                                          "train.early_stop_min_delta=0.01"]
    assert train(load_config(None, patience + ["train.steps=3"]), shards, w)["early_stopped_at_step"] is None
    s = train(load_config(None, patience), shards, w)
    assert s["steps"] == s["early_stopped_at_step"] == 4 and s["best_val_iou"] == 0.608, s
    assert ("step 4: no new best val IoU in 2 evaluations by more than 0.01 (train.early_stop_min_delta) "
            "(train.early_stop_patience); stopping, best 0.6080") in capsys.readouterr().out
    assert sorted(p.name for p in (w / "checkpoints" / "best").glob("*.index")) == ["best-4.index"]
    with pytest.raises(ConfigError, match=r"train.early_stop_min_delta.*in \[0, 1\)"):
        load_config(None, ["train.early_stop_min_delta=-0.1"])


def test_train_monitor_picks_the_best_checkpoint_and_counts_the_patience(shards, tmp_path, monkeypatch, capsys):
    # Monitored by val Dice, the best is step 3's (0.7) and two evaluations without a better Dice
    # stop the run at step 5; by val IoU it would have been step 2's, stopping at step 4.
    _evaluations_scoring(monkeypatch, [0.5, 0.9, 0.6, 0.6, 0.6, 0.6], [0.5, 0.6, 0.7, 0.65, 0.66, 0.2])
    w = tmp_path / "w"
    over = tiny_overrides(steps=6) + ["train.eval_every_steps=1", "train.early_stop_patience=2"]
    s = train(load_config(None, over + ["train.monitor=val_dice"]), shards, w)
    assert s["steps"] == s["early_stopped_at_step"] == 5, s
    assert (s["monitor"], s["best_monitored"], s["best_val_iou"]) == ("val_dice", 0.7, None), s
    out = capsys.readouterr().out
    assert "step 3: new best val_dice 0.7000 (was 0.6000)" in out and "no new best val_dice in 2 evaluations" in out
    assert sorted(p.name for p in (w / "checkpoints" / "best").glob("*.index")) == ["best-3.index"]
    # Resumed by val IoU, no patience: the best kept by Dice is of another metric, so step 6's
    # evaluation replaces it though step 2's IoU was higher.
    s = train(load_config(None, tiny_overrides(steps=6) + ["train.eval_every_steps=1"]), shards, w)
    assert s["start_step"] == 5 and s["best_monitored"] == s["best_val_iou"] == 0.6, s
    assert f"train.monitor is val_iou, and was val_dice when {w / 'checkpoints' / 'best'} was kept" in (
        capsys.readouterr().out)
    assert sorted(p.name for p in (w / "checkpoints" / "best").glob("*.index")) == ["best-6.index"]
    for bad, message in ((["train.monitor=val_object_f1"], "only with train.object_metrics: true"),
                         (["train.monitor=val_fg_iou", "model.num_classes=3", "train.loss=cce"], "num_classes 2"),
                         (["train.monitor=val_loss"], "'val_iou' | 'val_fg_iou'")):
        with pytest.raises(ConfigError, match=f"train.monitor.*{re.escape(message)}"):
            load_config(None, bad)


def test_object_postprocess_scores_the_objects_predict_would_give(shards, tmp_path, capsys):
    # train.object_postprocess: val_object_f1 and val_seg of the masks' objects after predict's
    # --postprocess (small ones removed, then grown); the pixel metrics stay the network's.
    from unet_dist.data.pipeline import eval_dataset, load_manifest
    from unet_dist.inference import load_trained
    from unet_dist.objects import FIELDS, components, count_row, grown, matched_objects, pooled
    from unet_dist.postprocess import remove_small

    w = tmp_path / "w"
    value = "grow:1+min-size:6"  # written in any order, as --postprocess
    s = train(load_config(None, tiny_overrides(steps=2) + [
        "train.object_metrics=true", f"train.object_postprocess={value}", "train.monitor=val_seg"]), shards, w)
    (logged,) = [e for e in map(json.loads, (w / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"]
    model, cfg, _ = load_trained(w, "latest")
    from unet_dist.surface import SUMS, boundary_rows, boundary_sums, pooled_boundary

    rows, raw_rows, changed, outlines = np.zeros(FIELDS), np.zeros(FIELDS), [0, 0], np.zeros(SUMS)
    for batch in eval_dataset(shards, cfg, 4, manifest=load_manifest(shards)):
        pred = np.argmax(np.concatenate([1 - (p := model(batch["image"]).numpy()), p], -1), -1)
        for p, m in zip(pred, batch["mask"].numpy()[..., 0], strict=True):
            kept = remove_small(p, (1,), 6)  # by hand: removed, then each object grown by a pixel
            labels, n = components(kept, 1)
            objects = grown(labels, kept == 0, 1)
            changed[0] += int((kept != p).sum())
            changed[1] += int((objects != labels).sum())
            rows += count_row(matched_objects(kept, m, 1, objects=(objects, n)))
            raw_rows += count_row(matched_objects(p, m, 1))
            outlines += boundary_sums(boundary_rows(kept, m, 2))  # the outlines of the mask as written
    assert min(changed) > 0, changed  # both steps changed this model's objects
    want, raw = pooled(np.stack([np.zeros(FIELDS), rows])), pooled(np.stack([np.zeros(FIELDS), raw_rows]))
    assert want != raw
    assert (logged["val_object_f1"], logged["val_seg"]) == pytest.approx((want["object_f1"], want["seg"]), abs=1e-12)
    assert s["best_monitored"] == pytest.approx(want["seg"])
    assert outlines[0] > 0 and [logged[f"val_{key}"] for key in ("hd95", "assd", "nsd")] == pytest.approx(
        list(pooled_boundary(outlines).values()), abs=1e-9)
    # evaluate --data scores the run's objects the same way, and says how.
    ev = json.loads(run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--data", str(shards),
                             "--checkpoint", "latest", check=True).stdout.strip().splitlines()[-1])
    assert (ev["val_object_f1"], ev["val_seg"], ev["val_iou"]) == (logged["val_object_f1"], logged["val_seg"],
                                                                   logged["val_iou"])
    assert (ev["val_hd95"], ev["val_nsd"]) == pytest.approx((logged["val_hd95"], logged["val_nsd"]), abs=1e-12)
    assert ev["object_postprocess"] == "min-size:6:1+grow:1:1"
    # Resumed with other post-processing, the best checkpoint's val_seg was of other objects.
    train(load_config(None, tiny_overrides(steps=3) + ["train.object_metrics=true", "train.monitor=val_seg",
                                                        "train.object_postprocess=grow:1"]), shards, w)
    assert (f"train.monitor is val_seg of objects after grow:1, and was val_seg of objects after {value} when"
            in capsys.readouterr().out)
    for bad, message in ((["train.object_postprocess=grow:1"], "none unless train.object_metrics is true"),
                         (["train.object_metrics=true", "train.object_postprocess=grow:0"],
                          "'grow:0': grow takes a whole number of pixels from 1 to 64")):
        with pytest.raises(ConfigError, match=f"train.object_postprocess.*{re.escape(message)}"):
            load_config(None, bad)


def test_evaluate_images_scores_predict_masks_at_the_images_own_sizes(shards, pet_src, tmp_path, capsys):
    # evaluate --images: what predict would write, scored against the masks at the images' own sizes
    # (the records of --data are the size conversion made them).
    import shutil

    from PIL import Image

    from unet_dist.evaluate import main as evaluate_main
    from unet_dist.metrics import scores
    from unet_dist.predict import main as predict_main
    from unet_dist.surface import boundary_rows, boundary_scores, per_class

    w = tmp_path / "w"
    train(load_config(None, tiny_overrides(steps=3)), shards, w)
    src = tmp_path / "test"
    (src / "images").mkdir(parents=True)
    (src / "annotations" / "trimaps").mkdir(parents=True)
    stems = sorted(p.stem for p in (pet_src / "images").iterdir())[:5]
    for stem in stems:
        shutil.copy(pet_src / "images" / f"{stem}.jpg", src / "images")
        shutil.copy(pet_src / "annotations" / "trimaps" / f"{stem}.png", src / "annotations" / "trimaps")
    shutil.copy(pet_src / "images" / f"{stems[0]}.jpg", src / "images" / "nomask.jpg")
    shutil.copy(pet_src / "images" / f"{stems[0]}.jpg", src / "images" / "small.jpg")
    Image.fromarray(np.ones((9, 9), np.uint8)).save(src / "annotations" / "trimaps" / "small.png")
    capsys.readouterr()
    assert evaluate_main(["--workdir", str(w), "--images", str(src), "--tta", "flip"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out.strip().splitlines()[-1])
    written = json.loads((w / "eval_images.json").read_text())
    per_image = written.pop("per_image")
    assert metrics == written
    assert sorted(r["image"] for r in per_image) == sorted(str(src / "images" / f"{s}.jpg") for s in stems)
    assert [r["iou"] for r in per_image] == sorted(r["iou"] for r in per_image)  # worst first
    assert (metrics["images"], metrics["skipped"], metrics["mode"], metrics["tta"]) == (5, 2, "resize", "flip")
    assert f"skipping {src / 'images' / 'nomask.jpg'}: no mask named nomask.*" in err
    assert f"skipping {src / 'images' / 'small.jpg'}: mask {src / 'annotations' / 'trimaps' / 'small.png'} is 9x9" in err
    # The same as predict's masks (same mode and mirroring) scored by hand at full size.
    assert predict_main(["--workdir", str(w), *(str(src / "images" / f"{s}.jpg") for s in stems),
                         "--out", str(tmp_path / "pred"), "--tta", "flip"]) == 0
    cm, outlines = np.zeros((2, 2), np.int64), []
    for stem in stems:
        truth = (np.asarray(Image.open(src / "annotations" / "trimaps" / f"{stem}.png")) == 1).astype(int)
        pred = np.asarray(Image.open(tmp_path / "pred" / f"{stem}_mask.png")).astype(int)
        assert pred.shape == truth.shape and truth.shape != (64, 64)
        one = np.bincount((truth * 2 + pred).ravel(), minlength=4).reshape(2, 2)
        cm += one
        mine = next(r for r in per_image if r["image"].endswith(f"{stem}.jpg"))
        assert mine["fg_iou"] == pytest.approx(scores(one)["fg_iou"], abs=1e-12)
        outlines.append(boundary_rows(pred, truth, 2))  # and the outlines' distances, each image's
        assert {key: mine[key] for key in per_class(outlines[-1])} == per_class(outlines[-1])
    assert metrics["iou_per_class"] == pytest.approx(scores(cm)["iou_per_class"], abs=1e-12)
    assert metrics["boundary"] == [{**row, "name": "pet"} for row in boundary_scores(np.stack(outlines))]
    assert metrics["boundary"][0]["images"] == 5
    # The same rows as a table for a spreadsheet, a column per score and class, in the same order.
    import csv

    with open(w / "eval_images.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["image"] for t in table] == [r["image"] for r in per_image] and table[0]["page"] == ""
    for t, r in zip(table, per_image, strict=True):
        assert float(t["iou"]) == pytest.approx(r["iou"], rel=1e-5)
        assert float(t["dice_rest"]) == pytest.approx(r["dice_per_class"][0], rel=1e-5)
        assert float(t["hd95_pet"]) == pytest.approx(r["hd95_per_class"][1], rel=1e-5, abs=1e-9)
        assert int(t["predicted_objects_pet"]) == r["predicted_objects_per_class"][1]
    assert "hd95_rest" not in table[0] and "nsd_pet" in table[0]
    # --predictions: predict's masks read back score as the model's did (the same masks); so do
    # another tool's 0/255 masks named by the stem alone. A mask that is not there, holds another
    # class or is another size is skipped with a line; model flags are refused.
    made = {key: metrics[key] for key in ("mode", "why", "tta", "checkpoints", "precision")}
    assert evaluate_main(["--workdir", str(w), "--images", str(src), "--predictions", str(tmp_path / "pred"),
                          "--out", str(tmp_path / "read.json")]) == 0
    read = json.loads((tmp_path / "read.json").read_text())
    assert read.pop("predictions") == str(tmp_path / "pred") and not made.keys() & read.keys()
    assert read == {k: v for k, v in {**written, "per_image": per_image}.items() if k not in made}
    other = tmp_path / "other"
    other.mkdir()
    for i, stem in enumerate(stems):
        mask = np.asarray(Image.open(tmp_path / "pred" / f"{stem}_mask.png"))
        if i == 0:
            mask = np.where(mask > 0, 7, 0).astype(np.uint8)  # not a class of the run
        elif i == 1:
            mask = mask[:-1]
        else:
            mask = mask * 255
        Image.fromarray(mask.astype(np.uint8), "L").save(other / f"{stem}.png")
    capsys.readouterr()
    assert evaluate_main(["--workdir", str(w), "--images", str(src), "--predictions", str(other),
                          "--out", str(tmp_path / "other.json")]) == 0
    err = capsys.readouterr().err
    assert f"skipping {src / 'images' / f'{stems[0]}.jpg'}: predicted mask {other / f'{stems[0]}.png'} holds 7; " \
           "the run's 2 classes are 0..1 (or 0/255)" in err, err
    assert f"predicted mask {other / f'{stems[1]}.png'} is " in err
    scored = json.loads((tmp_path / "other.json").read_text())
    assert scored["images"] == 3 and sorted(r["image"] for r in scored["per_image"]) == sorted(
        r["image"] for r in per_image if not r["image"].endswith((f"{stems[0]}.jpg", f"{stems[1]}.jpg")))
    for r in scored["per_image"]:
        assert r == next(q for q in per_image if q["image"] == r["image"])
    (other / f"{stems[2]}.png").unlink()
    assert evaluate_main(["--workdir", str(w), "--images", str(src), "--predictions", str(other),
                          "--out", str(tmp_path / "other.json")]) == 0
    assert f"no predicted mask {stems[2]}_mask.png or {stems[2]}.* in --predictions {other}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert evaluate_main(["--workdir", str(w), "--images", str(src), "--predictions", str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"evaluate: error: --images {src}: none of its 6 images could be read and scored against --predictions (the "
        "lines above say why)")
    with pytest.raises(SystemExit):
        evaluate_main(["--workdir", str(w), "--images", str(src), "--predictions", str(other), "--tta", "flip"])
    assert "--tta: not used with --predictions (its masks are made already)" in capsys.readouterr().err
    # --list: the images a data set's own test list names (as convert --val-list reads it), each
    # scored as in the whole folder; a listed image that is skipped is still named.
    listing = tmp_path / "test.txt"
    listing.write_text(f"{stems[1]} 1 1 1\n{stems[3]}.jpg 2 1 1\nsmall\n")
    assert evaluate_main(["--workdir", str(w), "--images", str(src), "--tta", "flip", "--list", str(listing),
                          "--out", str(tmp_path / "listed.json")]) == 0
    out, err = capsys.readouterr()
    listed = json.loads((tmp_path / "listed.json").read_text())
    assert len((tmp_path / "listed.csv").read_text().splitlines()) == 1 + 2  # --out's table beside it
    from unet_dist.image_scores import table_path

    assert table_path(tmp_path / "scores.csv") == tmp_path / "scores.csv.csv"
    assert (listed["images"], listed["skipped"], listed["list"]) == (2, 1, str(listing.resolve()))
    assert "small.png is 9x9" in err and "nomask" not in err and "list" not in metrics
    assert sorted(listed["per_image"], key=lambda r: r["image"]) == sorted(
        (r for r in per_image if r["image"].endswith((f"{stems[1]}.jpg", f"{stems[3]}.jpg"))), key=lambda r: r["image"])
    listing.write_text("nomask\nnot_there\n")
    assert evaluate_main(["--workdir", str(w), "--images", str(src), "--list", str(listing)]) == 2
    assert capsys.readouterr().err.strip() == (f"evaluate: error: --list {listing}: 1 of its 2 images are not in SRC, "
                                               "such as 'not_there'")
    # Bad input: a folder without labelled images, and flags of the other source.
    assert evaluate_main(["--workdir", str(w), "--images", str(tmp_path / "pred")]) == 2
    assert "is not in the --layout oxford-pet layout" in capsys.readouterr().err
    for argv, message in ((["--images", str(src), "--split", "train"], "--split: not used with --images"),
                          (["--data", str(shards), "--list", str(listing)], "--list: not used with --data"),
                          (["--data", str(shards), "--tta", "flip"], "--tta: not used with --data"),
                          (["--data", str(shards), "--nsd-tolerance", "3"], "--nsd-tolerance: not used with --data"),
                          (["--images", str(src), "--nsd-tolerance", "-1"],
                           "--nsd-tolerance -1.0: a distance in pixels, 0 or more")):
        with pytest.raises(SystemExit):
            evaluate_main(["--workdir", str(w), *argv])
        assert message in capsys.readouterr().err


def _each(flag, values):
    return [v for value in values for v in (flag, str(value))]


def _assert_mask_of(mask, probs):
    """mask == probs >= 0.5, but for pixels within 1e-4 of 0.5: a batch of another size sums in
    another order, and the 2-step models leave pixels 6e-6 from the threshold (measured)."""
    sure = np.abs(probs - 0.5) > 1e-4
    assert sure.mean() > 0.95
    np.testing.assert_array_equal(mask[sure], (probs >= 0.5)[sure])


def test_several_runs_predict_export_and_evaluate_their_average(shards, pet_src, tmp_path, capsys, monkeypatch):
    # The folds of a cross-validation (or runs with other seeds) are used together: predict, export
    # and evaluate --images average their probabilities, as nnU-Net ensembles its five folds.
    from PIL import Image

    from unet_dist.data.convert import convert
    from unet_dist.evaluate import main as evaluate_main
    from unet_dist.export import main as export_main
    from unet_dist.inference import load_predictor
    from unet_dist.metrics import scores
    from unet_dist.predict import main as predict_main

    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, w in enumerate(runs):
        train(load_config(None, tiny_overrides(steps=2) + [f"runtime.seed={seed}"]), shards, w)
    images = tf.constant(np.random.default_rng(0).integers(0, 255, (2, 50, 70, 3), dtype=np.uint8))
    one = [load_predictor([w]).fn(images).numpy() for w in runs]
    assert np.abs(one[0] - one[1]).max() > 1e-3  # two different models: the average is a real check
    both = load_predictor(runs)
    np.testing.assert_allclose(both.fn(images).numpy(), (one[0] + one[1]) / 2, atol=1e-6)
    assert both.why.endswith("; averaged over 2 runs") and both.mode == "resize"
    # The CLIs take several --workdir runs.
    image = tmp_path / "x.png"
    Image.fromarray(images.numpy()[0]).save(image)
    capsys.readouterr()
    assert predict_main([*_each("--workdir", runs), str(image), "--out", str(tmp_path / "pred"), "--probabilities"]) == 0
    assert f"checkpoints {both.checkpoints[0]}, {both.checkpoints[1]}" in capsys.readouterr().out
    mask = np.asarray(Image.open(tmp_path / "pred" / "x_mask.png"))
    _assert_mask_of(mask, ((one[0] + one[1]) / 2)[0, ..., 0])
    # --probabilities: the averaged probabilities the mask was taken from (one unit: the foreground's).
    probs = np.asarray(Image.open(tmp_path / "pred" / "x_probs.tif"))
    np.testing.assert_allclose(probs, ((one[0] + one[1]) / 2)[0, ..., 0], atol=1e-5)
    np.testing.assert_array_equal(mask, probs >= 0.5)
    assert export_main([*_each("--workdir", runs), "--out", str(tmp_path / "export")]) == 0
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    np.testing.assert_allclose(loaded.serve(images)["probabilities"].numpy(), (one[0] + one[1]) / 2, atol=1e-5)
    assert evaluate_main([*_each("--workdir", runs), "--images", str(pet_src)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["images"] == 48 and metrics["checkpoints"] == both.checkpoints
    assert (runs[0] / "eval_images.json").exists() and not (runs[1] / "eval_images.json").exists()
    # A multi-page TIFF (a microscopy stack) is predicted page by page, as STEM_pNNN, and evaluate
    # --images scores each page against the same page of its mask stack.
    stack = tmp_path / "stack"
    (stack / "images").mkdir(parents=True)
    (stack / "masks").mkdir()
    pages = [Image.fromarray(a) for a in images.numpy()]
    pages[0].save(stack / "images" / "vol.tif", save_all=True, append_images=pages[1:])
    truth = [Image.fromarray((a[..., 0] > 127).astype(np.uint8)) for a in images.numpy()]
    truth[0].save(stack / "masks" / "vol.tif", save_all=True, append_images=truth[1:])
    assert predict_main([*_each("--workdir", runs), str(stack / "images"), "--out", str(tmp_path / "spred"),
                         "--probabilities"]) == 0
    assert sorted(p.name for p in (tmp_path / "spred").glob("*_mask.png")) == ["vol_p000_mask.png", "vol_p001_mask.png"]
    # ... and, once every page is done, the page masks as one stack, as the input came.
    assert (f"predict: {tmp_path / 'spred' / 'vol_mask.tif'}: the 2 page masks of {stack / 'images' / 'vol.tif'} as "
            "one stack (their probabilities in vol_probs.tif)") in capsys.readouterr().out
    with Image.open(tmp_path / "spred" / "vol_mask.tif") as stacked, \
            Image.open(tmp_path / "spred" / "vol_probs.tif") as stacked_probs:
        assert stacked.n_frames == stacked_probs.n_frames == 2
        for i in range(2):
            stacked.seek(i)
            stacked_probs.seek(i)
            mask = np.asarray(Image.open(tmp_path / "spred" / f"vol_p{i:03d}_mask.png"))
            _assert_mask_of(mask, ((one[0] + one[1]) / 2)[i, ..., 0])
            np.testing.assert_array_equal(np.asarray(stacked), mask)
            np.testing.assert_array_equal(np.asarray(stacked_probs) >= 0.5, mask)
    # Predicting that folder again (here: into it) leaves the stack of masks out, with the pages' pairs.
    again = tmp_path / "again"
    shutil.copytree(tmp_path / "spred", again)
    shutil.copy(stack / "images" / "vol.tif", again)
    assert predict_main([*_each("--workdir", runs), str(again), "--out", str(again)]) == 0
    out, err = capsys.readouterr()
    assert "leaving out 8 files of earlier predictions" in err and "predict: 2 images" in out, (out, err)
    # A page that cannot be predicted leaves the stack unwritten, and says so.
    import unet_dist.data.imageio as imageio

    real_values = imageio.image_values

    def page_1_broken(path, page=0, channels=3):
        if page == 1:
            raise imageio.BadImage("broken")
        return real_values(path, page, channels)

    monkeypatch.setattr(imageio, "image_values", page_1_broken)
    assert predict_main([*_each("--workdir", runs), str(stack / "images" / "vol.tif"), "--out",
                         str(tmp_path / "broken")]) == 0
    assert "vol_mask.tif not written: 1 of the 2 pages of " in capsys.readouterr().err
    assert not (tmp_path / "broken" / "vol_mask.tif").exists()
    monkeypatch.undo()
    assert evaluate_main([*_each("--workdir", runs), "--images", str(stack), "--layout", "folders",
                          "--out", str(tmp_path / "stack.json")]) == 0
    scored = json.loads((tmp_path / "stack.json").read_text())
    assert scored["images"] == 2 and sorted(r["page"] for r in scored["per_image"]) == [0, 1]
    # The stack is scored whole too: the IoU of its pages' pooled pixels, not the mean of theirs.
    [whole] = scored["per_stack"]
    assert whole["image"] == str(stack / "images" / "vol.tif") and whole["pages"] == 2
    truth_ids = np.stack([np.asarray(t) for t in truth]).astype(int)
    # evaluate predicts each page as predict did (one image a batch): its masks, not a threshold of `one`.
    predicted = np.stack([np.asarray(Image.open(tmp_path / "spred" / f"vol_p{i:03d}_mask.png")) for i in range(2)])
    predicted = predicted.astype(int)
    pooled = np.bincount((2 * truth_ids + predicted).ravel(), minlength=4).reshape(2, 2)
    assert whole["iou"] == pytest.approx(scores(pooled)["iou"]) and "per_stack" not in metrics
    # Runs that predict other classes cannot be averaged; --data evaluates one run.
    tri = tmp_path / "tri"
    convert(pet_src, tri, classes="trimap", image_size=(64, 64), shards=1, workers=1, progress=False)
    train(load_config(None, tiny_overrides(steps=1) + ["model.num_classes=3", "train.loss=cce"]), tri, tmp_path / "t")
    with pytest.raises(ConfigError, match=r"--workdir .*/t: 3 classes, but .*/a has 2: an ensemble averages"):
        load_predictor([runs[0], tmp_path / "t"])
    with pytest.raises(SystemExit):
        evaluate_main([*_each("--workdir", runs), "--data", str(shards)])
    assert "--data evaluates one --workdir" in capsys.readouterr().err


def test_the_training_iterator_is_gone_when_train_returns(shards, tmp_path):
    # It sits in a reference cycle: left to the interpreter's last garbage collection, it waited at
    # exit for a numpy_function call (the per-sample border weight map) whose thread Python had
    # already stopped, and the process hung after its last line.
    import gc

    from tensorflow.python.data.ops.iterator_ops import OwnedIterator

    gc.collect()
    gc.disable()
    try:
        train(load_config(None, tiny_overrides(steps=2) + ["train.loss=weighted_ce"]), shards, tmp_path / "w")
        assert not [o for o in gc.get_objects() if isinstance(o, OwnedIterator)]
    finally:
        gc.enable()


def _ct_like(src, n: int, seed: int = 0) -> None:
    """A folders-layout SRC of n CT-like 32x32 slices (`synthetic.make_ct`: int16 .npy in Hounsfield
    units, air and bone in some, which move each slice's own percentiles) and .npy organ masks."""
    from unet_dist.data.synthetic import make_ct

    rng = np.random.default_rng(seed)
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(n):
        hu, trimap = make_ct(rng, size=32)
        np.save(src / "images" / f"ct{i:02d}.npy", hu)
        np.save(src / "masks" / f"ct{i:02d}.npy", (trimap == 1).astype(np.uint8))


def test_a_dataset_intensity_window_maps_training_and_prediction_alike(tmp_path, capsys):
    # convert --intensity dataset takes one window from the training images' foreground and maps
    # every image by it; the run's data.json carries it to evaluate --images, predict and export,
    # whose serve_values maps raw values in the graph to what predict computed.
    from PIL import Image

    from unet_dist.data.imageio import image_values, load_image
    from unet_dist.predict import MASK

    src = tmp_path / "src"
    _ct_like(src, 24)
    data = tmp_path / "data"
    conv = run_main(capsys, "unet_dist.convert", str(src), str(data), "--layout", "folders", "--channels", "1",
                    "--val-fraction", "0.25", "--intensity", "dataset", check=True)
    window = json.loads((data / "manifest.json").read_text())["intensity"]["window"]
    assert len(window) == 1 and 40 < window[0][0] < 70 < window[0][1] < 100, window  # the organ's values
    assert f"values {window[0][0]:g} to {window[0][1]:g} stored as 0 to 255" in conv.stdout, conv.stdout
    w = tmp_path / "w"
    args = ["--data", str(data), "--workdir", str(w), "--deterministic", "--set", "model.in_channels=1"]
    for o in tiny_overrides(steps=80) + ["data.image_size=[32, 32]", "model.base_filters=8", "optim.learning_rate=0.01",
                                          "data.augment.scale_crop=false"]:
        args += ["--set", o]
    run_main(capsys, "unet_dist.train", *args, check=True)
    assert json.loads((w / "data.json").read_text())["intensity"]["window"] == window
    summary = json.loads((w / "summary.json").read_text())
    assert summary["final_val_iou"] > 0.8, summary["final_val_iou"]
    # evaluate --images maps the source images by the run's window, as conversion did.
    ev = run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--images", str(src), "--layout", "folders",
                  check=True)
    scored = json.loads(ev.stdout.strip().splitlines()[-1])
    assert scored["images"] == 24 and scored["iou"] > 0.8, scored
    # The slices are the model's training size, so tile mode (auto) is one pass of each, as evaluation
    # in training was: the val slices scored from their files give the val records' IoU. (With
    # mirrored context at the borders, before session 37, they did not.)
    from unet_dist.data.pipeline import FEATURES

    val = [tf.io.parse_single_example(r, FEATURES)["stem"].numpy().decode()
           for f in json.loads((data / "manifest.json").read_text())["val"]["shards"]
           for r in tf.data.TFRecordDataset(str(data / f))]
    (tmp_path / "val.txt").write_text("\n".join(val))
    ev = run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--images", str(src), "--layout", "folders",
                  "--list", str(tmp_path / "val.txt"), check=True)
    scored = json.loads(ev.stdout.strip().splitlines()[-1])
    assert scored["images"] == 6 and scored["mode"] == "tile", scored
    assert abs(scored["iou"] - summary["final_val_iou"]) < 1e-6, (scored["iou"], summary["final_val_iou"])
    out = tmp_path / "pred"
    run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(src / "images" / "ct01.npy"), "--out", str(out),
             check=True)
    predicted = np.asarray(Image.open(out / f"ct01{MASK}"))
    assert (predicted == np.load(src / "masks" / "ct01.npy")).mean() > 0.9
    # The SavedModel serves the 8-bit image, and the raw Hounsfield units through serve_values.
    run_main(capsys, "unet_dist.export", "--workdir", str(w), "--out", str(tmp_path / "export"), check=True)
    loaded = tf.saved_model.load(str(tmp_path / "export"))  # held: its functions need it alive
    image = load_image(src / "images" / "ct01.npy", channels=1, window=window)
    np.testing.assert_array_equal(loaded.serve(image[None])["mask"].numpy()[0], predicted)
    values = image_values(src / "images" / "ct01.npy", channels=1).astype(np.float32)
    np.testing.assert_array_equal(loaded.serve_values(values[None])["mask"].numpy()[0], predicted)
    # Records of images mapped otherwise are not scored: a test set converted with a window of its
    # own (here each image's own range) is refused, naming the flags that map it as training did;
    # converted with them, it scores as the run's own data.
    data_own = tmp_path / "data_own"
    run_main(capsys, "unet_dist.convert", str(src), str(data_own), "--layout", "folders", "--channels", "1",
             check=True)
    refused = run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--data", str(data_own))
    flags = ["--intensity", "window", "--window", repr(window[0][0]), repr(window[0][1])]
    assert refused.returncode == 2 and refused.stderr.strip().endswith(
        f"{data_own}/manifest.json: images mapped to 8 bits from each image's own range, but the run's training "
        f"data from {window[0][0]:g} to {window[0][1]:g} ({w / 'data.json'}); convert it again with "
        f"{' '.join(flags)}"), refused.stderr
    run_main(capsys, "unet_dist.convert", str(src), str(tmp_path / "again"), "--layout", "folders", "--channels", "1",
             "--val-fraction", "0.25", *flags, check=True)
    ev = run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--data", str(tmp_path / "again"), check=True)
    assert abs(json.loads(ev.stdout.strip().splitlines()[-1])["val_iou"] - summary["final_val_iou"]) < 1e-6
    # An ensemble reads each image once: a run whose images were scaled each by its own range is refused.
    own = tmp_path / "own"
    train(load_config(None, tiny_overrides(steps=1) + ["model.in_channels=1"]), data_own, own)
    mixed = run_main(capsys, "unet_dist.predict", "--workdir", str(w), "--workdir", str(own),
                     str(src / "images" / "ct01.npy"), "--out", str(tmp_path / "mixed"))
    assert mixed.returncode == 2 and mixed.stderr.strip().endswith(
        f"--workdir {own}: images mapped to 8 bits from each image's own range, but {w}'s from "
        f"{window[0][0]:g} to {window[0][1]:g} (convert --intensity): an ensemble reads each image once"), mixed.stderr


def test_images_of_five_channels_train_evaluate_predict_and_export(shards, tmp_path, capsys):
    # The objects show in the fifth channel alone; the other four are noise. A model that learns
    # them takes every channel, in the order conversion stored them, through training and prediction.
    from PIL import Image

    from unet_dist.predict import MASK

    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    for i in range(24):
        yy, xx = np.mgrid[:32, :32]
        cy, cx, r = rng.integers(9, 23, 2).tolist() + [int(rng.integers(4, 8))]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image = rng.normal(0, 1, (32, 32, 5)).astype(np.float32)
        image[..., 4] += 4 * mask
        np.save(src / "images" / f"s{i:02d}.npy", image)
        np.save(src / "masks" / f"s{i:02d}.npy", mask.astype(np.uint8))
    data = tmp_path / "data"
    run_main(capsys, "unet_dist.convert", str(src), str(data), "--layout", "folders", "--channels", "5",
             "--val-fraction", "0.25", check=True)
    w = tmp_path / "w"
    args = ["--data", str(data), "--workdir", str(w), "--deterministic"]
    for o in tiny_overrides(steps=80) + ["data.image_size=[32, 32]", "model.base_filters=8", "optim.learning_rate=0.01",
                                          "data.augment.scale_crop=false"]:
        args += ["--set", o]
    refused = run_main(capsys, "unet_dist.train", *args)
    assert refused.returncode == 1 and refused.stderr.strip().endswith(
        f"config key model.in_channels is 3 but the images of {data}/manifest.json have 5 channels; "
        "--set model.in_channels=5"), refused.stderr
    run_main(capsys, "unet_dist.train", *args, "--set", "model.in_channels=5", check=True)
    summary = json.loads((w / "summary.json").read_text())
    assert summary["final_val_iou"] > 0.8, summary["final_val_iou"]  # the background alone scores about 0.45
    assert json.loads((w / "data.json").read_text())["channels"] == 5
    ev = run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--data", str(data), check=True)
    assert abs(json.loads(ev.stdout.strip().splitlines()[-1])["val_iou"] - summary["final_val_iou"]) < 1e-6
    # evaluate --images reads .npy images and masks at their own sizes, as conversion did.
    ev = run_main(capsys, "unet_dist.evaluate", "--workdir", str(w), "--images", str(src), "--layout", "folders",
                  check=True)
    scored = json.loads(ev.stdout.strip().splitlines()[-1])
    assert scored["images"] == 24 and scored["iou"] > 0.8, scored
    # predict reads .npy images as the data has them; one of another channel count is skipped, named.
    np.save(tmp_path / "rgb.npy", np.zeros((32, 32, 3), np.float32))
    out = tmp_path / "pred"
    pred = run_main(capsys, "unet_dist.predict", "--workdir", str(w), str(src / "images" / "s00.npy"),
                    str(tmp_path / "rgb.npy"), "--out", str(out), check=True)
    assert f"predict: skipping {tmp_path / 'rgb.npy'}: 3 channel(s)" in pred.stderr, pred.stderr
    predicted = np.asarray(Image.open(out / f"s00{MASK}"))
    truth = np.load(src / "masks" / "s00.npy")
    assert (predicted == truth).mean() > 0.9
    assert Image.open(out / "s00_overlay.png").size == (96, 32)
    # The SavedModel takes (B, H, W, 5) uint8 images and predicts what predict did.
    run_main(capsys, "unet_dist.export", "--workdir", str(w), "--out", str(tmp_path / "export"), check=True)
    from unet_dist.data.imageio import load_image

    loaded = tf.saved_model.load(str(tmp_path / "export"))  # held: its functions need it alive
    served = loaded.serve(load_image(src / "images" / "s00.npy", channels=5)[None])
    np.testing.assert_array_equal(served["mask"].numpy()[0], predicted)
    # An ensemble averages runs that take the same images: an RGB run beside it is refused in one line.
    rgb_run = tmp_path / "rgb_run"
    train(load_config(None, tiny_overrides(steps=1)), shards, rgb_run)
    mixed = run_main(capsys, "unet_dist.predict", "--workdir", str(w), "--workdir", str(rgb_run),
                     str(src / "images" / "s00.npy"), "--out", str(tmp_path / "mixed"))
    assert mixed.returncode == 2 and mixed.stderr.strip().endswith(
        f"--workdir {rgb_run}: images of 3 channels, but {w} takes 5: an ensemble predicts the same images"), mixed.stderr
