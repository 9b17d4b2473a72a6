"""The `distill_student` stage: every kept teacher -> a CNN student, plus the scratch baseline.

The teacher runs inside the step (frozen, inference mode, optionally bfloat16)
on exactly the batch the student sees, mixup included; the student's BatchNorm
statistics are averaged across devices and kept in the train state.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from remem_jax import checkpoints, config_validation as cv, errors, export, files, losses, metrics, tree
from remem_jax.dtypes import DTYPES
from remem_jax.models import students
from remem_jax.train import common, handoff, runs, seeds, stages, state as state_lib, step as step_lib

METHODS = ("kd", "dist", "patient")
TEACHER_SELECTIONS = ("all", "last")  # config.distill.teachers: every kept checkpoint, or the last per setting
SCRATCH = "scratch"


def distillation_objective(method: str, d) -> Any:
    """`(student_logits, teacher_logits, soft_labels) -> loss` for a method and its config."""
    if method == "kd":
        return lambda s, t, y: losses.kd_loss(s, t, y, temperature=d.temperature, kd_weight=d.kd_weight)
    if method == "dist":
        return lambda s, t, y: losses.dist_objective(s, t, y, beta=d.dist_beta, gamma=d.dist_gamma, tau=d.dist_tau)
    if method == "patient":
        return lambda s, t, y: losses.patient_kd_loss(s, t, temperature=d.temperature)
    if method == SCRATCH:
        return lambda s, t, y: losses.softmax_cross_entropy(s, y)
    raise errors.UserError(f"config.distill.method must be one of {METHODS}, got {method!r}.")


PATIENT_MIXUP_ALPHA = 0.8  # Beyer et al.'s consistent mixup, the ReMem paper's Table 6


def mixup_alpha(method: str, configured: Optional[float]) -> float:
    """The mixup Beta parameter of a method: None picks 0.8 for patient KD and none otherwise."""
    if method == SCRATCH:
        return 0.0
    if configured is None:
        return PATIENT_MIXUP_ALPHA if method == "patient" else 0.0
    return configured


def distillation_loss(student, teacher, objective):
    """The step's loss. `frozen` holds the teacher's params (absent for scratch)."""
    def loss_fn(params, frozen, batch_stats, batch, rng):
        images = batch["image"]
        teacher_logits = None
        if teacher is not None:
            teacher_logits = jax.lax.stop_gradient(
                teacher.apply({"params": frozen["teacher"]}, images.astype(teacher.dtype), train=False))
        logits, new_state = student.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                          mutable=["batch_stats"], rngs={"dropout": rng})
        loss = objective(logits, teacher_logits, batch["soft_label"])
        metrics = {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
        if teacher_logits is not None:
            metrics["teacher_agreement"] = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
        return loss, {"batch_stats": new_state["batch_stats"], "metrics": metrics}
    return loss_fn


def kept_teachers(ctx: common.RunContext) -> list[dict]:
    """Every teacher checkpoint the finetune stage exported (or the last of each setting)."""
    teachers = handoff.kept_teachers(ctx, ctx.config.distill.teachers)
    if not teachers:
        raise errors.UserError(f"No fine-tuned teachers in {ctx.path(handoff.FINETUNE_DIR)}; run the "
                               "'finetune_teacher' stage first (put it before 'distill_student' in config.stages).")
    return teachers


def student_model(d, num_classes: int):
    """The CNN student of `config.distill` (BatchNorm statistics averaged over the 'batch' axis)."""
    extra = {"width_multiplier": d.width_multiplier} if d.student == "mobilenet_v2" else {}
    return students.create_student(d.student, num_classes, dtype=DTYPES[d.dtype], bn_axis_name="batch", **extra)


def student_tx(d):
    """`config.distill`'s optimizer: SGD momentum, warmup (5% of steps by default) + cosine, wd, clip."""
    return common.make_tx(d, d.steps, warmup_fraction=0.05)


def distillation_step(d, student, teacher, method: str, tx):
    """The train step (not yet pmapped) of `method` with `config.distill`'s loss settings; teacher None: scratch."""
    return step_lib.make_train_step(distillation_loss(student, teacher, distillation_objective(method, d)), tx)


