"""Start-up mistakes through the command line: one `remem_jax: error:` line, exit status 2, before any training."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import digits
from remem_jax import config_validation, errors
from remem_jax.train import stages
from tests import helpers
from tests.test_cli import REPO, run_cli
from tests.test_cli_inputs import one_error_line


@pytest.mark.parametrize("overrides,message", [
    (["--config.data.image_size=12"], "config.data.image_size must be a multiple of the patch size 8 of "
     "config.pretrain.variant='Ti_8', got 12."),
    (["--config.no_such=1"], "unknown config field config.no_such (every field is listed in configs/common.py)"),
])
def test_config_mistakes(tmp_path, overrides, message):
    line = one_error_line(run_cli(tmp_path / "run", *overrides))
    assert message in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field,value,message", [
    ("data.image_size", 4, "config.data.image_size must be a multiple of the patch size 8 of "
     "config.pretrain.variant='Ti_8', got 4."),
    ("finetune.settings", ("remem", "remem"), "config.finetune.settings must be a list without repeats, "
     "got ('remem', 'remem')."),
    ("stages", ("pretrain_teacher", "pretrain_teacher"), "config.stages must be a list without repeats"),
])
def test_config_mistakes_found_by_validation(field, value, message):
    # The same start-up validation as above; its one-line exit is the generic UserError path tested there.
    config = digits.get_config()
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(errors.UserError, match=re.escape(message)):
        config_validation.validate(config, stages.table())


def test_global_batch_that_does_not_split_over_the_devices(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}
    result = subprocess.run([sys.executable, "-m", "remem_jax.main", "--config=configs/digits.py",
                             f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    line = one_error_line(result)
    assert "config.pretrain.batch_size must be a multiple of the 3 devices of this run (each gets an equal share " \
           "of the global batch), got 64." in line, line
    assert not (tmp_path / "run").exists()


def test_missing_config_file_and_extra_argument(tmp_path):
    line = one_error_line(run_cli(tmp_path, config="configs/no_such.py"))
    assert line == "remem_jax: error: --config: the config file 'configs/no_such.py' does not exist (paths are " \
                   "relative to the current folder).", line
    line = one_error_line(run_cli(tmp_path, "extra"))
    assert line == "remem_jax: error: unexpected argument 'extra': every option is a --flag (e.g. --config=FILE " \
                   "--workdir=DIR)", line


def test_analyze_names_an_unknown_field_as_main_does(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    result = subprocess.run([sys.executable, "-m", "remem_jax.analyze", "--config=configs/analysis_digits.py",
                             f"--workdir={tmp_path}", "--config.analysis.no_such=1"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert one_error_line(result) == "remem_jax: error: unknown config field config.analysis.no_such (every field " \
                                     "is listed in configs/common.py)"


@pytest.fixture(scope="module")
def two_block_teacher(tmp_path_factory):
    return helpers.random_vit_npz(tmp_path_factory.mktemp("teacher") / "ti8.npz")


def test_tinymim_student_deeper_than_its_teacher_is_refused(tmp_path, two_block_teacher):
    line = one_error_line(run_cli(tmp_path / "run", "--config.stages=('relation_distill',)",
                                  f"--config.teacher.checkpoint={two_block_teacher}", "--config.data.image_size=16",
                                  "--config.tinymim.student=Ti_8", "--config.tinymim.num_layers=3"))
    assert "config.tinymim.num_layers: the student (3 blocks) is deeper than the teacher" in line, line
    assert not (tmp_path / "run" / "tinymim" / "relation_block2").exists()


def test_hidden_size_that_does_not_split_over_the_heads(tmp_path, two_block_teacher):
    flat = dict(np.load(two_block_teacher))
    key = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    flat[key] = np.zeros((192, 5, 38), np.float32)
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, **flat)
    line = one_error_line(run_cli(tmp_path / "run", "--config.stages=('finetune_teacher',)",
                                  f"--config.teacher.checkpoint={bad}", "--config.data.image_size=16"))
    assert f"{key} has shape (192, 5, 38); expected (hidden, heads, hidden / heads) with hidden = 192" in line, line


def test_export_names_a_missing_path_and_a_file_that_is_not_an_npz(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}

    def export(student):
        return subprocess.run([sys.executable, "-m", "remem_jax.export", f"--student={student}"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    missing = tmp_path / "no_such_dir"
    assert one_error_line(export(missing)) == (
        f"remem_jax: error: --student {str(missing)!r} does not exist; pass a student npz or the folder holding "
        "student.npz and model.json (e.g. WORKDIR/best_student).")
    folder = tmp_path / "best_student"
    folder.mkdir()
    (folder / "student.npz").write_bytes(np.random.default_rng(0).bytes(1000))
    (folder / "model.json").write_text('{"architecture": "resnet18", "kwargs": {}, "num_classes": 10, '
                                       '"image_size": 16, "class_names": ["0", "1", "2", "3", "4", "5", "6", "7", '
                                       '"8", "9"]}')
    line = one_error_line(export(folder))
    assert "student.npz' (1000 bytes) is not an npz file" in line, line
