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
    """Turns accumulated counts into metrics and their standard errors.

    The standard errors treat each eval example as an independent Bernoulli trial (the test set
    as a sample of the population it stands for): `top1_se = sqrt(p (1 - p) / n)`, and for the
    mean of the per-class accuracies p_c over the C classes present, each estimated from its n_c
    examples, `mean_per_class_se = sqrt(sum_c p_c (1 - p_c) / n_c) / C`. They say how far a
    number could move on another test set of the same size; two numbers closer than about two
    standard errors are not told apart by this test set.

    Returns:
      {'top1': accuracy over all examples, 'top1_se', 'mean_per_class': mean over classes present
      in the eval set of their accuracy, 'mean_per_class_se', 'loss': mean cross-entropy,
      'num_examples': count}.
    """
    correct = np.asarray(counts["correct_per_class"], np.float64)
    count = np.asarray(counts["count_per_class"], np.float64)
    n = float(np.asarray(counts["num_examples"]))
    if n <= 0:
        raise ValueError("finalize_counts: no real examples were counted (num_examples=0).")
    present = count > 0
    top1 = correct.sum() / n
    per_class = correct[present] / count[present]
    return {
        "top1": float(top1),
        "top1_se": binomial_se(top1, n),
        "mean_per_class": float(np.mean(per_class)),
        "mean_per_class_se": float(np.sqrt(np.sum(per_class * (1 - per_class) / count[present])) / present.sum()),
        "loss": float(np.asarray(counts["loss_sum"]) / n),
        "num_examples": n,
    }


def binomial_se(accuracy: float, num_examples: float) -> float:
    """Standard error `sqrt(p (1 - p) / n)` of an accuracy p measured on n independent examples."""
    return float(np.sqrt(accuracy * (1.0 - accuracy) / num_examples))


def format_accuracy(evaluation, metric: str) -> str:
    """`evaluation[metric]` in percent with its standard error, e.g. '65.11 ± 2.25'; '-' when absent.

    The error is `evaluation[metric + '_se']` (from `finalize_counts`); results written before
    standard errors existed show the number alone.
    """
    if not evaluation or evaluation.get(metric) is None:
        return "-"
    se = evaluation.get(f"{metric}_se")
    return f"{100 * evaluation[metric]:.2f}" + ("" if se is None else f" ± {100 * se:.2f}")


STANDARD_ERROR_NOTE = ("± is one standard error of the test-set estimate (binomial; for mean per-class accuracy, "
                       "of the mean of the per-class binomials): differences within about two of them are not told "
                       "apart by this test set.")
