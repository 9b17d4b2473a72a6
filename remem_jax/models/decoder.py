"""The reconstruction decoder of the mutual-information estimate (ReMem App. A.5, Table 7).

Table 7's digits were lost in extraction; the shape kept here is ours (methods.md section 6,
row 11): stages of (bilinear x2 upsample, 3x3 conv stride 1 'SAME', BatchNorm, ReLU), then a last
(bilinear x2, 3x3 conv) to 3 channels and a sigmoid, so pixels come out in [0, 1]. A 14x14 grid of
ViT-B/16 patch tokens becomes 224x224 with the default four stages. A stage only upsamples while
the map is smaller than `output_size`; if the map still differs from it after the last stage (a
patch size that is not 2^stages), it is bilinearly resized to `output_size` before the last conv.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


def _upsample(x: jax.Array, size: int) -> jax.Array:
    n, _, _, c = x.shape
    return jax.image.resize(x, (n, size, size, c), method="bilinear")


class ReconstructionDecoder(nn.Module):
    """`[B, g, g, D]` token grid -> `[B, S, S, 3]` image in [0, 1] (probabilities of a Bernoulli decoder).

    Attributes:
      output_size: S, the image side to reconstruct.
      channels: widths of the hidden stages (one BN+ReLU stage each); the last conv adds 3.

    `return_logits=True` returns the pre-sigmoid values (for a numerically stable BCE).
    """
    output_size: int
    channels: Sequence[int] = (256, 128, 64)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_logits: bool = False) -> jax.Array:
        if x.ndim != 4 or x.shape[1] != x.shape[2]:
            raise ValueError(f"Expected a square token grid [B, g, g, D], got shape {x.shape}.")
        size = x.shape[1]
        for width in self.channels:
            if size < self.output_size:
                size = min(2 * size, self.output_size)
                x = _upsample(x, size)
            x = nn.Conv(width, (3, 3), padding="SAME")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        final = self.output_size  # the last stage: x2 if that reaches S, else straight to S
        if x.shape[1] != final:
            x = _upsample(x, final)
        x = nn.Conv(3, (3, 3), padding="SAME")(x)
        return x if return_logits else nn.sigmoid(x)
