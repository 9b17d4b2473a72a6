"""Pipeline tests on TFDS mock data, the offline digits and a generated PNG image folder."""
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from remem_jax.data import augment, pipeline, sources
from remem_jax.data import DataNotFoundError, UnknownDatasetError
from tests import helpers

S = 32  # Test image size.
CFG = helpers.data_config(image_size=S, shuffle_buffer=64)


def cfg_with(**changes):
    return helpers.data_config(image_size=S, shuffle_buffer=64, **changes)


def _check_train_batch(batch, num_classes, global_batch):
    ld = jax.local_device_count()
    pd = global_batch // jax.device_count()
    assert batch["image"].shape == (ld, pd, S, S, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (ld, pd) and batch["label"].dtype == np.int32
    assert batch["soft_label"].shape == (ld, pd, num_classes)
    assert batch["soft_label"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.05  # Real pixels, not a constant.
    assert ((batch["label"] >= 0) & (batch["label"] < num_classes)).all()
    np.testing.assert_allclose(batch["soft_label"].sum(-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name,num_classes", [("cifar100", 100), ("oxford_flowers102", 102),
                                              ("caltech101", 102), ("sun397", 397)])
def test_tfds_mock_train_and_eval(name, num_classes):
    with tfds.testing.mock_data(num_examples=21):
        it = pipeline.make_train_iterator(CFG, name, global_batch_size=16, seed=3)
        for _ in range(3):  # 48 > 21 examples: crosses an epoch boundary.
            batch = next(it)
            _check_train_batch(batch, num_classes, 16)
            np.testing.assert_array_equal(batch["soft_label"].argmax(-1), batch["label"])
        ev = pipeline.make_eval_data(CFG, name, global_batch_size=16)
        assert (ev.num_examples, ev.num_batches) == (21, 2)
        batches = list(ev)
        assert len(batches) == 2
        mask = np.concatenate([b["mask"].reshape(-1) for b in batches])
        np.testing.assert_array_equal(mask, np.r_[np.ones(21), np.zeros(11)])
        for b in batches:
            assert b["image"].shape == (8, 2, S, S, 3) and b["label"].dtype == np.int32
        pad = batches[1]["image"].reshape(-1, S, S, 3)[5:]
        assert (pad == 0).all()


def test_tfds_mock_resume_is_exact():
    with tfds.testing.mock_data(num_examples=20):
        full = pipeline.make_train_iterator(CFG, "cifar100", global_batch_size=8, seed=1)
        ref = [next(full) for _ in range(6)]  # 48 examples: 2.4 epochs.
        resumed = pipeline.make_train_iterator(CFG, "cifar100", global_batch_size=8, seed=1,
                                               start_step=4)
        for want in ref[4:]:
            got = next(resumed)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
        other = next(pipeline.make_train_iterator(CFG, "cifar100", global_batch_size=8, seed=2))
        assert not np.array_equal(other["image"], ref[0]["image"])


def test_resume_with_mixup_is_exact():
    """Mixup is keyed on the global step: restarted at step N, the pipeline mixes (lambda and
    partner alike) exactly as the uninterrupted one does at step N."""
    cfg = helpers.data_config(image_size=16, shuffle_buffer=64)
    kw = dict(global_batch_size=16, seed=4, mixup_alpha=0.8)
    full = pipeline.make_train_iterator(cfg, "digits", **kw)
    ref = [next(full) for _ in range(5)]
    resumed = pipeline.make_train_iterator(cfg, "digits", start_step=3, **kw)
    for want in ref[3:]:
        got = next(resumed)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
        assert (want["soft_label"].max(-1) < 1.0).any(), "the batches must be mixed"


def test_mixup_consistency():
    """The mixed batch is lam*x + (1-lam)*roll(x) of the unmixed batch, images and labels alike."""
    kw = dict(global_batch_size=64, seed=5)
    plain = next(pipeline.make_train_iterator(CFG, "digits", **kw))
    mixed = next(pipeline.make_train_iterator(CFG, "digits", mixup_alpha=0.8, **kw))
    np.testing.assert_array_equal(plain["label"], mixed["label"])
    x = plain["image"].reshape(64, S, S, 3)
    y = plain["label"].reshape(64)
    soft = mixed["soft_label"].reshape(64, 10)
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    i = int(np.flatnonzero(y != np.roll(y, 1))[0])
    lam = soft[i, y[i]]
    want_soft = lam * np.eye(10)[y] + (1 - lam) * np.eye(10)[np.roll(y, 1)]
    np.testing.assert_allclose(soft, want_soft, atol=1e-6)
    np.testing.assert_allclose(mixed["image"].reshape(64, S, S, 3),
                               lam * x + (1 - lam) * np.roll(x, 1, axis=0), atol=1e-5)
    assert 0.0 < lam < 1.0
    # Each step draws its own lambda.
    it = pipeline.make_train_iterator(CFG, "digits", mixup_alpha=0.8, **kw)
    lams = set()
    for _ in range(4):
        b = next(it)
        yb, sb = b["label"].reshape(64), b["soft_label"].reshape(64, 10)
        j = int(np.flatnonzero(yb != np.roll(yb, 1))[0])
        lams.add(round(float(sb[j, yb[j]]), 5))
    assert len(lams) == 4


def test_mixup_beta_distribution():
    """lam ~ Beta(alpha, alpha): the mean is 1/2 and the variance 1/(4(2 alpha + 1))."""
    alpha = 0.8
    lams = []
    x = tf.zeros([2, 1])
    for step in range(2000):
        _, soft, lam = augment.mixup(x, tf.eye(2), tf.constant([7, step], tf.int64), alpha)
        lams.append(float(lam))
    lams = np.array(lams)
    assert abs(lams.mean() - 0.5) < 0.03
    assert abs(lams.var() - 1 / (4 * (2 * alpha + 1))) < 0.01


def _write_folder(root, split, counts, rng):
    for c, n in enumerate(counts):
        d = os.path.join(root, split, f"class_{c}")
        os.makedirs(d)
        for i in range(n):
            h, w = rng.integers(20, 50, size=2)
            im = (rng.random((h, w, 3)) * 255).astype(np.uint8)
            ext = "png" if i % 2 else "jpg"
            data = tf.io.encode_png(im) if ext == "png" else tf.io.encode_jpeg(im)
            tf.io.write_file(os.path.join(d, f"img_{i}.{ext}"), data)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = str(tmp_path)
    _write_folder(root, "train", [7, 5, 6], rng)
    _write_folder(root, "test", [3, 2, 4], rng)
    cfg = cfg_with(image_folder=root)
    assert pipeline.get_num_classes(cfg, "image_folder") == 3
    batch = next(pipeline.make_train_iterator(cfg, "image_folder", global_batch_size=16, seed=0))
    _check_train_batch(batch, 3, 16)
    ev = pipeline.make_eval_data(cfg, "image_folder", global_batch_size=8)
    assert (ev.num_examples, ev.num_batches) == (9, 2)
    labels = np.concatenate([b["label"].reshape(-1)[b["mask"].reshape(-1) > 0] for b in ev])
    np.testing.assert_array_equal(np.sort(labels), [0, 0, 0, 1, 1, 2, 2, 2, 2])


def test_hosts_split_every_global_batch():
    """A record table is shared: host p of 3 gets part p of each batch one host would get.

    This process stands in for each host in turn; its local batch is 8 (global_batch_size //
    jax.process_count()), so the three hosts together make the one-host batch of 24.
    """
    cfg = CFG
    parts = [sources.build_source(cfg, "digits", "train", process_index=p, process_count=3)
             for p in range(3)]
    assert all(p.shared and p.host_counts == (1347,) for p in parts)
    one_host = pipeline.TrainData(cfg, "digits", global_batch_size=24, seed=4).iterator()
    hosts = [pipeline.TrainData(cfg, "digits", global_batch_size=8, seed=4, process_index=p,
                                process_count=3).iterator(start_step=1) for p in range(3)]
    next(one_host)
    for _ in range(2):
        want = next(one_host)
        got = [next(h) for h in hosts]
        for k in want:
            np.testing.assert_array_equal(
                np.concatenate([g[k].reshape(8, *g[k].shape[2:]) for g in got]),
                want[k].reshape(24, *want[k].shape[2:]))
    one = pipeline.make_eval_data(cfg, "digits", global_batch_size=24)
    evs = [pipeline.EvalData(cfg, "digits", global_batch_size=8, process_index=p, process_count=3)
           for p in range(3)]
    assert [e.num_batches for e in evs] == [one.num_batches] * 3 == [19] * 3
    assert sum(e.num_examples for e in evs) == one.num_examples == 450
    for want, *got in zip(one, *evs):
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k].reshape(8, *g[k].shape[2:]) for g in got]),
                                          want[k].reshape(24, *want[k].shape[2:]))


