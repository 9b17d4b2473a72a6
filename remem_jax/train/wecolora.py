"""The `fewshot_distill` stage: WeCoLoRA and its baselines, few-shot feature distillation of a shallow ViT.

Every variant (config `wecolora.variants`) trains a student of ceil(L / d) blocks to reproduce the
frozen teacher's last-block tokens on the same augmented few-shot images (`config.data.few_shot_*`),
with a mean L1 over all tokens (CLS included) and channels:

  variant     student init                         trainable             target tokens
  wecolora    teacher blocks {0, d, 2d, ...}        LoRA on q,k,v,out,    last block, before encoder_norm
              + embedding, cls, posemb, norm, head  Dense_0, Dense_1
  lora_qv     the same copy                         LoRA on q, v          last block, before encoder_norm
  weco_kd     the same copy                         everything (no head)  after encoder_norm
  scratch_kd  random ViT of the student's shape     everything (no head)  after encoder_norm

LoRA follows the official code: A ~ U(+-1/sqrt(d_in)), B = 0 (the step-0 student is exactly the
copy), scale 1, no bias. The teacher runs frozen in inference mode inside the step. AdamW (0.9,
0.95), weight decay on every leaf but biases and 1-D leaves (timm's rule; so the LoRA matrices are
decayed), lr = blr * batch / 256, linear warmup then cosine, no clipping, an epoch-based schedule
over the few-shot subset (the last partial batch of an epoch is dropped, as the reference).

Each variant's student is exported with LoRA merged into the kernels as a plain AugReg npz
(`DIR/fewshot_distill/<variant>/student.npz`), which `checkpoints.load_augreg` loads as an ordinary
ViT; `linear_probe` reads those files.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from remem_jax import checkpoints, devices, errors, files, losses, optim, surgery, tree
from remem_jax.data import pipeline
from remem_jax.dtypes import DTYPES
from remem_jax.models import vit
from remem_jax.train import common, loop, state as state_lib, step as step_lib
from remem_jax.train.teacher import TeacherSetup, setup_finetune, teacher_cache_dir, teacher_checkpoint_path

STAGE = "fewshot_distill"


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one row of the WeCoLoRA table builds and trains its student."""
    copy_weights: bool           # student = every d-th teacher block (else a random ViT)
    lora_targets: Optional[str]  # surgery.LORA_PRESETS name; None = every parameter trains
    after_norm: bool             # match tokens after encoder_norm (else the last block's output)
    description: str


VARIANTS: dict[str, Variant] = {
    "wecolora": Variant(True, "all", False, "weight copy + LoRA on every linear layer (WeCoLoRA)"),
    "lora_qv": Variant(True, "qv", False, "weight copy + standard LoRA on q and v"),
    "weco_kd": Variant(True, None, True, "weight copy, all weights trained (WeCo+KD)"),
    "scratch_kd": Variant(False, None, True, "random shallow ViT, all weights trained (KD from scratch)"),
}


def student_depth(teacher_depth: int, d: int) -> int:
    """ceil(L / d): the blocks {0, d, 2d, ...} of an L-block teacher."""
    return len(range(0, teacher_depth, d))


def _not_head(path: str) -> bool:
    # The head and pre_logits read only CLS after the encoder; the token loss never reaches them.
    return not path.startswith(("head/", "pre_logits/"))


def build_student(variant: str, teacher_model: vit.VisionTransformer, teacher_params: Any, *, d: int,
                  lora_rank: int, image_size: int, rng: jax.Array, dtype=jnp.float32,
                  remat: bool = False) -> TeacherSetup:
    """The student of a variant, split into trainable and frozen leaves.

    Args:
      variant: a key of `VARIANTS`.
      teacher_model, teacher_params: the teacher ViT (plain, no reweighting).
      d: the weight-copy factor (1 <= d <= L).
      lora_rank: rank of the LoRA variants.
      image_size: input size (for shapes).
      rng: key for LoRA's A or the random student.
      dtype: the student's compute dtype.
      remat: rematerialise each student block in the backward pass.

    Returns:
      A `TeacherSetup` whose `combine(trainable, frozen)` gives the student's effective params
      (LoRA materialised, for export) and whose `apply_variables` gives the factored-LoRA
      variables the step uses (its gradient reaches only the trainable leaves).
    """
    if variant not in VARIANTS:
        raise errors.UserError(f"config.wecolora.variants: unknown variant {variant!r}; use {tuple(VARIANTS)}.")
    spec = VARIANTS[variant]
    params = surgery.copy_every_dth_block(teacher_params, d)
    model = teacher_model.clone(num_layers=student_depth(teacher_model.num_layers, d), dtype=dtype,
                                remat_blocks=remat, parent=None)
    if not spec.copy_weights:
        images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        params = jax.jit(model.init)(jax.random.fold_in(rng, 1), images)["params"]
    if spec.lora_targets is not None:
        return setup_finetune(model, params, "lora", rng, image_size=image_size, lora_rank=lora_rank,
                              lora_alpha=None, lora_targets=spec.lora_targets, lora_init="uniform",
                              train_head=False)
    trainable, frozen = surgery.partition(params, _not_head)
    return TeacherSetup(model, trainable, frozen, surgery.merge_partitions)


