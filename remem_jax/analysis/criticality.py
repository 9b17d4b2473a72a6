"""Neuron criticality (ReMem App. C.2): how much switching off one MLP neuron moves the representation.

For MLP hidden neuron j of a block,

    c_j = max_i ||z_i - z_i^(j->0)||_2 / ||z_i||_2,

where z_i is the pre-logit class-token embedding of input i (the `pre_logits` collection of
`models.vit`) and z^(j->0) the same with neuron j switched off by `surgery.zero_mlp_neurons`
(its Dense_0 column and bias zeroed, so GELU(0) = 0 exactly). Neurons are evaluated in chunks,
each chunk one `jax.vmap` over neuron indices (the zeroing takes traced indices). The unmodified
z is one more entry of the same vmapped computation, so both go through identical kernels and a
neuron whose outgoing weights are all zero scores exactly 0 (its switch-off adds 0 where the
original added 0 * h_j).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from remem_jax import surgery


def _pre_logits_fn(model):
    def pre_logits(params, images):
        _, state = model.apply({"params": params}, images, mutable=["pre_logits"])
        return state["pre_logits"]["representation"][0].astype(jnp.float32)
    return pre_logits


@functools.lru_cache(maxsize=32)
def _chunk_function(model, block: int):
    """Jitted `(params, images, neuron_indices) -> (||z_off - z|| [chunk, B], ||z|| [B])`, once per model and block."""
    base_fn = _pre_logits_fn(model)

    @jax.jit
    def chunk(params, images, idx):
        def one(j, switch_off):
            zeroed = surgery.zero_mlp_neurons(params, block, j[None])
            # Only the two zeroed leaves differ (the others are the same objects): select those.
            chosen = jax.tree.map(lambda a, b: a if a is b else jnp.where(switch_off, a, b), zeroed, params)
            return base_fn(chosen, images)
        # Entry 0 is the unmodified model, through the very same batched computation.
        flags = jnp.arange(idx.shape[0] + 1) > 0
        z_all = jax.vmap(one)(jnp.concatenate([idx[:1], idx]), flags)   # [1 + chunk, B, D]
        z, z_off = z_all[0], z_all[1:]
        return jnp.linalg.norm(z_off - z[None], axis=-1), jnp.linalg.norm(z, axis=-1)
    return chunk


def criticality(model, params: Any, images: np.ndarray, block: int, neurons: Optional[Sequence[int]] = None, *,
                chunk_size: int = 64, image_batch: int = 256) -> np.ndarray:
    """c_j for each neuron of `neurons` (default: every MLP neuron of `block`), float64 `[len(neurons)]`.

    Args:
      model, params: a ViT and its parameter tree.
      images: `[N, S, S, 3]` inputs in [-1, 1] (the max runs over them).
      block: the block whose MLP neurons are switched off (0-indexed).
      neurons: hidden-neuron indices; None for all `model.mlp_dim`.
      chunk_size: neurons per vmapped call.
      image_batch: images per call.
    """
    neurons = np.arange(model.mlp_dim) if neurons is None else np.asarray(neurons, np.int64)
    chunk = _chunk_function(model, int(block))
    out = np.zeros(len(neurons), np.float64)
    for start in range(0, len(neurons), chunk_size):
        idx = neurons[start:start + chunk_size]
        padded = np.concatenate([idx, np.repeat(idx[-1:], chunk_size - len(idx))]) if len(idx) < chunk_size else idx
        best = np.zeros(len(idx))
        for i in range(0, len(images), image_batch):
            num, den = chunk(params, images[i:i + image_batch], jnp.asarray(padded, jnp.int32))
            ratio = np.asarray(num, np.float64)[:len(idx)] / np.maximum(np.asarray(den, np.float64), 1e-30)[None]
            best = np.maximum(best, ratio.max(axis=1))
        out[start:start + len(idx)] = best
    return out


def summarize(values: np.ndarray, neurons: Optional[Sequence[int]] = None, top_k: int = 10,
              bins: int = 30) -> dict:
    """Top-k neurons (index, c_j), quantiles and a histogram of the criticality values."""
    values = np.asarray(values, np.float64)
    neurons = np.arange(len(values)) if neurons is None else np.asarray(neurons)
    order = np.argsort(-values, kind="stable")[:top_k]
    counts, edges = np.histogram(values, bins=bins)
    return {"top": [{"neuron": int(neurons[i]), "criticality": float(values[i])} for i in order],
            "mean": float(values.mean()), "median": float(np.median(values)), "max": float(values.max()),
            "num_neurons": int(len(values)),
            "histogram": {"counts": counts.tolist(), "edges": edges.tolist()}}
