"""Defaults of the `config.data` section, one line of documentation each.

`configs/common.py` is the source of truth for a run; the pipeline reads every field through
`field(data_config, name)`, which falls back to these defaults, so a config that omits a field
still works (and tests can pass a plain dict).
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

# name: (default, one-line comment)
FIELDS: dict[str, tuple[Any, str]] = {
    "image_size": (224, "Square side images are resized to (ReMem: 224, as Kornblith et al.)."),
    "data_dir": (None, "TFDS data_dir; None = the TFDS default (~/tensorflow_datasets)."),
    "manual_dir": (None, "Where manually downloaded archives live (ImageNet, RESISC45, DR)."),
    "shuffle_buffer": (10_000, "Shuffle buffer for streamed TFDS splits (index sources shuffle fully)."),
    "validation_percent": (0, "0: evaluate on the test split; k>0: train on the first 100-k% of "
                              "train, evaluate on the held-out k%."),
    "few_shot_fraction": (0.0, "0.0 = whole train split; else keep this class-stratified fraction "
                               "(0.01, 0.1, ...), at least 1 per class."),
    "few_shot_per_class": (0, "0 = off; N>0 keeps N examples per class (exclusive with fraction)."),
    "few_shot_seed": (12, "Seed of the few-shot selection (12 as WeCoLoRA's random_state)."),
    "image_folder": (None, "Root with train/ and test/ sub-folders, one sub-folder per class."),
    "image_folder_metric": ("top1", "Metric of the image_folder dataset: 'top1' or 'mean_per_class'."),
    "imagenet_lt_train_list": (None, "Path to ImageNet_LT_train.txt (list file of ImageNet-LT)."),
    "imagenet_lt_eval_list": (None, "Path to ImageNet_LT_val.txt (paper, 20k) or ImageNet_LT_test.txt."),
    "imagenet_lt_image_root": (None, "Optional extracted ILSVRC2012 root holding train/ and val/; "
                                     "if set, read list images from it instead of TFDS imagenet2012."),
    "digits_test_fraction": (0.25, "Held-out test fraction of the offline digits (stratified)."),
    "digits_source_size": (32, "Side of the stored uint8 digit images (8x8 upsampled, nearest)."),
    "digits_split_seed": (0, "Seed of the fixed digits train/test split."),
    "crop_area_min": (0.05, "Inception crop: minimum crop area fraction (area range [min, 1])."),
    "random_flip": (True, "Random horizontal flip in training (off for flip-sensitive data: digits)."),
    "prefetch": (2, "Batches prefetched by tf.data after batching."),
    "num_parallel_calls": (-1, "Parallel decode/augment calls; -1 = tf.data.AUTOTUNE."),
    "skip_bad_images": (False, "image_folder: skip (and count) undecodable images instead of "
                               "stopping with their names."),
}


def get_default_config() -> ml_collections.ConfigDict:
    """Returns a ConfigDict with every `config.data` field at its default."""
    return ml_collections.ConfigDict({k: v for k, (v, _) in FIELDS.items()})


def field(data_config: Any, name: str) -> Any:
    """Reads `name` from a ConfigDict / dict / object, falling back to the documented default.

    Args:
      data_config: the `config.data` section (ConfigDict, Mapping or attribute object) or None.
      name: a field of FIELDS.

    Returns:
      The configured value, or the default when the field is absent.
    """
    if name not in FIELDS:
        raise KeyError(f"Unknown config.data field {name!r}; known: {sorted(FIELDS)}.")
    if data_config is None:
        return FIELDS[name][0]
    if isinstance(data_config, Mapping):
        return data_config.get(name, FIELDS[name][0])
    try:
        return getattr(data_config, name)
    except (AttributeError, KeyError):
        return FIELDS[name][0]
