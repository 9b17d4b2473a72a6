"""The workdir under faults: a second process, a read-only or full file system. One line, exit 2, nothing lost."""
import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import helpers
from tests.test_cli import REPO
from tests.test_cli_inputs import one_error_line

FINETUNE = ["--config.stages=('finetune_teacher',)", "--config.data.image_size=16", "--config.finetune.steps=6",
            "--config.finetune.keep_steps=(3,6)", "--config.finetune.batch_size=16", "--config.finetune.warmup_steps=1",
            "--config.finetune.eval_every=0", "--config.finetune.checkpoint_every=3", "--config.finetune.log_every=3",
            "--config.finetune.settings=('remem',)"]


@pytest.fixture(scope="module")
def teacher_npz(tmp_path_factory):
    return helpers.random_vit_npz(tmp_path_factory.mktemp("teacher") / "ti8.npz")


def cli(workdir, teacher, *extra):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "remem_jax.main", "--config=configs/digits.py", f"--workdir={workdir}",
           f"--config.teacher.checkpoint={teacher}", *FINETUNE, *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root only, as CI runs); skipped where mounting is not allowed."""
    mounts = []

    def mount(name, options):
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounts.append(path)
        return path
    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_second_process_on_a_workdir_in_use_stops_naming_the_holder(tmp_path, teacher_npz):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-04T10:00:00+00:00"}
    (workdir / "run.lock").write_text(json.dumps(holder))  # this test's process: alive
    line = one_error_line(cli(workdir, teacher_npz))
    assert line == (f"remem_jax: error: --workdir {workdir} is in use by process {os.getpid()} on "
                    f"{socket.gethostname()} (started 2026-12-04T10:00:00+00:00; lock file {workdir}/run.lock). "
                    f"Wait for it to finish, or, if that process no longer runs, delete {workdir}/run.lock.")
    assert json.loads((workdir / "run.lock").read_text()) == holder and sorted(os.listdir(workdir)) == ["run.lock"]


def test_a_lock_left_by_a_killed_process_is_taken_over_and_removed_at_exit(tmp_path):
    from tests.test_stage_table import toy_config, toy_table
    from remem_jax import main
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                  "started": "2026-12-04T10:00:00+00:00"}))
    seen = []
    table = toy_table()
    run_toy = table["toy"].run

    def toy_sees_its_own_lock(ctx):
        seen.append(json.loads((workdir / "run.lock").read_text())["pid"])
        return run_toy(ctx)
    table["toy"] = dataclasses.replace(table["toy"], run=toy_sees_its_own_lock)
    assert main.run(toy_config(), str(workdir), stage_table=table)["toy"]["summary"]["score"] == 2.0
    assert seen == [os.getpid()]  # taken over while the run worked
    assert not (workdir / "run.lock").exists()  # and removed at its end


def test_a_read_only_workdir_is_one_line(tmpfs, teacher_npz):
    workdir = tmpfs("ro", "ro,size=1m")
    line = one_error_line(cli(workdir, teacher_npz))
    assert line == f"remem_jax: error: Cannot write to --workdir '{workdir}': it is on a read-only file system."


def test_a_full_disk_is_one_line_and_the_rerun_resumes_once_space_is_freed(tmp_path, tmpfs, teacher_npz):
    want = cli(tmp_path / "reference", teacher_npz)
    assert want.returncode == 0, want.stderr[-3000:]
    disk = tmpfs("full", "size=16m")  # the run needs about 23 MiB: it fills up after its step-3 checkpoint
    result = cli(disk / "run", teacher_npz)
    line = one_error_line(result)
    assert line.startswith(f"remem_jax: error: No space left to write {disk}/run/finetune/remem/"), line
    assert "MiB free on its device" in line and result.stderr.count("Traceback") == 0, result.stderr[-3000:]
    assert os.listdir(disk / "run" / "finetune" / "remem" / "checkpoints") == ["3"]
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    again = cli(disk / "run", teacher_npz)
    assert again.returncode == 0, again.stderr[-3000:]
    with np.load(tmp_path / "reference" / "finetune" / "remem" / "teachers" / "step_6.npz") as a, \
            np.load(disk / "run" / "finetune" / "remem" / "teachers" / "step_6.npz") as b:
        assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert [f for _, _, names in os.walk(disk / "run") for f in names if ".tmp-" in f] == []
