import pytest

from unet_dist.config import ConfigError, config_from_dict, load_config


def test_defaults_and_presets_load_and_read_back_from_a_runs_config_yaml(tmp_path):
    # A run's config.yaml (config_yaml) is what resume, evaluate, predict and export load.
    from pathlib import Path

    from unet_dist.config import config_yaml

    presets = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))
    for cfg in [load_config(), *map(load_config, presets)]:
        (tmp_path / "config.yaml").write_text(config_yaml(cfg))
        assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, words",
    [
        ("data.no_such_key=1", ["unknown config key data.no_such_key", "global_batch_size"]),
        ("nosection.x=1", ["unknown config key nosection"]),
        ("data.global_batch_size=abc", ["data.global_batch_size", "int"]),
        ("data.global_batch_size=0", ["data.global_batch_size", "> 0"]),
        ("data.global_batch_size=-4", ["data.global_batch_size"]),
        ("model.padding=reflect", ["model.padding", "'same'"]),
        ("data.image_size=[250, 256]", ["data.image_size", "divisible by 2^depth = 16"]),
        ("runtime.precision=fp8", ["runtime.precision", "mixed_bfloat16"]),
        ("runtime.fp16_allreduce=true", ["runtime.fp16_allreduce was renamed", "runtime.allreduce_dtype"]),
        ("runtime.allreduce_dtype=int8", ["runtime.allreduce_dtype", "'bfloat16'"]),
        ("optim.learning_rate=-1", ["optim.learning_rate"]),
        ("train.steps=0", ["train.steps"]),
        ("model.batch_norm=yes please", ["model.batch_norm", "bool"]),
        ("data.augment.hue=0.9", ["data.augment.hue"]),
        ("data.augment.scale_min=0.4", ["data.augment.scale_min", "0.5 <= scale_min"]),
        ("data.augment.scale_prob=0", ["data.augment.scale_prob", "0 < scale_prob <= 1"]),
        ("data.augment.noise=-0.1", ["data.augment.noise", "0 to 1"]),
        ("data.augment.blur_prob=0", ["data.augment.blur_prob", "0 < blur_prob <= 1"]),
        ("data.augment.gamma=5", ["data.augment.gamma", "0 to 4"]),
        ("data.augment.gamma_inverted_prob=0.1", ["data.augment.gamma", "> 0 where gamma_inverted_prob"]),
        ("data.augment.gamma_inverted_prob=1.5", ["data.augment.gamma_inverted_prob", "0 to 1"]),
        ("data.per_replica_batch_size=8", ["set exactly one"]),
        ("model.up_filters=[4, 2]", ["model.up_filters"]),
        ("data.patch_size=[512, 128]", ["data.patch_size", "0 < h <= 256"]),
        ("data.patch_size=[120, 128]", ["data.patch_size", "divisible by 2^depth = 16"]),
        ("runtime.seed=-1", ["runtime.seed", "2**32 - 1"]),
        ("runtime.seed=4294967296", ["runtime.seed"]),
        ("train.focal_gamma=-1", ["train.focal_gamma", ">= 0"]),
        ("train.weight_w0=-10", ["train.weight_w0", ">= 0"]),
        ("optim.power=0", ["optim.power", "> 0"]),
        ("optim.step_factor=0", ["optim.step_factor", "> 0"]),
        ("train.gradient_accumulation_steps=0", ["train.gradient_accumulation_steps", ">= 1"]),
    ],
)
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_sync_batch_norm_needs_batch_norm_and_neither_xla_nor_accumulation():
    for norm in ("none", "instance"):
        with pytest.raises(ConfigError, match="model.sync_batch_norm: .*unless model.norm is batch"):
            load_config(None, ["model.sync_batch_norm=true", f"model.norm={norm}"])
    with pytest.raises(ConfigError, match="model.sync_batch_norm: .*runtime.xla is true"):
        load_config(None, ["model.sync_batch_norm=true", "runtime.xla=true"])
    # Under op determinism TensorFlow refuses to compile the max-pool gradient, at the first step.
    with pytest.raises(ConfigError, match="runtime.xla: got True; allowed: false or auto when runtime.deterministic is true"):
        load_config(None, ["runtime.deterministic=true", "runtime.xla=true"])
    assert load_config(None, ["runtime.deterministic=true"]).runtime.xla == "auto"
    for bad in (["model.padding=valid"], ["model.depth=2"]):  # heads at levels 1..depth-2, halving sizes
        with pytest.raises(ConfigError, match=r"^config key model.deep_supervision: got True; allowed: false unless "
                                              r"model.padding is same and model.depth >= 3"):
            load_config(None, ["model.deep_supervision=true", *bad])
    assert load_config(None, ["model.sync_batch_norm=true"]).model.sync_batch_norm
    # Nor with gradient accumulation: its loop cannot hold tf.distribute's synchronisation.
    with pytest.raises(ConfigError, match="train.gradient_accumulation_steps: got 2; allowed: 1 with model.sync_batch_norm"):
        load_config(None, ["model.sync_batch_norm=true", "train.gradient_accumulation_steps=2"])


def test_rot90_needs_a_square_training_input():
    with pytest.raises(ConfigError, match="data.augment.rot90"):
        load_config(None, ["data.augment.rot90=true", "data.image_size=[256, 320]"])
    with pytest.raises(ConfigError, match="data.augment.rot90: .*patch_size is square"):
        load_config(None, ["data.augment.rot90=true", "data.image_size=[256, 320]", "data.patch_size=[128, 192]"])
    # Only the patch is turned: a square patch of a non-square image is fine.
    cfg = load_config(None, ["data.augment.rot90=true", "data.image_size=[256, 320]", "data.patch_size=[128, 128]"])
    assert cfg.data.augment.rot90


