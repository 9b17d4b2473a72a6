"""The compute dtypes a config may name (`teacher.dtype`, `pretrain.dtype`, `finetune.dtype`, ...).

Parameters always stay float32; these are the dtypes the models compute in.
"""
import jax.numpy as jnp

# config name -> JAX dtype
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
