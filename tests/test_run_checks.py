"""Start-up checks of `remem_jax.main.run`: the workdir, the config it was started with, the data first."""
import dataclasses
import json
import os

import pytest
import tensorflow as tf

from configs import digits
from remem_jax import checkpoints, errors, main, workdir as workdir_lib
from remem_jax.data import DataNotFoundError
from remem_jax.train import stages as stages_lib


@pytest.fixture
def fake_stages(monkeypatch):
    """The real stage entries with runs that only record that they ran, so `run` itself is what is tested."""
    ran = []
    real = stages_lib.table()

    def stage(name):
        def fn(ctx):
            ran.append(name)
            return stages_lib.StageOutput({"ran": name}, f"| ran |\n|---|\n| {name} |")
        return dataclasses.replace(real[name], run=fn)
    names = ("pretrain_teacher", "finetune_teacher", "distill_student")
    monkeypatch.setattr(stages_lib, "table", lambda: {n: stage(n) for n in names})
    return ran


def config(**changes):
    c = digits.get_config()
    c.stages = ("pretrain_teacher", "finetune_teacher")
    for key, value in changes.items():
        section, field = key.split("__")
        c[section][field] = value
    return c


def test_missing_dataset_is_reported_before_any_checkpoint_is_touched(tmp_path, monkeypatch):
    touched = []
    for name in ("exists", "stat", "GFile"):
        real = getattr(tf.io.gfile, name)

        def spy(path, *args, _real=real, **kwargs):
            if "://" in str(path):
                touched.append(path)
            return _real(path, *args, **kwargs)
        monkeypatch.setattr(tf.io.gfile, name, spy)
    monkeypatch.setattr(checkpoints, "load_npz", lambda *a, **k: pytest.fail("a checkpoint was read"))
    c = digits.get_config()
    c.dataset = "cifar10"
    c.data.data_dir = str(tmp_path / "tfds")
    c.stages = ("finetune_teacher", "distill_student")
    c.teacher.checkpoint = "B_16"  # gs://
    with pytest.raises(DataNotFoundError, match=r"Dataset 'cifar10': TFDS builder 'cifar10' has no prepared data"):
        main.run(c, str(tmp_path / "run"))
    assert touched == []
    assert not os.path.exists(tmp_path / "run" / "config.json")  # a failed first start pins no config


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("x")
    with pytest.raises(errors.UserError) as info:
        main.run(config(), str(path))
    assert str(info.value) == (f"--workdir {str(path)!r} is an existing file, not a directory; pass a directory "
                               "(new or from an earlier run).")
    with pytest.raises(errors.UserError, match=r"Cannot create --workdir '.*results.txt/run': NotADirectoryError"):
        main.run(config(), str(path / "run"))


def test_config_is_stored_and_a_result_changing_change_is_refused(tmp_path, fake_stages):
    wd = str(tmp_path)
    main.run(config(), wd)
    stored = json.load(open(tmp_path / "config.json"))
    assert stored["started_stages"] == ["pretrain_teacher", "finetune_teacher"]
    assert stored["config"]["finetune"]["lr"] == 0.01 and stored["changes"] == []

    with pytest.raises(errors.UserError) as info:
        main.run(config(finetune__lr=0.02, pretrain__steps=70, finetune__log_every=5), wd)
    assert str(info.value) == (
        f"--workdir {wd} was started with another config, and these changes alter results of stages already "
        "started there (finetune_teacher, pretrain_teacher): finetune.lr: 0.01 -> 0.02; pretrain.steps: 500 -> 70. "
        "Use a new --workdir, undo the changes, or pass --allow_config_change to continue anyway "
        f"(the change is recorded in {wd}/config.json).")
    assert json.load(open(tmp_path / "config.json")) == stored  # a refused start changes nothing

    main.run(config(finetune__lr=0.02, finetune__log_every=5), wd, allow_config_change=True)
    stored = json.load(open(tmp_path / "config.json"))
    assert stored["config"]["finetune"]["lr"] == 0.02
    assert stored["changes"][-1]["fields"] == {"finetune.lr": [0.01, 0.02], "finetune.log_every": [25, 5]}
    assert stored["changes"][-1]["override"] is True


