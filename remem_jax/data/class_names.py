"""Human-readable class names of a registry dataset, for exported models and `remem_jax.predict`."""
from __future__ import annotations

import os

from absl import logging

from remem_jax.data import sources
from remem_jax.data.registry import get_spec

# ImageNet-LT's labels are ImageNet-2012's (the list files use the same 1000 class indices).
_LABELS_OF = {"imagenet_lt": "imagenet2012"}


def class_names(data_config, dataset: str, num_classes: int) -> list[str]:
    """The `num_classes` class names of `dataset`, in label order.

    digits: '0'..'9'; image_folder: the sub-folders of train/; TFDS datasets: the
    builder's `label` feature names (known without the data for most builders).
    Where no names can be found, the names are the label indices ('0', '1', ...)
    and a warning says so.
    """
    spec = get_spec(dataset)
    names = None
    try:
        if spec.kind == "digits":
            names = [str(i) for i in range(10)]
        elif spec.kind == "image_folder":
            names = sources.list_image_folder(os.path.join(data_config.image_folder, "train"))[0]
        else:
            import tensorflow_datasets as tfds
            tfds_name = spec.tfds_name or _LABELS_OF.get(spec.kind, "imagenet2012")
            builder = tfds.builder(tfds_name, data_dir=data_config.data_dir)
            names = list(builder.info.features["label"].names)
    except Exception as e:  # names are a convenience: the export must not fail for lack of them
        logging.warning("No class names for dataset %r (%s: %s); using label indices.", dataset,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    if names is None or len(names) != num_classes:
        if names is not None:
            logging.warning("Dataset %r has %d class names but the model has %d classes; using label "
                            "indices.", dataset, len(names), num_classes)
        names = [str(i) for i in range(num_classes)]
    return [str(n) for n in names]
