"""Deterministic, class-stratified subsets of an index list: few-shot selection, hold-out, and
the fixed eval subset of the evaluations during training (`config.data.eval_examples`).

All work on the labels of a split in its fixed (builder/file) order and return sorted indices
into it, so they are identical on every host and every run.
"""
from __future__ import annotations

import numpy as np


def _class_permutation(indices: np.ndarray, seed: int) -> np.ndarray:
    # sklearn.utils.shuffle(x, random_state=seed) with a fresh seed per class is exactly what
    # WeCoLoRA's ImageFolderWithRatio does, so folder datasets reproduce its subsets.
    from sklearn.utils import shuffle
    return shuffle(indices, random_state=seed)


def few_shot_indices(labels: np.ndarray, *, fraction: float = 0.0, per_class: int = 0,
                     seed: int = 12) -> np.ndarray:
    """Selects a class-stratified few-shot subset.

    For each class c with n_c examples (in split order), the class's indices are shuffled with a
    RandomState(seed) (a fresh one per class, as WeCoLoRA) and the first k_c are kept, where
    k_c = max(1, floor(n_c * fraction)) or k_c = min(n_c, per_class).

    Args:
      labels: int array [N] of the split's labels in its fixed order.
      fraction: fraction in (0, 1] to keep per class; 0 disables it.
      per_class: number to keep per class; 0 disables it. Exactly one of the two must be > 0.
      seed: selection seed.

    Returns:
      Sorted int64 indices into `labels`.
    """
    labels = np.asarray(labels)
    if (fraction > 0) == (per_class > 0):
        raise ValueError("Exactly one of few_shot_fraction (got %r) and few_shot_per_class (got %r)"
                         " must be > 0." % (fraction, per_class))
    if fraction < 0 or fraction > 1:
        raise ValueError(f"few_shot_fraction must be in [0, 1], got {fraction}.")
    if per_class < 0:
        raise ValueError(f"few_shot_per_class must be >= 0, got {per_class}.")
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(np.floor(len(idx) * fraction + 1e-9))) if fraction > 0 else per_class
        keep.append(_class_permutation(idx, seed)[:min(k, len(idx))])
    return np.sort(np.concatenate(keep)).astype(np.int64)


def holdout_indices(labels: np.ndarray, percent: float, seed: int = 0
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Splits indices into (train, held-out validation), stratified by class.

    Each class keeps floor(n_c * (100 - percent) / 100) examples (at least 1 when n_c > 1 for
    both parts; a singleton class stays in train) of a seeded permutation for training; the rest is held out.

    Args:
      labels: int array [N] of the split's labels.
      percent: held-out percentage in (0, 100).
      seed: permutation seed (fixed, independent of the few-shot seed).

    Returns:
      (train_indices, heldout_indices), both sorted int64.
    """
    if not 0 < percent < 100:
        raise ValueError(f"validation_percent must be in (0, 100), got {percent}.")
    labels = np.asarray(labels)
    train, held = [], []
    for c in np.unique(labels):
        idx = _class_permutation(np.flatnonzero(labels == c), seed)
        n_train = int(np.floor(len(idx) * (100 - percent) / 100 + 1e-9))
        # Every class keeps >= 1 training example; classes with >= 2 also get >= 1 held out.
        n_train = min(max(n_train, 1), max(len(idx) - 1, 1))
        train.append(idx[:n_train])
        held.append(idx[n_train:])
    return (np.sort(np.concatenate(train)).astype(np.int64),
            np.sort(np.concatenate(held)).astype(np.int64))


def stratified_allocation(class_sizes: np.ndarray, num_examples: int) -> np.ndarray:
    """How many of `num_examples` each class gets: proportional, largest-remainder rounding.

    Class c's quota is num_examples * n_c / N. When num_examples >= the number of classes, every
    class is guaranteed one example: a class whose quota is below 1 gets exactly 1, and the rest
    is shared again in proportion among the other classes (repeated until no quota is below 1).
    Each quota is rounded down and the examples still missing go, one each, to the classes with
    the largest remainders (ties: the earlier class). With fewer examples than classes the plain
    proportional allocation is used (some classes get none). Integer arithmetic throughout, so
    the result is exact and platform-independent.

    Args:
      class_sizes: int array [C], every entry >= 1.
      num_examples: total to allocate, in [0, sum(class_sizes)].

    Returns:
      int64 [C]: k_c with sum(k) == num_examples and 0 <= k_c <= n_c.
    """
    sizes = np.asarray(class_sizes, np.int64)
    if not 0 <= num_examples <= sizes.sum() or np.any(sizes < 1):
        raise ValueError(f"Cannot allocate {num_examples} examples over classes of sizes {sizes.tolist()}.")
    one_each = np.zeros(len(sizes), bool)  # classes held at one example
    if num_examples >= len(sizes):
        while True:  # quota < 1  <=>  shared * n_c < (sizes of the classes shared among)
            shared, free = num_examples - int(one_each.sum()), ~one_each
            below = free & (shared * sizes < sizes[free].sum())
            if not below.any():
                break
            one_each |= below
    free = ~one_each
    shared, total = num_examples - int(one_each.sum()), int(sizes[free].sum())
    quota = shared * np.where(free, sizes, 0)
    k = np.where(free, quota // max(total, 1), 1)
    remainders = np.where(free, quota % max(total, 1), -1)
    missing = num_examples - int(k.sum())
    k[np.lexsort((np.arange(len(sizes)), -remainders))[:missing]] += 1
    return k


def stratified_subset_indices(labels: np.ndarray, num_examples: int, seed: int = 0) -> np.ndarray:
    """A fixed, class-stratified subset of exactly `num_examples` indices (the whole split if smaller).

    The per-class counts are `stratified_allocation` of the class sizes (proportional, every class
    present when num_examples >= the number of classes); class c keeps the first k_c of its indices shuffled
    with RandomState(seed) (as `few_shot_indices`). Used for the evaluations during training
    (`config.data.eval_examples`): the same subset at every evaluation, on every host and in
    every rerun.

    Args:
      labels: int array [N] of the split's labels in its fixed order.
      num_examples: subset size, a positive integer; >= N keeps every index.
      seed: selection seed.

    Returns:
      Sorted int64 indices into `labels`.
    """
    labels = np.asarray(labels)
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}.")
    if num_examples >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes, sizes = np.unique(labels, return_counts=True)
    keep = [_class_permutation(np.flatnonzero(labels == c), seed)[:k]
            for c, k in zip(classes, stratified_allocation(sizes, int(num_examples)))]
    return np.sort(np.concatenate(keep)).astype(np.int64)
