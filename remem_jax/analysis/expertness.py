"""MLP expertness (ReMem Def. 5.3): how well a block's hidden neurons split into input-specific experts.

The inputs X and a block's MLP hidden neurons form a bipartite graph. The edge weight between
input i and neuron j is the L2 norm over tokens of the post-GELU activation,
`A[i, j] = ||h[i, :, j]||_2` (methods.md section 6, row 12: the paper's ReLU network has
non-negative activations; ViT's GELU is negative for negative inputs, so the norm over tokens,
which is non-negative whatever the signs, is the edge weight; no other rectification is done).
Spectral co-clustering (Dhillon 2001; scikit-learn `SpectralCoclustering`) with k = number of
classes partitions rows and columns into k co-clusters (X_c, N_c); the score is the fraction of
the graph's squared weight inside them,

    E = sum_c ||A[X_c, N_c]||_F^2 / ||A||_F^2   in [0, 1].

Rows or columns that are all zero (a dead neuron, a blank input) carry no weight and would make
the normalised graph singular: they are left out of the co-clustering (their weight is 0, so the
score is unchanged) and counted in the result. The random baseline is the mean score of the same
co-cluster sizes with rows and columns assigned at random (`baseline_draws` permutations), about
sum_c |X_c| |N_c| / (|X| |N|) for a dense matrix.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from remem_jax import errors


def edge_weights(hidden: np.ndarray) -> np.ndarray:
    """`[N_inputs, tokens, neurons]` activations (or `[N_inputs, neurons]`) -> non-negative `[N_inputs, neurons]`."""
    h = np.asarray(hidden, np.float64)
    if h.ndim == 2:
        return np.abs(h)
    if h.ndim != 3:
        raise ValueError(f"Expected activations [inputs, tokens, neurons] or [inputs, neurons], got {h.shape}.")
    return np.sqrt(np.sum(h * h, axis=1))


def cocluster_score(weights: np.ndarray, row_labels: np.ndarray, column_labels: np.ndarray) -> float:
    """sum_c ||A[rows of c, columns of c]||_F^2 / ||A||_F^2 for given co-cluster labels."""
    a2 = np.asarray(weights, np.float64) ** 2
    total = a2.sum()
    if total == 0:
        return 0.0
    same = row_labels[:, None] == column_labels[None, :]
    return float(a2[same].sum() / total)


def expertness(hidden: np.ndarray, num_clusters: int, *, seed: int = 0, baseline_draws: int = 20) -> dict:
    """The expertness of one block's MLP (see the module docstring).

    Args:
      hidden: `mlp_hidden` activations `[inputs, tokens, neurons]` (or already edge weights `[inputs, neurons]`,
        whose absolute values are then used).
      num_clusters: k, the number of classes.
      seed: seeds the co-clustering's k-means and the baseline permutations.
      baseline_draws: random partitions averaged for the baseline.

    Returns:
      {'score', 'baseline', 'baseline_std', 'num_clusters', 'row_labels', 'column_labels',
       'zero_rows', 'zero_columns'}; labels are -1 for left-out all-zero rows / columns.
    """
    from sklearn.cluster import SpectralCoclustering
    a = edge_weights(hidden)
    rows, cols = a.sum(axis=1) > 0, a.sum(axis=0) > 0
    sub = a[rows][:, cols]
    if min(sub.shape) < num_clusters:
        raise errors.UserError(f"expertness needs at least {num_clusters} (number of classes) non-zero inputs and "
                               f"neurons, got {sub.shape[0]} inputs and {sub.shape[1]} neurons; use more images "
                               "(config.analysis.num_images).")
    model = SpectralCoclustering(n_clusters=num_clusters, random_state=seed)
    model.fit(sub)
    row_labels = np.full(a.shape[0], -1)
    col_labels = np.full(a.shape[1], -1)
    row_labels[rows], col_labels[cols] = model.row_labels_, model.column_labels_
    score = cocluster_score(a, row_labels, col_labels)
    rng = np.random.default_rng(seed)
    draws = [cocluster_score(a, rng.permutation(row_labels), rng.permutation(col_labels))
             for _ in range(baseline_draws)]
    return {"score": score, "baseline": float(np.mean(draws)), "baseline_std": float(np.std(draws)),
            "num_clusters": int(num_clusters), "row_labels": row_labels.tolist(),
            "column_labels": col_labels.tolist(), "zero_rows": int((~rows).sum()),
            "zero_columns": int((~cols).sum())}


def block_expertness(hidden_per_block: list, num_clusters: int, blocks: Optional[list] = None, *,
                     seed: int = 0) -> list[dict]:
    """`expertness` of each block's activations (labels dropped, for the report)."""
    blocks = list(range(len(hidden_per_block))) if blocks is None else blocks
    out = []
    for b in blocks:
        r = expertness(hidden_per_block[b], num_clusters, seed=seed)
        out.append({"block": int(b), **{k: v for k, v in r.items() if not k.endswith("_labels")}})
    return out
