"""Exact metrics under pmap with 8 fake devices, against NumPy float64."""
import functools

import jax
import numpy as np

from remem_jax import metrics


def _numpy_metrics(logits, labels):
    logits = logits.astype(np.float64)
    pred = logits.argmax(-1)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    per_class = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    return {"top1": np.mean(pred == labels), "mean_per_class": np.mean(per_class),
            "loss": -np.mean(logp[np.arange(len(labels)), labels]), "num_examples": len(labels)}


def _pmapped_counts(num_classes):
    @functools.partial(jax.pmap, axis_name="batch")
    def step(logits, labels, mask):
        return jax.lax.psum(metrics.eval_counts(logits, labels, mask, num_classes), "batch")
    return step


def test_exact_under_pmap_with_padding():
    n, c, ld, pd = 203, 7, jax.local_device_count(), 4  # 203 = 6 * 32 + 11: padded.
    assert ld == 8
    rng = np.random.default_rng(0)
    # Imbalanced labels (class 6 absent) so top-1 and mean per-class differ.
    labels = rng.choice(6, size=n, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]).astype(np.int32)
    logits = rng.normal(size=(n, c)).astype(np.float32) + 2 * np.eye(c, dtype=np.float32)[labels]
    step = _pmapped_counts(c)
    per_batch = ld * pd
    total = None
    for start in range(0, n, per_batch):
        lg, lb = logits[start:start + per_batch], labels[start:start + per_batch]
        pad = per_batch - len(lb)
        mask = np.r_[np.ones(len(lb)), np.zeros(pad)].astype(np.float32)
        lg = np.concatenate([lg, np.full((pad, c), 50.0, np.float32)])  # Garbage padding.
        lb = np.concatenate([lb, np.full(pad, 3, np.int32)])
        out = step(lg.reshape(ld, pd, c), lb.reshape(ld, pd), mask.reshape(ld, pd))
        total = metrics.merge_counts(total, out)
    got = metrics.finalize_counts(total)
    want = _numpy_metrics(logits, labels)
    assert got["num_examples"] == n
    np.testing.assert_allclose(total["count_per_class"], np.bincount(labels, minlength=c))
    for k in ("top1", "mean_per_class"):
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    assert abs(got["top1"] - got["mean_per_class"]) > 1e-3


def test_jit_and_eager_match_numpy_counts():
    rng = np.random.default_rng(1)
    n, c = 12, 4
    # Class 3 occurs only on padding, so it is absent from the real examples.
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3], np.int32)
    mask = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0], np.float32)
    # Real examples right per class: 3 of 4, 1 of 3, 2 of 2 (top-1 6/9, mean per class 0.69);
    # the padding is right on classes 0 and 3, which must count for nothing.
    predicted = np.array([0, 0, 0, 2, 0, 1, 0, 2, 2, 2, 3, 3])
    logits = rng.normal(size=(n, c)).astype(np.float32) + 5.0 * np.eye(c, dtype=np.float32)[predicted]
    eager = metrics.eval_counts(logits, labels, mask, c)
    jitted = jax.jit(metrics.eval_counts, static_argnums=3)(logits, labels, mask, c)

    # Independent reference: plain counting over the real (mask 1) examples.
    real = mask == 1
    hit = logits.argmax(-1) == labels
    correct_per_class = np.array([np.sum(hit & real & (labels == k)) for k in range(c)], np.float64)
    count_per_class = np.array([np.sum(real & (labels == k)) for k in range(c)], np.float64)
    z = logits.astype(np.float64)
    nll = np.log(np.exp(z).sum(-1)) - z[np.arange(n), labels]
    present = [k for k in range(c) if count_per_class[k] > 0]
    want_top1 = sum(hit[i] for i in range(n) if real[i]) / real.sum()
    want_mean_per_class = np.mean([correct_per_class[k] / count_per_class[k] for k in present])
    assert (hit == (predicted == labels)).all() and present == [0, 1, 2]
    assert abs(want_top1 - want_mean_per_class) > 1e-2

    for counts in (eager, jitted):
        np.testing.assert_array_equal(counts["correct_per_class"], correct_per_class)
        np.testing.assert_array_equal(counts["count_per_class"], count_per_class)
        np.testing.assert_allclose(counts["loss_sum"], nll[real].sum(), rtol=1e-5)
        assert float(counts["num_examples"]) == real.sum()
        got = metrics.finalize_counts(metrics.merge_counts(None, counts))
        np.testing.assert_allclose(got["top1"], want_top1, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got["mean_per_class"], want_mean_per_class, rtol=0, atol=1e-12)
        np.testing.assert_allclose(got["loss"], nll[real].mean(), rtol=1e-5)


def test_standard_errors_by_hand():
    # 3 classes: class 0 has 4 examples (3 right), class 1 has 2 (1 right), class 2 has 4 (4 right).
    counts = {"correct_per_class": np.array([3.0, 1.0, 4.0]), "count_per_class": np.array([4.0, 2.0, 4.0]),
              "loss_sum": np.array(5.0), "num_examples": np.array(10.0)}
    got = metrics.finalize_counts(counts)
    # top-1 = 8/10: sqrt(0.8 * 0.2 / 10) = 0.126491...
    np.testing.assert_allclose(got["top1_se"], 0.12649110640673517, rtol=1e-12)
    # per class 0.75, 0.5, 1.0: sqrt(0.75*0.25/4 + 0.5*0.5/2 + 0) / 3 = sqrt(0.171875) / 3 = 0.138193...
    np.testing.assert_allclose(got["mean_per_class"], 0.75, rtol=1e-12)
    np.testing.assert_allclose(got["mean_per_class_se"], 0.13819269959814163, rtol=1e-12)


def test_standard_errors_match_the_spread_of_resampled_test_sets():
    """Each formula predicts the spread of its metric over independent test sets of the same size.

    top-1: test sets drawn i.i.d. from a population of three classes of different difficulty;
    mean per-class: test sets with the same number of examples per class (what the formula
    conditions on). 4000 draws measure a spread to about 1%.
    """
    rng = np.random.default_rng(0)
    true_acc, class_prob, n = np.array([0.9, 0.6, 0.3]), np.array([0.5, 0.2, 0.3]), 100

    def draw(n_per_class):
        return metrics.finalize_counts({
            "correct_per_class": rng.binomial(n_per_class, true_acc).astype(np.float64),
            "count_per_class": n_per_class.astype(np.float64), "loss_sum": np.array(0.0),
            "num_examples": np.array(float(n_per_class.sum()))})

    iid = [draw(rng.multinomial(n, class_prob)) for _ in range(4000)]
    fixed = [draw(np.array([50, 20, 30])) for _ in range(4000)]
    for key, sample in (("top1", iid), ("mean_per_class", fixed)):
        spread = np.std([d[key] for d in sample])
        mean_se = np.mean([d[f"{key}_se"] for d in sample])
        np.testing.assert_allclose(mean_se, spread, rtol=0.05, err_msg=key)
