"""Test-wide set-up: eight fake CPU devices so that pmapped code runs as on a multi-chip host.

This must run before JAX initialises its backends, which is why it lives in conftest.py.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import chex  # noqa: E402

chex.set_n_cpu_devices(8)

import tensorflow as tf  # noqa: E402

# tf.data must never grab an accelerator or all host threads in tests.
tf.config.set_visible_devices([], "GPU")