@dataclasses.dataclass
class StudentRunner:
    """What every student of a stage shares, built (and compiled) once, when first needed.

    All kept teachers come from one base model, so one compiled step per
    method serves every teacher: their parameters are step arguments.
    """
    ctx: common.RunContext
    steps: dict = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def student(self):
        return student_model(self.ctx.config.distill, self.ctx.num_classes)

    @functools.cached_property
    def init_variables(self) -> tuple[Any, Any]:
        return students.init_student(self.student, self.ctx.rng("distill", "student-init"),
                                     self.ctx.config.data.image_size)

    @functools.cached_property
    def tx(self):
        return student_tx(self.ctx.config.distill)

    @functools.cached_property
    def evaluator(self):
        student = self.student
        return common.make_evaluator(
            lambda v, x: student.apply(v, x, train=False),
            lambda s: {"params": s.params, "batch_stats": s.batch_stats}, self.ctx, self.ctx.config.distill.batch_size)

    def step_fn(self, teacher, method: str):
        key = (teacher, method)
        if key not in self.steps:
            self.steps[key] = step_lib.pmap_train_step(
                distillation_step(self.ctx.config.distill, self.student, teacher, method, self.tx))
        return self.steps[key]


def train_student(runner: StudentRunner, name: str, teacher_entry: Optional[dict]) -> dict:
    """Distills one student from one teacher (or trains it from labels if none)."""
    ctx = runner.ctx
    d = ctx.config.distill
    run_dir = ctx.path(handoff.DISTILL_DIR, name)

    def body(sub: runs.SubRun) -> dict:
        teacher, frozen, method = None, {}, SCRATCH
        if teacher_entry is not None:
            teacher, teacher_params = checkpoints.load_augreg(
                teacher_entry["checkpoint"], num_classes=ctx.num_classes, image_size=ctx.config.data.image_size,
                dtype=DTYPES[ctx.config.teacher.dtype])
            frozen, method = {"teacher": teacher_params}, d.method
        params, batch_stats = runner.init_variables
        state = state_lib.create_train_state(params, runner.tx, rng=ctx.rng("distill", name), frozen=frozen,
                                             batch_stats=batch_stats)
        mixup = mixup_alpha(method, d.mixup_alpha)
        make_iter = common.train_iterator_factory(ctx, d.batch_size, seed=ctx.config.seed, mixup_alpha=mixup)
        final, history = sub.train(state, runner.step_fn(teacher, method),
                                   loop_config=common.loop_config(sub.name, d, d.steps),
                                   make_train_iterator=make_iter, evaluate=runner.evaluator)
        checkpoint = os.path.join(run_dir, "student.npz")
        common.save_params(checkpoint, {"params": final.params, "batch_stats": final.batch_stats})
        return sub.commit({"name": name, "student": d.student, "method": method, "teacher": teacher_entry,
                           "student_eval": history[-1], "student_params": tree.param_count(final.params),
                           "student_checkpoint": checkpoint}, metrics=("student_eval",))

    return runs.resumable(ctx, f"distill/{name}", run_dir, body)


