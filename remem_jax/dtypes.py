"""The compute dtypes a config may name (`teacher.dtype`, `pretrain.dtype`, `finetune.dtype`, ...).

Parameters and optimizer state always stay float32, and losses and softmaxes are computed in
float32 (`losses`, the ViT's attention); these are the dtypes the models' matmuls and
activations use. `'auto'` (every section's default) is bfloat16 on GPU and TPU and float32 on
CPU, resolved when the name is looked up (`DTYPES['auto']`, `resolve`), i.e. on the machine that
runs the step.
"""
from collections.abc import Mapping

import jax
import jax.numpy as jnp

AUTO = "auto"
_FIXED = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def auto_dtype():
    """bfloat16 on GPU / TPU, float32 on CPU (and any other backend)."""
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else jnp.float32


def resolve(name: str):
    """The JAX dtype of a config name (`'float32'`, `'bfloat16'` or `'auto'`)."""
    if name == AUTO:
        return auto_dtype()
    return _FIXED[name]


def resolved_name(name: str) -> str:
    """`'float32'` or `'bfloat16'`: the name with `'auto'` resolved on this machine."""
    return jnp.dtype(resolve(name)).name


class _Dtypes(Mapping):
    """config name -> JAX dtype; `'auto'` is resolved at lookup."""

    def __getitem__(self, name):
        return resolve(name)

    def __iter__(self):
        return iter((*_FIXED, AUTO))

    def __len__(self):
        return len(_FIXED) + 1


# config name -> JAX dtype (`'float32'`, `'bfloat16'`, `'auto'`)
DTYPES: Mapping = _Dtypes()
