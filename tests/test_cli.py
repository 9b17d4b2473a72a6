"""The command line: a user's mistake ends with one line and exit status 2, never a traceback."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(tmp_path, *overrides, config="configs/digits.py"):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "remem_jax.main", f"--config={config}",
           f"--workdir={tmp_path}", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides,message", [
    (["--config.finetune.nope=1"], "nope"),
    (["--config.finetune.mode=qlora"], "config.finetune.mode must be one of full, head, lora, adapter, got 'qlora'"),
    (["--config.dataset=mnist"], "Unknown dataset 'mnist'"),
    # The None-default fields take command-line values (the run gets past them to the student check).
    (["--config.finetune.warmup_steps=10", "--config.distill.mixup_alpha=0", "--config.pretrain.num_layers=2",
      "--config.distill.student=resnet19"], "config.distill.student must be one of resnet18, resnet34, resnet50, "
     "mobilenet_v2, efficientnet_v2_b0, efficientnet_v2_s, got 'resnet19'."),
    (["--config.finetune.warmup_steps=-1"], "config.finetune.warmup_steps must be None (min(500, 10% of steps)) or "
     "an integer in [0, finetune.steps=100), got -1."),
    (["--config.finetune.keep_steps=(50,500)"], "config.finetune.keep_steps must be step numbers <= "
     "finetune.steps (100), got (50, 500); [500] would never be reached."),
    (["--config.stages=('finetune_teacher',)", "--config.teacher.checkpoint=/no/such/teacher.npz"],
     "Checkpoint file '/no/such/teacher.npz' does not exist"),
    (["--config.stages=('finetune_teacher',)", "--config.teacher.checkpoint=B_17"], "Unknown checkpoint name 'B_17'"),
    (["--config.stages=('distill_student',)"], "config.stages: 'distill_student' needs the kept teachers from the "
     "'finetune_teacher' stage, which has not run in this workdir: add 'finetune_teacher' before 'distill_student'"),
])
def test_user_errors_end_with_one_line(tmp_path, overrides, message):
    result = run_cli(tmp_path, *overrides)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("remem_jax: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


@pytest.mark.parametrize("config,message", [
    # The argument after ':' reaches get_config: image_folder's required path is what is missing.
    ("configs/remem.py:image_folder", "config.data.image_folder must be a folder holding train/<class>/*.jpg and "
     "test/<class>/*.jpg (or val/<class>/*.jpg) (dataset 'image_folder'), got None."),
    ("configs/remem.py:mnist", "remem_jax: error: Unknown dataset 'mnist'. Known datasets: caltech101, cars196, "),
    ("configs/remem.py", "remem_jax: error: configs/remem.py needs a dataset name: "
     "--config=configs/remem.py:<dataset>, <dataset> one of caltech101, "),
])
def test_parametrised_config_errors_end_with_one_line(tmp_path, config, message):
    result = run_cli(tmp_path, config=config)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("remem_jax: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


def test_missing_workdir_flag():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", "remem_jax.main", "--config=configs/digits.py"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--workdir is required" in result.stderr


_TOOL = """
import sys
from absl import logging
from remem_jax import cli

def main(argv, holders):
    logging.info("progress line of the tool")
    logging.warning("a warning of the tool")

cli.run(main, lambda: {}, progress=sys.argv.pop(1) == "progress")
"""


@pytest.mark.parametrize("mode", ["progress", "quiet"])
def test_cli_run_shows_info_lines_only_for_long_running_tools(mode):
    # remem_jax.analyze runs with progress=True (its step lines must show); export and predict do not.
    result = subprocess.run([sys.executable, "-c", _TOOL, mode], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "a warning of the tool" in result.stderr
    assert ("progress line of the tool" in result.stderr) == (mode == "progress")
