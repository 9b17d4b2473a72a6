"""Exact eval end to end: digits test split (450, not a multiple of 64) through the pipeline and
a pmapped eval with psum, against NumPy over the raw arrays."""
import functools

import jax
import numpy as np

from remem_jax import metrics
from remem_jax.data import digits, pipeline
from tests import helpers


def test_exact_eval_matches_numpy():
    size = 16
    cfg = helpers.data_config(image_size=size, digits_source_size=size)  # Resize is the identity here.
    ev = pipeline.make_eval_data(cfg, "digits", global_batch_size=64)
    assert ev.num_examples == 450 and ev.num_batches == 8
    w = np.random.default_rng(0).normal(size=(size * size * 3, 10)).astype(np.float32) / 30

    def model(images):
        return images.reshape(images.shape[0], -1) @ w

    @functools.partial(jax.pmap, axis_name="batch")
    def step(images, labels, mask):
        return jax.lax.psum(metrics.eval_counts(model(images), labels, mask, 10), "batch")

    total = None
    for _ in range(2):  # Re-iterable: a second pass gives the same counts.
        total = None
        for batch in ev:
            total = metrics.merge_counts(total, step(batch["image"], batch["label"],
                                                     batch["mask"]))
    got = metrics.finalize_counts(total)

    images, labels = digits.load_digits_arrays(size, 0.25, 0)["test"]
    x = images.astype(np.float32) / 127.5 - 1.0
    logits = model(x).astype(np.float64)
    pred = logits.argmax(-1)
    z = logits - logits.max(-1, keepdims=True)
    loss = -np.mean((z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(450), labels])
    assert got["num_examples"] == 450
    np.testing.assert_array_equal(total["count_per_class"], np.bincount(labels, minlength=10))
    np.testing.assert_allclose(got["top1"], np.mean(pred == labels), atol=1e-12)
    np.testing.assert_allclose(
        got["mean_per_class"], np.mean([np.mean(pred[labels == c] == c) for c in range(10)]),
        atol=1e-12)
    np.testing.assert_allclose(got["loss"], loss, rtol=1e-4)
