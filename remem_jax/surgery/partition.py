"""The trainable / frozen split of a parameter tree for a fine-tuning mode.

The train state keeps only trainable leaves in `params` and the rest in
`frozen`; `merge_partitions` puts them back together inside the step.
"""
from __future__ import annotations

from typing import Any

from remem_jax import tree
from remem_jax.surgery.base import LORA_KEY, Params, Predicate, SurgeryError, is_adapter

TRAINABLE_MODES = ("full", "head", "lora", "adapter")


def _is_head(path: str) -> bool:
    return path.startswith("head/")


def _is_lora(path: str) -> bool:
    return path.startswith(LORA_KEY + "/")


def trainable_predicate(mode: str, *, train_head: bool = True) -> Predicate:
    """Which flat paths are trainable in a fine-tuning mode.

    Args:
      mode: `'full'` (every leaf), `'head'` (the head only: linear probe),
        `'lora'` (the `'lora'` subtree and the head; the base is frozen) or
        `'adapter'` (every `Adapter_*` leaf and the head).
      train_head: for `'lora'` and `'adapter'`, whether the head trains too
        (False for WeCoLoRA feature distillation, where only LoRA trains).

    Returns:
      A function from a flat `/`-path to bool.
    """
    if mode not in TRAINABLE_MODES:
        raise SurgeryError(f"Trainable mode must be one of {TRAINABLE_MODES}, got {mode!r}.")
    head = _is_head if train_head else (lambda path: False)
    if mode == "full":
        return lambda path: True
    if mode == "head":
        return _is_head
    if mode == "lora":
        return lambda path: _is_lora(path) or head(path)
    return lambda path: is_adapter(path) or head(path)


def partition(params: Params, predicate: Predicate) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a tree into `(trainable, frozen)` nested dicts by a path predicate.

    Leaves are not copied. `merge_partitions` is the exact inverse; a side
    with no leaves is `{}`.
    """
    trainable, frozen = {}, {}
    for key, value in tree.flatten_params(params).items():
        (trainable if predicate(key) else frozen)[key] = value
    return tree.unflatten_params(trainable), tree.unflatten_params(frozen)


def merge_partitions(trainable: Params, frozen: Params) -> dict[str, Any]:
    """Inverse of `partition`: the union of two trees with disjoint leaf paths."""
    flat_t, flat_f = tree.flatten_params(trainable), tree.flatten_params(frozen)
    both = sorted(set(flat_t) & set(flat_f))
    if both:
        raise SurgeryError(f"Trainable and frozen trees share leaves: {both}.")
    return tree.unflatten_params({**flat_f, **flat_t})


def split_trainable(params: Params, mode: str, *, train_head: bool = True
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`partition(params, trainable_predicate(mode))`, checking the mode fits the tree.

    Raises:
      SurgeryError: a mode whose trainable leaves are absent (no head for
        `'head'`, no `'lora'` subtree for `'lora'`, no adapters for `'adapter'`).
    """
    flat = tree.flatten_params(params)
    needs = {"head": (_is_head, "a head"), "lora": (_is_lora, f"a {LORA_KEY!r} subtree "
                                                   "(call attach_lora first)"),
             "adapter": (is_adapter, "Adapter_* leaves (call init_adapters first)")}
    if mode in needs:
        test, what = needs[mode]
        if not any(test(k) for k in flat):
            raise SurgeryError(f"Trainable mode {mode!r} needs {what}, but the tree has none.")
    return partition(params, trainable_predicate(mode, train_head=train_head))


def trainable_mask(params: Params, mode: str, *, train_head: bool = True) -> dict[str, Any]:
    """A tree of bools (True = trainable) with the structure of `params` (for `optax.masked`)."""
    predicate = trainable_predicate(mode, train_head=train_head)
    return tree.unflatten_params({k: predicate(k) for k in tree.flatten_params(params)})