def test_mixup_pairs_within_the_global_batch():
    """With mixup, host p of 3 still gets part p of the one-host batch: its first example is mixed
    with the last example of host p-1 (host 0's with the global batch's last), as on one host."""
    one_host = pipeline.TrainData(CFG, "digits", global_batch_size=24, seed=4, mixup_alpha=0.8).iterator()
    hosts = [pipeline.TrainData(CFG, "digits", global_batch_size=8, seed=4, mixup_alpha=0.8, process_index=p,
                                process_count=3).iterator() for p in range(3)]
    for _ in range(2):
        want = next(one_host)
        got = [next(h) for h in hosts]
        assert not np.array_equal(want["soft_label"].max(-1), np.ones_like(want["soft_label"].max(-1)))  # mixed
        for k in want:
            np.testing.assert_array_equal(
                np.concatenate([g[k].reshape(8, *g[k].shape[2:]) for g in got]),
                want[k].reshape(24, *want[k].shape[2:]), err_msg=k)


def test_holdout_split_strings():
    sizes = {"train": 1000, "validation": 200}
    assert sources.holdout_split_strings("train", 2, sizes) == ("train[0:980]", "train[980:1000]")
    tr, ho = sources.holdout_split_strings("train[:80%]", 10, sizes)
    assert (tr, ho) == ("train[0:720]", "train[720:800]")
    tr, ho = sources.holdout_split_strings("train+validation", 50, sizes)
    assert tr == "train[0:500]+validation[0:100]"
    assert ho == "train[500:1000]+validation[100:200]"


