"""Offline dataset: scikit-learn's bundled handwritten digits as small RGB images.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 grey-level scans (values 0..16) inside the
package, so this dataset needs no download. We scale them to uint8 0..255, upsample with
nearest-neighbour to `source_size` pixels, replicate to RGB and PNG-encode each image: the
pipeline then decodes, crops and resizes them with exactly the code it uses for TFDS JPEGs.
"""
from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10


@functools.lru_cache(maxsize=8)
def load_digits_arrays(source_size: int = 32, test_fraction: float = 0.25, seed: int = 0
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Returns the fixed stratified digits split as uint8 RGB arrays.

    Args:
      source_size: side of the stored images (a multiple of 8 keeps pixels square blocks; any
        size >= 8 works).
      test_fraction: fraction of each class put in the test split, in (0, 1).
      seed: seed of the split (the same seed gives the same split on every machine).

    Returns:
      {'train': (images uint8 [N, S, S, 3], labels int32 [N]), 'test': (...)}, examples in a
      seeded random order.
    """
    from sklearn.datasets import load_digits  # Imported lazily: sklearn is slow to import.
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits_test_fraction must be in (0, 1), got {test_fraction}.")
    if source_size < 8:
        raise ValueError(f"digits_source_size must be >= 8, got {source_size}.")
    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..16.
    labels = bunch.target.astype(np.int32)
    rows = (np.arange(source_size) * 8) // source_size  # Nearest-neighbour upsampling.
    images = images[:, rows][:, :, rows]
    images = np.repeat(images[..., None], 3, axis=-1)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           random_state=seed, stratify=labels)
    return {"train": (images[idx_train], labels[idx_train]),
            "test": (images[idx_test], labels[idx_test])}


@functools.lru_cache(maxsize=8)
def load_digits_encoded(source_size: int = 32, test_fraction: float = 0.25, seed: int = 0
                        ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Like `load_digits_arrays` but each image is PNG bytes (object array [N]).

    This is the form the input pipeline consumes (it decodes after shuffling, as for TFDS).
    """
    import tensorflow as tf

    out = {}
    for split, (images, labels) in load_digits_arrays(source_size, test_fraction, seed).items():
        encoded = np.array([tf.io.encode_png(im).numpy() for im in images], dtype=object)
        out[split] = (encoded, labels)
    return out
