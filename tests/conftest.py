"""Test-wide set-up: eight fake CPU devices so that pmapped code runs as on a multi-chip host,
and one persistent XLA compilation cache for the whole session.

On CPU the suite's time is mostly XLA compiling (a tiny ViT's train step takes ~15 s to compile,
~0.1 s to run), and many tests, their subprocesses (CLI runs, notebook kernels) and both xdist
workers compile the very same programs. The cache (keyed by the program, the flags and the
devices, so a hit is the identical executable) compiles each once. `REMEM_TEST_XLA_CACHE=` (empty)
turns it off; any other value is the directory to use.

This must run before JAX initialises its backends, which is why it lives in conftest.py.
"""
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_XLA_CACHE = os.environ.get("REMEM_TEST_XLA_CACHE",
                            os.path.join(tempfile.gettempdir(), f"remem_jax_test_xla_cache_{os.getuid()}"))
if _XLA_CACHE:
    # Environment variables, not jax.config, so that subprocesses inherit the cache too.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import chex  # noqa: E402

chex.set_n_cpu_devices(8)

import tensorflow as tf  # noqa: E402

# tf.data must never grab an accelerator or all host threads in tests.
tf.config.set_visible_devices([], "GPU")
