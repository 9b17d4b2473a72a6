"""Classifies images with an exported student: `python -m remem_jax.predict --model=DIR --images=GLOB`.

  python -m remem_jax.predict --model=/tmp/remem_digits/best_student --images='digits/*.png'
  python -m remem_jax.predict --model=DIR --images=photo.jpg --format=tflite --top_k=3

DIR is a directory written by `remem_jax.export` (or the `distill_student` stage's
`best_student/`): `model.json` plus the exported files. Images (a file, a directory of
images or a glob) are decoded and resized exactly as the eval pipeline does
(`remem_jax.data.augment.eval_preprocess`) and classified with the chosen format
(default: the first of savedmodel, tflite, stablehlo that DIR holds); each image's
top-5 classes are printed with their names and probabilities.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from remem_jax import export, files

PREFERRED = ("savedmodel", "tflite", "stablehlo")
DEFAULT_TOP_K = 5


@dataclasses.dataclass
class Prediction:
    """One image's classification: the top-k (label, name, probability), best first."""
    path: str
    labels: list
    names: list
    probabilities: list


def choose_format(info: export.ModelInfo, model_dir: str, fmt: Optional[str]) -> str:
    """`fmt` (checked), or the first of `PREFERRED` exported in `model_dir`."""
    if fmt:
        fmt = export.check_formats([fmt], "--format")[0]
        if fmt not in info.formats:
            exported = ", ".join(info.formats) or "none"
            raise export.ExportError(f"{model_dir!r} has no verified {fmt} export (model.json lists: {exported}); "
                                     f"make one with `python -m remem_jax.export --student={model_dir} "
                                     f"--formats={fmt}`.")
        return fmt
    for candidate in PREFERRED:
        if candidate in info.formats:
            return candidate
    raise export.ExportError(f"{model_dir!r} holds no exported model (model.json lists no formats); export it "
                             "with `python -m remem_jax.export --student=...`.")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def classify(model_dir: str, paths: Sequence[str], fmt: Optional[str] = None, top_k: int = DEFAULT_TOP_K,
             batch_size: int = 32) -> list[Prediction]:
    """Classifies image files with the exported student in `model_dir`.

    Args:
      model_dir: a directory with model.json and exported files.
      paths: image files (JPEG, PNG, GIF, BMP).
      fmt: 'savedmodel', 'tflite' or 'stablehlo'; None picks as `choose_format`.
      top_k: classes per image (at most num_classes).
      batch_size: images per call of the model.

    Returns:
      One Prediction per path, in order.
    """
    info = export.read_model_info(model_dir)
    fmt = choose_format(info, model_dir, fmt)
    run = export.load_runner(fmt, model_dir)
    images = export.load_images(paths, info.image_size)
    logits = np.concatenate([run(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    probs = softmax(logits.astype(np.float64))
    k = min(top_k, info.num_classes)
    out = []
    for path, p in zip(paths, probs):
        top = np.argsort(-p, kind="stable")[:k]
        out.append(Prediction(path=path, labels=[int(i) for i in top], names=[info.class_names[i] for i in top],
                              probabilities=[float(p[i]) for i in top]))
    return out


def format_predictions(predictions: Sequence[Prediction]) -> str:
    lines = []
    for pred in predictions:
        lines.append(pred.path)
        for rank, (label, name, p) in enumerate(zip(pred.labels, pred.names, pred.probabilities), 1):
            lines.append(f"  {rank}. {name} (label {label}) {100 * p:.2f}%")
    return "\n".join(lines)


def _flags():
    from absl import flags
    return {
        "model": flags.DEFINE_string("model", None, "Directory with model.json and the exported student."),
        "images": flags.DEFINE_string("images", None, "An image file, a directory of images, or a glob."),
        "format": flags.DEFINE_string("format", None, "savedmodel | tflite | stablehlo (default: the first "
                                      "exported of savedmodel, tflite, stablehlo)."),
        "top_k": flags.DEFINE_integer("top_k", DEFAULT_TOP_K, "Classes printed per image."),
    }


def main(argv, flag_values) -> None:
    del argv
    for name in ("model", "images"):
        if not flag_values[name].value:
            raise export.ExportError(f"--{name} is required.")
    if flag_values["top_k"].value < 1:
        raise export.ExportError(f"--top_k must be a positive integer, got {flag_values['top_k'].value}.")
    model_dir = flag_values["model"].value
    if not os.path.isdir(model_dir) and not files.is_remote(model_dir):
        raise export.ExportError(f"--model={model_dir!r} is not a directory.")
    fmt = flag_values["format"].value
    if fmt:
        export.check_formats([fmt], "--format")
    paths = export.expand_image_paths(flag_values["images"].value)
    print(format_predictions(classify(model_dir, paths, fmt, flag_values["top_k"].value)))


if __name__ == "__main__":
    from remem_jax import cli
    cli.run(main, _flags)