def feature_distillation_loss(teacher: vit.VisionTransformer, setup: TeacherSetup, after_norm: bool):
    """The step's loss: mean L1 between the student's and the frozen teacher's tokens.

    `frozen` is `{'teacher': teacher params, 'student': the student's frozen leaves}`; the teacher
    sees the identical (augmented) batch in inference mode.
    """
    def loss_fn(params, frozen, batch_stats, batch, rng):
        images = batch["image"]
        target = jax.lax.stop_gradient(vit.encoder_tokens(
            teacher, frozen["teacher"], images.astype(teacher.dtype), after_norm=after_norm))
        variables = setup.apply_variables(params, frozen["student"])
        tokens = vit.encoder_tokens(setup.model, variables["params"], images, after_norm=after_norm,
                                    train=True, rng=rng, lora=variables.get("lora"))
        return losses.l1_feature_loss(tokens, target), {"batch_stats": batch_stats, "metrics": {}}
    return loss_fn


def make_l1_evaluator(teacher: vit.VisionTransformer, setup: TeacherSetup, after_norm: bool,
                      eval_data) -> Callable[[Any], dict]:
    """`replicated_state -> {'l1': mean L1 per real eval image, 'num_examples': n}` (exact, padded)."""
    def step(variables, batch):
        images = batch["image"]
        target = vit.encoder_tokens(teacher, variables["teacher"], images.astype(teacher.dtype),
                                    after_norm=after_norm)
        student = setup.apply_variables(variables["params"], variables["student"])
        tokens = vit.encoder_tokens(setup.model, student["params"], images, after_norm=after_norm,
                                    lora=student.get("lora"))
        per_image = jnp.mean(jnp.abs(tokens.astype(jnp.float32) - target.astype(jnp.float32)), axis=(1, 2))
        mask = batch["mask"]
        return jax.lax.psum((jnp.sum(per_image * mask), jnp.sum(mask)), "batch")
    pstep = jax.pmap(step, axis_name="batch")

    def evaluate(state) -> dict:
        variables = {"params": state.params, "teacher": state.frozen["teacher"], "student": state.frozen["student"]}
        total, count = 0.0, 0.0
        for batch in eval_data:
            s, n = jax.device_get(pstep(variables, batch))
            total, count = total + float(np.asarray(s)[0]), count + float(np.asarray(n)[0])
        return {"l1": total / count, "num_examples": count}
    return evaluate


def schedule_steps(num_examples: int, batch_size: int, epochs: int, warmup_epochs: int, *,
                   section: str) -> tuple[int, int, int]:
    """`(steps_per_epoch, total_steps, warmup_steps)` of an epoch-based run (last partial batch dropped)."""
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch < 1:
        raise errors.UserError(
            f"config.{section}.batch_size={batch_size} is larger than the {num_examples} training examples, so "
            f"an epoch has no full batch; lower the batch size or use more data (config.data.few_shot_*).")
    return steps_per_epoch, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch


def make_tx(w, total_steps: int, warmup_steps: int):
    """AdamW (betas `w.adam_betas`), wd on matrices, lr = blr * batch / 256, warmup + cosine, no clip."""
    peak = w.blr * w.batch_size / 256
    return optim.make_optimizer(
        learning_rate=optim.warmup_cosine_schedule(peak, total_steps, warmup_steps),
        weight_decay=w.weight_decay, grad_clip_norm=None, optimizer="adam",
        adam_betas=tuple(w.adam_betas), weight_decay_mask=optim.matrix_mask)


