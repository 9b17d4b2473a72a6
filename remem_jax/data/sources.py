"""Sources: where one host's examples of one split come from, still encoded.

A `Source` is either
  * a record table (`records`): encoded image bytes or file paths plus int labels, held as
    NumPy arrays (digits, image folders, ImageNet-LT from an extracted image root, few-shot
    subsets of TFDS splits). The pipeline shuffles these fully by permuting indices; or
  * a stream (`stream_fn`): a TFDS split read in its fixed on-disk order, yielding
    {'image': encoded bytes, 'label': int32}; the pipeline shuffles it with a buffer.
Nothing here decodes an image: decoding happens in the pipeline after shuffling.

Host slicing: a record table is small (bytes of a small dataset, or file paths), so every host
holds all of it (`shared`) and the pipeline gives host p its part of every global batch: the
batches then depend on the seed and the global batch size only, not on the number of hosts. A TFDS
stream gives host p `tfds.even_splits(split, process_count)[p]`, and a few-shot subset of a TFDS
split (whose bytes may be large) the indices [p::process_count]. `host_counts` holds every host's
count so that eval can pad all hosts to the same number of batches without communication.

An eval source may be a fixed class-stratified subset of the eval split (`build_source(...,
eval_examples=n)`, for the evaluations during training): selected by `_select` on the labels of
a record table, or, for a TFDS stream, after one label pass, kept as records like a few-shot subset.

`check_ready` checks, cheaply and before anything else of a run happens, that the configured
dataset exists on disk (prepared TFDS data, image folders, list files).

Undecodable images of an image folder: listing reads no image (a folder of a million files stays
cheap to list). A decode failure in the pipeline is caught where it happens and the failing files
are found with one parallel decode pass over the split (`find_undecodable`), so the error names
every bad file at once and a clean folder pays nothing. With `config.data.skip_bad_images` that
pass runs up front instead (once per split and process) and the bad files are dropped from the
record table, so shuffling, resume and the exact eval counts stay consistent.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
from typing import Any, Callable, Optional

import numpy as np
from absl import logging

from remem_jax import errors, files
from remem_jax.data import digits as digits_lib
from remem_jax.data import fewshot
from remem_jax.data.registry import DatasetSpec, get_spec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
ROLES = ("train", "few_shot", "eval")


class DataNotFoundError(FileNotFoundError):
    """Data, manual files, folders or list files that the configured dataset needs are missing."""


class DataError(errors.UserError, ValueError):
    """Data on disk that cannot be used as it is (class folders that do not match, bad images)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One host's examples of one split (see module docstring).

    Attributes:
      name: dataset name.
      num_classes: number of classes.
      metric: 'top1' or 'mean_per_class'.
      host_counts: number of examples on each host, indexed by process index; one entry, the
        table's size, when `shared`.
      process_index: this host (0 when `shared`).
      records: (data [N] object array of bytes or path strings, labels int32 [N]) or None.
      records_are_paths: whether records[0] holds file paths to read.
      stream_fn: zero-argument function returning a tf.data.Dataset, or None.
      shared: `records` is the whole table, identical on every host; the pipeline slices every
        global batch between the hosts.
    """

    name: str
    num_classes: int
    metric: str
    host_counts: tuple[int, ...]
    process_index: int
    records: Optional[tuple[np.ndarray, np.ndarray]] = None
    records_are_paths: bool = False
    stream_fn: Optional[Callable[[], Any]] = None
    shared: bool = False

    @property
    def num_examples(self) -> int:
        """This host's number of examples."""
        return self.host_counts[self.process_index]

    @property
    def total_examples(self) -> int:
        """The number of examples over all hosts."""
        return sum(self.host_counts)


# --------------------------------------------------------------------------------------------
# Selection shared by all record sources.

def _few_shot_requested(cfg) -> bool:
    return cfg.few_shot_fraction is not None or cfg.few_shot_per_class is not None


def _few_shot(cfg, labels: np.ndarray) -> np.ndarray:
    # None (off) is fewshot's 0.
    fraction = 0.0 if cfg.few_shot_fraction is None else cfg.few_shot_fraction
    per_class = 0 if cfg.few_shot_per_class is None else cfg.few_shot_per_class
    return fewshot.few_shot_indices(labels, fraction=fraction, per_class=per_class,
                                    seed=cfg.few_shot_seed)


