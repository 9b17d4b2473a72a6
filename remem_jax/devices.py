"""Moving pytrees between the host and the local devices of a pmapped step.

`replicate` lays a host tree out exactly as `jax.pmap(..., axis_name='batch')`
returns it, and `unreplicate` / `to_host` bring one replica back as NumPy.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def to_host(tree: Any) -> Any:
    """Device arrays (one replica of a pmapped tree, or plain) -> numpy arrays."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


def unreplicate(tree: Any) -> Any:
    """The first replica of a pmap-replicated tree, as numpy arrays.

    Reads device 0's buffer directly: no gather is dispatched and nothing crosses devices.
    """
    def first(x):
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_data(0))[0]  # the shard keeps a device axis of 1
        return np.asarray(x)[0]
    return jax.tree.map(first, tree)


def replicate(tree: Any, axis_name: str = "batch", devices: Optional[Sequence[jax.Device]] = None) -> Any:
    """Copies a host pytree to every local device, laid out exactly as pmap over `axis_name` returns it.

    Unlike `flax.jax_utils.replicate` (whose arrays carry a different mesh axis name), the state
    this returns has the same sharding as the step's output, so the pmapped step is traced and
    compiled once instead of twice (first call, then again on its own output).

    Args:
      tree: a pytree of arrays (e.g. a `TrainState`).
      axis_name: the pmap axis name of the step.
      devices: the devices to replicate to; all local devices by default.

    Returns:
      The pytree with a leading device axis on every leaf.
    """
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.array(devices), (axis_name,)), PartitionSpec(axis_name))

    def put(x):
        x = np.asarray(x)
        return jax.device_put(np.broadcast_to(x[None], (len(devices),) + x.shape), sharding)
    return jax.tree.map(put, tree)
