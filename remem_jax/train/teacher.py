"""Teacher stages: `pretrain_teacher` (a ViT from scratch) and `finetune_teacher` (ReMem).

`finetune_teacher` loads the AugReg teacher, applies the ReMem reweighting and
the fine-tuning mode (full, LoRA, adapter, head), trains with SAM, evaluates
exactly, keeps orbax checkpoints at `finetune.keep_steps`, resumes from the
workdir, and exports every kept teacher as a plain AugReg npz (LoRA merged,
reweighting folded into the weights) for `distill_student`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from remem_jax import checkpoints, config_validation as cv, errors, files, metrics, optim, surgery, tree
from remem_jax.dtypes import DTYPES
from remem_jax.models import vit
from remem_jax.train import common, handoff, runs, seeds, stages, vit_finetune

SETTINGS = ("remem", "vanilla")


# ----------------------------------------------------------------------------- pretrain_teacher

def pretrain_teacher(ctx: common.RunContext) -> stages.StageOutput:
    """Trains a ViT from scratch on the dataset and saves it as an AugReg npz."""
    p = ctx.config.pretrain
    out = handoff.pretrained_path(ctx)

    def body(sub: runs.SubRun) -> dict:
        overrides = {"num_layers": p.num_layers} if p.num_layers is not None else {}
        model = vit.create_vit(p.variant, ctx.num_classes, dtype=DTYPES[p.dtype], remat_blocks=p.remat, **overrides)
        size = ctx.config.data.image_size
        params = jax.jit(model.init)(ctx.rng("pretrain", "init"), jnp.zeros((1, size, size, 3)))["params"]
        setup = vit_finetune.TrainableViT(model, params, {}, surgery.merge_partitions)
        final, history = vit_finetune.train_classifier(sub, setup, p, steps=p.steps, sam_rho=0.0,
                                                       sync_perturbations=False, accum_steps=1, seed_name="pretrain")
        common.save_vit(ctx, out, setup.combine(final.params, final.frozen), model)
        return sub.commit({"checkpoint": out, "variant": p.variant, "num_params": tree.param_count(final.params),
                           "eval": history[-1]}, metrics=("eval",))

    summary = runs.resumable(ctx, "pretrain", ctx.path(handoff.PRETRAIN_DIR), body)
    metric = ctx.metric
    summary = dict(summary, metric=metric)
    table = "\n".join([f"| teacher | variant | params | steps | {metric} |", "|---|---|---|---|---|",
                       f"| {out} | {summary['variant']} | {summary['num_params']:,} | {p.steps} | "
                       f"{metrics.format_accuracy(summary['eval'], metric)} |", "", metrics.STANDARD_ERROR_NOTE])
    return stages.StageOutput(summary, table)


def validate_pretrain(config) -> None:
    p = config.pretrain
    for f in ("steps", "batch_size"):
        cv.positive_int(config, f"pretrain.{f}")
    try:
        vit.variant_config(p.variant)
    except ValueError as e:
        raise errors.UserError(f"config.pretrain.variant: {e}") from None
    cv.image_size_fits_patches(config, vit.variant_config(p.variant)["patch_size"], f"pretrain.variant={p.variant!r}")
    cv.optional_positive_int(config, "pretrain.num_layers", "the variant's depth")
    cv.check(p.lr > 0, "pretrain.lr", "> 0", p.lr)
    cv.warmup(config, "pretrain", "min(500, 10% of steps)")
    cv.cadence(config, "pretrain")
    cv.one_of("pretrain.optimizer", p.optimizer, optim.OPTIMIZERS)
    cv.one_of("pretrain.dtype", p.dtype, DTYPES)
    cv.check(isinstance(p.remat, bool), "pretrain.remat", "True or False", p.remat)


# ----------------------------------------------------------------------------- finetune_teacher

def setting_hyperparameters(f, setting: str) -> dict:
    """SAM radius and reweighting of a named setting."""
    if setting == "remem":
        return dict(sam_rho=f.sam_rho, mlp_alpha=f.mlp_alpha, attn_beta=f.attn_beta)
    if setting == "vanilla":
        return dict(sam_rho=0.0, mlp_alpha=1.0, attn_beta=1.0)
    raise errors.UserError(f"config.finetune.settings: unknown setting {setting!r}; use {SETTINGS}.")


def export_teacher(ctx: common.RunContext, params: Any, model: vit.VisionTransformer, path: str) -> None:
    """Saves a fine-tuned teacher as a plain AugReg npz: reweighting folded into the weights.

    The folded file is an ordinary ViT (adapters, if any, are kept and folded too)
    whose plain forward pass equals the reweighted model's up to LayerNorm's eps.
    """
    params = surgery.fold_reweighting(params, mlp_alpha=model.mlp_alpha, attn_beta=model.attn_beta,
                                      residual_mode=model.residual_mode, num_layers=model.num_layers)
    common.save_vit(ctx, path, params, model)


def finetune_model(f, ckpt: checkpoints.VitFile, num_classes: int, hp: dict) -> vit.VisionTransformer:
    """The teacher ViT of a setting: the file's architecture with the config's options."""
    adapter = {"adapter_dim": ckpt.architecture["hidden_size"] // f.adapter_reduction} if f.mode == "adapter" else {}
    return checkpoints.build_vit(ckpt, num_classes=num_classes, mlp_alpha=hp["mlp_alpha"], attn_beta=hp["attn_beta"],
                                 residual_mode=f.residual_mode, dropout_rate=f.dropout, dtype=DTYPES[f.dtype],
                                 remat_blocks=f.remat, **adapter)


def finetune_setting(ctx: common.RunContext, setting: str) -> dict:
    """Fine-tunes the teacher in one setting and exports its kept checkpoints."""
    f = ctx.config.finetune
    hp = setting_hyperparameters(f, setting)
    run_dir = ctx.path(handoff.FINETUNE_DIR, setting)

    def body(sub: runs.SubRun) -> dict:
        size = ctx.config.data.image_size
        ckpt = handoff.read_teacher(ctx)
        model = finetune_model(f, ckpt, ctx.num_classes, hp)
        params = checkpoints.load_into(model, ckpt, image_size=size)
        setup = vit_finetune.setup_finetune(model, params, f.mode, ctx.rng("finetune", setting, "surgery"),
                                            image_size=size, lora_rank=f.lora_rank, lora_alpha=f.lora_alpha,
                                            lora_targets=f.lora_targets)
        kept_json = handoff.kept_path(ctx, setting)
        kept = files.read_json(kept_json, default={})

        def on_keep(step, host_state, record):
            path = handoff.kept_teacher_path(ctx, setting, step)
            export_teacher(ctx, setup.combine(host_state.params, host_state.frozen), model, path)
            kept[str(step)] = {"setting": setting, "step": step, "checkpoint": path,
                               **{k: v for k, v in record.items() if k != "step"}}
            common.write_json(kept_json, kept)

        keep_steps = sorted(set(f.keep_steps) | {f.steps})  # validation rejects entries > f.steps
        _, history = vit_finetune.train_classifier(
            sub, setup, f, steps=f.steps, sam_rho=hp["sam_rho"], sync_perturbations=f.sync_perturbations,
            accum_steps=f.accum_steps, keep_steps=keep_steps, on_keep=on_keep, seed_name=f"finetune-{setting}")
        return sub.commit({"setting": setting, **hp, "mode": f.mode,
                           "trainable_params": tree.param_count(setup.trainable),
                           "kept": [kept[str(s)] for s in keep_steps if str(s) in kept], "eval_history": history},
                          metrics=("kept",))

    return runs.resumable(ctx, f"finetune/{setting}", run_dir, body)


def finetune_table(summaries: dict, metric: str) -> str:
    """Markdown: one row per kept teacher (setting, step, SAM rho, alpha, beta, metric)."""
    lines = [f"| setting | step | mode | SAM rho | MLP alpha | attention beta | trainable params | {metric} |",
             "|---|---|---|---|---|---|---|---|"]
    for setting, s in summaries.items():
        for k in s["kept"]:
            lines.append(f"| {setting} | {k['step']} | {s['mode']} | {s['sam_rho']:g} | {s['mlp_alpha']:g} | "
                         f"{s['attn_beta']:g} | {s['trainable_params']:,} | {metrics.format_accuracy(k, metric)} |")
    return "\n".join(lines + ["", metrics.STANDARD_ERROR_NOTE])


def finetune_teacher(ctx: common.RunContext) -> stages.StageOutput:
    """The `finetune_teacher` stage: every configured setting (remem, vanilla)."""
    summaries = {setting: finetune_setting(ctx, setting) for setting in ctx.config.finetune.settings}
    return stages.StageOutput(dict(summaries, metric=ctx.metric), finetune_table(summaries, ctx.metric))


def _keep_steps(f) -> None:
    keep = tuple(f.keep_steps)
    cv.check(all(isinstance(s, int) and s > 0 for s in keep), "finetune.keep_steps", "positive step numbers",
             f.keep_steps)
    too_late = [s for s in keep if s > f.steps]
    cv.check(not too_late, "finetune.keep_steps", f"step numbers <= finetune.steps ({f.steps})", f.keep_steps,
             f"{too_late} would never be reached")


def validate_finetune(config) -> None:
    f = config.finetune
    for name in ("steps", "batch_size", "accum_steps"):
        cv.positive_int(config, f"finetune.{name}")
    cv.check(f.lr > 0, "finetune.lr", "> 0", f.lr)
    cv.warmup(config, "finetune", "min(500, 10% of steps)")
    cv.cadence(config, "finetune")
    cv.check(0.0 <= f.sam_rho <= 10.0, "finetune.sam_rho", "in [0, 10] (paper: 0.005, 0.05, 0.5)", f.sam_rho)
    cv.check(0.0 < f.mlp_alpha <= 2.0, "finetune.mlp_alpha", "in (0, 2] (1 = pretrained)", f.mlp_alpha)
    cv.check(0.0 < f.attn_beta <= 2.0, "finetune.attn_beta", "in (0, 2] (1 = pretrained)", f.attn_beta)
    cv.one_of("finetune.residual_mode", f.residual_mode, vit.RESIDUAL_MODES)
    cv.one_of("finetune.mode", f.mode, surgery.TRAINABLE_MODES)
    cv.check(len(f.settings) > 0 and all(s in SETTINGS for s in f.settings),
             "finetune.settings", f"a non-empty list of {', '.join(SETTINGS)}", f.settings)
    cv.check(len(set(f.settings)) == len(f.settings), "finetune.settings", "a list without repeats", f.settings)
    _keep_steps(f)
    cv.check(f.lora_rank > 0, "finetune.lora_rank", "a positive integer", f.lora_rank)
    cv.one_of("finetune.lora_targets", f.lora_targets, surgery.LORA_PRESETS)
    cv.check(f.adapter_reduction > 0, "finetune.adapter_reduction", "a positive integer", f.adapter_reduction)
    cv.one_of("finetune.dtype", f.dtype, DTYPES)
    cv.check(isinstance(f.remat, bool), "finetune.remat", "True or False", f.remat)
    cv.check(0.0 <= f.momentum < 1.0, "finetune.momentum", "in [0, 1)", f.momentum)
    cv.check(f.batch_size % f.accum_steps == 0, "finetune.accum_steps",
             f"a divisor of finetune.batch_size ({f.batch_size})", f.accum_steps)


def compared_pretrain(results: dict) -> list[seeds.Compared]:
    return [seeds.Compared("teacher", results["metric"], results["eval"][results["metric"]])]


def compared_finetune(results: dict) -> list[seeds.Compared]:
    metric = results["metric"]
    return [seeds.Compared(f"{setting} step {k['step']}", metric, k[metric])
            for setting, s in results.items() if setting != "metric" for k in s["kept"]]


STAGES = (
    stages.Stage("pretrain_teacher", folder=handoff.PRETRAIN_DIR, section="pretrain", run=pretrain_teacher,
                 validate=validate_pretrain, global_batches=("pretrain.batch_size",), outputs="`teacher.npz` (AugReg layout; `teacher.checkpoint='pretrain'`)", compared=compared_pretrain),
    stages.Stage("finetune_teacher", folder=handoff.FINETUNE_DIR, section="finetune", run=finetune_teacher,
                 validate=validate_finetune, global_batches=("finetune.batch_size",), reads=("teacher.checkpoint",),
                 needs=(stages.Need("pretrain_teacher", "the teacher npz (config.teacher.checkpoint='pretrain')",
                                    handoff.uses_pretrained_teacher),),
                 outputs="`<setting>/teachers/step_<N>.npz` (every kept teacher, reweighting folded), "
                         "`<setting>/kept.json`", compared=compared_finetune),
)
