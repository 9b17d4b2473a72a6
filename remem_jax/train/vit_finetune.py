"""The ViT fine-tune machinery the stages share: a trainable/frozen split, its loss, and its training.

Used by the teacher stages (pretraining, ReMem fine-tuning), WeCoLoRA (its students are split
the same way), TinyMIM's student fine-tune and the analysis's pruning fine-tune.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from remem_jax import losses, surgery
from remem_jax.models import vit
from remem_jax.train import common, runs, state as state_lib, step as step_lib


@dataclasses.dataclass
class TrainableViT:
    """A ViT split into trainable and frozen leaves, and how to put it back together.

    `combine(trainable, frozen)` gives full (LoRA-materialised) params, for export and analyses;
    `variables(trainable, frozen)` gives what a train/eval forward pass hands `model.apply`:
    `{'params': ..., 'lora': ...}` with factored LoRA (no `W + A B` per step), or
    `{'params': combine(...)}` when `variables` is None.
    """
    model: vit.VisionTransformer
    trainable: Any
    frozen: Any
    combine: Callable[[Any, Any], Any]  # (trainable, frozen) -> full params, jittable
    variables: Optional[Callable[[Any, Any], dict]] = None  # (trainable, frozen) -> apply variables

    def apply_variables(self, trainable: Any, frozen: Any) -> dict:
        """The variables of a forward pass (factored LoRA where there is LoRA)."""
        if self.variables is None:
            return {"params": self.combine(trainable, frozen)}
        return self.variables(trainable, frozen)


def classification_loss(model: vit.VisionTransformer, variables: Callable[[Any, Any], dict]):
    """The step's loss: softmax cross-entropy on (possibly soft) labels.

    `variables(params, frozen)` gives the `model.apply` variables (`TrainableViT.apply_variables`).
    """
    def loss_fn(params, frozen, batch_stats, batch, rng):
        logits = model.apply(variables(params, frozen), batch["image"], train=True,
                             rngs={"dropout": rng})
        loss = losses.softmax_cross_entropy(logits, batch["soft_label"])
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"batch_stats": batch_stats, "metrics": {"accuracy": accuracy}}
    return loss_fn


def setup_finetune(model: vit.VisionTransformer, params: Any, mode: str, rng: jax.Array, *,
                   image_size: int, lora_rank: int = 32, lora_alpha: Optional[float] = 32.0,
                   lora_targets: str = "qv", lora_init: str = "gaussian", train_head: bool = True
                   ) -> TrainableViT:
    """Splits `params` for a fine-tuning mode: full, head, lora or adapter.

    LoRA leaves (A from `lora_init`, B zero; scale `lora_alpha / rank`, or 1 for
    None) live under `params['lora']`; adapters are fresh `Adapter_*` leaves
    (identity at init; `model` must be built with `adapter_dim`). Only the mode's
    leaves (and the head, if `train_head`) are trainable; the rest is frozen and never updated.
    """
    lora_config = None
    if mode == "adapter":
        params = surgery.init_adapters(rng, model, params, image_size)
    elif mode == "lora":
        targets = surgery.lora_targets(params, lora_targets)
        lora, lora_config = surgery.init_lora(rng, params, targets, rank=lora_rank, alpha=lora_alpha,
                                              init=lora_init)
        params = surgery.attach_lora(params, lora)
    trainable, frozen = surgery.split_trainable(params, mode, train_head=train_head)

    def combine(t, f):
        return surgery.effective_params(surgery.merge_partitions(t, f), lora_config)

    def variables(t, f):
        return surgery.lora_variables(surgery.merge_partitions(t, f), lora_config)
    return TrainableViT(model, trainable, frozen, combine, variables)


def classifier_step(section, setup: TrainableViT, *, steps: int, sam_rho: float, rng: jax.Array,
                    sync_perturbations: bool = False, accum_steps: int = 1) -> tuple[state_lib.TrainState, Any]:
    """The (SAM-)SGD classifier step of a config section and its initial state (the step not yet pmapped).

    The optimizer is `common.make_tx(section, steps)` (SGD momentum or Adam, warmup + cosine,
    decoupled weight decay, clipping, layer-wise decay where the section has it).
    """
    tx = common.make_tx(section, steps, num_layers=setup.model.num_layers)
    state = state_lib.create_train_state(setup.trainable, tx, rng=rng, frozen=setup.frozen)
    step = step_lib.make_train_step(classification_loss(setup.model, setup.apply_variables), tx, sam_rho=sam_rho,
                                    sync_perturbations=sync_perturbations, accum_steps=accum_steps)
    return state, step


def train_classifier(sub: runs.SubRun, setup: TrainableViT, section, *, steps: int, sam_rho: float,
                     sync_perturbations: bool, accum_steps: int, keep_steps=(), on_keep=None,
                     seed_name: str) -> tuple[Any, list]:
    """Trains a ViT classifier with (SAM-)SGD in sub-run `sub`; returns the final host state and eval history.

    Args:
      sub: the sub-run (its folder holds the checkpoints and eval history).
      setup: the model and its trainable/frozen split.
      section: the config section with the optimizer fields (`common.make_tx`) and cadence.
      steps: optimizer steps.
      sam_rho, sync_perturbations: SAM's radius (0: plain) and whether the ascent is all-reduced.
      accum_steps: micro-batches per step.
      keep_steps: steps kept as checkpoints and handed to `on_keep(step, host_state, eval)`.
      seed_name: names the run's PRNG stream (same name: same data order and dropout keys).
    """
    ctx = sub.ctx
    state, step = classifier_step(section, setup, steps=steps, sam_rho=sam_rho, rng=ctx.rng(seed_name, "train"),
                                  sync_perturbations=sync_perturbations, accum_steps=accum_steps)
    logits_fn = lambda v, x: setup.model.apply(setup.apply_variables(v["params"], v["frozen"]), x)
    evaluator = common.make_evaluator(logits_fn, lambda s: {"params": s.params, "frozen": s.frozen},
                                      ctx, section.batch_size)
    make_iter = common.train_iterator_factory(ctx, section.batch_size, seed=ctx.config.seed)
    return sub.train(state, step_lib.pmap_train_step(step),
                     loop_config=common.loop_config(sub.name, section, steps, keep_steps),
                     make_train_iterator=make_iter, evaluate=evaluator, on_keep=on_keep)
