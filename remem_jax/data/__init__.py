"""Data: dataset registry, tf.data pipelines and the offline digits dataset.

The package-level names are imported on first use (PEP 562), so that reading a config
(`configs/*.py` import `remem_jax.data.registry`) does not import TensorFlow: a command-line
mistake is reported in a second, not after TensorFlow's ~10 s import.
"""
import importlib

_NAMES = {
    "EvalData": "pipeline", "TrainData": "pipeline", "get_metric": "pipeline", "get_num_classes": "pipeline",
    "make_eval_data": "pipeline", "make_train_iterator": "pipeline", "num_train_examples": "pipeline",
    "REGISTRY": "registry", "DatasetSpec": "registry", "UnknownDatasetError": "registry",
    "get_spec": "registry", "known_datasets": "registry",
    "DataNotFoundError": "sources",
}

__all__ = sorted(_NAMES)


def __getattr__(name):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