def _eval_subset(idx: np.ndarray, labels: np.ndarray, eval_examples: Optional[int]) -> np.ndarray:
    """`idx`, or its fixed class-stratified subset of `eval_examples` (`labels`: the labels of `idx`)."""
    if eval_examples is None:
        return idx
    return idx[fewshot.stratified_subset_indices(labels, eval_examples)]


def _select(cfg, role: str, train_labels: np.ndarray, eval_labels_fn: Callable[[], np.ndarray],
            eval_examples: Optional[int] = None) -> tuple[str, np.ndarray]:
    """Returns (which split to read: 'train'|'eval', indices into it) for `role` (see `build_source`).

    `eval_examples` (role 'eval'): keep a fixed class-stratified subset of that many examples.
    """
    percent = cfg.validation_percent
    if percent:
        train_idx, held_idx = fewshot.holdout_indices(train_labels, percent)
        if role == "eval":
            return "train", _eval_subset(held_idx, train_labels[held_idx], eval_examples)
        idx = train_idx
    elif role == "eval":
        labels = eval_labels_fn()
        return "eval", _eval_subset(np.arange(len(labels), dtype=np.int64), labels, eval_examples)
    else:
        idx = np.arange(len(train_labels), dtype=np.int64)
    if role == "few_shot" and _few_shot_requested(cfg):
        idx = idx[_few_shot(cfg, train_labels[idx])]
    return "train", idx


def _record_source(spec_name, num_classes, metric, data, labels, idx, are_paths):
    # The whole table on every host (see the module docstring): the pipeline slices each batch.
    return Source(name=spec_name, num_classes=num_classes, metric=metric, host_counts=(len(idx),),
                  process_index=0, records=(data[idx], labels[idx].astype(np.int32)),
                  records_are_paths=are_paths, shared=True)


# --------------------------------------------------------------------------------------------
# Offline digits.

def _digits_source(spec: DatasetSpec, cfg, role, pi, pc, eval_examples) -> Source:
    splits = digits_lib.load_digits_encoded(int(cfg.digits_source_size),
                                            float(cfg.digits_test_fraction),
                                            int(cfg.digits_split_seed))
    which, idx = _select(cfg, role, splits["train"][1], lambda: splits["test"][1], eval_examples)
    data, labels = splits["train" if which == "train" else "test"]
    return _record_source(spec.name, spec.num_classes, spec.metric, data, labels, idx, False)


# --------------------------------------------------------------------------------------------
# Image folders.

