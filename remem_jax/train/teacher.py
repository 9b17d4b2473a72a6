"""Teacher stages: `pretrain_teacher` (a ViT from scratch) and `finetune_teacher` (ReMem).

`finetune_teacher` loads the AugReg teacher, applies the ReMem reweighting and
the fine-tuning mode (full, LoRA, adapter, head), trains with SAM, evaluates
exactly, keeps orbax checkpoints at `finetune.keep_steps`, resumes from the
workdir, and exports every kept teacher as a plain AugReg npz (LoRA merged,
reweighting folded into the weights) for `distill_student`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from absl import logging

from remem_jax import checkpoints, errors, files, losses, surgery, tree
from remem_jax.dtypes import DTYPES
from remem_jax.models import vit
from remem_jax.train import common, loop, state as state_lib, step as step_lib

PRETRAINED_NAME = "pretrain"
SETTINGS = ("remem", "vanilla")


@dataclasses.dataclass
class TeacherSetup:
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

    `variables(params, frozen)` gives the `model.apply` variables (`TeacherSetup.apply_variables`).
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
                   ) -> TeacherSetup:
    """Splits `params` for a fine-tuning mode: full, head, lora or adapter.

    LoRA leaves (A from `lora_init`, B zero; scale `lora_alpha / rank`, or 1 for
    None) live under `params['lora']`; adapters are fresh `Adapter_*` leaves
    (identity at init). Only the mode's leaves (and the head, if `train_head`)
    are trainable; the rest is frozen and never updated.
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
    return TeacherSetup(model, trainable, frozen, combine, variables)


def train_classifier(ctx: common.RunContext, name: str, setup: TeacherSetup, section, *,
                     steps: int, sam_rho: float, sync_perturbations: bool, accum_steps: int,
                     run_dir: str, keep_steps=(), on_keep=None, seed_name: str) -> tuple[Any, list]:
    """Trains a ViT classifier with (SAM-)SGD; returns the final host state and eval history."""
    tx = common.make_tx(section, steps, num_layers=setup.model.num_layers)
    state = state_lib.create_train_state(setup.trainable, tx, rng=ctx.rng(seed_name, "train"),
                                         frozen=setup.frozen)
    step_fn = step_lib.pmap_train_step(step_lib.make_train_step(
        classification_loss(setup.model, setup.apply_variables), tx, sam_rho=sam_rho,
        sync_perturbations=sync_perturbations, accum_steps=accum_steps))
    logits_fn = lambda v, x: setup.model.apply(setup.apply_variables(v["params"], v["frozen"]), x)
    evaluator = common.make_evaluator(logits_fn, lambda s: {"params": s.params, "frozen": s.frozen},
                                      ctx, section.batch_size)
    make_iter = common.train_iterator_factory(ctx, section.batch_size, seed=ctx.config.seed)
    final, history = loop.run(
        common.loop_config(name, section, steps, keep_steps), step_fn=step_fn, state=state,
        make_train_iterator=make_iter, checkpointer=common.checkpointer(os.path.join(run_dir, "checkpoints"), keep_steps),
        evaluate=evaluator, on_keep=on_keep, writer=ctx.writer)
    return final, history


# ----------------------------------------------------------------------------- pretrain_teacher

def pretrained_path(ctx: common.RunContext) -> str:
    return ctx.path("pretrain", "teacher.npz")


def pretrain_teacher(ctx: common.RunContext) -> dict:
    """Trains a ViT from scratch on the dataset and saves it as an AugReg npz."""
    p = ctx.config.pretrain
    out = pretrained_path(ctx)
    summary_path = ctx.path("pretrain", "summary.json")
    if files.exists(out) and files.exists(summary_path):
        logging.info("pretrain_teacher: %s exists, skipping.", out)
        return files.read_json(summary_path)
    overrides = {"num_layers": p.num_layers} if p.num_layers is not None else {}
    model = vit.create_vit(p.variant, ctx.num_classes, dtype=DTYPES[p.dtype], remat_blocks=p.remat, **overrides)
    size = ctx.config.data.image_size
    params = jax.jit(model.init)(ctx.rng("pretrain", "init"), jnp.zeros((1, size, size, 3)))["params"]
    setup = TeacherSetup(model, params, {}, surgery.merge_partitions)
    final, history = train_classifier(
        ctx, "pretrain", setup, p, steps=p.steps, sam_rho=0.0, sync_perturbations=False, accum_steps=1,
        run_dir=ctx.path("pretrain"), seed_name="pretrain")
    common.save_params(out, setup.combine(final.params, final.frozen))
    summary = {"checkpoint": out, "variant": p.variant, "num_params": tree.param_count(final.params),
               "eval": history[-1] if history else {}}
    common.write_json(summary_path, summary)
    return summary


# ----------------------------------------------------------------------------- finetune_teacher

