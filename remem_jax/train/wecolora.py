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
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from remem_jax import config_validation as cv, devices, errors, losses, optim, surgery, tree
from remem_jax.data import pipeline
from remem_jax.dtypes import DTYPES
from remem_jax.models import vit
from remem_jax.train import common, handoff, loop, runs, seeds, stages, state as state_lib, step as step_lib
from remem_jax.train.vit_finetune import TrainableViT, setup_finetune

STAGE = handoff.FEWSHOT_STAGE


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


def _not_head(path: str) -> bool:
    # The head and pre_logits read only CLS after the encoder; the token loss never reaches them.
    return not path.startswith(("head/", "pre_logits/"))


def build_student(variant: str, teacher_model: vit.VisionTransformer, teacher_params: Any, *, d: int,
                  lora_rank: int, image_size: int, rng: jax.Array, dtype=jnp.float32,
                  remat: bool = False) -> TrainableViT:
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
      A `TrainableViT` whose `combine(trainable, frozen)` gives the student's effective params
      (LoRA materialised, for export) and whose `apply_variables` gives the factored-LoRA
      variables the step uses (its gradient reaches only the trainable leaves).
    """
    if variant not in VARIANTS:
        raise errors.UserError(f"config.wecolora.variants: unknown variant {variant!r}; use {tuple(VARIANTS)}.")
    spec = VARIANTS[variant]
    params = surgery.copy_every_dth_block(teacher_params, d)
    model = teacher_model.clone(num_layers=surgery.student_depth(teacher_model.num_layers, d), dtype=dtype,
                                remat_blocks=remat, parent=None)
    if not spec.copy_weights:
        images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        params = jax.jit(model.init)(jax.random.fold_in(rng, 1), images)["params"]
    if spec.lora_targets is not None:
        return setup_finetune(model, params, "lora", rng, image_size=image_size, lora_rank=lora_rank,
                              lora_alpha=None, lora_targets=spec.lora_targets, lora_init="uniform",
                              train_head=False)
    trainable, frozen = surgery.partition(params, _not_head)
    return TrainableViT(model, trainable, frozen, surgery.merge_partitions)


def feature_distillation_loss(teacher: vit.VisionTransformer, setup: TrainableViT, after_norm: bool):
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


def make_l1_evaluator(teacher: vit.VisionTransformer, setup: TrainableViT, after_norm: bool,
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


def make_tx(w, total_steps: int, warmup_steps: int):
    """AdamW (betas `w.adam_betas`), wd on matrices, lr = blr * batch / 256, warmup + cosine, no clip."""
    peak = w.blr * w.batch_size / 256
    return optim.make_optimizer(
        learning_rate=optim.warmup_cosine_schedule(peak, total_steps, warmup_steps),
        weight_decay=w.weight_decay, grad_clip_norm=None, optimizer="adam",
        adam_betas=tuple(w.adam_betas), weight_decay_mask=optim.matrix_mask)


def variant_step(w, variant: str, setup: TrainableViT, teacher: vit.VisionTransformer, teacher_params: Any, *,
                 steps: int, warmup_steps: int, rng: jax.Array) -> tuple[state_lib.TrainState, Any]:
    """A variant's train step (not yet pmapped) with `config.wecolora`'s optimizer, and its initial state."""
    tx = make_tx(w, steps, warmup_steps)
    state = state_lib.create_train_state(setup.trainable, tx, rng=rng,
                                         frozen={"teacher": teacher_params, "student": setup.frozen})
    step = step_lib.make_train_step(feature_distillation_loss(teacher, setup, VARIANTS[variant].after_norm), tx,
                                    accum_steps=w.accum_steps)
    return state, step


def distill_variant(ctx: common.RunContext, variant: str, teacher: vit.VisionTransformer,
                    teacher_params: Any, num_examples: int) -> dict:
    """Trains (or resumes, or skips if complete) one variant's student and exports it merged."""
    w = ctx.config.wecolora

    def body(sub: runs.SubRun) -> dict:
        spec = VARIANTS[variant]
        size = ctx.config.data.image_size
        setup = build_student(variant, teacher, teacher_params, d=w.d, lora_rank=w.lora_rank, image_size=size,
                              rng=ctx.rng(STAGE, variant, "init"), dtype=DTYPES[w.dtype], remat=w.remat)
        steps_per_epoch, steps, warmup = optim.epoch_schedule_steps(num_examples, w.batch_size, w.epochs,
                                                                    w.warmup_epochs, section="wecolora")
        state, step = variant_step(w, variant, setup, teacher, teacher_params, steps=steps, warmup_steps=warmup,
                                   rng=ctx.rng(STAGE, variant, "train"))
        step_fn = step_lib.pmap_train_step(step)
        evaluator = make_l1_evaluator(teacher, setup, spec.after_norm, common.eval_data(ctx, w.batch_size))
        initial = evaluator(devices.replicate(state))
        logging.info("%s/%s: %d blocks, %d trainable params, %d steps (%d per epoch); test-image L1 at init %.5f",
                     STAGE, variant, setup.model.num_layers, tree.param_count(setup.trainable), steps,
                     steps_per_epoch, initial["l1"])
        final, history = sub.train(
            state, step_fn, make_train_iterator=common.train_iterator_factory(ctx, w.batch_size, seed=ctx.config.seed,
                                                                 few_shot=True),
            loop_config=loop.LoopConfig(name=sub.name, num_steps=steps, global_batch_size=w.batch_size,
                                        log_every=w.log_every, eval_every=0, checkpoint_every=w.checkpoint_every),
            evaluate=evaluator)
        out = handoff.fewshot_student_path(ctx, variant)
        common.save_vit(ctx, out, setup.combine(final.params, final.frozen["student"]), setup.model)  # LoRA merged
        return sub.commit({
            "variant": variant, "description": spec.description, "d": w.d, "student_blocks": setup.model.num_layers,
            "lora_rank": w.lora_rank if spec.lora_targets else None, "lora_targets": spec.lora_targets,
            "target": "after encoder_norm" if spec.after_norm else "last block, before encoder_norm",
            "trainable_params": tree.param_count(setup.trainable), "steps": steps, "epochs": w.epochs,
            "few_shot_examples": num_examples, "l1_initial": initial["l1"], "l1_final": history[-1]["l1"],
            "student_checkpoint": out}, metrics=("l1_final",))

    return runs.resumable(ctx, f"{STAGE}/{variant}", ctx.path(handoff.FEWSHOT_DIR, variant), body)