def test_errors(tmp_path):
    with pytest.raises(UnknownDatasetError, match="Known datasets"):
        pipeline.make_eval_data(CFG, "imagenet21k", global_batch_size=8)
    with pytest.raises(DataNotFoundError, match="image_folder"):
        pipeline.make_eval_data(CFG, "image_folder", global_batch_size=8)
    missing = str(tmp_path / "nope")
    with pytest.raises(DataNotFoundError, match="nope"):
        pipeline.make_eval_data(cfg_with(image_folder=missing), "image_folder",
                                global_batch_size=8)
    with pytest.raises(DataNotFoundError, match="tfds build cifar100"):
        pipeline.make_eval_data(cfg_with(data_dir=str(tmp_path)), "cifar100",
                                global_batch_size=8)
    with pytest.raises(DataNotFoundError, match="MANUAL download"):
        pipeline.make_eval_data(cfg_with(data_dir=str(tmp_path)), "resisc45",
                                global_batch_size=8)
    with pytest.raises(DataNotFoundError, match="imagenet_lt_train_list"):
        pipeline.make_eval_data(CFG, "imagenet_lt", global_batch_size=8)
    with pytest.raises(DataNotFoundError, match="missing.txt"):
        pipeline.make_eval_data(cfg_with(imagenet_lt_train_list=str(tmp_path / "missing.txt")),
                                "imagenet_lt", global_batch_size=8)
    with pytest.raises(ValueError, match="multiple of jax.device_count"):
        pipeline.make_train_iterator(CFG, "digits", global_batch_size=12, seed=0)


def test_imagenet_lt_from_list_and_image_root(tmp_path):
    rng = np.random.default_rng(1)
    lines = []
    for wnid, label, n in (("n01", 0, 5), ("n02", 1, 2)):
        d = tmp_path / "train" / wnid
        d.mkdir(parents=True)
        for i in range(n):
            tf.io.write_file(str(d / f"{wnid}_{i}.JPEG"),
                             tf.io.encode_jpeg((rng.random((30, 40, 3)) * 255).astype(np.uint8)))
            lines.append(f"train/{wnid}/{wnid}_{i}.JPEG {label}")
    (tmp_path / "lt_train.txt").write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    (tmp_path / "lt_val.txt").write_text(lines[4] + "\n")
    cfg = cfg_with(imagenet_lt_train_list=str(tmp_path / "lt_train.txt"),
               imagenet_lt_eval_list=str(tmp_path / "lt_val.txt"),
               imagenet_lt_image_root=str(tmp_path))
    assert pipeline.num_train_examples(cfg, "imagenet_lt") == 6
    batch = next(pipeline.make_train_iterator(cfg, "imagenet_lt", global_batch_size=8, seed=0))
    assert batch["soft_label"].shape == (8, 1, 1000)
    ev = pipeline.make_eval_data(cfg, "imagenet_lt", global_batch_size=8)
    assert ev.num_examples == 1 and next(iter(ev))["label"][0, 0] == 0


def test_imagenet_lt_tfds_filter_path(tmp_path):
    """Without an image root, list entries are matched by file name in TFDS imagenet2012."""
    with tfds.testing.mock_data(num_examples=12):
        ds = tfds.builder("imagenet2012").as_dataset(split="validation")
        names = [ex["file_name"].decode() for ex in ds.as_numpy_iterator()]
        assert len(set(names)) == 12  # Mock file names are distinct.
        (tmp_path / "train.txt").write_text("".join(f"val/n0/{n} {i % 3}\n"
                                                    for i, n in enumerate(names[:7])))
        (tmp_path / "val.txt").write_text("".join(f"val/n0/{n} 5\n" for n in names[7:10]))
        cfg = cfg_with(imagenet_lt_train_list=str(tmp_path / "train.txt"),
                   imagenet_lt_eval_list=str(tmp_path / "val.txt"))
        ev = pipeline.make_eval_data(cfg, "imagenet_lt", global_batch_size=8)
        batches = list(ev)
        assert ev.num_examples == 3 and len(batches) == 1
        np.testing.assert_array_equal(batches[0]["label"].reshape(-1)[:3], [5, 5, 5])
        batch = next(pipeline.make_train_iterator(cfg, "imagenet_lt", global_batch_size=16,
                                                  seed=0))
        assert set(np.unique(batch["label"])) <= {0, 1, 2}
        _check_train_batch(batch, 1000, 16)
