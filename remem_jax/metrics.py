"""Exact classification metrics from additive counts.

Inside a pmapped eval step call `eval_counts` on the device's batch and `lax.psum` the result over
axis 'batch' (this sums over all devices of all hosts); accumulate the per-batch results on the
host with `merge_counts` and turn them into numbers with `finalize_counts`. Padding examples
(mask 0) contribute nothing, so a padded eval counts every real example exactly once.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

COUNT_KEYS = ("correct_per_class", "count_per_class", "loss_sum", "num_examples")


def eval_counts(logits: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int
                ) -> dict[str, jax.Array]:
    """Additive counts of one batch (jittable).

    Args:
      logits: float [..., C] class scores.
      labels: int [...] class indices (any value where mask is 0).
      mask: float/bool [...]: 1 for real examples, 0 for padding.
      num_classes: C.

    Returns:
      {'correct_per_class': f32 [C], 'count_per_class': f32 [C], 'loss_sum': f32 [] (summed
      softmax cross-entropy), 'num_examples': f32 []}.
    """
    logits = jnp.reshape(logits, (-1, logits.shape[-1])).astype(jnp.float32)
    labels = jnp.reshape(labels, (-1,)).astype(jnp.int32)
    mask = jnp.reshape(mask, (-1,)).astype(jnp.float32)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[:, None]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    nll = -jnp.sum(jax.nn.log_softmax(logits, axis=-1) * one_hot, axis=-1)
    return {
        "correct_per_class": jnp.sum(one_hot * correct[:, None], axis=0),
        "count_per_class": jnp.sum(one_hot, axis=0),
        "loss_sum": jnp.sum(nll),
        "num_examples": jnp.sum(mask),
    }


def merge_counts(a: Mapping[str, np.ndarray] | None, b: Mapping[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """Adds two count dicts on the host in float64 (a may be None to start).

    `b` may still carry a leading device axis from pmap (identical after psum); the first
    replica is taken.
    """
    def host(x, ndim):
        x = np.asarray(x, dtype=np.float64)
        while x.ndim > ndim:
            x = x[0]
        return x

    b = {"correct_per_class": host(b["correct_per_class"], 1),
         "count_per_class": host(b["count_per_class"], 1),
         "loss_sum": host(b["loss_sum"], 0), "num_examples": host(b["num_examples"], 0)}
    if a is None:
        return b
    return {k: np.asarray(a[k], np.float64) + b[k] for k in COUNT_KEYS}


def finalize_counts(counts: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Turns accumulated counts into metrics.

    Returns:
      {'top1': accuracy over all examples, 'mean_per_class': mean over classes present in the
      eval set of their accuracy, 'loss': mean cross-entropy, 'num_examples': count}.
    """
    correct = np.asarray(counts["correct_per_class"], np.float64)
    count = np.asarray(counts["count_per_class"], np.float64)
    n = float(np.asarray(counts["num_examples"]))
    if n <= 0:
        raise ValueError("finalize_counts: no real examples were counted (num_examples=0).")
    present = count > 0
    return {
        "top1": float(correct.sum() / n),
        "mean_per_class": float(np.mean(correct[present] / count[present])),
        "loss": float(np.asarray(counts["loss_sum"]) / n),
        "num_examples": n,
    }
