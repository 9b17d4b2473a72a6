"""Colour jitter as a jittable JAX op, for augmentations that one model of a pair sees alone.

TinyMIM gives its student `ColorJitter(0.4, 0.4, 0.4)` while the teacher sees the same crop
and flip without it; doing the jitter on the device, inside the train step, keeps one input
pipeline (identical crops and flips for both models by construction).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _grey(x: jax.Array) -> jax.Array:
    return jnp.sum(x * jnp.asarray(_LUMA, x.dtype), axis=-1, keepdims=True)


def color_jitter(rng: jax.Array, images: jax.Array, strength: float) -> jax.Array:
    """Brightness, contrast and saturation jitter with factors ~ U[1 - s, 1 + s] per image.

    torchvision's ColorJitter(s, s, s) without hue: on [0, 1] pixels, brightness `f * x`,
    contrast `f * x + (1 - f) * mean(grey(x))`, saturation `f * x + (1 - f) * grey(x)`, each
    clipped to [0, 1]. The order is fixed (brightness, contrast, saturation) where torchvision
    draws a random order per image.

    Args:
      rng: a PRNG key.
      images: `[B, H, W, 3]` in [-1, 1] (the model range).
      strength: s in [0, 1); 0 returns `images` unchanged.

    Returns:
      The jittered images, same shape and dtype, in [-1, 1].
    """
    if strength == 0:
        return images
    dtype = images.dtype
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    factors = jax.random.uniform(rng, (3, x.shape[0], 1, 1, 1), minval=1.0 - strength, maxval=1.0 + strength)
    x = jnp.clip(factors[0] * x, 0.0, 1.0)
    mean = jnp.mean(_grey(x), axis=(1, 2, 3), keepdims=True)
    x = jnp.clip(factors[1] * x + (1.0 - factors[1]) * mean, 0.0, 1.0)
    x = jnp.clip(factors[2] * x + (1.0 - factors[2]) * _grey(x), 0.0, 1.0)
    return (2.0 * x - 1.0).astype(dtype)
