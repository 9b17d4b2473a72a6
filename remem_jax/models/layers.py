"""Layers every CNN student shares: BatchNorm, conv + norm + activation, MBConv, the pooled head.

Conventions shared by every CNN student:
  * NHWC images in [-1, 1] (the teacher's input); no further normalisation.
  * Convolutions use torchvision's explicit symmetric padding `(k - 1) // 2`,
    kaiming-normal (fan-out) kernels, and no bias before a BatchNorm.
  * BatchNorm: `momentum=0.9` (torch's 0.1), statistics averaged over
    `bn_axis_name` when it is set (`'batch'` inside `pmap`). Flax keeps the
    biased batch variance in the running average (torch keeps the unbiased one).
  * `dtype` is the compute dtype; parameters are always float32 and the head
    runs in float32, so logits are float32.

MobileNetV2's inverted residual is an `MBConv` with ReLU6 and no
squeeze-excitation; EfficientNetV2's MBConv adds squeeze-excitation, SiLU and
stochastic depth.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

Dtype = Any
Activation = Callable[[jnp.ndarray], jnp.ndarray]

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out") on every convolution (a plain normal).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's `_make_divisible`: round to a multiple of `divisor`, never below 90 %.

    Args:
      value: the unrounded channel count.
      divisor: the multiple to round to.
      min_value: lower bound (defaults to `divisor`).

    Returns:
      The rounded channel count.
    """
    min_value = divisor if min_value is None else min_value
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def batch_norm(train: bool, epsilon: float, axis_name: Optional[str], dtype: Dtype,
               name: str, zero_init: bool = False) -> nn.BatchNorm:
    """The BatchNorm every student uses (see the module docstring).

    Args:
      train: normalise with batch statistics and update the running ones; else use the running ones.
      epsilon: added to the variance.
      axis_name: pmap axis over which the batch statistics are averaged, or None.
      dtype: compute dtype (statistics are reduced in float32 regardless).
      name: module name.
      zero_init: initialise the scale to zero instead of one.

    Returns:
      The unbound BatchNorm module.
    """
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=epsilon, axis_name=axis_name,
        dtype=dtype, param_dtype=jnp.float32,
        scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones, name=name)


def global_pool_head(x: jnp.ndarray, num_classes: int, dropout_rate: float, train: bool,
                     kernel_init: nn.initializers.Initializer,
                     bias_init: nn.initializers.Initializer = nn.initializers.zeros,
                     name: str = "classifier") -> jnp.ndarray:
    """Global average pool, dropout and a float32 linear classifier.

    Must be called inside a compact method (it creates the `name` Dense).

    Args:
      x: features `[B, H, W, C]`.
      num_classes: classifier outputs.
      dropout_rate: dropout before the classifier (rng `'dropout'` in train mode).
      train: whether dropout is active.
      kernel_init, bias_init: initialisers of the classifier.
      name: name of the Dense module.

    Returns:
      Float32 logits `[B, num_classes]`.
    """
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if dropout_rate > 0:
        x = nn.Dropout(dropout_rate, deterministic=not train)(x)
    return nn.Dense(num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                    kernel_init=kernel_init, bias_init=bias_init, name=name)(x)


class ConvNormAct(nn.Module):
    """Convolution, BatchNorm and an optional activation (torchvision `Conv2dNormActivation`).

    Attributes:
      features: output channels.
      kernel_size: square kernel size; padding is `(kernel_size - 1) // 2` on each side.
      strides: spatial stride.
      groups: feature groups (`groups == input channels` makes it depthwise).
      activation: applied after the norm; None for a linear projection.
      bn_epsilon, bn_axis_name, dtype: see the module docstring.
    """
    features: int
    kernel_size: int = 3
    strides: int = 1
    groups: int = 1
    activation: Optional[Activation] = nn.relu
    bn_epsilon: float = 1e-5
    bn_axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        pad = (self.kernel_size - 1) // 2
        x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), self.strides,
                    padding=((pad, pad), (pad, pad)), feature_group_count=self.groups,
                    use_bias=False, kernel_init=conv_kernel_init, dtype=self.dtype,
                    param_dtype=jnp.float32, name="conv")(x)
        x = batch_norm(train, self.bn_epsilon, self.bn_axis_name, self.dtype, "bn")(x)
        return x if self.activation is None else self.activation(x)


class SqueezeExcitation(nn.Module):
    """Squeeze-excitation: pool, 1x1 conv down, activation, 1x1 conv up, sigmoid gate.

    Attributes:
      squeeze_features: channels of the bottleneck.
      activation: activation between the two 1x1 convolutions.
      dtype: compute dtype.
    """
    squeeze_features: int
    activation: Activation = nn.silu
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        conv = functools.partial(nn.Conv, kernel_size=(1, 1), kernel_init=conv_kernel_init,
                                 dtype=self.dtype, param_dtype=jnp.float32)
        scale = jnp.mean(x, axis=(1, 2), keepdims=True)
        scale = self.activation(conv(self.squeeze_features, name="fc1")(scale))
        scale = nn.sigmoid(conv(x.shape[-1], name="fc2")(scale))
        return x * scale


def residual(x: jnp.ndarray, y: jnp.ndarray, strides: int, stochastic_depth_rate: float,
             train: bool) -> jnp.ndarray:
    """`x + drop_path(y)` when shapes allow a residual, else `y`.

    Must be called inside a compact method when `stochastic_depth_rate > 0`
    (it creates a Dropout that draws from the `'dropout'` rng in train mode).
    """
    if strides != 1 or x.shape[-1] != y.shape[-1]:
        return y
    if stochastic_depth_rate > 0:
        # One Bernoulli draw per sample, scaled by 1 / (1 - rate): torchvision's "row" mode.
        y = nn.Dropout(stochastic_depth_rate, broadcast_dims=(1, 2, 3), deterministic=not train)(y)
    return x + y


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, [squeeze-excitation], 1x1 project.

    The residual is used when `strides == 1` and the channel count is unchanged;
    the branch then goes through per-sample stochastic depth (rng `'dropout'`).

    Attributes:
      features: output channels.
      expanded_features: channels after the expansion; equal to the input
        channels means no expansion convolution (torchvision's rule).
      kernel_size: depthwise kernel size.
      strides: depthwise stride.
      squeeze_features: squeeze-excitation bottleneck; 0 disables it.
      activation: activation after the expansion and the depthwise conv.
      stochastic_depth_rate: probability of dropping the residual branch of a sample.
      bn_epsilon, bn_axis_name, dtype: see the module docstring.
    """
    features: int
    expanded_features: int
    kernel_size: int = 3
    strides: int = 1
    squeeze_features: int = 0
    activation: Activation = nn.relu6
    stochastic_depth_rate: float = 0.0
    bn_epsilon: float = 1e-5
    bn_axis_name: Optional[str] = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        conv = functools.partial(ConvNormAct, bn_epsilon=self.bn_epsilon,
                                 bn_axis_name=self.bn_axis_name, dtype=self.dtype)
        y = x
        if self.expanded_features != x.shape[-1]:
            y = conv(self.expanded_features, 1, activation=self.activation, name="expand")(y, train)
        y = conv(self.expanded_features, self.kernel_size, self.strides,
                 groups=self.expanded_features, activation=self.activation,
                 name="depthwise")(y, train)
        if self.squeeze_features:
            y = SqueezeExcitation(self.squeeze_features, self.activation, self.dtype, name="se")(y)
        y = conv(self.features, 1, activation=None, name="project")(y, train)
        return residual(x, y, self.strides, self.stochastic_depth_rate, train)
