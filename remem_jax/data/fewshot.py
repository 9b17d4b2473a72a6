"""Deterministic, class-stratified subsets of an index list: few-shot selection and hold-out.

Both work on the labels of a split in its fixed (builder/file) order and return sorted indices
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
