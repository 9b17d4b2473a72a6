"""tf.data input pipelines: a dataset name -> sharded NumPy batches for pmapped steps.

Train batches are an infinite, deterministic stream: epoch e is a permutation of the examples
keyed on (seed, e) (full permutation for record sources, a seeded shuffle buffer for streamed
TFDS splits), every per-example random op is keyed on (seed, position in the stream) and mixup
on (seed, step). Resuming with `start_step=N` skips N batches of the (still encoded) stream, so
it yields bit-identical batches to an uninterrupted run.

Hosts: a shared record table (`Source.shared`) is permuted identically on every host and host p
takes positions [p * local_batch, (p + 1) * local_batch) of every global batch, in eval too, so
every device sees the same examples whatever the number of hosts (one host with 8 devices or 2
hosts with 4 each). Mixup pairs every example with the one before it in the global batch (a host
also takes the example before its part), so it too is the same on 1 or N hosts. A stream, or a
per-host record slice, is this host's own stream (and mixup pairs within the host's batch): such
runs depend on the number of hosts (`sources.host_count_invariance`).

Eval data pads the last batch with masked zeros, so that every real example is seen exactly
once, and pads every host to the same number of batches.

Layout: every array is [jax.local_device_count(), per_device_batch, ...]; images are float32
NHWC in [-1, 1]; teachers and students get the same tensor.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np

from remem_jax.data import augment
from remem_jax.data import sources as sources_lib
from remem_jax.data.registry import get_spec

_MAX_EPOCHS = 2**62
# Tags that separate the random streams derived from one seed.
_TAG_PERMUTE, _TAG_SHUFFLE, _TAG_AUGMENT, _TAG_MIXUP = 0, 1, 2, 3


def _tf():
    """Imports TensorFlow and hides accelerators from it (tf.data must stay on the CPU)."""
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # Already initialised; then the caller decided.
        pass
    return tf


def _seed_pair(tf, seed: int, tag: int, counter):
    """A stateless seed [2] int64 for (seed, tag, counter)."""
    return tf.stack([tf.constant(seed * 4 + tag, tf.int64), tf.cast(counter, tf.int64)])


def _parallel_calls(tf, data_config) -> int:
    """`config.data.num_parallel_calls`; None lets tf.data choose (AUTOTUNE)."""
    n = data_config.num_parallel_calls
    return tf.data.AUTOTUNE if n is None else int(n)


def _options(tf, data_config):
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return options


def _host_layout(global_batch_size: int) -> tuple[int, int, int]:
    """Returns (local batch, local devices, per-device batch) with clear errors."""
    import jax

    if global_batch_size <= 0 or global_batch_size % jax.device_count():
        raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                         f"jax.device_count()={jax.device_count()}.")
    local = global_batch_size // jax.process_count()
    ld = jax.local_device_count()
    return local, ld, local // ld


def _host_slice(source: sources_lib.Source, process_index: Optional[int],
                process_count: Optional[int]) -> tuple[int, int]:
    """(this host, hosts) that split every batch of `source`: (0, 1) unless its table is shared."""
    if not source.shared:
        return 0, 1
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    return process_index, process_count


def _fetch_fn(tf, source: sources_lib.Source):
    """Returns index -> (encoded bytes, label) for a record source."""
    data, labels = source.records
    data = tf.constant(list(data), dtype=tf.string)
    labels = tf.constant(labels, dtype=tf.int32)

    def fetch(i):
        item = tf.gather(data, i)
        if source.records_are_paths:
            item = tf.io.read_file(item)
        return item, tf.gather(labels, i)

    return fetch


def _naming_bad_images(source: sources_lib.Source, batches: Iterator[Any]) -> Iterator[Any]:
    """`batches`, with a decode failure of a file-based source turned into an error naming the files."""
    tf = _tf()
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            named = sources_lib.undecodable_images_error(source, e)
            if named is None:
                raise
            raise named from e
        yield batch


def get_num_classes(data_config, dataset: str) -> int:
    """Number of classes of `dataset` (reads the folder list for 'image_folder')."""
    spec = get_spec(dataset)
    if spec.kind == "image_folder":
        return sources_lib.image_folder_num_classes(data_config)
    return spec.num_classes


def get_metric(data_config, dataset: str) -> str:
    """The headline metric of `dataset`: 'top1' or 'mean_per_class'."""
    spec = get_spec(dataset)
    if spec.kind == "image_folder":
        metric = data_config.image_folder_metric
        if metric not in ("top1", "mean_per_class"):
            raise ValueError(f"config.data.image_folder_metric must be 'top1' or "
                             f"'mean_per_class', got {metric!r}.")
        return metric
    return spec.metric


class TrainData:
    """The train split of one dataset on this host; `iterator(start_step)` gives batches.

    Building it reads the source's metadata once (and, for few-shot TFDS subsets, does the
    label pass and keeps the encoded subset in memory), so the trainer can ask for
    `num_examples` and iterators without repeating that work.

    `few_shot=True` reads the `few_shot_*` subset of the train split (the stages that are
    few-shot by definition); otherwise the whole train split (less any validation hold-out).

    Attributes:
      num_examples: training examples over all hosts (after hold-out and few-shot selection).
      num_classes: number of classes.
      local_batch_size: examples per batch on this host.
    """

    def __init__(self, data_config, dataset: str, *, global_batch_size: int, seed: int,
                 mixup_alpha: float = 0.0, few_shot: bool = False, source: Optional[sources_lib.Source] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None):
        self._tf = _tf()
        if mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0, got {mixup_alpha}.")
        self.config = data_config
        self.dataset = dataset
        self.seed = int(seed)
        self.mixup_alpha = float(mixup_alpha)
        self.local_batch_size, self._ld, self._pd = _host_layout(global_batch_size)
        self.source = source or sources_lib.build_source(data_config, dataset, train_role(few_shot))
        self._host = _host_slice(self.source, process_index, process_count)
        self.num_examples = self.source.total_examples
        self.num_classes = self.source.num_classes

    def dataset_from(self, start_step: int = 0):
        """The tf.data.Dataset of batches from `start_step` on."""
        tf, source, cfg = self._tf, self.source, self.config
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}.")
        n = source.num_examples
        pi, pc = self._host
        batch = self.local_batch_size * pc  # positions of the stream per step (all hosts' parts)
        position = start_step * batch
        start_epoch, offset = divmod(position, n)
        epochs = tf.data.Dataset.range(start_epoch, _MAX_EPOCHS)
        if source.records is not None:
            fetch = _fetch_fn(tf, source)

            def epoch_indices(epoch):
                perm = tf.random.experimental.stateless_shuffle(
                    tf.range(n, dtype=tf.int64), seed=_seed_pair(tf, self.seed, _TAG_PERMUTE,
                                                                 epoch))
                return tf.data.Dataset.from_tensor_slices(perm)

            ds = epochs.flat_map(epoch_indices).skip(offset)

            def load(pos, i):
                image, label = fetch(i)
                return pos, {"image": image, "label": label}
        else:
            base = source.stream_fn()
            buffer = int(cfg.shuffle_buffer)

            def epoch_examples(epoch):
                op_seed = tf.constant(self.seed * 4 + _TAG_SHUFFLE, tf.int64) * 1_000_003 + epoch
                return base.shuffle(buffer, seed=op_seed, reshuffle_each_iteration=False)

            # Skipping happens before decoding, so resuming costs I/O only.
            ds = epochs.flat_map(epoch_examples).skip(offset)

            def load(pos, ex):
                return pos, ex
        ds = ds.enumerate(start=position)
        # Mixup pairs each example with the one before it in the *global* batch, so a host also
        # takes the example before its part (augmented as its owner does: keys are positions).
        lends = self.mixup_alpha > 0 and pc > 1
        if pc > 1:  # This host's part of every global batch (indices only: cheap to skip).
            lo, hi = pi * self.local_batch_size, (pi + 1) * self.local_batch_size
            take = tf.constant(([(lo - 1) % batch] if lends else []) + list(range(lo, hi)), tf.int64)
            ds = ds.batch(batch, drop_remainder=True).map(
                lambda p, i: (tf.gather(p, take), tf.gather(i, take))).unbatch()
        ds = ds.map(load)
        image_size = int(cfg.image_size)
        area_min = float(cfg.crop_area_min)
        random_flip = bool(cfg.random_flip)
        num_classes = self.num_classes

        def preprocess(pos, ex):
            seed = _seed_pair(tf, self.seed, _TAG_AUGMENT, pos)
            return {"image": augment.train_preprocess(ex["image"], seed, image_size, area_min, random_flip),
                    "label": ex["label"]}

        ds = ds.map(preprocess, num_parallel_calls=_parallel_calls(tf, cfg))
        ds = ds.batch(self.local_batch_size + int(lends), drop_remainder=True)
        ld, pd, alpha = self._ld, self._pd, self.mixup_alpha

        def finish(step, batch):
            image, label = batch["image"], batch["label"]
            soft = tf.one_hot(label, num_classes, dtype=tf.float32)
            if lends:
                image, soft, _ = augment.mixup_with_previous(
                    image, soft, _seed_pair(tf, self.seed, _TAG_MIXUP, step), alpha)
                label = label[1:]
            elif alpha > 0:
                image, soft, _ = augment.mixup(image, soft,
                                               _seed_pair(tf, self.seed, _TAG_MIXUP, step), alpha)
            return {"image": tf.reshape(image, [ld, pd, image_size, image_size, 3]),
                    "label": tf.reshape(label, [ld, pd]),
                    "soft_label": tf.reshape(soft, [ld, pd, num_classes])}

        ds = ds.enumerate(start=start_step).map(finish)
        ds = ds.prefetch(int(cfg.prefetch))
        return ds.with_options(_options(tf, cfg))

    def iterator(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """An infinite iterator of NumPy batches from `start_step` on.

        Raises (while iterating):
          DataError: an image of a file-based source does not decode; names the files.
        """
        return _naming_bad_images(self.source, self.dataset_from(start_step).as_numpy_iterator())


def make_train_iterator(data_config, dataset: str, *, global_batch_size: int, seed: int,
                        start_step: int = 0, mixup_alpha: float = 0.0, few_shot: bool = False
                        ) -> Iterator[dict[str, np.ndarray]]:
    """Infinite, deterministic, resumable train batches for pmap.

    Args:
      data_config: the complete config.data section (every field of configs/common.py; read as
        attributes, so a ConfigDict or any object with those attributes).
      dataset: registry name (see `registry.known_datasets()`).
      global_batch_size: batch over all hosts; must be a multiple of jax.device_count(). Each
        host yields global_batch_size // process_count examples: its part of every global
        batch (record tables) or of its own slice (streams; see the module docstring).
      seed: data seed (order, crops, flips, mixup).
      start_step: first step to yield; batches equal those of an uninterrupted iterator.
      mixup_alpha: Beta(alpha, alpha) mixup with the batch rolled by one; 0 disables it.
      few_shot: read the `few_shot_*` subset of the train split instead of all of it.

    Returns:
      Iterator of {'image': float32 [ld, pd, S, S, 3] in [-1, 1], 'label': int32 [ld, pd],
      'soft_label': float32 [ld, pd, C]} (one-hot, or mixed when mixup_alpha > 0; 'label' is
      always the unmixed label of the example).
    """
    data = TrainData(data_config, dataset, global_batch_size=global_batch_size, seed=seed,
                     mixup_alpha=mixup_alpha, few_shot=few_shot)
    return data.iterator(start_step)


def train_role(few_shot: bool) -> str:
    """The source role of a stage's training data: the few-shot subset or the whole train split."""
    return "few_shot" if few_shot else "train"


