"""Config files load and validate; errors name the field, the expected and the actual value."""
import importlib
import inspect
import os

import pytest

from configs import common, remem
from remem_jax import config_validation
from remem_jax.train import stages as stages_lib
from remem_jax.data import registry
from remem_jax.errors import UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
# Config files with a plain get_config(); configs/remem.py takes the dataset as its argument.
CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR)
                      if f.endswith(".py") and f not in ("__init__.py", "common.py", "remem.py"))
STAGES = stages_lib.table()
# Datasets whose files are wherever the user says: placeholders for the paths they need.
USER_PATHS = {"image_folder": {"image_folder": "/data/my_images"},
              "imagenet_lt": {"imagenet_lt_train_list": "/data/ImageNet_LT_train.txt",
                              "imagenet_lt_eval_list": "/data/ImageNet_LT_val.txt"}}


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_file_loads_and_validates(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    config_validation.validate(config, STAGES)


@pytest.mark.parametrize("dataset", registry.known_datasets())
def test_every_registry_dataset_config_builds_and_validates(dataset):
    config = remem.get_config(dataset)
    assert config.dataset == dataset
    config.data.update(USER_PATHS.get(dataset, {}))
    config_validation.validate(config, STAGES)
    # Apart from the dataset, it is the paper's setting of configs/common.py.
    config.dataset = common.get_config().dataset
    assert config.to_dict() == dict(common.get_config().to_dict(), data=config.data.to_dict())


def test_aliases_equal_the_parametrised_config():
    from configs import cifar100
    assert cifar100.get_config().to_dict() == remem.get_config("cifar100").to_dict()


@pytest.mark.parametrize("arg,match", [
    ("mnist", r"Unknown dataset 'mnist'\. Known datasets: caltech101, cars196, .*, svhn_cropped\."),
    (None, r"configs/remem.py needs a dataset name: --config=configs/remem.py:<dataset>, <dataset> one of "
           r"caltech101, .*, svhn_cropped\."),
    ("", r"needs a dataset name"),
])
def test_parametrised_config_rejects_unknown_or_missing_dataset(arg, match):
    with pytest.raises((UserError, registry.UnknownDatasetError), match=match):
        remem.get_config(arg)


def test_config_argument_passes_through_the_command_line():
    c = parse_cli(f"--config={os.path.join(CONFIG_DIR, 'remem.py')}:sun397", "--config.distill.student=resnet50")
    assert c.dataset == "sun397" and c.distill.student == "resnet50"


@pytest.mark.parametrize("dataset,field,match", [
    ("image_folder", "image_folder", r"config.data.image_folder must be a folder holding train/<class>/\*.jpg and "
     r"test/<class>/\*.jpg \(or val/<class>/\*.jpg\) \(dataset 'image_folder'\), got None\."),
    ("imagenet_lt", "imagenet_lt_train_list", r"config.data.imagenet_lt_train_list must be the path of "
     r"ImageNet_LT_train.txt \(dataset 'imagenet_lt'\), got None\."),
    ("imagenet_lt", "imagenet_lt_eval_list", r"config.data.imagenet_lt_eval_list must be the path of "
     r"ImageNet_LT_val.txt or ImageNet_LT_test.txt \(dataset 'imagenet_lt'\), got None\."),
])
def test_user_data_paths_are_required_at_start_up(dataset, field, match):
    config = remem.get_config(dataset)
    config.data.update({k: v for k, v in USER_PATHS[dataset].items() if k != field})
    with pytest.raises(UserError, match=match):
        config_validation.validate(config, STAGES)
    config.data.validation_percent = 10  # then the eval split is held out of train
    if field == "imagenet_lt_eval_list":
        config_validation.validate(config, STAGES)


def test_unknown_dataset_is_rejected_at_start_up():
    config = common.get_config()
    config.dataset = "cifar1000"
    with pytest.raises(registry.UnknownDatasetError, match="Unknown dataset 'cifar1000'"):
        config_validation.validate(config, STAGES)


def _leaf_fields(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaf_fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_every_field_has_a_default_and_a_one_line_comment():
    source = inspect.getsource(common.get_config).splitlines()
    for field in _leaf_fields(common.get_config()):
        lines = [line for line in source if line.strip().startswith(f"c.{field} = ")]
        assert len(lines) == 1, field
        assert "  # " in lines[0] and lines[0].split("  # ", 1)[1].strip(), field


def test_the_data_layer_has_no_defaults_of_its_own():
    """configs/common.py is the one table of config.data defaults; a field it lacks is an error."""
    from remem_jax.data import pipeline
    data = common.get_config().data
    del data["image_size"]
    with pytest.raises(AttributeError, match="image_size"):
        next(pipeline.make_train_iterator(data, "digits", global_batch_size=8, seed=0))


def test_mixup_defaults_follow_the_method():
    from remem_jax.train import distill
    assert distill.mixup_alpha("patient", None) == 0.8
    assert distill.mixup_alpha("kd", None) == 0.0 and distill.mixup_alpha("dist", None) == 0.0
    assert distill.mixup_alpha("patient", 0.0) == 0.0
    assert distill.mixup_alpha("kd", 0.2) == 0.2 and distill.mixup_alpha("scratch", 0.8) == 0.0


def test_paper_defaults():
    c = common.get_config()
    assert c.teacher.checkpoint == "B_16" and c.data.image_size == 224
    assert c.data.few_shot_seed == 12 and c.data.crop_area_min == 0.05 and c.data.shuffle_buffer == 10_000
    assert (c.finetune.batch_size, c.finetune.sam_rho, c.finetune.mlp_alpha, c.finetune.attn_beta) == (512, 0.5, 0.8, 1.0)
    assert (c.finetune.momentum, c.finetune.weight_decay, c.finetune.grad_clip_norm) == (0.9, 1e-4, 1.0)
    assert (c.finetune.lora_rank, c.finetune.lora_alpha, c.finetune.adapter_reduction) == (32, 32.0, 16)
    assert c.distill.steps == 20_000 and "vanilla" in c.finetune.settings


@pytest.mark.parametrize("field,value,match", [
    ("finetune.sam_rho", -0.1, r"config.finetune.sam_rho must be in \[0, 10\].*got -0.1"),
    ("finetune.mode", "qlora", r"config.finetune.mode must be one of full, head, lora, adapter, got 'qlora'"),
    ("finetune.mlp_alpha", 0.0, r"config.finetune.mlp_alpha must be in \(0, 2\]"),
    ("finetune.batch_size", 0, r"config.finetune.batch_size must be a positive integer, got 0"),
    ("distill.method", "fitnet", r"config.distill.method must be one of kd, dist, patient, got 'fitnet'"),
    ("distill.kd_weight", 1.5, r"config.distill.kd_weight must be in \[0, 1\]"),
    ("stages", ("finetune_teacher", "train_everything"), r"config.stages must be a list of .*'train_everything'"),
    ("distill.student", "resnet19", r"config.distill.student must be one of resnet18, resnet34, resnet50, "
     r"mobilenet_v2, efficientnet_v2_b0, efficientnet_v2_s, got 'resnet19'\."),
    ("finetune.keep_steps", (500, 20_000, 30_000), r"config.finetune.keep_steps must be step numbers <= "
     r"finetune.steps \(10000\), got \(500, 20000, 30000\); \[20000, 30000\] would never be reached\."),
    ("finetune.keep_steps", (0, 500), r"config.finetune.keep_steps must be positive step numbers, got \(0, 500\)"),
    ("finetune.residual_mode", "square", r"config.finetune.residual_mode must be one of two_minus, inverse, got 'square'"),
    ("finetune.lora_targets", "qkv", r"config.finetune.lora_targets must be one of qv, all, got 'qkv'"),
    ("finetune.settings", ("remem", "sam"), r"config.finetune.settings must be a non-empty list of remem, vanilla"),
    ("finetune.dtype", "float16", r"config.finetune.dtype must be one of float32, bfloat16, auto, got 'float16'"),
    ("distill.teachers", "best", r"config.distill.teachers must be one of all, last, got 'best'"),
    ("data.image_folder_metric", "top5", r"config.data.image_folder_metric must be one of top1, mean_per_class"),
])
def test_validation_names_the_field(field, value, match):
    config = common.get_config()
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(UserError, match=match):
        config_validation.validate(config, STAGES)


@pytest.mark.parametrize("field,value,match", [
    ("pretrain.optimizer", "lamb", r"config.pretrain.optimizer must be one of sgd, adam, got 'lamb'"),
    ("pretrain.dtype", "half", r"config.pretrain.dtype must be one of float32, bfloat16, auto, got 'half'"),
    ("pretrain.variant", "H_14", r"config.pretrain.variant: Unknown ViT variant 'H_14'"),
])
def test_pretrain_validation_names_the_field(field, value, match):
    config = common.get_config()
    config.stages = ("pretrain_teacher",)
    section, _, key = field.rpartition(".")
    config[section][key] = value
    with pytest.raises(UserError, match=match):
        config_validation.validate(config, STAGES)


def test_allowed_values_come_from_the_implementing_modules():
    """Each error lists exactly what the implementing module accepts (one owner per list)."""
    from remem_jax import optim, surgery
    from remem_jax.dtypes import DTYPES
    from remem_jax.models import students, vit
    from remem_jax.train import distill, teacher
    owners = {"finetune.mode": surgery.TRAINABLE_MODES, "finetune.lora_targets": tuple(surgery.LORA_PRESETS),
              "finetune.residual_mode": vit.RESIDUAL_MODES, "finetune.dtype": tuple(DTYPES),
              "distill.student": tuple(students.STUDENTS), "distill.method": distill.METHODS,
              "distill.teachers": distill.TEACHER_SELECTIONS}
    for field, allowed in owners.items():
        config = common.get_config()
        section, key = field.split(".")
        config[section][key] = "no-such-value"
        with pytest.raises(UserError) as err:
            config_validation.validate(config, STAGES)
        assert f"one of {', '.join(allowed)}, got 'no-such-value'" in str(err.value), field
    config = common.get_config()
    config.finetune.settings = ("nope",)
    with pytest.raises(UserError, match=", ".join(teacher.SETTINGS)):
        config_validation.validate(config, STAGES)
    config = common.get_config()
    config.stages = ("pretrain_teacher",)
    config.pretrain.optimizer = "nope"
    with pytest.raises(UserError, match=", ".join(optim.OPTIMIZERS)):
        config_validation.validate(config, STAGES)


def parse_cli(*args):
    """Parses `--config=... --config.x=...` exactly as remem_jax.main does, in process."""
    from absl import flags
    from ml_collections import config_flags
    argv = ["remem_jax", *args]
    fv = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return holder.value


def test_use_the_default_is_none_and_command_line_overrides_still_work():
    c = common.get_config()
    for field in ("pretrain.warmup_steps", "finetune.warmup_steps", "distill.warmup_steps", "distill.mixup_alpha",
                  "data.num_parallel_calls", "pretrain.num_layers", "data.few_shot_fraction", "data.few_shot_per_class",
                  "data.eval_examples"):
        section, key = field.split(".")
        assert c[section][key] is None, field
    config_file = os.path.join(CONFIG_DIR, "cifar100.py")
    c = parse_cli(f"--config={config_file}", "--config.finetune.warmup_steps=10", "--config.distill.warmup_steps=0",
                  "--config.pretrain.warmup_steps=7", "--config.distill.mixup_alpha=0", "--config.pretrain.num_layers=4",
                  "--config.data.num_parallel_calls=3", "--config.data.few_shot_fraction=0.1",
                  "--config.data.eval_examples=500")
    assert (c.finetune.warmup_steps, c.distill.warmup_steps, c.pretrain.warmup_steps) == (10, 0, 7)
    assert c.distill.mixup_alpha == 0.0 and isinstance(c.distill.mixup_alpha, float)
    assert (c.pretrain.num_layers, c.data.num_parallel_calls, c.data.few_shot_fraction) == (4, 3, 0.1)
    assert c.data.eval_examples == 500
    assert c.to_dict()["finetune"]["warmup_steps"] == 10 and c.to_dict()["data"]["few_shot_per_class"] is None
    config_validation.validate(c, STAGES)


def test_defaults_the_none_fields_stand_for():
    from remem_jax.train import common as train_common
    assert train_common.warmup_steps(None, 10_000) == 500 and train_common.warmup_steps(None, 1000) == 100
    assert train_common.warmup_steps(None, 20_000, default_fraction=0.05) == 1000
    assert train_common.warmup_steps(0, 1000) == 0 and train_common.warmup_steps(10, 1000, 0.05) == 10


@pytest.mark.parametrize("field,value,match", [
    ("finetune.warmup_steps", -1, r"config.finetune.warmup_steps must be None \(min\(500, 10% of steps\)\) or an "
     r"integer in \[0, finetune.steps=10000\), got -1\."),
    ("distill.warmup_steps", 20_000, r"config.distill.warmup_steps must be None \(5% of steps\) or an integer in "
     r"\[0, distill.steps=20000\), got 20000\."),
    ("distill.mixup_alpha", -1.0, r"config.distill.mixup_alpha must be None \(0.8 for patient, 0 for kd/dist\) or "
     r">= 0 \(0: off\), got -1.0\."),
    ("data.num_parallel_calls", -1, r"config.data.num_parallel_calls must be None \(tf.data.AUTOTUNE\) or a positive "
     r"integer, got -1\."),
    ("data.few_shot_fraction", 0.0, r"config.data.few_shot_fraction must be None \(whole train split\) or in "
     r"\(0, 1\], got 0.0\."),
    ("data.few_shot_per_class", 0, r"config.data.few_shot_per_class must be None \(off\) or a positive integer, got 0\."),
    ("data.eval_examples", 0, r"config.data.eval_examples must be None \(every evaluation uses the whole eval split\) "
     r"or a positive integer, got 0\."),
    ("data.eval_examples", -5, r"config.data.eval_examples must be None .* or a positive integer, got -5\."),
    ("finetune.log_every", 0, r"config.finetune.log_every must be a positive integer, got 0\."),
    ("distill.eval_every", -5, r"config.distill.eval_every must be an integer >= 0 \(0: only kept steps and the end\)"),
])
def test_sentinel_validation_names_the_field(field, value, match):
    config = common.get_config()
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(UserError, match=match):
        config_validation.validate(config, STAGES)


@pytest.mark.parametrize("field,value,match", [
    ("seeds", 0, r"config.seeds must be a positive integer, got 0\."),
    ("seed", -1, r"config.seed must be an integer >= 0, got -1\."),
])
def test_seed_fields_are_validated(field, value, match):
    config = common.get_config()
    config[field] = value
    with pytest.raises(UserError, match=match):
        config_validation.validate(config, STAGES)


def test_few_shot_fraction_and_per_class_are_exclusive():
    config = common.get_config()
    config.data.few_shot_fraction, config.data.few_shot_per_class = 0.1, 5
    with pytest.raises(UserError, match=r"config.data.few_shot_per_class must be None when data.few_shot_fraction "
                                        r"is set \(0.1\), got 5\."):
        config_validation.validate(config, STAGES)


def test_pretrain_num_layers_must_be_none_or_positive():
    config = common.get_config()
    config.stages = ("pretrain_teacher",)
    config.pretrain.num_layers = 0
    with pytest.raises(UserError, match=r"config.pretrain.num_layers must be None \(the variant's depth\) or a "
                                        r"positive integer, got 0\."):
        config_validation.validate(config, STAGES)


@pytest.mark.parametrize("field,value,match", [
    ("wecolora.d", 0, r"config.wecolora.d must be a positive integer, got 0"),
    ("wecolora.variants", ("wecolora", "lora"), r"config.wecolora.variants must be a non-empty list of wecolora, "
                                                r"lora_qv, weco_kd, scratch_kd"),
    # The boundary: warmup as long as the whole schedule (configs/wecolora_digits.py: 30 epochs).
    ("wecolora.warmup_epochs", 30, r"config.wecolora.warmup_epochs must be an integer in \[0, wecolora.epochs=30\), got 30"),
    ("wecolora.adam_betas", (0.9, 1.0), r"config.wecolora.adam_betas must be two numbers in \[0, 1\)"),
    ("linear_probe.train_fraction", 1.5, r"config.linear_probe.train_fraction must be None \(whole train split\)"),
    ("linear_probe.trust_coefficient", 0.0, r"config.linear_probe.trust_coefficient must be > 0"),
])
def test_wecolora_validation_names_the_field(field, value, match):
    config = importlib.import_module("configs.wecolora_digits").get_config()
    section, _, key = field.rpartition(".")
    config[section][key] = value
    with pytest.raises(UserError, match=match):
        config_validation.validate(config, STAGES)


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu(monkeypatch):
    import jax
    import jax.numpy as jnp
    from remem_jax import dtypes
    config = common.get_config()
    for section in ("teacher", "pretrain", "finetune", "distill", "wecolora", "tinymim", "student_finetune"):
        assert config[section].dtype == "auto", section
    config_validation.validate(config, STAGES)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert dtypes.DTYPES["auto"] == jnp.float32 and dtypes.resolved_name("auto") == "float32"
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        assert dtypes.DTYPES["auto"] == jnp.bfloat16
    assert dtypes.DTYPES["float32"] == jnp.float32 and dtypes.DTYPES["bfloat16"] == jnp.bfloat16


@pytest.mark.parametrize("field,value,match", [
    ("tinymim.drop_path", 1.0, r"config.tinymim.drop_path must be in \[0, 1\), got 1.0"),
    ("tinymim.target", "tokens", r"config.tinymim.target must be one of"),
    ("student_finetune.layer_decay", 0.0, r"config.student_finetune.layer_decay must be in \(0, 1\] \(1: off\), got 0.0"),
    ("student_finetune.layer_decay", 1.5, r"config.student_finetune.layer_decay must be in \(0, 1\] \(1: off\), got 1.5"),
])
def test_tinymim_validation_names_the_field(field, value, match):
    config = importlib.import_module("configs.tinymim_digits").get_config()
    section, _, key = field.rpartition(".")
    with config.unlocked():
        config[section][key] = value
    with pytest.raises(UserError, match=match):
        config_validation.validate(config, STAGES)