def results_table(results: dict) -> str:
    """Markdown: one row per variant (blocks, trainable params, test-image L1 before and after)."""
    lines = ["| student | d | blocks | LoRA rank | trainable params | few-shot images | distill L1 start -> end |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        rank = "-" if r["lora_rank"] is None else str(r["lora_rank"])
        lines.append(f"| {r['variant']} | {r['d']} | {r['student_blocks']} | {rank} | {r['trainable_params']:,} | "
                     f"{r['few_shot_examples']} | {r['l1_initial']:.4f} -> {r['l1_final']:.4f} |")
    return "\n".join(lines) + f"\n\nTeacher: {results['teacher']} ({results['teacher_blocks']} blocks)."


def fewshot_distill(ctx: common.RunContext) -> stages.StageOutput:
    """The `fewshot_distill` stage: every configured variant against the frozen teacher."""
    w = ctx.config.wecolora
    teacher, teacher_params, teacher_path = handoff.load_frozen_teacher(ctx)
    num_examples = pipeline.num_train_examples(ctx.config.data, ctx.config.dataset, few_shot=True)
    rows = [distill_variant(ctx, v, teacher, teacher_params, num_examples) for v in w.variants]
    results = {"teacher": teacher_path, "teacher_blocks": teacher.num_layers, "d": w.d,
               "few_shot_examples": num_examples, "rows": rows}
    return stages.StageOutput(results, results_table(results))


def validate(config) -> None:
    w = config.wecolora
    for name in ("d", "lora_rank", "epochs", "batch_size", "accum_steps"):
        cv.positive_int(config, f"wecolora.{name}")
    cv.check(cv.is_int(w.warmup_epochs) and 0 <= w.warmup_epochs < w.epochs, "wecolora.warmup_epochs",
             f"an integer in [0, wecolora.epochs={w.epochs})", w.warmup_epochs)
    cv.check(len(w.variants) > 0 and all(v in VARIANTS for v in w.variants), "wecolora.variants",
             f"a non-empty list of {', '.join(VARIANTS)}", w.variants)
    cv.check(len(set(w.variants)) == len(w.variants), "wecolora.variants", "a list without repeats", w.variants)
    cv.check(w.blr > 0, "wecolora.blr", "> 0", w.blr)
    cv.check(w.weight_decay >= 0, "wecolora.weight_decay", ">= 0", w.weight_decay)
    cv.check(len(w.adam_betas) == 2 and all(0 <= b < 1 for b in w.adam_betas), "wecolora.adam_betas",
             "two numbers in [0, 1)", w.adam_betas)
    cv.check(w.batch_size % w.accum_steps == 0, "wecolora.accum_steps",
             f"a divisor of wecolora.batch_size ({w.batch_size})", w.accum_steps)
    cv.one_of("wecolora.dtype", w.dtype, DTYPES)
    cv.check(isinstance(w.remat, bool), "wecolora.remat", "True or False", w.remat)
    cv.positive_int(config, "wecolora.log_every")
    cv.check(cv.is_int(w.checkpoint_every) and w.checkpoint_every >= 0, "wecolora.checkpoint_every",
             "an integer >= 0 (0: only at the end)", w.checkpoint_every)


def compared(results: dict) -> list[seeds.Compared]:
    return [seeds.Compared(r["variant"], "distill L1 at the end (test images)", r["l1_final"], accuracy=False)
            for r in results["rows"]]


STAGES = (
    stages.Stage(STAGE, folder=handoff.FEWSHOT_DIR, section="wecolora", run=fewshot_distill, validate=validate,
                 global_batches=("wecolora.batch_size",),
                 reads=("teacher.checkpoint", "teacher.dtype"),
                 needs=(stages.Need("pretrain_teacher", "the teacher npz (config.teacher.checkpoint='pretrain')",
                                    handoff.uses_pretrained_teacher),),
                 outputs="`<variant>/student.npz` (LoRA merged: a plain AugReg npz)", train_data="few_shot", compared=compared),
)