def results_table(rows: list[dict], metric: str) -> str:
    """A markdown table: teacher checkpoint, teacher accuracy, student accuracy, method."""
    lines = [f"| teacher | teacher step | teacher {metric} | student | method | student {metric} |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("teacher") or {}
        lines.append(f"| {t.get('setting', SCRATCH)} | {t.get('step', '-')} | {metrics.format_accuracy(t, metric)} | "
                     f"{r['student']} | {r['method']} | {metrics.format_accuracy(r['student_eval'], metric)} |")
    return "\n".join(lines + ["", metrics.STANDARD_ERROR_NOTE])


def export_best_student(best_dir: str, best: dict) -> None:
    """Writes the best student as a plain npz and an orbax checkpoint; a re-run keeps it."""
    marker = os.path.join(best_dir, "best.json")
    previous = files.read_json(marker, default={})
    if previous.get("student_checkpoint") == best["student_checkpoint"]:
        return
    orbax_dir = os.path.join(best_dir, "orbax")
    if files.exists(orbax_dir) and common.is_chief():  # a different best student from an earlier run
        files.remove_tree(orbax_dir)
    # Process 0 wrote the student's npz in this stage (and removed the old export): every host
    # waits for that before reading it and before opening the orbax directory.
    multihost_utils.sync_global_devices("distill_student: best student written")
    params = tree.unflatten_params(checkpoints.load_npz(best["student_checkpoint"]))
    common.save_params(os.path.join(best_dir, "student.npz"), params)
    common.checkpointer(orbax_dir).save(0, params)
    common.write_json(marker, {"name": best["name"], "student_checkpoint": best["student_checkpoint"]})


def distill_student(ctx: common.RunContext) -> stages.StageOutput:
    """Distills a student from every kept teacher, trains the scratch baseline, picks the best."""
    d = ctx.config.distill
    runner = StudentRunner(ctx)
    rows = [train_student(runner, f"{t['setting']}_step{t['step']}", t) for t in kept_teachers(ctx)]
    if d.scratch_baseline:
        rows.append(train_student(runner, SCRATCH, None))
    metric = ctx.metric
    distilled = [r for r in rows if r["method"] != SCRATCH]
    best = max(distilled, key=lambda r: r["student_eval"][metric])
    split = ("the held-out validation split" if ctx.config.data.validation_percent
             else "the eval (test) split: no validation split is configured")
    table = results_table(rows, metric)
    best_dir = ctx.path(handoff.BEST_STUDENT_DIR)
    export_best_student(best_dir, best)
    # model.json, then the serving formats (config.distill.export_formats), each verified on eval images.
    serving = export.export_for_serving(ctx.config, best_dir, ctx.num_classes)
    served = "".join(f", {best_dir}/{e['file']}" for e in (serving or {}).get("formats", {}).values())
    report = "\n".join([table, "", f"Best student: {best['name']} ({metric} "
                        f"{metrics.format_accuracy(best['student_eval'], metric)}), selected on {split}.",
                        f"Exported to {best_dir}/student.npz and {best_dir}/orbax{served}."])
    if common.is_chief():
        print(report)
    return stages.StageOutput(
        {"rows": rows, "best": best["name"], "metric": metric, "selected_on": split,
         "best_dir": best_dir, "export": {f: {"file": e["file"], "max_abs_diff": e["max_abs_diff"]}
                                          for f, e in (serving or {}).get("formats", {}).items()}}, report)


def validate(config) -> None:
    d = config.distill
    for name in ("steps", "batch_size"):
        cv.positive_int(config, f"distill.{name}")
    cv.one_of("distill.student", d.student, students.STUDENTS)
    cv.check(d.lr > 0, "distill.lr", "> 0", d.lr)
    cv.warmup(config, "distill", "5% of steps")
    cv.cadence(config, "distill")
    cv.one_of("distill.method", d.method, METHODS)
    cv.check(d.temperature > 0, "distill.temperature", "> 0", d.temperature)
    cv.check(0.0 <= d.kd_weight <= 1.0, "distill.kd_weight", "in [0, 1]", d.kd_weight)
    cv.check(d.mixup_alpha is None or d.mixup_alpha >= 0, "distill.mixup_alpha",
             f"None ({PATIENT_MIXUP_ALPHA} for patient, 0 for kd/dist) or >= 0 (0: off)", d.mixup_alpha)
    cv.one_of("distill.teachers", d.teachers, TEACHER_SELECTIONS)
    cv.one_of("distill.dtype", d.dtype, DTYPES)
    cv.check(isinstance(d.export_formats, (tuple, list)) and all(f in export.FORMATS for f in d.export_formats),
             "distill.export_formats", f"a tuple of {', '.join(export.FORMATS)} (() for none)", d.export_formats)


def compared(results: dict) -> list[seeds.Compared]:
    metric = results["metric"]
    return [seeds.Compared(f"{r['student']} <- {(r.get('teacher') or {}).get('setting', SCRATCH)}"
                           f"{'' if r.get('teacher') is None else ' step ' + str(r['teacher']['step'])} ({r['method']})",
                           metric, r["student_eval"][metric]) for r in results["rows"]]


STAGES = (
    stages.Stage("distill_student", folder=handoff.DISTILL_DIR, section="distill", run=distill_student,
                 validate=validate, global_batches=("distill.batch_size",), reads=("teacher.dtype",),
                 needs=(stages.Need("finetune_teacher", "the kept teachers"),),
                 outputs="`<setting>_step<N>/student.npz`, `scratch/student.npz`; the best student in "
                         "`DIR/best_student/` (npz, orbax, verified serving exports, model.json)", compared=compared),
)
