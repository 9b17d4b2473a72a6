"""ResNet-18/34/50 in torchvision's layout (ResNet v1.5: the stride sits on the 3x3 conv).

7x7/2 conv 64, BN, ReLU, 3x3/2 max-pool, four stages (64, 128, 256, 512 base
widths; the first stage keeps the resolution, the others halve it), global
average pool and a linear classifier. 18 and 34 use `BasicBlock`, 50 uses
`Bottleneck` (expansion 4). Shortcuts are a 1x1 strided conv + BN where the
shape changes. Conventions (input range, padding, BatchNorm, dtype) are those
listed in `mobilenet_v2.py`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence, Type

import flax.linen as nn
import jax
import jax.numpy as jnp

from remem_jax.models.layers import batch_norm, conv_kernel_init, global_pool_head

Dtype = Any

# Number of blocks per stage and the block type (torchvision `resnet18` / `resnet34` / `resnet50`).
STAGE_SIZES: dict[int, tuple[int, ...]] = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


class _ResNetBlockBase(nn.Module):
    """Fields and helpers shared by the two residual blocks.

    Attributes:
      planes: base width of the block (output is `planes * expansion`).
      strides: stride of the block (on its 3x3 conv and its shortcut).
      zero_init_residual: zero-initialise the last BN scale so the block starts as identity.
      bn_epsilon, bn_axis_name, dtype: see `mobilenet_v2.py`.
    """
    planes: int
    strides: int = 1
    zero_init_residual: bool = False
    bn_epsilon: float = 1e-5
    bn_axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    expansion = 1

    def conv(self, features: int, kernel_size: int, strides: int, name: str) -> nn.Conv:
        pad = kernel_size // 2
        return nn.Conv(features, (kernel_size, kernel_size), strides,
                       padding=((pad, pad), (pad, pad)), use_bias=False,
                       kernel_init=conv_kernel_init, dtype=self.dtype, param_dtype=jnp.float32,
                       name=name)

    def norm(self, train: bool, name: str, zero_init: bool = False) -> nn.BatchNorm:
        return batch_norm(train, self.bn_epsilon, self.bn_axis_name, self.dtype, name, zero_init)

    def shortcut(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        features = self.planes * self.expansion
        if self.strides == 1 and x.shape[-1] == features:
            return x
        x = self.conv(features, 1, self.strides, "downsample_conv")(x)
        return self.norm(train, "downsample_bn")(x)


class BasicBlock(_ResNetBlockBase):
    """3x3 conv, BN, ReLU, 3x3 conv, BN, add the shortcut, ReLU (ResNet-18/34)."""
    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = nn.relu(self.norm(train, "bn1")(self.conv(self.planes, 3, self.strides, "conv1")(x)))
        y = self.conv(self.planes, 3, 1, "conv2")(y)
        y = self.norm(train, "bn2", self.zero_init_residual)(y)
        return nn.relu(y + self.shortcut(x, train))


class Bottleneck(_ResNetBlockBase):
    """1x1 conv, 3x3 strided conv, 1x1 conv to 4x width, each with BN; ReLU after the add (R50)."""
    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = nn.relu(self.norm(train, "bn1")(self.conv(self.planes, 1, 1, "conv1")(x)))
        y = nn.relu(self.norm(train, "bn2")(self.conv(self.planes, 3, self.strides, "conv2")(y)))
        y = self.norm(train, "bn3", self.zero_init_residual)(
            self.conv(self.planes * self.expansion, 1, 1, "conv3")(y))
        return nn.relu(y + self.shortcut(x, train))


def _uniform(scale: float) -> nn.initializers.Initializer:
    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


class ResNet(nn.Module):
    """ResNet with a configurable block type and stage sizes.

    Attributes:
      num_classes: classifier outputs.
      stage_sizes: blocks per stage, e.g. `(2, 2, 2, 2)` for ResNet-18.
      block_cls: `BasicBlock` or `Bottleneck`.
      width: channels of the stem and base width of the first stage.
      zero_init_residual: zero-init the last BN of each block (torchvision option, off by default).
      bn_epsilon: BatchNorm epsilon (torchvision: 1e-5).
      bn_axis_name: axis over which BatchNorm statistics are averaged (`'batch'` under pmap).
      dtype: compute dtype.
    """
    num_classes: int
    stage_sizes: Sequence[int] = STAGE_SIZES[18]
    block_cls: Type[_ResNetBlockBase] = BasicBlock
    width: int = 64
    zero_init_residual: bool = False
    bn_epsilon: float = 1e-5
    bn_axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        x = images.astype(self.dtype)
        x = nn.Conv(self.width, (7, 7), 2, padding=((3, 3), (3, 3)), use_bias=False,
                    kernel_init=conv_kernel_init, dtype=self.dtype, param_dtype=jnp.float32,
                    name="conv1")(x)
        x = nn.relu(batch_norm(train, self.bn_epsilon, self.bn_axis_name, self.dtype, "bn1")(x))
        # Padding of a max-pool is -inf, as in torch.
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        block = functools.partial(self.block_cls, zero_init_residual=self.zero_init_residual,
                                  bn_epsilon=self.bn_epsilon, bn_axis_name=self.bn_axis_name,
                                  dtype=self.dtype)
        for stage, size in enumerate(self.stage_sizes):
            for i in range(size):
                strides = 2 if stage > 0 and i == 0 else 1
                x = block(self.width * 2 ** stage, strides, name=f"layer{stage + 1}_{i}")(x, train)
        # torch nn.Linear default init: weight and bias uniform(+-1 / sqrt(fan_in)).
        kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        return global_pool_head(x, self.num_classes, 0.0, train, name="fc", kernel_init=kernel_init,
                                bias_init=_uniform(1 / math.sqrt(x.shape[-1])))


ResNet18 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[18], block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[34], block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=STAGE_SIZES[50], block_cls=Bottleneck)
