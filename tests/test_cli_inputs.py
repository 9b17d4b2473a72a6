"""Broken inputs through the command line: one `remem_jax: error:` line, exit status 2, nothing left behind."""
import json
import os

from configs import digits
from tests.test_cli import run_cli


def one_error_line(result):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("remem_jax: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_unreadable_remote_checkpoint(tmp_path):
    cache = tmp_path / "cache"
    line = one_error_line(run_cli(tmp_path / "run", "--config.stages=('finetune_teacher',)",
                                  "--config.teacher.checkpoint=nofs://bucket/B_16.npz",
                                  f"--config.teacher.cache_dir={cache}"))
    assert line.startswith("remem_jax: error: Cannot read checkpoint nofs://bucket/B_16.npz: TensorFlow has no "
                           "file system for nofs:// paths (UnimplementedError: "), line
    assert line.endswith("and pass the local path as config.teacher.checkpoint."), line
    assert not cache.exists() or [f for _, _, fs in os.walk(cache) for f in fs] == []


def test_missing_dataset_comes_before_the_checkpoint(tmp_path):
    line = one_error_line(run_cli(tmp_path / "run", "--config.dataset=cifar10",
                                  f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.stages=('finetune_teacher',)",
                                  "--config.teacher.checkpoint=nofs://bucket/B_16.npz"))
    assert "Dataset 'cifar10': TFDS builder 'cifar10' has no prepared data" in line and "nofs" not in line, line


def test_workdir_is_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    line = one_error_line(run_cli(path))
    assert line == f"remem_jax: error: --workdir {str(path)!r} is an existing file, not a directory; pass a " \
                   "directory (new or from an earlier run)."
    assert path.read_text() == "keep me"


def test_changed_config_is_refused(tmp_path):
    stored = digits.get_config().to_dict()
    stored["finetune"]["lr"] = 0.5
    record = {"config": json.loads(json.dumps(stored)), "started_stages": ["pretrain_teacher", "finetune_teacher"],
              "changes": []}
    (tmp_path / "config.json").write_text(json.dumps(record))
    line = one_error_line(run_cli(tmp_path))
    assert line == (f"remem_jax: error: --workdir {tmp_path} was started with another config, and these changes "
                    "alter results of stages already started there (finetune_teacher): finetune.lr: 0.5 -> 0.01. Use a "
                    "new --workdir, undo the changes, or pass --allow_config_change to continue anyway (the change is "
                    f"recorded in {tmp_path}/config.json).")
    assert json.loads((tmp_path / "config.json").read_text()) == record
