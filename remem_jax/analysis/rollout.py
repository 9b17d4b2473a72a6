"""Attention rollout (Abnar & Zuidema 2020): how much each input token reaches the class token.

Per block l, the head-averaged attention `A_l = mean_h P_l[h]` (`[N, N]`, rows sum to 1) is
mixed with the residual connection as `Ahat_l = (1 - w) * A_l + w * I` with w = 0.5 (the paper's
choice: the residual carries as much as attention), which keeps rows summing to 1, and the
rollout is the product `R = Ahat_L ... Ahat_1` (row i: where token i's information at the top
came from at the input). The class-token row without its own entry, reshaped to the patch grid,
is the map that is drawn. Blocks whose attention is pruned contribute the identity.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RESIDUAL_WEIGHT = 0.5


def rollout(attention: Sequence[np.ndarray], residual_weight: float = RESIDUAL_WEIGHT) -> np.ndarray:
    """`[B, heads, N, N]` per block -> rollout `[B, N, N]` (float64, rows sum to 1)."""
    if not attention:
        raise ValueError("rollout needs the attention of at least one block.")
    result = None
    for probs in attention:
        a = np.asarray(probs, np.float64).mean(axis=1)
        eye = np.eye(a.shape[-1])[None]
        a_hat = (1.0 - residual_weight) * a + residual_weight * eye
        a_hat = a_hat / a_hat.sum(axis=-1, keepdims=True)  # exact row sums despite float32 softmax
        result = a_hat if result is None else a_hat @ result
    return result


def class_token_maps(rollout_matrix: np.ndarray) -> np.ndarray:
    """`[B, 1 + g*g, 1 + g*g]` rollout -> `[B, g, g]` class-token maps (renormalised to sum to 1)."""
    row = rollout_matrix[:, 0, 1:]
    g = int(round(np.sqrt(row.shape[-1])))
    if g * g != row.shape[-1]:
        raise ValueError(f"{row.shape[-1]} patch tokens do not form a square grid.")
    row = row / np.maximum(row.sum(axis=-1, keepdims=True), 1e-30)
    return row.reshape(-1, g, g)
