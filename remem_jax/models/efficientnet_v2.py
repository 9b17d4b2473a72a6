"""EfficientNetV2 (Tan & Le 2021): Fused-MBConv early stages, MBConv with squeeze-excitation later.

The layout is torchvision's `EfficientNet` class: a 3x3/2 stem, the stages of
`FusedMBConv` / `MBConv` blocks, a 1x1 conv to 1280 channels, global average
pool, dropout and a linear classifier; SiLU throughout, BatchNorm epsilon 1e-3,
stochastic depth growing linearly with the block index.

  * `EFFICIENTNET_V2_S` is torchvision `efficientnet_v2_s`.
  * `EFFICIENTNET_V2_B0` is timm `efficientnetv2_b0` / `tf_efficientnetv2_b0`
    (the paper's B0 table). timm's first stage is a plain conv-BN-SiLU 32->16
    ("cn" block), which is exactly a FusedMBConv with expand ratio 1 and no
    residual, and timm's squeeze width `round(expanded * 0.25 / expand_ratio)`
    equals torchvision's `input_channels // 4` for every B0 block. The tf_
    variant pads stride-2 convs TF-"SAME" style; here all convs pad symmetrically.

MBConv, squeeze-excitation and the conv-norm-activation unit are shared with
MobileNetV2 (`layers.py`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from remem_jax.models.layers import (ConvNormAct, MBConv, global_pool_head, make_divisible,
                                    residual)

Dtype = Any
BN_EPSILON = 1e-3


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One stage: torchvision's `FusedMBConvConfig` / `MBConvConfig` at width and depth 1."""
    fused: bool
    expand_ratio: int
    kernel_size: int
    strides: int
    in_features: int
    features: int
    repeats: int


def _fused(*args: int) -> StageConfig:
    return StageConfig(True, *args)


def _mb(*args: int) -> StageConfig:
    return StageConfig(False, *args)


# (expand_ratio, kernel, stride, in, out, repeats):
# torchvision `_efficientnet_conf("efficientnet_v2_s")`.
EFFICIENTNET_V2_S: tuple[StageConfig, ...] = (
    _fused(1, 3, 1, 24, 24, 2),
    _fused(4, 3, 2, 24, 48, 4),
    _fused(4, 3, 2, 48, 64, 4),
    _mb(4, 3, 2, 64, 128, 6),
    _mb(6, 3, 1, 128, 160, 9),
    _mb(6, 3, 2, 160, 256, 15),
)

# timm `_gen_efficientnetv2_base` arch_def (cn_r1_k3_s1_e1_c16, er_r2_k3_s2_e4_c32,
# er_r2_k3_s2_e4_c48, ir_r3_k3_s2_e4_c96_se0.25, ir_r5_k3_s1_e6_c112_se0.25,
# ir_r8_k3_s2_e6_c192_se0.25) with stem 32.
EFFICIENTNET_V2_B0: tuple[StageConfig, ...] = (
    _fused(1, 3, 1, 32, 16, 1),
    _fused(4, 3, 2, 16, 32, 2),
    _fused(4, 3, 2, 32, 48, 2),
    _mb(4, 3, 2, 48, 96, 3),
    _mb(6, 3, 1, 96, 112, 5),
    _mb(6, 3, 2, 112, 192, 8),
)


class FusedMBConv(nn.Module):
    """Fused-MBConv: kxk expand conv (+ 1x1 project when expanded), residual with stochastic depth.

    With no expansion (expanded == input channels) it is one kxk conv-BN-SiLU, as in torchvision.

    Attributes:
      features: output channels.
      expanded_features: channels after the kxk conv.
      kernel_size, strides: of the kxk conv.
      stochastic_depth_rate: probability of dropping the residual branch of a sample.
      bn_epsilon, bn_axis_name, dtype: as in `ConvNormAct`.
    """
    features: int
    expanded_features: int
    kernel_size: int = 3
    strides: int = 1
    stochastic_depth_rate: float = 0.0
    bn_epsilon: float = BN_EPSILON
    bn_axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        conv = functools.partial(ConvNormAct, bn_epsilon=self.bn_epsilon,
                                 bn_axis_name=self.bn_axis_name, dtype=self.dtype)
        if self.expanded_features != x.shape[-1]:
            y = conv(self.expanded_features, self.kernel_size, self.strides, activation=nn.silu,
                     name="expand")(x, train)
            y = conv(self.features, 1, activation=None, name="project")(y, train)
        else:
            y = conv(self.features, self.kernel_size, self.strides, activation=nn.silu,
                     name="conv")(x, train)
        return residual(x, y, self.strides, self.stochastic_depth_rate, train)


class EfficientNetV2(nn.Module):
    """EfficientNetV2 built from a stage table (torchvision `EfficientNet` layout).

    Attributes:
      num_classes: classifier outputs.
      stages: the stage table, e.g. `EFFICIENTNET_V2_S` or `EFFICIENTNET_V2_B0`.
      last_features: channels of the final 1x1 conv.
      dropout_rate: dropout before the classifier (torchvision S: 0.2).
      stochastic_depth_rate: drop rate of the last block; block i of n uses `rate * i / n`.
      bn_epsilon: BatchNorm epsilon (torchvision and timm tf_: 1e-3).
      bn_axis_name: axis over which BatchNorm statistics are averaged (`'batch'` under pmap).
      dtype: compute dtype.
    """
    num_classes: int
    stages: Sequence[StageConfig] = EFFICIENTNET_V2_S
    last_features: int = 1280
    dropout_rate: float = 0.2
    stochastic_depth_rate: float = 0.2
    bn_epsilon: float = BN_EPSILON
    bn_axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        common = dict(bn_epsilon=self.bn_epsilon, bn_axis_name=self.bn_axis_name, dtype=self.dtype)
        x = images.astype(self.dtype)
        x = ConvNormAct(self.stages[0].in_features, 3, 2, activation=nn.silu, name="stem",
                        **common)(x, train)
        total = sum(stage.repeats for stage in self.stages)
        block = 0
        for index, stage in enumerate(self.stages):
            if stage.in_features != x.shape[-1]:
                raise ValueError(f"stages[{index}].in_features is {stage.in_features} but the "
                                 f"previous layer gives {x.shape[-1]} channels.")
            for i in range(stage.repeats):
                strides = stage.strides if i == 0 else 1
                in_features = x.shape[-1]
                expanded = make_divisible(in_features * stage.expand_ratio)
                rate = self.stochastic_depth_rate * block / total
                if stage.fused:
                    layer = FusedMBConv(stage.features, expanded, stage.kernel_size, strides,
                                        rate, name=f"block{block}", **common)
                else:
                    layer = MBConv(stage.features, expanded, stage.kernel_size, strides,
                                   squeeze_features=max(1, in_features // 4), activation=nn.silu,
                                   stochastic_depth_rate=rate, name=f"block{block}", **common)
                x = layer(x, train)
                block += 1
        x = ConvNormAct(self.last_features, 1, activation=nn.silu, name="head_conv",
                        **common)(x, train)
        # torchvision: linear weight uniform(+-1 / sqrt(out_features)), zero bias.
        kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_out", "uniform")
        return global_pool_head(x, self.num_classes, self.dropout_rate, train, kernel_init)
