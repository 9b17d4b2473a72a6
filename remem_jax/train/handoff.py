"""What one stage writes to the workdir and a later stage reads: folders, paths, teachers, students.

Every stage folder name and every file a stage hands on is named here, so that the stage
writing it and the stages reading it never import each other.

  DIR/pretrain/teacher.npz                      pretrain_teacher's ViT ('pretrain' as teacher.checkpoint)
  DIR/finetune/<setting>/kept.json              finetune_teacher's kept teachers (step -> entry)
  DIR/finetune/<setting>/teachers/step_N.npz    each kept teacher, reweighting folded
  DIR/fewshot_distill/results.json              fewshot_distill's students (read by linear_probe)
  DIR/tinymim/<run>/summary.json                relation_distill's students (read by finetune_student)
"""
from __future__ import annotations

from typing import Any, Optional

from remem_jax import checkpoints, errors, files
from remem_jax.dtypes import DTYPES
from remem_jax.models import vit
from remem_jax.train import common, runs

# Stage folders (DIR/<folder>/), one per stage.
PRETRAIN_DIR = "pretrain"
FINETUNE_DIR = "finetune"
DISTILL_DIR = "distill"
BEST_STUDENT_DIR = "best_student"  # the distill_student stage's export of its best student
FEWSHOT_DIR = "fewshot_distill"
PROBE_DIR = "linear_probe"
TINYMIM_DIR = "tinymim"
TINYMIM_FINETUNE_DIR = "tinymim_finetune"
ANALYSIS_DIR = "analysis"

FEWSHOT_STAGE = "fewshot_distill"

PRETRAINED_NAME = "pretrain"  # config.teacher.checkpoint naming the pretrain_teacher stage's ViT


# ----------------------------------------------------------------------------- the teacher

def pretrained_path(ctx: common.RunContext) -> str:
    return ctx.path(PRETRAIN_DIR, "teacher.npz")


def uses_pretrained_teacher(config) -> bool:
    return config.teacher.checkpoint == PRETRAINED_NAME


def teacher_checkpoint_path(ctx: common.RunContext) -> str:
    """`config.teacher.checkpoint`, with 'pretrain' resolved to the pretrain_teacher stage's npz."""
    name = ctx.config.teacher.checkpoint
    if name != PRETRAINED_NAME:
        return name
    path = pretrained_path(ctx)
    if not files.exists(path):
        raise errors.UserError(f"config.teacher.checkpoint is 'pretrain' but {path} does not exist; "
                               "put 'pretrain_teacher' first in config.stages.")
    return path


def teacher_cache_dir(ctx: common.RunContext) -> str:
    """Where a remote teacher checkpoint is cached: config.teacher.cache_dir, or the per-user default.

    Every setting (and every later run) reads the one cached copy instead of the remote file.
    Exported teachers in the workdir are not cached: each is read once, by its student.
    """
    return ctx.config.teacher.get("cache_dir") or checkpoints.default_cache_dir()


def read_teacher(ctx: common.RunContext) -> checkpoints.VitFile:
    """The file of `config.teacher.checkpoint` (through the cache)."""
    return checkpoints.read_vit(teacher_checkpoint_path(ctx), cache_dir=teacher_cache_dir(ctx))


def load_frozen_teacher(ctx: common.RunContext) -> tuple[vit.VisionTransformer, Any, str]:
    """The frozen teacher of the distillation stages: the file's ViT with its own head, in
    `config.teacher.dtype`, at the run's image size; and its path."""
    ckpt = read_teacher(ctx)
    model = checkpoints.build_vit(ckpt, num_classes=ckpt.num_classes, dtype=DTYPES[ctx.config.teacher.dtype])
    return model, checkpoints.load_into(model, ckpt, image_size=ctx.config.data.image_size), ckpt.path


# ----------------------------------------------------------------------------- kept teachers

def kept_path(ctx: common.RunContext, setting: str) -> str:
    return ctx.path(FINETUNE_DIR, setting, "kept.json")


def kept_teacher_path(ctx: common.RunContext, setting: str, step: int) -> str:
    return ctx.path(FINETUNE_DIR, setting, "teachers", f"step_{step}.npz")


def kept_teachers(ctx: common.RunContext, selection: str) -> list[dict]:
    """The teachers finetune_teacher kept, per setting of `config.finetune.settings` in step order.

    Args:
      selection: 'all' kept steps of each setting, or the 'last' of each.

    Returns:
      Entries `{'setting', 'step', 'checkpoint', <eval metrics>}`; empty when none were kept.
    """
    teachers = []
    for setting in ctx.config.finetune.settings:
        kept = files.read_json(kept_path(ctx, setting), default={})
        entries = [kept[k] for k in sorted(kept, key=int)]
        teachers.extend(entries[-1:] if selection == "last" else entries)
    return teachers


# ----------------------------------------------------------------------------- students

def fewshot_student_path(ctx: common.RunContext, variant: str) -> str:
    return ctx.path(FEWSHOT_DIR, variant, "student.npz")


def fewshot_results(ctx: common.RunContext) -> Optional[dict]:
    """The fewshot_distill stage's results (teacher, d, one row per student), or None."""
    results = files.read_json(runs.stage_results_paths(ctx.workdir, FEWSHOT_DIR)[0])
    if results is None:  # a workdir from before per-stage results files
        results = files.read_json(ctx.path(runs.RESULTS_JSON), default={}).get(FEWSHOT_STAGE)
    return results


def tinymim_run_dir(ctx: common.RunContext, run_name: str) -> str:
    return ctx.path(TINYMIM_DIR, run_name)


def tinymim_student(ctx: common.RunContext, run_name: str) -> Optional[dict]:
    """The committed summary of relation_distill's run `run_name`, or None."""
    return runs.SubRun(ctx, run_name, tinymim_run_dir(ctx, run_name)).committed()
