"""MobileNetV2 (torchvision layout), built from the shared layers in `layers.py`."""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from remem_jax.models.layers import ConvNormAct, MBConv, global_pool_head, make_divisible

Dtype = Any

# (expand_ratio t, output channels c, repeats n, first stride s): torchvision / Sandler et al. 2018.
MOBILENET_V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 as torchvision `mobilenet_v2` defines it.

    Attributes:
      num_classes: classifier outputs.
      width_multiplier: scales every channel count (rounded with `make_divisible(.., 8)`);
        the last conv keeps at least 1280 channels.
      dropout_rate: dropout before the classifier (torchvision: 0.2).
      bn_axis_name: axis over which BatchNorm statistics are averaged (`'batch'` under pmap).
      dtype: compute dtype.
    """
    num_classes: int
    width_multiplier: float = 1.0
    dropout_rate: float = 0.2
    setting: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_SETTING
    bn_axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        if self.width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be positive, got {self.width_multiplier}.")
        conv = functools.partial(ConvNormAct, activation=nn.relu6, bn_axis_name=self.bn_axis_name,
                                 dtype=self.dtype)
        x = images.astype(self.dtype)
        in_features = make_divisible(32 * self.width_multiplier)
        x = conv(in_features, 3, 2, name="stem")(x, train)
        block = 0
        for expand_ratio, channels, repeats, first_stride in self.setting:
            features = make_divisible(channels * self.width_multiplier)
            for i in range(repeats):
                x = MBConv(features, int(round(x.shape[-1] * expand_ratio)), 3,
                           first_stride if i == 0 else 1, activation=nn.relu6,
                           bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                           name=f"block{block}")(x, train)
                block += 1
        last_features = make_divisible(1280 * max(1.0, self.width_multiplier))
        x = conv(last_features, 1, name="head_conv")(x, train)
        # torchvision: nn.init.normal_(linear.weight, 0, 0.01), zero bias.
        return global_pool_head(x, self.num_classes, self.dropout_rate, train,
                                kernel_init=nn.initializers.normal(0.01))
