"""Block pruning and neuron switch-off (criticality) as tree transforms."""
from __future__ import annotations

from typing import Any, Iterable, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from remem_jax import tree
from remem_jax.surgery.base import MLP, Params, SurgeryError, block_path, num_blocks, renumber_blocks


def drop_blocks(params: Params, indices: Iterable[int]) -> dict[str, Any]:
    """Removes whole blocks and renumbers the rest.

    The result, run by a ViT with `L - len(indices)` layers, equals the
    original model with both branches of those blocks pruned
    (`prune_attn = prune_mlp = indices`): a block without branches is the
    identity.

    Raises:
      SurgeryError: indices outside [0, L), duplicates, or every block dropped.
    """
    indices = [int(i) for i in indices]
    num = num_blocks(tree.flatten_params(params))
    bad = [i for i in indices if not 0 <= i < num]
    if bad:
        raise SurgeryError(f"drop_blocks indices {bad} are outside [0, {num}).")
    if len(set(indices)) != len(indices):
        raise SurgeryError(f"drop_blocks indices contain duplicates: {indices}.")
    keep = [i for i in range(num) if i not in set(indices)]
    if not keep:
        raise SurgeryError(f"drop_blocks would remove all {num} blocks.")
    return renumber_blocks(params, keep)


def zero_mlp_neurons(params: Params, block: int, neuron_indices: Union[Sequence[int], jax.Array]
                     ) -> dict[str, Any]:
    """Switches off MLP hidden neurons of one block (neuron criticality).

    Zeroes the chosen columns of `MlpBlock_3/Dense_0` kernel and bias, so the
    neurons' pre-activation is 0 and their GELU output is exactly 0
    (GELU(0) = 0). Works under `jax.jit` (indices may be traced). The two
    changed leaves become jax arrays; all others are the same objects.

    Raises:
      SurgeryError: unknown block or (concrete) indices outside [0, mlp_dim).
    """
    flat = dict(tree.flatten_params(params))
    prefix = f"{block_path(block)}/{MLP}/Dense_0"
    if f"{prefix}/kernel" not in flat:
        raise SurgeryError(f"No {prefix}/kernel in the tree (blocks: {tree.block_indices(flat)}).")
    kernel, bias = flat[f"{prefix}/kernel"], flat[f"{prefix}/bias"]
    mlp_dim = kernel.shape[-1]
    if not isinstance(neuron_indices, jax.core.Tracer):
        idx = np.asarray(neuron_indices, np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= mlp_dim)]
        if bad.size:
            raise SurgeryError(f"Neuron indices {bad.tolist()} are outside [0, {mlp_dim}) "
                               f"in block {block}.")
        neuron_indices = idx
    flat[f"{prefix}/kernel"] = jnp.asarray(kernel).at[:, neuron_indices].set(0)
    flat[f"{prefix}/bias"] = jnp.asarray(bias).at[neuron_indices].set(0)
    return tree.unflatten_params(flat)