def num_train_examples(data_config, dataset: str, *, few_shot: bool = False) -> int:
    """Training examples over all hosts (after hold-out, and few-shot selection when `few_shot`).

    For few-shot subsets of TFDS datasets this costs a label pass; prefer `TrainData`, which
    builds the source once and exposes `num_examples`.
    """
    return sources_lib.build_source(data_config, dataset, train_role(few_shot)).total_examples


class EvalData:
    """One full, exact pass over an eval split (or its fixed subset) per `iter()`.

    Every real example of this host appears exactly once with mask 1.0; the last batch is padded
    with zero images (mask 0.0) and every host yields `num_batches` batches (the maximum over
    hosts), so pmapped psums line up.

    Attributes:
      num_examples: this host's real examples.
      total_examples: real examples over all hosts.
      num_batches: batches per pass (identical on all hosts).
      num_classes, metric: of the dataset.
    """

    def __init__(self, data_config, dataset: str, *, global_batch_size: int,
                 source: Optional[sources_lib.Source] = None, eval_examples: Optional[int] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None):
        """See `make_eval_data`; `source` (built by the caller) replaces `eval_examples`."""
        self._tf = _tf()
        self.config = data_config
        self.dataset = dataset
        self.local_batch_size, self._ld, self._pd = _host_layout(global_batch_size)
        self.source = source or sources_lib.build_source(data_config, dataset, "eval", eval_examples=eval_examples)
        self.total_examples = self.source.total_examples
        pi, pc = _host_slice(self.source, process_index, process_count)
        local = self.local_batch_size
        self.num_batches = max(1, math.ceil(max(self.source.host_counts) / (local * pc)))
        # This host's real examples: its part of every global batch of the padded pass.
        positions = np.arange(self.num_batches * local * pc).reshape(self.num_batches, pc, local)
        positions = positions[:, pi].reshape(-1)
        self._indices = positions[positions < self.source.num_examples]
        self.num_examples = len(self._indices)
        self.num_classes = self.source.num_classes
        self.metric = get_metric(data_config, dataset)

    def __len__(self) -> int:
        return self.num_batches

    def as_dataset(self):
        """The tf.data.Dataset of one padded pass."""
        tf, source, cfg = self._tf, self.source, self.config
        image_size = int(cfg.image_size)
        if source.records is not None:
            fetch = _fetch_fn(tf, source)

            def load(i):
                image, label = fetch(i)
                return {"image": image, "label": label}
            ds = tf.data.Dataset.from_tensor_slices(self._indices).map(load)
        else:
            ds = source.stream_fn()

        def preprocess(ex):
            return {"image": augment.eval_preprocess(ex["image"], image_size),
                    "label": ex["label"], "mask": tf.constant(1.0, tf.float32)}

        ds = ds.map(preprocess, num_parallel_calls=_parallel_calls(tf, cfg))
        num_pad = self.num_batches * self.local_batch_size - self.num_examples
        padding = tf.data.Dataset.from_tensors({
            "image": tf.zeros([image_size, image_size, 3], tf.float32),
            "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0, tf.float32)})
        ds = ds.concatenate(padding.repeat(num_pad))
        ds = ds.batch(self.local_batch_size, drop_remainder=True)
        ld, pd = self._ld, self._pd
        ds = ds.map(lambda b: {
            "image": tf.reshape(b["image"], [ld, pd, image_size, image_size, 3]),
            "label": tf.reshape(b["label"], [ld, pd]),
            "mask": tf.reshape(b["mask"], [ld, pd])})
        ds = ds.prefetch(int(cfg.prefetch))
        return ds.with_options(_options(tf, cfg))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        real, batches = 0, 0
        for batch in _naming_bad_images(self.source, self.as_dataset().as_numpy_iterator()):
            real += int(batch["mask"].sum())
            batches += 1
            yield batch
        if real != self.num_examples or batches != self.num_batches:
            raise RuntimeError(
                f"Eval pass over {self.dataset!r} yielded {real} real examples in {batches} "
                f"batches; expected {self.num_examples} in {self.num_batches}. The data on disk "
                "does not match its metadata (or list files name missing images).")


def make_eval_data(data_config, dataset: str, *, global_batch_size: int,
                   eval_examples: Optional[int] = None) -> EvalData:
    """Exact, padded, re-iterable eval data (see `EvalData`).

    Args:
      data_config: the config.data section.
      dataset: registry name.
      global_batch_size: eval batch over all hosts (multiple of jax.device_count()).
      eval_examples: None: the whole eval split; n: its fixed class-stratified subset of n
        examples (`sources.build_source`), every one counted once as well.

    Returns:
      EvalData yielding {'image': float32 [ld, pd, S, S, 3], 'label': int32 [ld, pd],
      'mask': float32 [ld, pd]}.
    """
    return EvalData(data_config, dataset, global_batch_size=global_batch_size, eval_examples=eval_examples)


def describe(data_config, dataset: str) -> dict[str, Any]:
    """A small summary dict of a dataset's static facts (for logs)."""
    spec = get_spec(dataset)
    return {"name": spec.name, "tfds_name": spec.tfds_name, "train_split": spec.train_split,
            "eval_split": spec.eval_split, "num_classes": get_num_classes(data_config, dataset),
            "metric": get_metric(data_config, dataset)}
