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


@pytest.mark.parametrize("sizes,n,expected", [
    # Worked by hand. Quotas n * n_c / N; a quota below 1 (with n >= C) is held at 1 and the rest
    # shared again; round down, then one each to the largest remainders.
    # Proportional: 10 * [10, 20, 30, 40] / 100 = [1, 2, 3, 4] exactly.
    ([10, 20, 30, 40], 10, [1, 2, 3, 4]),
    # [6, 3, 1], n=5: quotas [3, 1.5, 0.5]; class 2 held at 1; 4 * [6, 3] / 9 = [2.67, 1.33] -> [2, 1],
    # the one left goes to the larger remainder (0.67, class 0).
    ([6, 3, 1], 5, [3, 1, 1]),
    # n < C: plainly proportional, 2 * [6, 3, 1] / 10 = [1.2, 0.6, 0.2] -> [1, 0, 0], the last to class 1 (0.6).
    ([6, 3, 1], 2, [1, 1, 0]),
    # Ties go to the earlier class: 4 * [3, 3, 3] / 9 = 1.33 each.
    ([3, 3, 3], 4, [2, 1, 1]),
    # [300, 120, 57, 9, 1], n=5: quotas [3.08, 1.23, 0.59, 0.09, 0.01]: classes 2-4 held at 1;
    # 2 * [300, 120] / 420 = [1.43, 0.57]: class 1 held at 1; class 0 gets the last: one of each.
    ([300, 120, 57, 9, 1], 5, [1, 1, 1, 1, 1]),
    # n=49: quotas [30.18, 12.07, 5.73, 0.91, 0.10]: classes 3, 4 held at 1; 47 * [300, 120, 57] / 477 =
    # [29.56, 11.82, 5.62] -> [29, 11, 5], the 2 left to remainders 0.82 (class 1) and 0.62 (class 2).
    ([300, 120, 57, 9, 1], 49, [29, 12, 6, 1, 1]),
])
def test_eval_subset_allocation_by_hand(sizes, n, expected):
    np.testing.assert_array_equal(fewshot.stratified_allocation(np.array(sizes), n), expected)
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(len(sizes)), sizes))
    idx = fewshot.stratified_subset_indices(labels, n, seed=3)
    assert len(idx) == n and len(np.unique(idx)) == n and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=len(sizes)), expected)


def test_eval_subset_is_fixed_seeded_and_covers_every_class():
    labels = _labels()  # 487 examples in classes of 300, 120, 57, 9, 1
    idx = fewshot.stratified_subset_indices(labels, 40)
    np.testing.assert_array_equal(idx, fewshot.stratified_subset_indices(labels.copy(), 40))  # deterministic
    assert not np.array_equal(idx, fewshot.stratified_subset_indices(labels, 40, seed=1))
    assert set(labels[idx]) == set(range(5))
    # Within a class: the first k of its indices shuffled by RandomState(seed), as few-shot selection.
    c0 = np.flatnonzero(labels == 0)
    k0 = int(np.sum(labels[idx] == 0))
    np.testing.assert_array_equal(idx[labels[idx] == 0], np.sort(c0[np.random.RandomState(0).permutation(len(c0))][:k0]))
    # Non-contiguous labels (a class absent from the split) and a subset no smaller than the split.
    np.testing.assert_array_equal(np.bincount(labels[fewshot.stratified_subset_indices(labels * 2, 5)]), [1] * 5)
    np.testing.assert_array_equal(fewshot.stratified_subset_indices(labels, 487), np.arange(487))
    np.testing.assert_array_equal(fewshot.stratified_subset_indices(labels, 10_000), np.arange(487))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_examples must be a positive integer"):
            fewshot.stratified_subset_indices(labels, bad)


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


def test_eval_subset_source_is_the_stratified_subset_of_the_eval_split():
    def build(cfg, **kw):
        return sources.build_source(cfg, "digits", "eval", process_index=0, process_count=1, **kw)
    for cfg in (helpers.data_config(), helpers.data_config(validation_percent=20)):  # test split, held-out part
        full, sub = build(cfg), build(cfg, eval_examples=40)
        idx = fewshot.stratified_subset_indices(full.records[1], 40)
        assert sub.total_examples == 40 and sub.shared
        np.testing.assert_array_equal(sub.records[0], full.records[0][idx])
        np.testing.assert_array_equal(sub.records[1], full.records[1][idx])
        np.testing.assert_array_equal(build(cfg, eval_examples=full.total_examples + 1).records[0], full.records[0])
    ev = pipeline.make_eval_data(helpers.data_config(image_size=16), "digits", global_batch_size=16, eval_examples=40)
    assert ev.total_examples == 40 and sum(int(b["mask"].sum()) for b in ev) == 40
    with pytest.raises(ValueError, match="eval_examples selects from the eval split; got it for role 'train'"):
        sources.build_source(helpers.data_config(), "digits", "train", eval_examples=40, process_index=0,
                             process_count=1)


def test_tfds_eval_subset_is_kept_in_memory_each_host_its_share():
    with tfds.testing.mock_data(num_examples=40):
        cfg = helpers.data_config(image_size=16)
        full = sources.build_source(cfg, "cifar10", "eval", process_index=0, process_count=1)
        assert full.stream_fn is not None  # the whole split stays a stream
        examples = list(full.stream_fn().as_numpy_iterator())
        labels = np.array([int(ex["label"]) for ex in examples])
        idx = fewshot.stratified_subset_indices(labels, 12)
        parts = [sources.build_source(cfg, "cifar10", "eval", eval_examples=12, process_index=p, process_count=2)
                 for p in range(2)]
        assert [p.host_counts for p in parts] == [(6, 6)] * 2
        for p, part in enumerate(parts):  # host p: the subset's examples [p::2], in split order
            np.testing.assert_array_equal(part.records[1], labels[idx[p::2]])
            assert list(part.records[0]) == [examples[i]["image"] for i in idx[p::2]]
        ev = pipeline.make_eval_data(cfg, "cifar10", global_batch_size=8, eval_examples=12)
        assert sum(int(b["mask"].sum()) for b in ev) == 12
