"""Data that is missing or broken on disk: named before a run starts, or where the pipeline meets it."""
import os

import numpy as np
import pytest
import tensorflow as tf

from remem_jax.data import pipeline, sources
from tests import helpers
from remem_jax.data.sources import DataError, DataNotFoundError

S = 16


def write_folder(root, split, counts, seed=0):
    rng = np.random.default_rng(seed)
    for c, n in enumerate(counts):
        d = os.path.join(root, split, f"class_{c}")
        os.makedirs(d)
        for i in range(n):
            im = (rng.random((20, 24, 3)) * 255).astype(np.uint8)
            data = tf.io.encode_png(im) if i % 2 else tf.io.encode_jpeg(im)
            tf.io.write_file(os.path.join(d, f"img_{i}.{'png' if i % 2 else 'jpg'}"), data)


@pytest.fixture
def folder(tmp_path):
    root = str(tmp_path / "images")
    write_folder(root, "train", [6, 5])
    write_folder(root, "test", [3, 2], seed=1)
    return root


def break_images(root):
    """A text file named .jpg and a JPEG cut in half (valid header, no body)."""
    not_jpeg = os.path.join(root, "train", "class_0", "zz_notes.jpg")
    open(not_jpeg, "w").write("this is not an image")
    good = open(os.path.join(root, "train", "class_1", "img_0.jpg"), "rb").read()
    truncated = os.path.join(root, "train", "class_1", "zz_cut.jpg")
    open(truncated, "wb").write(good[: len(good) // 3])
    return not_jpeg, truncated


def cfg(root, **kw):
    return helpers.data_config(image_size=S, image_folder=root, **kw)


def test_undecodable_images_are_named_by_the_train_pipeline(folder):
    not_jpeg, truncated = break_images(folder)
    with pytest.raises(DataError) as info:
        it = pipeline.make_train_iterator(cfg(folder), "image_folder", global_batch_size=8, seed=0)
        for _ in range(4):  # 13 images: every one is decoded within two batches
            next(it)
    msg = str(info.value)
    assert msg.startswith(f"Cannot decode image {not_jpeg!r} (InvalidArgumentError: ")
    assert f"2 of 13 images of dataset 'image_folder' are undecodable; the others: {truncated}." in msg
    assert "set config.data.skip_bad_images=True" in msg and "\n" not in msg


def test_undecodable_test_image_is_named_by_eval(folder):
    bad = os.path.join(folder, "test", "class_1", "broken.png")
    open(bad, "wb").write(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    with pytest.raises(DataError, match=rf"Cannot decode image '{bad}' .*1 of 6 images"):
        list(pipeline.make_eval_data(cfg(folder), "image_folder", global_batch_size=8))


def test_skip_bad_images_drops_and_counts_them(folder):
    not_jpeg, truncated = break_images(folder)
    report = sources.check_ready(cfg(folder, skip_bad_images=True), "image_folder")
    assert report == {"dataset": "image_folder", "eval_split": "test", "skipped_bad_images": {"train": 2, "test": 0},
                      "skipped_files": sorted([not_jpeg, truncated])}
    data = pipeline.TrainData(cfg(folder, skip_bad_images=True), "image_folder", global_batch_size=8, seed=0)
    assert data.num_examples == 11
    it = data.iterator()
    for _ in range(3):  # more than two epochs, nothing raises
        assert next(it)["image"].shape[-3:] == (S, S, 3)
    ev = pipeline.make_eval_data(cfg(folder, skip_bad_images=True), "image_folder", global_batch_size=8)
    assert sum(int(b["mask"].sum()) for b in ev) == 5


def test_class_with_only_bad_images_is_an_error_even_when_skipping(folder):
    d = os.path.join(folder, "train", "class_2")
    os.makedirs(d)
    open(os.path.join(d, "a.jpg"), "w").write("<html></html>")
    with pytest.raises(DataError, match=rf"class '{d}' has no decodable image"):
        sources.check_ready(cfg(folder, skip_bad_images=True), "image_folder")


def test_test_class_missing_from_train_names_the_folder(folder):
    os.makedirs(os.path.join(folder, "test", "class_9"))
    with pytest.raises(DataError) as info:
        sources.check_ready(cfg(folder), "image_folder")
    train, test = os.path.join(folder, "train"), os.path.join(folder, "test")
    assert str(info.value) == (
        f"Image folder {test!r} has 1 class folder(s) that {train!r} lacks: {test}/class_9; every evaluated "
        "class needs training images (train classes: class_0, class_1).")


@pytest.mark.parametrize("split,extra", [("train", None), ("test", "notes.txt")])
def test_empty_class_folder_names_the_folder(folder, split, extra):
    d = os.path.join(folder, split, "class_1" if split == "test" else "class_5")
    if split == "test":
        for f in os.listdir(d):
            os.remove(os.path.join(d, f))
        open(os.path.join(d, extra), "w").write("x")
    else:
        os.makedirs(d)
    held = f"it holds 1 other file(s), e.g. {extra!r}" if extra else "it is empty"
    with pytest.raises(DataNotFoundError) as info:
        sources.check_ready(cfg(folder), "image_folder")
    assert str(info.value) == (f"Image folder class {d!r} has no .jpg/.jpeg/.png images ({held}); add images "
                               "or remove the folder.")


def test_check_ready_only_checks_the_splits_the_run_reads(folder, tmp_path):
    import shutil
    shutil.rmtree(os.path.join(folder, "test"))
    with pytest.raises(DataNotFoundError, match="has no eval split"):
        sources.check_ready(cfg(folder), "image_folder")
    assert sources.check_ready(cfg(folder, validation_percent=20), "image_folder") == {"dataset": "image_folder"}


def eval_count(root) -> int:
    return sum(int(b["mask"].sum()) for b in pipeline.make_eval_data(cfg(root), "image_folder", global_batch_size=8))


def test_val_is_the_eval_split_of_a_folder_without_test(folder, caplog):
    os.rename(os.path.join(folder, "test"), os.path.join(folder, "val"))  # ImageNet's layout
    caplog.set_level("INFO")
    assert sources.image_folder_eval_split(cfg(folder)) == "val"
    assert sources.check_ready(cfg(folder), "image_folder") == {"dataset": "image_folder", "eval_split": "val"}
    assert eval_count(folder) == 5
    assert f"image_folder: evaluating on {os.path.join(folder, 'val')}." in caplog.text


def test_test_wins_over_val_and_val_is_said_to_be_ignored(folder, caplog):
    write_folder(folder, "val", [1, 1], seed=2)
    caplog.set_level("INFO")
    assert sources.check_ready(cfg(folder), "image_folder")["eval_split"] == "test"
    assert eval_count(folder) == 5  # test/'s 3 + 2, not val/'s 1 + 1
    assert (f"image_folder: evaluating on {os.path.join(folder, 'test')}; {os.path.join(folder, 'val')} is "
            "ignored (test/ wins).") in caplog.text


def test_a_folder_with_neither_test_nor_val_names_both(folder):
    import shutil
    shutil.rmtree(os.path.join(folder, "test"))
    test, val = os.path.join(folder, "test"), os.path.join(folder, "val")
    expected = (f"Image folder config.data.image_folder={folder!r} has no eval split: expected {test!r} or {val!r} "
                "(one sub-folder of images per class, as in train/), found neither.")
    with pytest.raises(DataNotFoundError) as info:
        sources.check_ready(cfg(folder), "image_folder")
    assert str(info.value) == expected
    with pytest.raises(DataNotFoundError) as info:
        pipeline.make_eval_data(cfg(folder), "image_folder", global_batch_size=8)
    assert str(info.value) == expected


def test_check_ready_names_unprepared_tfds_data_and_missing_lists(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"Dataset 'cifar10': TFDS builder 'cifar10' has no prepared data "
                                                rf"in data_dir={tmp_path} .*`tfds build cifar10 --data_dir={tmp_path}`"):
        sources.check_ready(helpers.data_config(data_dir=str(tmp_path)), "cifar10")
    with pytest.raises(DataNotFoundError, match="MANUAL download"):
        sources.check_ready(helpers.data_config(data_dir=str(tmp_path)), "resisc45")
    with pytest.raises(DataNotFoundError, match="imagenet_lt_train_list"):
        sources.check_ready(helpers.data_config(), "imagenet_lt")
    assert sources.check_ready(helpers.data_config(), "digits") == {"dataset": "digits"}
