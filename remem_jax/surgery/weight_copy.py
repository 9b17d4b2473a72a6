"""WeCoLoRA weight copy: a shallower ViT student made of every d-th teacher block."""
from __future__ import annotations

from typing import Any

import numpy as np

from remem_jax import tree
from remem_jax.surgery.base import Params, SurgeryError, num_blocks, renumber_blocks


def copy_every_dth_block(params: Params, d: int) -> dict[str, Any]:
    """WeCoLoRA weight copy: keep teacher blocks {0, d, 2d, ...}, renumbered 0, 1, ...

    The student has ceil(L / d) blocks (the code's `range(0, L, d)`), student
    block i = teacher block i*d. Everything outside the blocks (embedding, cls,
    posemb, encoder_norm, pre_logits, head) is kept as the same objects.

    Raises:
      SurgeryError: d < 1 or d > L.
    """
    num = num_blocks(tree.flatten_params(params))
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= num:
        raise SurgeryError(f"Weight-copy factor d must be an integer in [1, {num}] "
                           f"(the teacher has {num} blocks), got {d!r}.")
    return renumber_blocks(params, list(range(0, num, int(d))))


def student_depth(teacher_depth: int, d: int) -> int:
    """ceil(L / d): the number of blocks {0, d, 2d, ...} `copy_every_dth_block` keeps of L."""
    return len(range(0, teacher_depth, d))
