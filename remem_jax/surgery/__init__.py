"""Pure pytree -> pytree transforms on ViT parameter trees (the raw AugReg npz tree).

Nothing here runs a network (except `init_adapters`, which initialises one to
get fresh adapter weights); every function takes nested dicts of arrays and
returns new nested dicts whose untouched leaves are the *same objects* as the
input's (no copies), so the transforms are cheap inside and outside `jax.jit`.
One idea per module:

* `lora`: `lora_targets`, `init_lora`, `apply_lora`, `merge_lora`,
  `lora_param_count`, `attach_lora` / `detach_lora` / `effective_params`,
  `lora_variables` (the factored forward pass's variables).
* `partition`: the trainable / frozen split (`trainable_predicate`,
  `partition`, `merge_partitions`, `split_trainable`, `trainable_mask`).
* `adapters`: `init_adapters` (fresh Houlsby adapter leaves).
* `fold`: `fold_reweighting`, a ReMem-reweighted model as a plain ViT tree.
* `weight_copy`: `copy_every_dth_block`, `student_depth` (WeCoLoRA).
* `pruning`: `drop_blocks`, `zero_mlp_neurons`.
* `base`: the error type and the block bookkeeping the others share.

Everything public is importable from `remem_jax.surgery` directly.
"""
from remem_jax.surgery.adapters import init_adapters
from remem_jax.surgery.base import LORA_KEY, SurgeryError
from remem_jax.surgery.fold import fold_reweighting
from remem_jax.surgery.lora import (FACTOR_POLICIES, FACTORED_TARGET, LORA_INITS, LORA_PRESETS, LoraConfig, apply_lora, attach_lora,
                                    detach_lora, effective_params, factoring_pays, init_lora, lora_dims, lora_param_count,
                                    lora_targets, lora_variables, merge_lora)
from remem_jax.surgery.partition import (TRAINABLE_MODES, merge_partitions, partition, split_trainable,
                                         trainable_mask, trainable_predicate)
from remem_jax.surgery.pruning import drop_blocks, zero_mlp_neurons
from remem_jax.surgery.weight_copy import copy_every_dth_block, student_depth

__all__ = [
    "FACTOR_POLICIES", "FACTORED_TARGET", "LORA_INITS", "LORA_KEY", "LORA_PRESETS", "TRAINABLE_MODES", "LoraConfig", "SurgeryError",
    "apply_lora", "attach_lora", "copy_every_dth_block", "detach_lora", "drop_blocks", "effective_params",
    "factoring_pays", "fold_reweighting", "init_adapters", "init_lora", "lora_dims", "lora_param_count", "lora_targets",
    "lora_variables", "merge_lora", "merge_partitions", "partition", "split_trainable", "student_depth", "trainable_mask", "trainable_predicate",
    "zero_mlp_neurons",
]
