"""Helpers shared by the tests."""
import ml_collections

from configs import common


def data_config(**changes) -> ml_collections.ConfigDict:
    """`config.data` at the defaults of configs/common.py with `changes` applied.

    The section is locked first, so a misspelt field name fails instead of adding a field.
    """
    cfg = common.get_config().data
    cfg.lock()
    for name, value in changes.items():
        cfg[name] = value
    return cfg
