"""Registry of the CNN students and their initialisation.

  model = create_student('resnet18', num_classes=1000, bn_axis_name='batch')
  params, batch_stats = init_student(model, jax.random.key(0), image_size=224)
  logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                train=True, mutable=['batch_stats'], rngs={'dropout': rng})

Every student takes NHWC images in [-1, 1] (the teacher's input) and returns
float32 logits; BatchNorm statistics live in the `batch_stats` collection.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from remem_jax.models.efficientnet_v2 import EFFICIENTNET_V2_B0, EFFICIENTNET_V2_S, EfficientNetV2
from remem_jax.models.mobilenet_v2 import MobileNetV2
from remem_jax.models.resnet import ResNet18, ResNet34, ResNet50

Dtype = Any

# name -> constructor taking (num_classes, dtype=, bn_axis_name=, **kwargs).
STUDENTS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "resnet34": ResNet34,
    "resnet50": ResNet50,
    "mobilenet_v2": MobileNetV2,
    "efficientnet_v2_b0": functools.partial(EfficientNetV2, stages=EFFICIENTNET_V2_B0),
    "efficientnet_v2_s": functools.partial(EfficientNetV2, stages=EFFICIENTNET_V2_S),
}


def create_student(name: str, num_classes: int, *, dtype: Dtype = jnp.float32,
                   bn_axis_name: str | None = None, **kwargs: Any) -> nn.Module:
    """Builds a student CNN by name.

    Args:
      name: one of `STUDENTS` (`resnet18`, `resnet34`, `resnet50`, `mobilenet_v2`,
        `efficientnet_v2_b0`, `efficientnet_v2_s`).
      num_classes: classifier outputs.
      dtype: compute dtype (parameters and logits stay float32).
      bn_axis_name: axis over which BatchNorm averages its statistics; `'batch'`
        when the model runs inside `jax.pmap(..., axis_name='batch')`.
      **kwargs: further module attributes, e.g. `width_multiplier` for
        `mobilenet_v2`, `dropout_rate` / `stochastic_depth_rate` for EfficientNetV2.

    Returns:
      The unbound Flax module.
    """
    if name not in STUDENTS:
        raise ValueError(f"Unknown student {name!r}; known students: {', '.join(STUDENTS)}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    return STUDENTS[name](num_classes=num_classes, dtype=dtype, bn_axis_name=bn_axis_name, **kwargs)


def init_student(model: nn.Module, rng: jax.Array, image_size: int) -> tuple[Any, Any]:
    """Initialises a student under `jit` on one zero image of `image_size` pixels.

    It runs the model in eval mode, which reads no statistics across devices, so a
    model built with `bn_axis_name='batch'` initialises outside `pmap` too.

    Args:
      model: a module from `create_student`.
      rng: PRNG key for the parameters.
      image_size: input height and width.

    Returns:
      `(params, batch_stats)`, float32 pytrees.
    """
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = jax.jit(functools.partial(model.init, train=False))(rng, images)
    return variables["params"], variables["batch_stats"]