def _image_files(class_dir: str) -> tuple[list[str], list[str]]:
    """(image file names, other file names) of one class folder, sorted."""
    import tensorflow as tf

    names = sorted(tf.io.gfile.listdir(class_dir))
    images = [n for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return images, [n for n in names if not n.lower().endswith(IMAGE_EXTENSIONS)]


def list_image_folder(split_dir: str, class_names: Optional[list[str]] = None
                      ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Lists <split_dir>/<class>/*.{jpg,jpeg,png} in sorted order (as torchvision ImageFolder).

    Args:
      split_dir: folder with one sub-folder per class.
      class_names: the class list (from the train folder) to map names to labels; None = the
        sorted sub-folders of `split_dir`. A class may be absent from `split_dir`.

    Returns:
      (class_names, paths object array [N], labels int32 [N]).

    Raises:
      DataNotFoundError: `split_dir` is missing or has no class folders, or a class folder
        holds no image.
      DataError: `split_dir` has a class folder that `class_names` lacks.
    """
    import tensorflow as tf

    if not tf.io.gfile.isdir(split_dir):
        raise DataNotFoundError(
            f"Image folder split {split_dir!r} does not exist. config.data.image_folder must "
            "contain train/ and test/ (or val/) sub-folders, each with one sub-folder of images per class.")
    found = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(split_dir)
                   if tf.io.gfile.isdir(os.path.join(split_dir, d)))
    if not found:
        raise DataNotFoundError(f"Image folder split {split_dir!r} has no class sub-folders.")
    if class_names is None:
        class_names = found
    extra = sorted(set(found) - set(class_names))
    if extra:
        train_dir = os.path.join(os.path.dirname(split_dir.rstrip("/")), "train")
        raise DataError(
            f"Image folder {split_dir!r} has {len(extra)} class folder(s) that {train_dir!r} lacks: "
            f"{', '.join(os.path.join(split_dir, e) for e in extra)}; every evaluated class needs "
            f"training images (train classes: {', '.join(class_names)}).")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        if not tf.io.gfile.isdir(class_dir):
            continue
        images, others = _image_files(class_dir)
        if not images:
            held = f"it holds {len(others)} other file(s), e.g. {others[0]!r}" if others else "it is empty"
            raise DataNotFoundError(
                f"Image folder class {class_dir!r} has no .jpg/.jpeg/.png images ({held}); add images "
                "or remove the folder.")
        paths.extend(os.path.join(class_dir, fname) for fname in images)
        labels.extend([label] * len(images))
    return class_names, np.array(paths, dtype=object), np.array(labels, dtype=np.int32)


# Undecodable files found per list of paths in this process (a scan is one decode pass).
_UNDECODABLE: dict[tuple[str, ...], list[str]] = {}


def find_undecodable(paths) -> list[str]:
    """The files among `paths` that cannot be read and decoded as images (one parallel pass).

    The result is kept for the process, so every stage and split asks once.
    """
    key = tuple(str(p) for p in paths)
    if key not in _UNDECODABLE:
        import tensorflow as tf
        from remem_jax.data import augment

        logging.info("Decoding %d images once to find undecodable ones.", len(key))
        ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(key) or [""], tf.string)).take(len(key))
        ds = ds.enumerate().map(
            lambda i, path: (i, tf.shape(augment.decode_image(tf.io.read_file(path)))[0]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=False).ignore_errors()
        ok = np.zeros(len(key), bool)
        for i, _ in ds.as_numpy_iterator():
            ok[i] = True
        _UNDECODABLE[key] = [key[i] for i in np.flatnonzero(~ok)]
    return _UNDECODABLE[key]


def decode_failure(path: str) -> str:
    """Why `path` does not decode, in one line (the TensorFlow error)."""
    import tensorflow as tf
    from remem_jax.data import augment

    try:
        augment.decode_image(tf.io.read_file(path))
    except tf.errors.OpError as e:
        return f"{type(e).__name__}: {' '.join(str(e.message).split())[:200]}"
    return "decodes when read alone"


def undecodable_images_error(source: "Source", err: BaseException) -> Optional[DataError]:
    """The error naming the undecodable files of `source` after `err` stopped its pipeline.

    Returns None when every file decodes (then `err` had another cause).
    """
    if source.records is None or not source.records_are_paths:
        return None
    paths = list(source.records[0])
    bad = find_undecodable(paths)
    if not bad:
        return None
    more = f"; the others: {', '.join(bad[1:6])}" + (f" and {len(bad) - 6} more" if len(bad) > 6 else "") \
        if len(bad) > 1 else ""
    return DataError(
        f"Cannot decode image {bad[0]!r} ({decode_failure(bad[0])}): {len(bad)} of {len(paths)} images of "
        f"dataset {source.name!r} are undecodable{more}. Replace or delete them, or set "
        "config.data.skip_bad_images=True to skip them (the count goes into the results).")


def _drop_undecodable(split_dir: str, classes: list[str], paths: np.ndarray, labels: np.ndarray):
    """(paths, labels, skipped files) with the undecodable images of a split removed."""
    bad = set(find_undecodable(paths))
    if not bad:
        return paths, labels, []
    keep = np.array([p not in bad for p in paths], bool)
    logging.warning("Skipping %d undecodable images of %s (config.data.skip_bad_images), e.g. %s.",
                    len(bad), split_dir, sorted(bad)[0])
    for label in sorted(set(labels[~keep]) - set(labels[keep])):
        raise DataError(f"Image folder class {os.path.join(split_dir, classes[label])!r} has no decodable "
                        "image: config.data.skip_bad_images skipped all of them.")
    return paths[keep], labels[keep], sorted(bad)


def _image_folder_root(cfg) -> str:
    root = cfg.image_folder
    if not root:
        raise DataNotFoundError("Dataset 'image_folder' needs config.data.image_folder: a root "
                                "folder with train/<class>/*.jpg and test/<class>/*.jpg (or val/<class>/*.jpg).")
    return root


# Image folder roots whose eval split choice was logged in this process (it is made on every source build).
_EVAL_SPLIT_LOGGED: set[tuple[str, str]] = set()

EVAL_SPLIT_FOLDERS = ("test", "val")


def image_folder_eval_split(cfg) -> str:
    """The eval split folder of the image_folder dataset: 'test', or 'val' when there is no test/.

    ImageNet's layout (and many others) has val/ instead of test/. When both exist, test/ is used
    and val/ is ignored (logged). The choice is logged once per process and recorded in the
    run's results by `check_ready` ('eval_split').

    Raises:
      DataNotFoundError: config.data.image_folder is unset, or has neither test/ nor val/.
    """
    import tensorflow as tf

    root = _image_folder_root(cfg)
    found = [name for name in EVAL_SPLIT_FOLDERS if tf.io.gfile.isdir(os.path.join(root, name))]
    if not found:
        raise DataNotFoundError(
            f"Image folder config.data.image_folder={root!r} has no eval split: expected "
            f"{os.path.join(root, 'test')!r} or {os.path.join(root, 'val')!r} (one sub-folder of images "
            "per class, as in train/), found neither.")
    split = found[0]
    if (root, split) not in _EVAL_SPLIT_LOGGED:
        _EVAL_SPLIT_LOGGED.add((root, split))
        ignored = f"; {os.path.join(root, 'val')} is ignored (test/ wins)" if len(found) > 1 else ""
        logging.info("image_folder: evaluating on %s%s.", os.path.join(root, split), ignored)
    return split


def image_folder_split(cfg, split: str, classes: Optional[list[str]] = None):
    """(classes, paths, labels, skipped files) of `<config.data.image_folder>/<split>`.

    Undecodable images are dropped (and returned as skipped) when
    config.data.skip_bad_images is set; otherwise nothing is decoded here.
    """
    split_dir = os.path.join(_image_folder_root(cfg), split)
    classes, paths, labels = list_image_folder(split_dir, classes)
    if cfg.skip_bad_images:
        return (classes, *_drop_undecodable(split_dir, classes, paths, labels))
    return classes, paths, labels, []


def _folder_source(spec: DatasetSpec, cfg, role, pi, pc, eval_examples) -> Source:
    classes, train_paths, train_labels, _ = image_folder_split(cfg, "train")
    test = {}

    def eval_labels():
        test["split"] = image_folder_split(cfg, image_folder_eval_split(cfg), classes)[1:3]
        return test["split"][1]

    which, idx = _select(cfg, role, train_labels, eval_labels, eval_examples)
    data, labels = (train_paths, train_labels) if which == "train" else test["split"]
    return _record_source(spec.name, len(classes), cfg.image_folder_metric, data,
                          labels, idx, True)


def image_folder_num_classes(cfg) -> int:
    """Number of classes of the image_folder dataset (the sub-folders of train/)."""
    return len(list_image_folder(os.path.join(_image_folder_root(cfg), "train"))[0])


# --------------------------------------------------------------------------------------------
# TFDS.

def _builder(spec: DatasetSpec, cfg, tfds_name: Optional[str] = None):
    import tensorflow_datasets as tfds

    name = tfds_name or spec.tfds_name
    return tfds.builder(name, data_dir=cfg.data_dir)


def _missing_data_message(spec: DatasetSpec, cfg, tfds_name: str, err: BaseException) -> str:
    data_dir = cfg.data_dir or "~/tensorflow_datasets (TFDS default)"
    manual_dir = cfg.manual_dir or "<manual_dir>"
    msg = (f"Dataset {spec.name!r}: TFDS builder {tfds_name!r} has no prepared data in "
           f"data_dir={data_dir} ({type(err).__name__}: {str(err).splitlines()[0]}). ")
    if spec.manual_download:
        msg += ("This dataset needs a MANUAL download. "
                + spec.manual_download.replace("<manual_dir>", manual_dir)
                .replace("<data_dir>", str(cfg.data_dir or "~/tensorflow_datasets")))
    else:
        msg += (f"Prepare it with `tfds build {tfds_name} --data_dir="
                f"{cfg.data_dir or '~/tensorflow_datasets'}` (or set "
                "config.data.data_dir to where it is already prepared).")
    return msg


def _as_dataset(builder, spec, cfg, split: str):
    """builder.as_dataset with encoded images, fixed order, and a helpful missing-data error."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        return builder.as_dataset(split=split, shuffle_files=False,
                                  decoders={"image": tfds.decode.SkipDecoding()},
                                  read_config=tfds.ReadConfig(add_tfds_id=False))
    except (AssertionError, FileNotFoundError, tf.errors.NotFoundError) as err:
        raise DataNotFoundError(_missing_data_message(spec, cfg, builder.name + (
            "/" + builder.builder_config.name if builder.builder_config else ""), err)) from err


def _image_label(ex):
    import tensorflow as tf
    return {"image": ex["image"], "label": tf.cast(ex["label"], tf.int32)}


_SLICE = re.compile(r"^\s*(\w+)\s*(\[.*\])?\s*$")


def holdout_split_strings(train_split: str, percent: float, split_sizes: dict[str, int]
                          ) -> tuple[str, str]:
    """Splits a TFDS train split string into (train part, held-out last `percent`%).

    Each '+'-component is resolved to absolute example indices (so 'train[:80%]' works too)
    and its last floor-complement is held out. TFDS shuffles examples when it writes a dataset,
    so the tail is a random, if not stratified, subset.

    Args:
      train_split: e.g. 'train', 'train+validation', 'train[:80%]'.
      percent: held-out percentage in (0, 100).
      split_sizes: {split name: num_examples}; if empty (TFDS mock data), plain percent slices
        are used, which only works for unsliced components.

    Returns:
      (train split string, held-out split string).
    """
    import tensorflow_datasets as tfds

    if not 0 < percent < 100:
        raise ValueError(f"validation_percent must be in (0, 100), got {percent}.")
    keep = 100 - percent
    train_parts, held_parts = [], []
    for comp in train_split.split("+"):
        m = _SLICE.match(comp)
        if not m:
            raise ValueError(f"Cannot parse split component {comp!r} of {train_split!r}.")
        name, sliced = m.group(1), m.group(2)
        if not split_sizes:
            if sliced:
                raise ValueError(f"validation_percent needs the split sizes to hold out part of "
                                 f"the sliced split {comp!r}; the dataset info has none.")
            train_parts.append(f"{name}[:{keep:g}%]")
            held_parts.append(f"{name}[{keep:g}%:]")
            continue
        infos = {k: types.SimpleNamespace(num_examples=v) for k, v in split_sizes.items()}
        for ins in tfds.core.ReadInstruction.from_spec(comp).to_absolute(infos):
            size = split_sizes[ins.splitname]
            a = 0 if ins.from_ is None else ins.from_
            b = size if ins.to is None else ins.to
            cut = a + int(np.floor((b - a) * keep / 100 + 1e-9))
            train_parts.append(f"{ins.splitname}[{a}:{cut}]")
            held_parts.append(f"{ins.splitname}[{cut}:{b}]")
    return "+".join(train_parts), "+".join(held_parts)


def _split_sizes(builder) -> dict[str, int]:
    try:
        return {name: info.num_examples for name, info in builder.info.splits.items()}
    except Exception:  # Unprepared or mocked datasets have no split info.  # noqa: BLE001
        return {}


def _host_split(split: str, p: int, pc: int) -> str:
    import tensorflow_datasets as tfds
    return split if pc == 1 else tfds.even_splits(split, n=pc)[p]


def _cardinality(ds) -> int:
    import tensorflow as tf
    n = int(ds.cardinality().numpy())
    if n < 0:  # Unknown: count (records are still encoded, so this is only I/O).
        n = int(ds.reduce(tf.constant(0, tf.int64), lambda c, _: c + 1).numpy())
    return n


def read_labels(ds) -> np.ndarray:
    """Reads the 'label' of every example of an (encoded) TFDS dataset: one pass, no decoding."""
    parts = [b.numpy() for b in ds.map(lambda ex: ex["label"]).batch(8192)]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros([0], np.int32)


def _materialize(ds, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keeps the encoded images and labels of `indices` (positions in `ds`) in host memory."""
    import tensorflow as tf

    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(indices, tf.int64),
                                            tf.ones([len(indices)], tf.int64)), default_value=0)
    kept = ds.enumerate().filter(lambda i, ex: table.lookup(i) > 0).map(
        lambda i, ex: (ex["image"], tf.cast(ex["label"], tf.int32)))
    images, labels = [], []
    for image, label in kept.as_numpy_iterator():
        images.append(image)
        labels.append(label)
    if len(images) != len(indices):
        raise RuntimeError(f"Materialising a subset found {len(images)} of {len(indices)} "
                           "selected examples; the split changed between the two passes.")
    return np.array(images, dtype=object), np.array(labels, dtype=np.int32)


def _materialized_subset(spec: DatasetSpec, full, idx: np.ndarray, pi: int, pc: int) -> Source:
    """The examples `idx` (positions) of the TFDS dataset `full`; this host keeps its share idx[pi::pc]."""
    data, labels = _materialize(full, idx[pi::pc])
    return Source(name=spec.name, num_classes=spec.num_classes, metric=spec.metric,
                  host_counts=tuple(len(idx[p::pc]) for p in range(pc)), process_index=pi, records=(data, labels))


def _tfds_source(spec: DatasetSpec, cfg, role, pi, pc, eval_examples) -> Source:
    builder = _builder(spec, cfg)
    train_split, eval_split = spec.train_split, spec.eval_split
    percent = cfg.validation_percent
    if percent:
        train_split, eval_split = holdout_split_strings(train_split, percent,
                                                        _split_sizes(builder))
    split = eval_split if role == "eval" else train_split
    if role == "few_shot" and _few_shot_requested(cfg):
        # Cost: one label-only pass over the train split (images stay encoded), then a second
        # pass that keeps the selected examples' encoded bytes in host memory.
        full = _as_dataset(builder, spec, cfg, split)
        return _materialized_subset(spec, full, _few_shot(cfg, read_labels(full)), pi, pc)
    host_splits = [_host_split(split, p, pc) for p in range(pc)]
    counts = tuple(_cardinality(_as_dataset(builder, spec, cfg, s)) for s in host_splits)
    if role == "eval" and eval_examples is not None and eval_examples < sum(counts):
        # The same two passes over the eval split, once, when the data is built.
        full = _as_dataset(builder, spec, cfg, split)
        return _materialized_subset(spec, full, fewshot.stratified_subset_indices(read_labels(full), eval_examples),
                                    pi, pc)

    def stream_fn():
        return _as_dataset(builder, spec, cfg, host_splits[pi]).map(_image_label)

    return Source(name=spec.name, num_classes=spec.num_classes, metric=spec.metric,
                  host_counts=counts, process_index=pi, stream_fn=stream_fn)


# --------------------------------------------------------------------------------------------
# ImageNet-LT from its list files.

def read_list_file(path: Optional[str], field_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads an ImageNet-LT list file ('train/n01440764/n01440764_190.JPEG 0' per line).

    Returns:
      (relative paths object array [N], labels int32 [N]).
    """
    import tensorflow as tf

    if not path:
        raise DataNotFoundError(
            f"Dataset 'imagenet_lt' needs config.data.{field_name}: the path of the published "
            "list file (ImageNet_LT_train.txt / ImageNet_LT_val.txt / ImageNet_LT_test.txt "
            "from https://github.com/zhmiao/OpenLongTailRecognition-OLTR).")
    if not tf.io.gfile.exists(path):
        raise DataNotFoundError(f"ImageNet-LT list file config.data.{field_name}={path!r} "
                                "does not exist.")
    paths, labels = [], []
    with tf.io.gfile.GFile(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().rsplit(None, 1)  # The label is the last token.
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{path}:{lineno}: expected '<relative path> <label>', got "
                                 f"{line.strip()!r}.")
            paths.append(parts[0])
            labels.append(int(parts[1]))
    return np.array(paths, dtype=object), np.array(labels, dtype=np.int32)


def _imagenet_lt_source(spec: DatasetSpec, cfg, role, pi, pc, eval_examples) -> Source:
    import tensorflow as tf

    train_paths, train_labels = read_list_file(cfg.imagenet_lt_train_list,
                                               "imagenet_lt_train_list")
    lists = {}

    def eval_labels():
        lists["eval"] = read_list_file(cfg.imagenet_lt_eval_list,
                                       "imagenet_lt_eval_list")
        return lists["eval"][1]

    which, idx = _select(cfg, role, train_labels, eval_labels, eval_examples)
    rel, labels = (train_paths, train_labels) if which == "train" else lists["eval"]
    root = cfg.imagenet_lt_image_root
    if root:
        full = np.array([os.path.join(root, r) for r in rel], dtype=object)
        if not tf.io.gfile.exists(full[idx[0]]):
            raise DataNotFoundError(f"ImageNet-LT image {full[idx[0]]!r} does not exist: "
                                    "config.data.imagenet_lt_image_root must hold the extracted "
                                    "ILSVRC2012 train/ and val/ folders.")
        return _record_source(spec.name, spec.num_classes, spec.metric, full, labels, idx, True)
    # Stream imagenet2012 and keep the listed files (matched on file name); the label comes
    # from the list. Every host reads the whole imagenet2012 split (filtering is cheap, the
    # I/O is not: ~11x the LT train set). Set imagenet_lt_image_root to avoid that.
    prefixes = {r.split("/")[0] for r in rel[idx]}
    if len(prefixes) != 1 or not prefixes <= {"train", "val"}:
        raise DataError(f"ImageNet-LT list entries must all start with 'train/' or 'val/', "
                         f"got prefixes {sorted(prefixes)}.")
    tfds_split = "train" if prefixes == {"train"} else "validation"
    host = idx[pi::pc]
    names = [os.path.basename(r) for r in rel[host]]
    host_labels = labels[host]
    builder = _builder(spec, cfg)

    def stream_fn():
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(names, tf.string),
                                                tf.constant(host_labels, tf.int32)),
            default_value=-1)
        ds = _as_dataset(builder, spec, cfg, tfds_split)
        ds = ds.map(lambda ex: {"image": ex["image"], "label": table.lookup(ex["file_name"])})
        return ds.filter(lambda ex: ex["label"] >= 0)

    return Source(name=spec.name, num_classes=spec.num_classes, metric=spec.metric,
                  host_counts=tuple(len(idx[p::pc]) for p in range(pc)), process_index=pi,
                  stream_fn=stream_fn)


# --------------------------------------------------------------------------------------------
# Fail fast.

def _split_names(split: str) -> list[str]:
    """'train[:80%]+validation' -> ['train', 'validation']."""
    return [comp.split("[", 1)[0].strip() for comp in split.split("+")]


def _check_tfds_prepared(spec: DatasetSpec, cfg, tfds_name: str, splits: list[str]) -> None:
    import tensorflow_datasets as tfds

    data_dir = cfg.data_dir
    try:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        prepared = builder.is_prepared()
    except Exception as e:  # noqa: BLE001 - unreachable data_dir, unregistered builder
        cause = files.remote_failure(data_dir or "", e)
        if cause:
            raise DataNotFoundError(f"Dataset {spec.name!r}: cannot read config.data.data_dir={data_dir}: "
                                    f"{cause}. Copy the prepared data to a local folder and point "
                                    "config.data.data_dir at it.") from e
        raise DataNotFoundError(_missing_data_message(spec, cfg, tfds_name, e)) from e
    if not prepared:
        raise DataNotFoundError(_missing_data_message(
            spec, cfg, tfds_name, FileNotFoundError(f"no prepared data in {builder.data_dir}")))
    known = set(builder.info.splits)
    missing = sorted({name for split in splits for name in _split_names(split)} - known)
    if known and missing:
        raise DataNotFoundError(f"Dataset {spec.name!r}: TFDS builder {tfds_name!r} in {builder.data_dir} has "
                                f"no split(s) {missing}; it has {sorted(known)}.")


def check_ready(data_config, dataset: str) -> dict[str, Any]:
    """Checks that `dataset` is prepared, before a run fetches or trains anything.

    Cheap checks only: prepared TFDS data (and its splits), the image folders (train/ and the eval
    split, test/ or else val/: listed, classes matched, no empty class folder; with
    `skip_bad_images` the one decode pass that finds the images to skip), the ImageNet-LT list
    files and their image root. Only the splits the run reads are checked (no eval split with
    `validation_percent`).

    Returns:
      A report for the run's results: {'dataset': name}, plus for image folders evaluated on their
      own eval split 'eval_split' ('test' or 'val'), plus with skip_bad_images 'skipped_bad_images'
      (count per split folder) and 'skipped_files'.

    Raises:
      UnknownDatasetError, DataNotFoundError, DataError: what is missing or wrong, by name.
    """
    spec = get_spec(dataset)
    need_eval = not data_config.validation_percent
    report: dict[str, Any] = {"dataset": dataset}
    if spec.kind == "image_folder":
        classes, _, _, skipped_train = image_folder_split(data_config, "train")
        skipped = {"train": skipped_train}
        if need_eval:
            report["eval_split"] = image_folder_eval_split(data_config)
            skipped[report["eval_split"]] = image_folder_split(data_config, report["eval_split"], classes)[3]
        if data_config.skip_bad_images:
            report["skipped_bad_images"] = {k: len(v) for k, v in skipped.items()}
            report["skipped_files"] = sorted(f for v in skipped.values() for f in v)
            logging.info("image_folder: skipped %s undecodable images (config.data.skip_bad_images).",
                         report["skipped_bad_images"])
    elif spec.kind == "tfds":
        _check_tfds_prepared(spec, data_config, spec.tfds_name,
                             [spec.train_split] + ([spec.eval_split] if need_eval else []))
    elif spec.kind == "imagenet_lt":
        read_list_file(data_config.imagenet_lt_train_list, "imagenet_lt_train_list")
        if need_eval:
            read_list_file(data_config.imagenet_lt_eval_list, "imagenet_lt_eval_list")
        root = data_config.imagenet_lt_image_root
        if root:
            if not files.is_dir(root):
                raise DataNotFoundError(f"config.data.imagenet_lt_image_root={root!r} is not a folder; it "
                                        "must hold the extracted ILSVRC2012 train/ and val/ folders.")
        else:
            _check_tfds_prepared(spec, data_config, spec.tfds_name, ["train", "validation"])
    return report


# --------------------------------------------------------------------------------------------

def host_count_invariance(data_config, dataset: str) -> tuple[bool, str]:
    """Whether the train and eval batches of `dataset` are the same on 1 or N hosts (same devices), and why.

    Record tables are held whole by every host, which takes its part of every global batch: the
    batches depend on the seed and the global batch size only. TFDS streams (and few-shot subsets
    of TFDS splits) give each host its own slice, so the batches depend on the number of hosts.
    Reads the config only; nothing is loaded.
    """
    kind = get_spec(dataset).kind
    if kind == "tfds":
        return False, (f"{dataset} is read from TFDS, each host its own slice (tfds.even_splits; few-shot subsets "
                       "[p::hosts]), so the batches depend on the number of hosts")
    if kind == "imagenet_lt" and not data_config.imagenet_lt_image_root:
        return False, (f"{dataset} without config.data.imagenet_lt_image_root is streamed from TFDS, each host "
                       "its own slice, so the batches depend on the number of hosts")
    return True, (f"{dataset} is a record table every host holds whole, each host taking its part of every global "
                  "batch, so 1 or N hosts with the same devices give the same batches")


_BUILDERS = {"digits": _digits_source, "image_folder": _folder_source, "tfds": _tfds_source,
             "imagenet_lt": _imagenet_lt_source}


def build_source(data_config, dataset: str, role: str, *, eval_examples: Optional[int] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None) -> Source:
    """Builds this host's source of the `role` split of `dataset`.

    Args:
      data_config: the config.data section.
      dataset: registry name.
      role: 'train' (the train split less any validation hold-out), 'few_shot' (that, then the
        `few_shot_*` selection: only the stages that are few-shot by definition read it) or 'eval'.
      eval_examples: role 'eval' only: a fixed class-stratified subset of this many examples of
        the eval split (`fewshot.stratified_subset_indices`, identical on every host and run);
        None, or at least the split's size: all of it. A TFDS split then costs one label pass and
        one pass that keeps the subset's encoded images in host memory (each host its share).
      process_index, process_count: host identity; default jax.process_index()/process_count().

    Returns:
      The Source.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}.")
    if eval_examples is not None and role != "eval":
        raise ValueError(f"eval_examples selects from the eval split; got it for role {role!r}.")
    spec = get_spec(dataset)
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    source = _BUILDERS[spec.kind](spec, data_config, role, process_index, process_count, eval_examples)
    if source.total_examples == 0:
        raise DataError(f"Dataset {dataset!r} {role} split has no examples.")
    return source
