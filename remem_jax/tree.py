"""Helpers on parameter pytrees (nested dicts keyed by module names) that several modules share.

* `flatten_params` / `unflatten_params`: nested dict <-> flat dict keyed by
  `/`-joined paths (the AugReg npz layout, vit_jax `recover_tree`).
* `block_index` / `block_indices`: the ViT encoder block a path belongs to
  (`Transformer/encoderblock_{i}/...`), parsed in one place.
* `check_params_match`: one error listing every missing / unexpected key and shape mismatch.
* `param_count`: the number of scalars in a tree.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np

from remem_jax import errors

BLOCK_PREFIX = "encoderblock_"
_BLOCK_PART_RE = re.compile(rf"{BLOCK_PREFIX}(\d+)")


class TreeError(errors.UserError, ValueError):
    """A flat mapping that cannot be a parameter tree (a key nests under a leaf)."""


def flatten_params(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Nested dict -> flat dict keyed by `sep`-joined paths (empty dicts dropped)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            for sub, leaf in flatten_params(value, sep).items():
                flat[f"{key}{sep}{sub}"] = leaf
        else:
            flat[key] = value
    return flat


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Flat `sep`-joined dict -> nested dict (vit_jax `recover_tree`).

    Raises:
      TreeError: a key nests under a path that is already a leaf.
    """
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TreeError(f"Key {key!r} nests under a leaf at {part!r}.")
        node[leaf] = value
    return tree


def check_params_match(params: Mapping[str, Any], expected: Mapping[str, Any], source: str, *,
                       error: type[Exception] = TreeError) -> None:
    """Raises one `error` listing every missing key, unexpected key and shape mismatch.

    Args:
      params: the tree to check (arrays or anything with a shape).
      expected: the tree it must equal in structure and shapes (e.g. ShapeDtypeStructs).
      source: where `params` came from, for the message (a file name, a function).
      error: the exception type to raise.
    """
    got, want = flatten_params(params), flatten_params(expected)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [f"{k}: expected {tuple(want[k].shape)}, got {tuple(np.shape(got[k]))}"
              for k in sorted(set(got) & set(want)) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if missing or extra or shapes:
        lines = [f"Parameters from {source} do not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if extra:
            lines.append(f"  unexpected keys ({len(extra)}): {', '.join(extra)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes))
        raise error("\n".join(lines))


def block_part_index(part: str) -> Optional[int]:
    """`'encoderblock_7'` -> 7; any other path component -> None."""
    m = _BLOCK_PART_RE.fullmatch(part)
    return int(m.group(1)) if m else None


def block_index(path: str, sep: str = "/") -> Optional[int]:
    """The encoder block of a flat path (`Transformer/encoderblock_3/...` -> 3), or None.

    The first `encoderblock_{i}` component counts, wherever it stands (so a LoRA
    subtree under `lora/Transformer/...` belongs to its block too).
    """
    for part in path.split(sep):
        index = block_part_index(part)
        if index is not None:
            return index
    return None


def block_indices(paths: Iterable[str]) -> list[int]:
    """Sorted distinct encoder-block indices of flat paths (numerically, so 10 follows 9)."""
    return sorted({i for i in map(block_index, paths) if i is not None})


def param_count(tree: Any) -> int:
    """Number of scalars in a pytree of arrays (or of anything with a `.shape`)."""
    return int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree)))