def test_a_blur_wider_than_the_trained_input_is_refused():
    # The kernel's radius (3 sigma) mirrors past the edge of what is trained on: the patch when set.
    load_config(None, ["data.augment.blur=3", "data.image_size=[32, 32]", "model.depth=2"])
    with pytest.raises(ConfigError, match=r"^config key data.augment.blur: .*at most 2.33333: .*\[8, 8\]"):
        load_config(None, ["data.augment.blur=3", "data.image_size=[32, 32]", "data.patch_size=[8, 8]",
                           "model.depth=2"])


def test_valid_padding_sizes_are_checked():
    cfg = load_config(None, ["model.padding=valid", "data.image_size=[572, 572]"])
    assert cfg.model.padding == "valid"
    with pytest.raises(ConfigError, match="nearest allowed"):
        load_config(None, ["model.padding=valid", "data.image_size=[570, 570]"])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  global_batch_size: [\n")
    with pytest.raises(ConfigError, match="bad.yaml line"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  depht: 3\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown config key model.depht"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    binary = tmp_path / "model.keras"  # a binary file given as --config
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"^config file .*model.keras: not UTF-8 text \(byte 4\); is it the YAML"):
        load_config(binary)
    # yaml.safe_load only: a Python object tag is refused, never constructed.
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError):
        load_config(evil)


def test_overrides_apply_in_order_and_batch_alternative():
    cfg = load_config(None, ["optim.learning_rate=0.5", "optim.learning_rate=0.25", "data.global_batch_size=null",
                             "data.per_replica_batch_size=8", "data.augment.flip=false"])
    assert cfg.optim.learning_rate == 0.25
    assert cfg.data.per_replica_batch_size == 8 and cfg.data.global_batch_size is None
    assert cfg.data.augment.flip is False


def test_a_trained_runs_commands_override_its_runtime_keys_only():
    # evaluate and predict take --set runtime.KEY=VALUE: how they run (a longer wait for the others'
    # shares, threads), never what the model was trained with.
    from unet_dist.config import with_runtime_overrides

    cfg = with_runtime_overrides(load_config(None, ["model.depth=3"]), ["runtime.stall_shutdown_seconds=900",
                                                                         "runtime.intra_op_threads=4"])
    assert (cfg.runtime.stall_shutdown_seconds, cfg.runtime.intra_op_threads, cfg.model.depth) == (900, 4, 3)
    for item, words in [("model.depth=4", "--set model.depth=4: only runtime.KEY=VALUE can be set for a trained run"),
                        ("runtime.strategy=horovod", "--set runtime.strategy=horovod: use --strategy"),
                        ("runtime.stall_shutdown_seconds=-1", "runtime.stall_shutdown_seconds"),
                        ("runtime.threads=2", "unknown config key runtime.threads")]:
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            with_runtime_overrides(load_config(), [item])


def test_entry_point_fails_before_work(tmp_path):
    from conftest import run_module

    proc = run_module("unet_dist.train", "--data", str(tmp_path), "--workdir", str(tmp_path / "w"),
                      "--set", "model.depth=99")
    assert proc.returncode == 2
    assert "model.depth" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_default_yaml_matches_the_dataclasses():
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "tools"))
    from gen_default_config import render

    assert (root / "configs/default.yaml").read_text() == render(), "run tools/gen_default_config.py"


def test_damaged_workdir_files_are_one_line(tmp_path):
    # evaluate, predict and export read WORKDIR/config.yaml and data.json: damaged, they are named.
    from unet_dist.config import load_workdir_config
    from unet_dist.inference import auto_mode

    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"config.yaml line 2: not valid YAML"):
        load_workdir_config(tmp_path)
    (tmp_path / "config.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"config.yaml: not a training run's config"):
        load_workdir_config(tmp_path)
    (tmp_path / "config.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"config.yaml: not UTF-8 text \(byte 0\): not a training run's config"):
        load_workdir_config(tmp_path)
    (tmp_path / "data.json").write_text("{")
    with pytest.raises(ConfigError, match=r"data.json: unreadable .*--mode tile or resize"):
        auto_mode(tmp_path, load_config(None))


def test_model_batch_norm_of_earlier_configs_reads_as_model_norm(tmp_path):
    # model.batch_norm true/false came before model.norm: earlier runs' config.yaml must still load
    # (resume, evaluate, predict), and a config may not say both.
    path = tmp_path / "old.yaml"
    for old, norm in ((True, "batch"), (False, "none")):
        path.write_text(f"model:\n  batch_norm: {str(old).lower()}\n")
        assert load_config(path).model.norm == norm
        assert load_config(None, [f"model.batch_norm={str(old).lower()}"]).model.norm == norm
    assert config_from_dict({"model": {"batch_norm": False}}).model.norm == "none"
    path.write_text("model:\n  batch_norm: false\n  norm: instance\n")
    with pytest.raises(ConfigError, match=r"old.yaml: config keys model.batch_norm and model.norm: give one"):
        load_config(path)
    with pytest.raises(ConfigError, match="model.norm: got 'layer'; allowed: "):
        load_config(None, ["model.norm=layer"])
