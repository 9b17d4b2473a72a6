"""The train state every stage uses: trainable params, frozen params, optimizer, BN stats, PRNG key."""
from __future__ import annotations

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """Everything a train step reads and writes; a plain pytree (checkpointable as is).

    Attributes:
      step: int32 scalar, the number of updates applied.
      params: trainable leaves only (what the optimizer updates).
      frozen: everything the loss needs but never trains (a frozen ViT base under LoRA or
        adapters, a teacher's params); {} if none.
      opt_state: the optimizer state of `params`.
      batch_stats: BatchNorm statistics; {} when the model has none.
      rng: raw uint32[2] PRNG key (`jax.random.PRNGKey`), so it checkpoints as a plain array.
    """
    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    batch_stats: Any
    rng: jax.Array


def _raw_key(rng: Any) -> jax.Array:
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    rng = jnp.asarray(rng)
    if rng.shape != (2,) or rng.dtype != jnp.uint32:
        raise ValueError(f"rng must be a raw jax.random.PRNGKey (uint32[2]) or a typed threefry key, "
                         f"got dtype {rng.dtype} and shape {rng.shape}.")
    return rng


def create_train_state(params: Any, tx: optax.GradientTransformation, *, rng: Any,
                       frozen: Optional[Any] = None, batch_stats: Optional[Any] = None) -> TrainState:
    """A step-0 state with `tx.init(params)`.

    Args:
      params: the trainable parameters.
      tx: the optimizer.
      rng: `jax.random.PRNGKey(seed)` (a typed `jax.random.key` is converted to its raw data).
      frozen: non-trainable parameters the loss needs; {} if None.
      batch_stats: BatchNorm statistics; {} if None.

    Returns:
      A `TrainState` on the host/default device (replicate it for pmap).
    """
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen={} if frozen is None else frozen, opt_state=tx.init(params),
                      batch_stats={} if batch_stats is None else batch_stats, rng=_raw_key(rng))
