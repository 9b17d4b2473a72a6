"""Exact evaluation: every real example of the split counted once, across devices and hosts."""
from __future__ import annotations

from typing import Any, Callable

import jax
from jax import lax

from remem_jax import metrics

# (variables, images) -> logits, evaluated in inference mode.
LogitsFn = Callable[[Any, jax.Array], jax.Array]


def make_eval_step(logits_fn: LogitsFn, num_classes: int, axis_name: str = "batch"):
    """A pmapped step returning the batch's counts summed over all devices and hosts."""
    def step(variables, batch):
        logits = logits_fn(variables, batch["image"])
        counts = metrics.eval_counts(logits, batch["label"], batch["mask"], num_classes)
        return lax.psum(counts, axis_name)
    return jax.pmap(step, axis_name=axis_name)


def evaluate(eval_step, variables, eval_data) -> dict[str, float]:
    """Runs one full pass over `eval_data` and returns top-1, mean per-class, loss, count.

    Args:
      eval_step: from `make_eval_step`.
      variables: replicated (leading device axis) model variables.
      eval_data: a re-iterable `remem_jax.data.pipeline.EvalData`.
    """
    total = None
    for batch in eval_data:
        counts = jax.tree.map(lambda x: x[0], eval_step(variables, batch))
        total = counts if total is None else metrics.merge_counts(total, counts)
    if total is None:
        raise ValueError("The eval split is empty.")
    return {k: float(v) for k, v in metrics.finalize_counts(jax.device_get(total)).items()}