def load_teacher(ctx: common.RunContext) -> tuple[vit.VisionTransformer, Any, str]:
    """The frozen teacher (plain ViT, its own head kept) and its checkpoint path."""
    path = teacher_checkpoint_path(ctx)
    model, params = checkpoints.load_augreg(path, image_size=ctx.config.data.image_size,
                                            cache_dir=teacher_cache_dir(ctx),
                                            dtype=DTYPES[ctx.config.teacher.dtype])
    return model, params, path


def student_path(ctx: common.RunContext, variant: str) -> str:
    return ctx.path(STAGE, variant, "student.npz")


def distill_variant(ctx: common.RunContext, variant: str, teacher: vit.VisionTransformer,
                    teacher_params: Any, num_examples: int) -> dict:
    """Trains (or resumes, or skips if complete) one variant's student and exports it merged."""
    w = ctx.config.wecolora
    run_dir = ctx.path(STAGE, variant)
    summary_path = os.path.join(run_dir, "summary.json")
    summary = files.read_json(summary_path)
    if summary and summary.get("complete"):
        logging.info("%s/%s: complete, skipping.", STAGE, variant)
        return summary
    spec = VARIANTS[variant]
    size = ctx.config.data.image_size
    setup = build_student(variant, teacher, teacher_params, d=w.d, lora_rank=w.lora_rank, image_size=size,
                          rng=ctx.rng(STAGE, variant, "init"), dtype=DTYPES[w.dtype], remat=w.remat)
    steps_per_epoch, steps, warmup = schedule_steps(num_examples, w.batch_size, w.epochs, w.warmup_epochs,
                                                    section="wecolora")
    tx = make_tx(w, steps, warmup)
    state = state_lib.create_train_state(setup.trainable, tx, rng=ctx.rng(STAGE, variant, "train"),
                                         frozen={"teacher": teacher_params, "student": setup.frozen})
    step_fn = step_lib.pmap_train_step(step_lib.make_train_step(
        feature_distillation_loss(teacher, setup, spec.after_norm), tx, accum_steps=w.accum_steps))
    evaluator = make_l1_evaluator(teacher, setup, spec.after_norm, common.eval_data(ctx, w.batch_size))
    initial = evaluator(devices.replicate(state))
    logging.info("%s/%s: %d blocks, %d trainable params, %d steps (%d per epoch); test-image L1 at init %.5f",
                 STAGE, variant, setup.model.num_layers, tree.param_count(setup.trainable), steps,
                 steps_per_epoch, initial["l1"])
    final, history = loop.run(
        loop.LoopConfig(name=f"{STAGE}/{variant}", num_steps=steps, global_batch_size=w.batch_size,
                        log_every=w.log_every, eval_every=0, checkpoint_every=w.checkpoint_every),
        step_fn=step_fn, state=state,
        make_train_iterator=common.train_iterator_factory(ctx, w.batch_size, seed=ctx.config.seed),
        checkpointer=common.checkpointer(os.path.join(run_dir, "checkpoints")), evaluate=evaluator,
        writer=ctx.writer)
    out = student_path(ctx, variant)
    common.save_params(out, setup.combine(final.params, final.frozen["student"]))  # LoRA merged
    summary = {"variant": variant, "complete": True, "description": spec.description, "d": w.d,
               "student_blocks": setup.model.num_layers,
               "lora_rank": w.lora_rank if spec.lora_targets else None, "lora_targets": spec.lora_targets,
               "target": "after encoder_norm" if spec.after_norm else "last block, before encoder_norm",
               "trainable_params": tree.param_count(setup.trainable), "steps": steps, "epochs": w.epochs,
               "few_shot_examples": num_examples, "l1_initial": initial["l1"],
               "l1_final": history[-1]["l1"] if history else None, "student_checkpoint": out}
    common.write_json(summary_path, summary)
    return summary


def fewshot_distill(ctx: common.RunContext) -> dict:
    """The `fewshot_distill` stage: every configured variant against the frozen teacher."""
    w = ctx.config.wecolora
    teacher, teacher_params, teacher_path = load_teacher(ctx)
    num_examples = pipeline.num_train_examples(ctx.config.data, ctx.config.dataset)
    rows = [distill_variant(ctx, v, teacher, teacher_params, num_examples) for v in w.variants]
    return {"teacher": teacher_path, "teacher_blocks": teacher.num_layers, "d": w.d,
            "few_shot_examples": num_examples, "rows": rows}