def setting_hyperparameters(f, setting: str) -> dict:
    """SAM radius and reweighting of a named setting."""
    if setting == "remem":
        return dict(sam_rho=f.sam_rho, mlp_alpha=f.mlp_alpha, attn_beta=f.attn_beta)
    if setting == "vanilla":
        return dict(sam_rho=0.0, mlp_alpha=1.0, attn_beta=1.0)
    raise errors.UserError(f"config.finetune.settings: unknown setting {setting!r}; use {SETTINGS}.")


def teacher_checkpoint_path(ctx: common.RunContext) -> str:
    name = ctx.config.teacher.checkpoint
    if name == PRETRAINED_NAME:
        path = pretrained_path(ctx)
        if not files.exists(path):
            raise errors.UserError(f"config.teacher.checkpoint is 'pretrain' but {path} does not exist; "
                                   "add 'pretrain_teacher' before 'finetune_teacher' in config.stages.")
        return path
    return name


def teacher_cache_dir(ctx: common.RunContext) -> str:
    """Where a remote teacher checkpoint is cached: config.teacher.cache_dir, or the per-user default.

    Every setting (and every later run) reads the one cached copy instead of the
    remote file. Exported teachers in the workdir are not cached: each is read
    once, by its student.
    """
    return ctx.config.teacher.get("cache_dir") or checkpoints.default_cache_dir()


def export_teacher(params: Any, model: vit.VisionTransformer, path: str) -> None:
    """Saves a fine-tuned teacher as a plain AugReg npz: reweighting folded into the weights.

    The folded file is an ordinary ViT (adapters, if any, are kept and folded too)
    whose plain forward pass equals the reweighted model's up to LayerNorm's eps.
    """
    params = surgery.fold_reweighting(params, mlp_alpha=model.mlp_alpha, attn_beta=model.attn_beta,
                                      residual_mode=model.residual_mode, num_layers=model.num_layers)
    common.save_params(path, params)


def finetune_setting(ctx: common.RunContext, setting: str) -> dict:
    """Fine-tunes the teacher in one setting and exports its kept checkpoints."""
    f = ctx.config.finetune
    hp = setting_hyperparameters(f, setting)
    run_dir = ctx.path("finetune", setting)
    summary_path = os.path.join(run_dir, "summary.json")
    summary = files.read_json(summary_path)
    if summary and summary.get("complete"):
        logging.info("finetune_teacher/%s: complete in %s, skipping.", setting, run_dir)
        return summary
    size = ctx.config.data.image_size
    model, params = checkpoints.load_augreg(
        teacher_checkpoint_path(ctx), num_classes=ctx.num_classes, image_size=size,
        cache_dir=teacher_cache_dir(ctx),
        mlp_alpha=hp["mlp_alpha"], attn_beta=hp["attn_beta"], residual_mode=f.residual_mode,
        dropout_rate=f.dropout, dtype=DTYPES[f.dtype])
    model = model.clone(remat_blocks=f.remat)
    if f.mode == "adapter":
        model = model.clone(adapter_dim=model.hidden_size // f.adapter_reduction)
    setup = setup_finetune(model, params, f.mode, ctx.rng("finetune", setting, "surgery"), image_size=size,
                           lora_rank=f.lora_rank, lora_alpha=f.lora_alpha, lora_targets=f.lora_targets)
    kept = files.read_json(os.path.join(run_dir, "kept.json"), default={})

    def on_keep(step, host_state, record):
        path = os.path.join(run_dir, "teachers", f"step_{step}.npz")
        export_teacher(setup.combine(host_state.params, host_state.frozen), model, path)
        kept[str(step)] = {"setting": setting, "step": step, "checkpoint": path,
                           **{k: v for k, v in record.items() if k != "step"}}
        common.write_json(os.path.join(run_dir, "kept.json"), kept)

    keep_steps = sorted(set(f.keep_steps) | {f.steps})  # validation rejects entries > f.steps
    _, history = train_classifier(
        ctx, f"finetune/{setting}", setup, f, steps=f.steps, sam_rho=hp["sam_rho"],
        sync_perturbations=f.sync_perturbations, accum_steps=f.accum_steps, run_dir=run_dir,
        keep_steps=keep_steps, on_keep=on_keep, seed_name=f"finetune-{setting}")
    summary = {"setting": setting, "complete": True, **hp, "mode": f.mode,
               "trainable_params": tree.param_count(setup.trainable),
               "kept": [kept[str(s)] for s in keep_steps if str(s) in kept], "eval_history": history}
    common.write_json(summary_path, summary)
    return summary


def finetune_teacher(ctx: common.RunContext) -> dict:
    """The `finetune_teacher` stage: every configured setting (remem, vanilla)."""
    return {setting: finetune_setting(ctx, setting) for setting in ctx.config.finetune.settings}
