"""Data: dataset registry, tf.data pipelines and the offline digits dataset."""
from remem_jax.data.pipeline import (EvalData, TrainData, get_metric, get_num_classes,
                                     make_eval_data, make_train_iterator, num_train_examples)
from remem_jax.data.registry import (REGISTRY, DatasetSpec, UnknownDatasetError, get_spec,
                                     known_datasets)
from remem_jax.data.sources import DataNotFoundError

__all__ = [
    "DataNotFoundError", "DatasetSpec", "EvalData", "REGISTRY", "TrainData",
    "UnknownDatasetError", "get_metric", "get_num_classes", "get_spec",
    "known_datasets", "make_eval_data", "make_train_iterator", "num_train_examples",
]