def test_io_fields_new_stages_and_unstarted_stages_may_change(tmp_path, fake_stages):
    wd = str(tmp_path)
    main.run(config(), wd)
    c = config(finetune__eval_every=7, distill__lr=0.3, data__prefetch=4, teacher__cache_dir=str(tmp_path / "c"),
               data__num_parallel_calls=2, pretrain__checkpoint_every=9)
    c.stages = ("pretrain_teacher", "finetune_teacher", "distill_student")  # the pipeline extended
    main.run(c, wd)
    stored = json.load(open(tmp_path / "config.json"))
    assert stored["started_stages"] == ["pretrain_teacher", "finetune_teacher", "distill_student"]
    change = stored["changes"][-1]
    assert change["override"] is False
    assert set(change["fields"]) == {"stages", "finetune.eval_every", "distill.lr", "data.prefetch",
                                     "teacher.cache_dir", "data.num_parallel_calls", "pretrain.checkpoint_every"}
    # distill_student has started now: its fields are protected from here on.
    with pytest.raises(errors.UserError, match=r"\(distill_student\): distill.lr: 0.3 -> 0.4\."):
        c.distill.lr = 0.4
        main.run(c, wd)


def test_shared_fields_protect_every_started_stage():
    old = {"seed": 0, "data": {"image_size": 32}, "stages": ["finetune_teacher"]}
    assert workdir_lib.config_changes(old, {"seed": 1, "data": {"image_size": 32}, "stages": ("finetune_teacher",)}) \
        == {"seed": [0, 1]}
    table = stages_lib.table()
    assert stages_lib.stages_reading("data.image_size", table) == tuple(table)
    assert set(stages_lib.stages_reading("teacher.checkpoint", table)) == {"finetune_teacher", "relation_distill",
                                                                          "fewshot_distill"}
    assert set(stages_lib.stages_reading("teacher.dtype", table)) == {"distill_student", "relation_distill",
                                                                     "fewshot_distill", "linear_probe"}
    assert stages_lib.stages_reading("wecolora.d", table) == ("fewshot_distill",)
    assert set(stages_lib.stages_reading("finetune.lr", table)) == {"finetune_teacher", "analyze"}
    assert set(stages_lib.stages_reading("tinymim.steps", table)) == {"relation_distill", "finetune_student"}
    assert workdir_lib.is_result_neutral("distill.log_every") and not workdir_lib.is_result_neutral("data.image_size")
    assert workdir_lib.is_result_neutral("data.eval_examples")  # only the evaluations between kept steps


def test_skipped_images_are_counted_in_every_stage_result(tmp_path, fake_stages):
    from tests.test_data_checks import write_folder
    root = str(tmp_path / "images")
    write_folder(root, "train", [4, 4])
    write_folder(root, "test", [2, 2])
    bad = os.path.join(root, "train", "class_1", "bad.jpg")
    open(bad, "w").write("not an image")
    c = config()
    c.dataset = "image_folder"
    c.data.image_folder = root
    c.data.skip_bad_images = True
    results = main.run(c, str(tmp_path / "run"))
    assert results["data"] == {"dataset": "image_folder", "eval_split": "test", "skipped_bad_images": {"train": 1, "test": 0},
                               "skipped_files": [bad]}
    assert results["finetune_teacher"]["skipped_bad_images"] == {"train": 1, "test": 0}
    assert json.load(open(tmp_path / "run" / "results.json"))["pretrain_teacher"]["skipped_bad_images"]["train"] == 1


def test_every_finetune_setting_reads_the_one_cached_teacher(tmp_path, monkeypatch):
    import jax
    import numpy as np
    from remem_jax import tree
    from remem_jax.models import vit
    from remem_jax.train import common, teacher, vit_finetune

    model = vit.create_vit("Ti_8", 10, num_layers=1)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)))["params"]
    remote = "ram://bucket/settings/teacher.npz"
    checkpoints.save_augreg(remote, params)
    reads = []
    real = tf.io.gfile.GFile
    monkeypatch.setattr(tf.io.gfile, "GFile", lambda p, mode="r": (reads.append(p) if p == remote else None)
                        or real(p, mode))
    class Loaded(Exception):
        pass

    def load_only(*args, **kwargs):
        raise Loaded()
    monkeypatch.setattr(vit_finetune, "train_classifier", load_only)
    c = config()
    c.data.image_size = 16
    c.teacher.checkpoint = remote
    c.teacher.cache_dir = str(tmp_path / "cache")
    ctx = common.RunContext(config=c, workdir=str(tmp_path / "run"))
    for setting in ("remem", "vanilla"):
        with pytest.raises(Loaded):
            teacher.finetune_setting(ctx, setting)
    assert reads == [remote]
    assert tree.param_count(params) > 0 and os.path.exists(checkpoints.cached_path(remote, c.teacher.cache_dir))
