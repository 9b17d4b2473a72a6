"""Input-pipeline throughput: `python -m remem_jax.data.benchmark --image_size=224 ...`.

Builds a temporary image folder of realistic JPEGs (500x375, noise plus gradients, quality 90,
~100 KB each, like ImageNet photos) and times the train pipeline (read + decode-and-crop +
resize + flip + normalise + batch), then the offline digits source. Prints images/s.
Every other `config.data` field takes its default from configs/common.py (the one table of them).
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
import time

from absl import app, flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 224, "Output image side.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_integer("num_batches", 20, "Timed batches (after 2 warm-up batches).")
flags.DEFINE_integer("num_images", 300, "JPEGs in the temporary folder.")
flags.DEFINE_integer("num_classes", 10, "Classes in the temporary folder.")
flags.DEFINE_float("mixup_alpha", 0.0, "Mixup alpha (0 = off).")


def write_jpeg_folder(root: str, num_images: int, num_classes: int, seed: int = 0) -> None:
    """Writes root/train/class_k/*.jpg of 500x375 noise-plus-gradient JPEGs."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(num_images):
        d = os.path.join(root, "train", f"class_{i % num_classes}")
        os.makedirs(d, exist_ok=True)
        a, b, c = rng.uniform(0.1, 0.6, 3)
        base = np.stack([xx * a, yy * b, (xx + yy) * c / 2], -1)
        im = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
        tf.io.write_file(os.path.join(d, f"{i}.jpg"), tf.io.encode_jpeg(im, quality=90))


def time_iterator(it, num_batches: int, batch_size: int) -> float:
    """Returns images/s over `num_batches` batches after two warm-up batches."""
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return num_batches * batch_size / (time.perf_counter() - start)


def default_data_config():
    """`config.data` of configs/common.py (next to the remem_jax package in a source checkout)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "configs", "common.py")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run the benchmark from a source checkout of remem_jax.")
    spec = importlib.util.spec_from_file_location("remem_configs_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().data


def jpeg_pipeline_images_per_s(image_size: int, batch_size: int, num_batches: int, *, num_images: int = 300,
                                num_classes: int = 10, mixup_alpha: float = 0.0) -> float:
    """Images/s of the image-folder train pipeline on a temporary folder of 500x375 JPEGs.

    The pipeline of a real run (read, decode-and-crop, resize to `image_size`, flip, normalise,
    batch; `config.data` defaults of configs/common.py), timed over `num_batches` batches of
    `batch_size` after two warm-up batches. `remem_jax.benchmark` compares it with the step's
    images/s (`data_over_step`).
    """
    from remem_jax.data import pipeline

    cfg = default_data_config()
    cfg.image_size = image_size
    with tempfile.TemporaryDirectory() as root:
        write_jpeg_folder(root, num_images, num_classes)
        cfg.image_folder = root
        data = pipeline.TrainData(cfg, "image_folder", global_batch_size=batch_size, seed=0,
                                  mixup_alpha=mixup_alpha)
        return time_iterator(data.iterator(), num_batches, batch_size)


def main(argv):
    del argv
    from remem_jax.data import pipeline

    rate = jpeg_pipeline_images_per_s(FLAGS.image_size, FLAGS.batch_size, FLAGS.num_batches,
                                      num_images=FLAGS.num_images, num_classes=FLAGS.num_classes,
                                      mixup_alpha=FLAGS.mixup_alpha)
    print(f"image_folder 500x375 JPEG -> {FLAGS.image_size}px train pipeline: "
          f"{rate:.0f} images/s ({os.cpu_count()} CPUs visible)")
    cfg = default_data_config()
    cfg.image_size = FLAGS.image_size
    data = pipeline.TrainData(cfg, "digits", global_batch_size=FLAGS.batch_size, seed=0,
                              mixup_alpha=FLAGS.mixup_alpha)
    rate = time_iterator(data.iterator(), FLAGS.num_batches, FLAGS.batch_size)
    print(f"digits (32px PNG) -> {FLAGS.image_size}px train pipeline: {rate:.0f} images/s")


if __name__ == "__main__":
    app.run(main)
