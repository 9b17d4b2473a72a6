"""What every surgery module shares: the error type, tree aliases, block bookkeeping."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from remem_jax import errors, tree

Params = Mapping[str, Any]
Predicate = Callable[[str], bool]

LORA_KEY = "lora"          # top-level key of the LoRA subtree in a train state's params
ATTN = "MultiHeadDotProductAttention_1"
MLP = "MlpBlock_3"
ADAPTER_PREFIX = "Adapter_"


class SurgeryError(errors.UserError, ValueError):
    """A parameter transform asked for something the tree or the arguments do not allow."""


def block_path(i: int) -> str:
    """`'Transformer/encoderblock_{i}'`, the flat-path prefix of block i."""
    return f"Transformer/{tree.BLOCK_PREFIX}{i}"


def num_blocks(flat: Mapping[str, Any]) -> int:
    """Number of encoder blocks of a flat ViT tree; indices must run 0..L-1.

    Raises:
      SurgeryError: no block, or a gap in the indices.
    """
    blocks = tree.block_indices(k for k in flat if k.startswith("Transformer/"))
    if not blocks:
        raise SurgeryError("The parameter tree has no Transformer/encoderblock_* keys; "
                           "is it a ViT (AugReg) tree?")
    if blocks != list(range(len(blocks))):
        raise SurgeryError(f"Encoder block indices must be 0..{len(blocks) - 1}, got {blocks}.")
    return len(blocks)


def block_sort_key(path: str):
    """Sorts flat paths by block index (numerically), then alphabetically; non-block paths first."""
    index = tree.block_index(path) if path.startswith("Transformer/") else None
    return (-1 if index is None else index, path)


def is_adapter(path: str) -> bool:
    return any(part.startswith(ADAPTER_PREFIX) for part in path.split("/"))


def renumber_blocks(params: Params, keep: Sequence[int]) -> dict[str, Any]:
    """Keeps blocks `keep` (old indices, in order) renumbered 0..; other leaves pass unchanged.

    Any path component `encoderblock_{i}` counts, so a LoRA subtree under
    `'lora'` is renumbered together with the base tree.
    """
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for key, value in tree.flatten_params(params).items():
        parts = key.split("/")
        drop = False
        for i, part in enumerate(parts):
            old = tree.block_part_index(part)
            if old is not None:
                if old not in new_index:
                    drop = True
                    break
                parts[i] = f"{tree.BLOCK_PREFIX}{new_index[old]}"
        if not drop:
            out["/".join(parts)] = value
    return tree.unflatten_params(out)
