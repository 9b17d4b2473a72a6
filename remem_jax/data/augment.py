"""Per-example decoding and augmentation, and per-batch mixup, as stateless TF ops.

Every random op takes an explicit stateless seed (an int64 [2] tensor) derived from the run seed
and the example's position in the stream, so the output does not depend on tf.data's
parallelism or on where a run was resumed.
"""
from __future__ import annotations

import tensorflow as tf


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to uint8 [H, W, 3] (grey and RGBA become RGB)."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _sample_crop(shape: tf.Tensor, seed: tf.Tensor, area_min: float):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([1, 0, 4], tf.float32), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        area_range=(area_min, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin, size


def decode_and_inception_crop(data: tf.Tensor, seed: tf.Tensor, area_min: float) -> tf.Tensor:
    """Decodes an image and takes an Inception-style random crop (uint8 [h, w, 3]).

    JPEGs are cropped while decoding (`decode_and_crop_jpeg`, which skips decoding most of the
    discarded pixels); other formats are decoded fully and then cropped. The crop area is
    uniform-ish in [area_min, 1] of the image with aspect ratio in [3/4, 4/3].
    """
    def jpeg():
        begin, size = _sample_crop(tf.image.extract_jpeg_shape(data), seed, area_min)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.image.decode_and_crop_jpeg(data, window, channels=3)

    def other():
        image = decode_image(data)
        begin, size = _sample_crop(tf.shape(image), seed, area_min)
        return tf.slice(image, begin, size)

    image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def to_model_range(image: tf.Tensor) -> tf.Tensor:
    """Maps pixel values in [0, 255] to float32 in [-1, 1] (the ViT convention): x/127.5 - 1."""
    return tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0) / 127.5 - 1.0


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Bilinear resize to [image_size, image_size] (aspect ratio not kept, as Kornblith et al.)."""
    return tf.image.resize(image, [image_size, image_size], method="bilinear")


def train_preprocess(data: tf.Tensor, seed: tf.Tensor, image_size: int, area_min: float,
                     random_flip: bool = True) -> tf.Tensor:
    """Train view: decode + inception crop + bilinear resize + random flip -> float32 [-1, 1]."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = resize(decode_and_inception_crop(data, crop_seed, area_min), image_size)
    if random_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return to_model_range(image)


def eval_preprocess(data: tf.Tensor, image_size: int) -> tf.Tensor:
    """Eval view: decode + bilinear resize (no crop) -> float32 [-1, 1] [S, S, 3]."""
    return to_model_range(resize(decode_image(data), image_size))


def mixup_with_previous(image: tf.Tensor, soft_label: tf.Tensor, seed: tf.Tensor, alpha: float):
    """Mixup of examples 1..B of a batch, each with the example before it (example 0 only lends).

    lam ~ Beta(alpha, alpha) (one draw for the batch, as g1/(g1+g2) of two Gamma(alpha)
    draws); image'[i] = lam*image[i+1] + (1-lam)*image[i]; the same for soft_label, which stays
    a distribution (sums to 1). A host holding positions [lo, hi) of a global batch passes
    positions lo-1 .. hi-1 (lo-1 taken modulo the global batch): its part of the mixed global
    batch is then exactly what one host holding the whole batch computes (`mixup`).

    Args:
      image: float [B+1, ...].
      soft_label: float [B+1, C].
      seed: int64 [2] stateless seed for this (global) batch.
      alpha: Beta parameter (> 0).

    Returns:
      (mixed image [B, ...], mixed soft_label [B, C], lam).
    """
    g = tf.random.stateless_gamma([2], seed=seed, alpha=alpha, dtype=tf.float32)
    lam = g[0] / tf.maximum(g[0] + g[1], 1e-30)
    lam = tf.where(tf.math.is_finite(lam), lam, 1.0)
    image = lam * image[1:] + (1.0 - lam) * image[:-1]
    soft_label = lam * soft_label[1:] + (1.0 - lam) * soft_label[:-1]
    return image, soft_label, lam


def mixup(image: tf.Tensor, soft_label: tf.Tensor, seed: tf.Tensor, alpha: float):
    """Mixup of a whole batch with its roll by one, as big_vision / patient distillation.

    lam ~ Beta(alpha, alpha) (one draw for the batch, as g1/(g1+g2) of two Gamma(alpha)
    draws); image' = lam*image + (1-lam)*roll(image, 1); the same for soft_label, which stays a
    distribution (sums to 1).

    Args:
      image: float [B, ...].
      soft_label: float [B, C].
      seed: int64 [2] stateless seed for this batch.
      alpha: Beta parameter (> 0).

    Returns:
      (mixed image, mixed soft_label, lam).
    """
    # roll(x, 1)[i] = x[i - 1], x[-1] for i = 0: the batch with its last example put in front.
    return mixup_with_previous(tf.concat([image[-1:], image], 0), tf.concat([soft_label[-1:], soft_label], 0),
                               seed, alpha)
