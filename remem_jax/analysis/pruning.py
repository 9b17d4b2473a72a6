"""Block-pruning sweep (ReMem section 5.1, Fig. 4): prune the top k attention or MLP branches.

Level (branch, k) removes the `branch` ('attn' or 'mlp') of the top k blocks, L-k .. L-1, with the
ViT's `prune_attn` / `prune_mlp` fields (a pruned branch is skipped; its residual stream passes
through), and drops that branch's parameters (pre-norm and sub-layer) from the tree, so a brief
fine-tune trains only what the pruned model uses. k = 0 is the unpruned model. When both
branches of a block are pruned the block is the identity, which `surgery.drop_blocks` removes
from the tree outright; a branch sweep never prunes both, so it keeps the block numbering.
Each level is then (optionally) fine-tuned and measured by the caller's functions (accuracy, MI).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from remem_jax import errors, tree
from remem_jax.surgery.base import ATTN, MLP, block_path

BRANCHES = ("attn", "mlp")
_BRANCH_PARAMS = {"attn": ("LayerNorm_0", ATTN, "Adapter_attn"), "mlp": ("LayerNorm_2", MLP, "Adapter_mlp")}


def top_blocks(num_layers: int, k: int) -> tuple[int, ...]:
    """The indices of the top k blocks, (L-k, ..., L-1)."""
    if not 0 <= k <= num_layers:
        raise errors.UserError(f"config.analysis.prune_max_blocks: cannot prune {k} blocks of a "
                               f"{num_layers}-block ViT (use 0..{num_layers}).")
    return tuple(range(num_layers - k, num_layers))


def prune_branches(model, params: Any, branch: str, blocks: Sequence[int]) -> tuple[Any, dict]:
    """`(model, params)` with `branch` of `blocks` removed (model fields and parameter subtrees).

    Branches the model already prunes stay pruned.
    """
    if branch not in BRANCHES:
        raise errors.UserError(f"config.analysis.prune_branches must name branches among {', '.join(BRANCHES)}, "
                               f"got {branch!r}.")
    field = f"prune_{branch}"
    pruned = tuple(sorted(set(getattr(model, field)) | set(int(b) for b in blocks)))
    model = model.clone(**{field: pruned})
    prefixes = tuple(f"{block_path(b)}/{name}/" for b in blocks for name in _BRANCH_PARAMS[branch])
    flat = {k: v for k, v in tree.flatten_params(params).items() if not k.startswith(prefixes)}
    return model, tree.unflatten_params(flat)


def sweep(model, params: Any, branches: Sequence[str], max_k: int, *,
          measure: Callable[[str, Any, Any], dict],
          finetune: Optional[Callable[[str, Any, Any], Any]] = None) -> list[dict]:
    """Runs every level (branch, k) for k = 0..max_k; k = 0 is measured once and shared.

    Args:
      model, params: the unpruned ViT.
      branches: among `BRANCHES`.
      max_k: the largest number of top blocks pruned.
      measure: `(level_name, model, params) -> metrics dict` (e.g. accuracy and MI).
      finetune: `(level_name, model, params) -> params`, applied before measuring every pruned level
        (k >= 1); None measures the pruned models as they are.

    Returns:
      One row per level: {'branch', 'k', 'blocks', 'name', 'finetuned', **metrics}; the k = 0 row
      appears once per branch with the same metrics.
    """
    base = None
    rows = []
    for branch in branches:
        for k in range(max_k + 1):
            blocks = top_blocks(model.num_layers, k)
            name = f"{branch}_k{k}"
            if k == 0:
                if base is None:
                    base = measure("unpruned", model, params)
                metrics, tuned = base, False
            else:
                m, p = prune_branches(model, params, branch, blocks)
                tuned = finetune is not None
                if tuned:
                    p = finetune(name, m, p)
                metrics = measure(name, m, p)
            rows.append({"branch": branch, "k": k, "blocks": list(blocks), "name": name, "finetuned": tuned,
                         **metrics})
    return rows
