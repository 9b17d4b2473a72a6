"""Config files load and validate; errors name the field; the data defaults agree."""
import importlib
import os

import pytest

from configs import common
from remem_jax import config_validation, main
from remem_jax.data import config as data_config
from remem_jax.data import registry
from remem_jax.errors import UserError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
CONFIG_NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f not in ("__init__.py", "common.py"))
STAGES = main.stage_functions()


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_file_loads_and_validates(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    registry.get_spec(config.dataset)
    config_validation.validate(config, STAGES)


def test_one_config_per_registry_dataset():
    missing = set(registry.known_datasets()) - set(CONFIG_NAMES) - {"sun397_tfds_test"}
    assert not missing


def test_data_defaults_match_the_data_module():
    defaults = common.get_config().data.to_dict()
    assert set(defaults) == set(data_config.FIELDS)
    for key, (value, _) in data_config.FIELDS.items():
        assert defaults[key] == value, key


def test_mixup_defaults_follow_the_method():
    from remem_jax.train import distill
    assert distill.mixup_alpha("patient", -1.0) == 0.8
    assert distill.mixup_alpha("kd", -1.0) == 0.0 and distill.mixup_alpha("dist", -1.0) == 0.0
    assert distill.mixup_alpha("kd", 0.2) == 0.2 and distill.mixup_alpha("scratch", 0.8) == 0.0


def test_paper_defaults():
    c = common.get_config()
    assert c.teacher.checkpoint == "B_16" and c.data.image_size == 224
    assert (c.finetune.batch_size, c.finetune.sam_rho, c.finetune.mlp_alpha, c.finetune.attn_beta) == (512, 0.5, 0.8, 1.0)
    assert (c.finetune.momentum, c.finetune.weight_decay, c.finetune.grad_clip_norm) == (0.9, 1e-4, 1.0)
    assert (c.finetune.lora_rank, c.finetune.lora_alpha, c.finetune.adapter_reduction) == (32, 32.0, 16)
    assert c.distill.steps == 20_000 and "vanilla" in c.finetune.settings


@pytest.mark.parametrize("field,value,match", [
    ("finetune.sam_rho", -0.1, r"config.finetune.sam_rho must be in \[0, 10\].*got -0.1"),
    ("finetune.mode", "qlora", r"config.finetune.mode must be one of full, lora, adapter, head, got 'qlora'"),
    ("finetune.mlp_alpha", 0.0, r"config.finetune.mlp_alpha must be in \(0, 2\]"),
    ("finetune.batch_size", 0, r"config.finetune.batch_size must be a positive integer, got 0"),
    ("distill.method", "fitnet", r"config.distill.method must be one of kd, dist, patient, got 'fitnet'"),
    ("distill.kd_weight", 1.5, r"config.distill.kd_weight must be in \[0, 1\]"),
    ("stages", ("finetune_teacher", "train_everything"), r"config.stages must be a list of .*'train_everything'"),
])
def test_validation_names_the_field(field, value, match):
    config = common.get_config()
    section, _, key = field.rpartition(".")
    (config[section] if section else config)[key] = value
    with pytest.raises(UserError, match=match):
        config_validation.validate(config, STAGES)
