"""Houlsby adapters: fresh adapter leaves for a ViT built with `adapter_dim`."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from remem_jax import tree
from remem_jax.models import vit
from remem_jax.surgery.base import Params, SurgeryError, is_adapter


def init_adapters(rng: jax.Array, model: vit.VisionTransformer, params: Params,
                  image_size: int) -> dict[str, Any]:
    """`params` plus freshly initialised `Adapter_attn` / `Adapter_mlp` leaves.

    The adapters come from `model.init` (down N(0, 1e-3^2), up zero, so every
    adapter starts as the identity and the forward pass is unchanged). Under
    `jax.jit` only the adapter leaves are materialised.

    Args:
      rng: PRNG key for `model.init`.
      model: a `VisionTransformer` built with `adapter_dim` (e.g. `D // 16`).
      params: the tree without adapters; its leaves must match the model's
        non-adapter parameters (they are returned unchanged).
      image_size: square input resolution the position embeddings are for.

    Raises:
      SurgeryError: the model has no adapters, params already has adapters, or
        params does not match the model's non-adapter parameters.
    """
    if not model.adapter_dim:
        raise SurgeryError("init_adapters needs a model built with adapter_dim "
                           "(e.g. hidden_size // 16); this one has none.")
    flat = tree.flatten_params(params)
    if any(is_adapter(k) for k in flat):
        raise SurgeryError("params already has Adapter_* leaves.")
    shapes = tree.flatten_params(vit.param_shapes(model, image_size))
    expected = {k: v for k, v in shapes.items() if not is_adapter(k)}
    tree.check_params_match(params, tree.unflatten_params(expected), "init_adapters(params)",
                            error=SurgeryError)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

    @jax.jit
    def adapters(key):
        fresh = tree.flatten_params(model.init(key, images)["params"])
        return {k: v for k, v in fresh.items() if is_adapter(k)}

    return tree.unflatten_params({**flat, **adapters(rng)})
