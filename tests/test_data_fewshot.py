"""Few-shot subsets and held-out validation: stratified, deterministic, disjoint from eval."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from remem_jax.data import fewshot, pipeline, sources
from tests import helpers


def _labels():
    rng = np.random.default_rng(0)
    return rng.permutation(np.repeat(np.arange(5), [300, 120, 57, 9, 1]))


def test_fraction_is_stratified_and_deterministic():
    labels = _labels()
    idx = fewshot.few_shot_indices(labels, fraction=0.1, seed=12)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), [30, 12, 5, 1, 1])
    np.testing.assert_array_equal(idx, fewshot.few_shot_indices(labels, fraction=0.1, seed=12))
    assert not np.array_equal(idx, fewshot.few_shot_indices(labels, fraction=0.1, seed=13))
    assert len(np.unique(idx)) == len(idx)


def test_per_class_and_wecolora_order():
    labels = _labels()
    idx = fewshot.few_shot_indices(labels, per_class=10, seed=12)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), [10, 10, 10, 9, 1])
    # Class c keeps the first k of sklearn's shuffle(random_state=12) of its indices (WeCoLoRA).
    c1 = np.flatnonzero(labels == 1)
    perm = c1[np.random.RandomState(12).permutation(len(c1))]
    np.testing.assert_array_equal(np.sort(perm[:10]), idx[labels[idx] == 1])
    with pytest.raises(ValueError, match="Exactly one"):
        fewshot.few_shot_indices(labels, fraction=0.1, per_class=3)


def test_holdout_is_stratified_and_disjoint():
    labels = _labels()
    tr, ho = fewshot.holdout_indices(labels, 10)
    assert len(np.intersect1d(tr, ho)) == 0 and len(tr) + len(ho) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[ho], minlength=5), [30, 12, 6, 1, 0])


def test_pipeline_few_shot_disjoint_from_eval():
    cfg = helpers.data_config(image_size=16, validation_percent=20, few_shot_fraction=0.1)
    train = sources.build_source(cfg, "digits", "few_shot", process_index=0, process_count=1)
    held = sources.build_source(cfg, "digits", "eval", process_index=0, process_count=1)
    pool = sources.build_source(helpers.data_config(validation_percent=20), "digits", "train",
                                process_index=0, process_count=1)
    want = np.maximum(1, np.floor(np.bincount(pool.records[1]) * 0.1 + 1e-9)).astype(int)
    np.testing.assert_array_equal(np.bincount(train.records[1]), want)
    # The few-shot settings select for the 'few_shot' role only: 'train' is the whole pool.
    np.testing.assert_array_equal(sources.build_source(cfg, "digits", "train", process_index=0,
                                                       process_count=1).records[0], pool.records[0])
    assert set(train.records[0].tolist()) <= set(pool.records[0].tolist())
    assert not set(train.records[0].tolist()) & set(held.records[0].tolist())
    # Eval is untouched by few-shot settings; hosts agree on the selection.
    held_nofs = sources.build_source(helpers.data_config(validation_percent=20), "digits", "eval",
                                     process_index=0, process_count=1)
    np.testing.assert_array_equal(held.records[0], held_nofs.records[0])
    parts = [sources.build_source(cfg, "digits", "few_shot", process_index=p, process_count=2)
             for p in range(2)]
    for part in parts:  # Every host holds the whole (shared) table; the pipeline splits batches.
        np.testing.assert_array_equal(part.records[0], train.records[0])
    test = sources.build_source(helpers.data_config(), "digits", "eval", process_index=0, process_count=1)
    full = sources.build_source(helpers.data_config(few_shot_fraction=0.1), "digits", "few_shot",
                                process_index=0, process_count=1)
    assert not set(full.records[0].tolist()) & set(test.records[0].tolist())


def test_tfds_few_shot_materialises_subset():
    with tfds.testing.mock_data(num_examples=40):
        cfg = helpers.data_config(image_size=16, few_shot_per_class=1)
        src = sources.build_source(cfg, "cifar10", "few_shot", process_index=0, process_count=1)
        assert src.records is not None
        assert len(np.unique(src.records[1])) == len(src.records[1]) == src.num_examples
        whole = sources.build_source(cfg, "cifar10", "train", process_index=0, process_count=1)
        assert whole.records is None and whole.total_examples == 40  # the stream of the whole split
        batch = next(pipeline.make_train_iterator(cfg, "cifar10", global_batch_size=8, seed=0, few_shot=True))
        assert batch["image"].shape == (8, 1, 16, 16, 3)
