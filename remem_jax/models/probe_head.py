"""The linear-probe head of MAE / MoCo v3 / WeCoLoRA: non-affine BatchNorm, then one Dense layer."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp


class ProbeHead(nn.Module):
    """`Dense(BatchNorm(x))` on frozen features `[B, D]`; returns float32 logits `[B, C]`.

    The BatchNorm has no scale and no offset (torch `BatchNorm1d(D, affine=False, eps=1e-6)`,
    momentum 0.1 there, 0.9 in Flax's convention): it only whitens the features, so the probe is
    still linear in them. The Dense kernel is trunc-normal with std 0.01, the bias zero.

    Attributes:
      num_classes: outputs.
      epsilon: BatchNorm's variance epsilon.
      axis_name: pmap axis over which the batch statistics are averaged (sync BN), or None.
    """
    num_classes: int
    epsilon: float = 1e-6
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, features, *, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, use_scale=False, use_bias=False, momentum=0.9,
                         epsilon=self.epsilon, axis_name=self.axis_name if train else None,
                         name="norm")(features.astype(jnp.float32))
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(0.01),
                        name="head")(x)
