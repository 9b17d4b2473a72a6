"""TinyMIM (Ren et al., CVPR 2023): `relation_distill` and `finetune_student` stages.

`relation_distill` distils a ViT student, built from a variant name with MAE's initialisation,
from a frozen ViT teacher (any AugReg npz, or the `pretrain_teacher` stage's). Targets
(`config.tinymim.target`, plus comparison rows in `config.tinymim.compare`):

  * `relation` (the released code): the Q-K and V-V token relations of the teacher's block
    `teacher_block` (1-indexed; default floor(0.75 L_t) when the teacher is deeper than the
    student, else its last) and of the student's last block, whose head count is the teacher's
    (`last_block_heads`). Only that much is computed: the teacher stops after the chosen block's
    q/k/v, the student after its last block's; the student's last-block attention output, MLP
    and final norm get no gradient and are kept out of the optimizer (never updated).
  * `cls`: `-cos(M c_s, c_t)` of the last-layer class tokens, M a learned linear map.
  * `feature`: Smooth-L1 (beta 2) between `M F_s` and the teacher's last-block tokens whitened
    by a non-affine LayerNorm. `cls` and `feature` follow the paper's description, not released
    code (notes/methods.md section 2.2, ambiguity row 22), and are marked so in the results.

Teacher and student see the same crop and flip; the student alone gets colour jitter (on the
device, in the step). AdamW (0.9, 0.95), wd 0.05, lr = blr * batch / 256, linear warmup then
cosine. Each distilled student is exported as an AugReg npz (`load_augreg` reads it: sin-cos
position embeddings are written as `pos_embedding`, plus a zero head for the dataset's classes).

`finetune_student` fine-tunes every distilled student and a scratch student of the same
architecture (same init, no distillation) with identical settings through the classifier
machinery of `train/vit_finetune.py`, and writes `results.md` (one row per target and teacher block,
plus scratch: distillation loss before / after, fine-tuned metric, with its standard error), led by the
teacher's own metric when its head classifies the dataset.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from remem_jax import checkpoints, config_validation as cv, devices, errors, files, metrics, optim, relation_losses, surgery, tree
from remem_jax.data import color_jitter
from remem_jax.dtypes import DTYPES
from remem_jax.models import vit
from remem_jax.train import common, handoff, runs, seeds, stages, state as state_lib, step as step_lib, vit_finetune

TARGETS = ("relation", "cls", "feature")
PAPER_ONLY_TARGETS = ("cls", "feature")  # not in the released code (ambiguity row 22)
SCRATCH = "scratch"
_RUN_SPEC = re.compile(r"(relation|cls|feature)(?:@(last|\d+))?")


# ----------------------------------------------------------------------------- what to run

@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One distillation run: a target and (for relations) the 1-indexed teacher block."""
    target: str
    teacher_block: Optional[int] = None  # None for cls / feature (last-layer tokens)

    @property
    def name(self) -> str:
        return f"{self.target}_block{self.teacher_block}" if self.target == "relation" else self.target


def default_teacher_block(teacher_layers: int, student_layers: int) -> int:
    """floor(0.75 L_t) when the teacher is deeper than the student, else its last block (1-indexed)."""
    return int(math.floor(0.75 * teacher_layers)) if teacher_layers > student_layers else teacher_layers


def parse_run(spec: str, *, teacher_layers: int, student_layers: int, field: str) -> RunSpec:
    """`'relation'`, `'relation@last'`, `'relation@9'`, `'cls'` or `'feature'` -> RunSpec."""
    match = _RUN_SPEC.fullmatch(str(spec))
    if match is None:
        raise errors.UserError(f"config.{field} entries must be 'relation', 'relation@last', 'relation@<block>', "
                               f"'cls' or 'feature', got {spec!r}.")
    target, block = match.groups()
    if target != "relation":
        if block is not None:
            raise errors.UserError(f"config.{field}: {spec!r}: a teacher block only applies to 'relation' "
                                   "(cls and feature use the last layer).")
        return RunSpec(target)
    if block is None:
        number = default_teacher_block(teacher_layers, student_layers)
    elif block == "last":
        number = teacher_layers
    else:
        number = int(block)
    if not 1 <= number <= teacher_layers:
        raise errors.UserError(f"config.{field}: teacher block {number} is outside 1..{teacher_layers} "
                               f"(the teacher has {teacher_layers} blocks; blocks are 1-indexed).")
    return RunSpec("relation", number)


def run_specs(t, *, teacher_layers: int, student_layers: int) -> list[RunSpec]:
    """The primary run (`tinymim.target`, `tinymim.teacher_block`) then `tinymim.compare`, without repeats."""
    primary = t.target if t.target != "relation" or t.teacher_block is None else f"relation@{t.teacher_block}"
    specs = [parse_run(primary, teacher_layers=teacher_layers, student_layers=student_layers,
                       field="tinymim.target / tinymim.teacher_block")]
    for entry in t.compare:
        spec = parse_run(entry, teacher_layers=teacher_layers, student_layers=student_layers,
                         field="tinymim.compare")
        if spec not in specs:
            specs.append(spec)
    return specs


# ----------------------------------------------------------------------------- models

def student_model(t, teacher_heads: int) -> vit.VisionTransformer:
    """The headless distillation student of `config.tinymim` (MAE init, drop-path off in the last block)."""
    overrides = {k: t[k] for k in ("num_layers", "num_heads") if t[k] is not None}
    layers = overrides.get("num_layers") or vit.variant_config(t.student)["num_layers"]
    rates = (float(t.drop_path),) * (layers - 1) + (0.0,)
    return vit.create_vit(t.student, None, last_block_heads=t.last_block_heads or teacher_heads,
                          posemb=t.posemb, init_style="mae", drop_path_rate=rates, dtype=DTYPES[t.dtype],
                          remat_blocks=t.remat, **overrides)


def split_used(params: Any, model: vit.VisionTransformer, image_size: int) -> tuple[dict, dict]:
    """`(used, unused)`: the leaves `model`'s forward pass reads, and the rest."""
    used = set(tree.flatten_params(vit.param_shapes(model, image_size)))
    missing = used - set(tree.flatten_params(params))
    if missing:
        raise ValueError(f"Parameters the model needs are missing: {sorted(missing)[:5]}.")
    flat = tree.flatten_params(params)
    return (tree.unflatten_params({k: v for k, v in flat.items() if k in used}),
            tree.unflatten_params({k: v for k, v in flat.items() if k not in used}))


def export_tree(student: vit.VisionTransformer, params: Any, image_size: int, num_classes: int) -> dict:
    """The student as an AugReg tree: fixed sin-cos `pos_embedding` written out, a zero head added."""
    flat = {k: np.asarray(jax.device_get(v)) for k, v in tree.flatten_params(params).items()}
    key = "Transformer/posembed_input/pos_embedding"
    if key not in flat:
        grid = image_size // student.patch_size
        flat[key] = vit.sincos_posemb_2d(student.hidden_size, grid)
    flat["head/kernel"] = np.zeros((student.hidden_size, num_classes), np.float32)
    flat["head/bias"] = np.zeros((num_classes,), np.float32)
    return tree.unflatten_params(flat)


# ----------------------------------------------------------------------------- the objective

@dataclasses.dataclass
class Objective:
    """The pieces of one target's loss; `loss_fn(train)` has the train-step contract."""
    spec: RunSpec
    student: vit.VisionTransformer     # as run in the step (truncated for relations)
    teacher: vit.VisionTransformer     # as run in the step (truncated for relations)
    teacher_width: int
    jitter: float

    def teacher_targets(self, teacher_params, images):
        """The teacher's side of the loss: q/k/v of its relation block, last-layer CLS, or last-block tokens."""
        images = images.astype(self.teacher.dtype)
        if self.spec.target == "relation":
            _, state = self.teacher.apply({"params": teacher_params}, images, mutable=["qkv"])
            got = vit.collect_intermediates(state)
            return {n: got[n][-1] for n in ("query", "key", "value")}
        _, state = self.teacher.apply({"params": teacher_params}, images, mutable=["tokens"])
        got = vit.collect_intermediates(state)
        return got["encoded"][:, 0] if self.spec.target == "cls" else got["tokens"][-1]

    def loss_fn(self, train: bool):
        projection = nn.Dense(self.teacher_width)

        def loss_fn(params, frozen, batch_stats, batch, rng):
            images = batch["image"]
            jitter_rng, dropout_rng = jax.random.split(rng)
            targets = jax.lax.stop_gradient(self.teacher_targets(frozen["teacher"], images))
            student_images = color_jitter.color_jitter(jitter_rng, images, self.jitter) if train else images
            student_params = surgery.merge_partitions(params["student"], frozen["student"])
            kwargs = dict(train=train, rngs={"dropout": dropout_rng})
            if self.spec.target == "relation":
                _, state = self.student.apply({"params": student_params}, student_images, mutable=["qkv"], **kwargs)
                got = vit.collect_intermediates(state)
                loss, metrics = relation_losses.relation_loss(
                    {n: got[n][-1] for n in ("query", "key", "value")}, targets)
            else:
                _, state = self.student.apply({"params": student_params}, student_images, mutable=["tokens"],
                                              **kwargs)
                encoded = vit.collect_intermediates(state)["encoded"]
                if self.spec.target == "cls":
                    loss = relation_losses.cls_loss(projection.apply({"params": params["projection"]},
                                                                     encoded[:, 0]), targets)
                else:
                    loss = relation_losses.feature_loss(projection.apply({"params": params["projection"]},
                                                                         encoded), targets)
                metrics = {}
            return loss, {"batch_stats": batch_stats, "metrics": metrics}
        return loss_fn

    def init_projection(self, rng, student_width: int) -> dict:
        if self.spec.target == "relation":
            return {}
        return nn.Dense(self.teacher_width).init(rng, jnp.zeros((1, student_width)))["params"]


# ----------------------------------------------------------------------------- relation_distill

def distill_lr(t) -> float:
    """`tinymim.lr`, or blr * batch / 256 (MAE's rule) when it is None."""
    return float(t.lr) if t.lr is not None else float(t.blr) * t.batch_size / 256


def make_distill_tx(t):
    """AdamW (0.9, adam_b2) with decoupled wd on kernels, linear warmup then cosine."""
    warmup = common.warmup_steps(t.warmup_steps, t.steps, default_fraction=0.05)
    schedule = optim.warmup_cosine_schedule(distill_lr(t), t.steps, warmup)
    return optim.make_optimizer(learning_rate=schedule, weight_decay=t.weight_decay,
                                grad_clip_norm=t.grad_clip_norm or None, optimizer="adam", adam_betas=(0.9, t.adam_b2))


@dataclasses.dataclass
class DistillSetup:
    """The teacher, the student and the data every run of the stage shares."""
    ctx: common.RunContext

    @functools.cached_property
    def teacher(self) -> tuple[vit.VisionTransformer, Any]:
        model, params, _ = handoff.load_frozen_teacher(self.ctx)
        return model, params

    @functools.cached_property
    def student(self) -> vit.VisionTransformer:
        t = self.ctx.config.tinymim
        try:
            model = student_model(t, self.teacher[0].num_heads)
        except ValueError as e:
            raise errors.UserError(f"config.tinymim: {e}") from None
        teacher = self.teacher[0]
        if model.patch_size != teacher.patch_size:
            raise errors.UserError(
                f"config.tinymim.student {t.student!r} has patch size {model.patch_size} but the teacher "
                f"({self.ctx.config.teacher.checkpoint}) has {teacher.patch_size}: relations need the same tokens.")
        if model.num_layers > teacher.num_layers:
            raise errors.UserError(
                f"config.tinymim.num_layers: the student ({model.num_layers} blocks) is deeper than the teacher "
                f"({self.ctx.config.teacher.checkpoint}, {teacher.num_layers} blocks); TinyMIM distils a smaller "
                "student: set config.tinymim.num_layers (or a smaller config.tinymim.student).")
        return model

    @functools.cached_property
    def student_init(self) -> Any:
        size = self.ctx.config.data.image_size
        return jax.jit(self.student.init)(self.ctx.rng("tinymim", "student-init"),
                                          jnp.zeros((1, size, size, 3)))["params"]

    @functools.cached_property
    def eval_batches(self) -> list[dict]:
        """The first `tinymim.eval_batches` complete eval batches (fixed images for the loss curve)."""
        t = self.ctx.config.tinymim
        batches = []
        for batch in common.eval_data(self.ctx, t.batch_size):
            if float(batch["mask"].min()) < 1.0:
                continue
            batches.append({"image": batch["image"]})
            if len(batches) == t.eval_batches:
                break
        return batches

    def specs(self) -> list[RunSpec]:
        return run_specs(self.ctx.config.tinymim, teacher_layers=self.teacher[0].num_layers,
                         student_layers=self.student.num_layers)

    def objective(self, spec: RunSpec) -> Objective:
        return build_objective(self.ctx.config.tinymim, self.teacher[0], self.student, spec)


def build_objective(t, teacher: vit.VisionTransformer, student: vit.VisionTransformer, spec: RunSpec) -> Objective:
    """The loss of run `spec` for `config.tinymim` (teacher and student truncated where relations end)."""
    width = teacher.hidden_size
    if spec.target == "relation":
        teacher = teacher.clone(qkv_only_block=spec.teacher_block - 1)
        student = student.clone(qkv_only_block=student.num_layers - 1)
        last_heads = student.last_block_heads or student.num_heads
        if last_heads != teacher.num_heads:
            raise errors.UserError(
                f"config.tinymim.last_block_heads is {last_heads} but the teacher has {teacher.num_heads} "
                "heads: the student's last-block relations must have the teacher's shape "
                "[batch, heads, tokens, tokens]; leave it None (= the teacher's).")
    else:  # last-layer tokens: no head
        teacher = teacher.clone(num_classes=None)
    return Objective(spec, student, teacher, width, float(t.color_jitter))


def distill_step(t, objective: Objective, student_init: Any, teacher_params: Any, *, image_size: int,
                 rng: jax.Array, projection_rng: jax.Array) -> tuple[state_lib.TrainState, Any, Any]:
    """A run's train step (not yet pmapped) with `config.tinymim`'s optimizer, its initial state, and the
    student's leaves the objective never reads (frozen; merged back at export)."""
    teacher_used, _ = split_used(teacher_params, objective.teacher, image_size)
    student_trained, student_frozen = split_used(student_init, objective.student, image_size)
    params = {"student": student_trained,
              "projection": objective.init_projection(projection_rng, objective.student.hidden_size)}
    tx = make_distill_tx(t)
    state = state_lib.create_train_state(params, tx, rng=rng, frozen={"teacher": teacher_used,
                                                                       "student": student_frozen})
    return state, step_lib.make_train_step(objective.loss_fn(train=True), tx), student_frozen


def _eval_loss_fn(objective: Objective):
    loss_fn = objective.loss_fn(train=False)

    def eval_step(state, batch):
        loss, aux = loss_fn(state.params, state.frozen, state.batch_stats, batch, jax.random.PRNGKey(0))
        return jax.lax.pmean({"distill_loss": loss, **aux["metrics"]}, "batch")
    return jax.pmap(eval_step, axis_name="batch")


def _evaluate(eval_step, replicated_state, batches) -> dict:
    values = [jax.device_get(eval_step(replicated_state, b)) for b in batches]
    return {k: float(np.mean([np.asarray(v[k])[0] for v in values])) for k in values[0]}


def distill_run(setup: DistillSetup, spec: RunSpec) -> dict:
    """Distils one student for one target; resumable; exports `tinymim/<name>/student.npz`."""
    ctx = setup.ctx
    t = ctx.config.tinymim
    run_dir = handoff.tinymim_run_dir(ctx, spec.name)

    def body(sub: runs.SubRun) -> dict:
        size = ctx.config.data.image_size
        objective = setup.objective(spec)
        state, step, student_frozen = distill_step(
            t, objective, setup.student_init, setup.teacher[1], image_size=size, rng=ctx.rng("tinymim", spec.name),
            projection_rng=ctx.rng("tinymim", spec.name, "projection"))
        step_fn = step_lib.pmap_train_step(step)
        eval_step = _eval_loss_fn(objective)
        batches = setup.eval_batches
        evaluate = (lambda s: _evaluate(eval_step, s, batches)) if batches else None
        initial = _evaluate(eval_step, devices.replicate(state), batches) if batches else {}
        make_iter = common.train_iterator_factory(ctx, t.batch_size, seed=ctx.config.seed)
        final, history = sub.train(state, step_fn, loop_config=common.loop_config(sub.name, t, t.steps),
                                   make_train_iterator=make_iter, evaluate=evaluate)
        student_params = surgery.merge_partitions(final.params["student"], student_frozen)
        out = os.path.join(run_dir, "student.npz")
        common.save_vit(ctx, out, export_tree(setup.student, student_params, size, ctx.num_classes), setup.student)
        return sub.commit({
            "name": spec.name, "target": spec.target, "teacher_block": spec.teacher_block,
            "teacher_layers": setup.teacher[0].num_layers, "student": t.student,
            "paper_only": spec.target in PAPER_ONLY_TARGETS, "steps": t.steps, "lr": distill_lr(t),
            "initial": initial, "final": history[-1] if history else {}, "history": history,
            "trained_params": tree.param_count(final.params), "student_checkpoint": out},
            metrics=("final",) if batches else ())

    return runs.resumable(ctx, f"relation_distill/{spec.name}", run_dir, body)


def distill_table(runs_: list[dict]) -> str:
    """Markdown: one row per distillation run (target, teacher block, loss on the fixed eval batches)."""
    lines = ["| student | target | teacher block | trained params | distill loss (init -> final) |",
             "|---|---|---|---|---|"]
    for r in runs_:
        block = "-" if r.get("teacher_block") is None else f"{r['teacher_block']} of {r['teacher_layers']}"
        loss = (f"{r['initial']['distill_loss']:.4f} -> {r['final']['distill_loss']:.4f}"
                if r.get("initial") and r.get("final") else "-")
        lines.append(f"| {r['name']} | {r['target']} | {block} | {r['trained_params']:,} | {loss} |")
    return "\n".join(lines)


def relation_distill(ctx: common.RunContext) -> stages.StageOutput:
    """The `relation_distill` stage: every run of `tinymim.target` + `tinymim.compare`."""
    setup = DistillSetup(ctx)
    runs_ = [distill_run(setup, spec) for spec in setup.specs()]
    return stages.StageOutput({"runs": runs_}, distill_table(runs_))


# ----------------------------------------------------------------------------- finetune_student

def finetune_drop_path(rate: float, num_layers: int) -> tuple[float, ...]:
    """timm's stochastic-depth rule for fine-tuning: linearly from 0 to `rate` over the blocks."""
    return tuple(float(r) for r in np.linspace(0.0, rate, num_layers))


def scratch_checkpoint(ctx: common.RunContext, setup: DistillSetup) -> str:
    """The scratch student: the distillation students' architecture and init, saved like them."""
    path = os.path.join(handoff.tinymim_run_dir(ctx, SCRATCH), "student.npz")
    if not files.exists(path):
        common.save_vit(ctx, path, export_tree(setup.student, setup.student_init, ctx.config.data.image_size,
                                               ctx.num_classes), setup.student)
    # Process 0 wrote it; every host reads it.
    multihost_utils.sync_global_devices("finetune_student: scratch student written")
    return path


def finetune_one(ctx: common.RunContext, name: str, checkpoint: str) -> dict:
    """Fine-tunes one student npz (the classifier machinery of `train.vit_finetune`); resumable."""
    f = ctx.config.student_finetune

    def body(sub: runs.SubRun) -> dict:
        size = ctx.config.data.image_size
        ckpt = checkpoints.read_vit(checkpoint)
        model = checkpoints.build_vit(
            ckpt, num_classes=ctx.num_classes, dtype=DTYPES[f.dtype], remat_blocks=f.remat,
            drop_path_rate=finetune_drop_path(f.drop_path, ckpt.architecture["num_layers"]))
        params = checkpoints.load_into(model, ckpt, image_size=size)
        setup = vit_finetune.setup_finetune(model, params, "full", ctx.rng("finetune_student", "surgery"),
                                            image_size=size)
        # One seed name for every student: the same data order and dropout keys for all rows.
        _, history = vit_finetune.train_classifier(sub, setup, f, steps=f.steps, sam_rho=0.0,
                                                   sync_perturbations=False, accum_steps=1,
                                                   seed_name="finetune_student")
        return sub.commit({"name": name, "checkpoint": checkpoint, "eval": history[-1], "eval_history": history},
                          metrics=("eval",))

    return runs.resumable(ctx, f"finetune_student/{name}", ctx.path(handoff.TINYMIM_FINETUNE_DIR, name), body)


TEACHER_ROW = "teacher"


def teacher_evaluation(ctx: common.RunContext, setup: DistillSetup) -> Optional[dict]:
    """The frozen teacher's own metrics on the eval split (resumable), or None when its head does not
    classify the dataset's classes (e.g. an ImageNet head on another dataset)."""
    model, params = setup.teacher
    if model.num_classes != ctx.num_classes:
        logging.info("finetune_student: the teacher's head has %s classes, the dataset %d: no teacher row.",
                     model.num_classes, ctx.num_classes)
        return None
    f = ctx.config.student_finetune

    def body(sub: runs.SubRun) -> dict:
        evaluator = common.make_evaluator(lambda v, x: model.apply(v, x), lambda p: {"params": p}, ctx, f.batch_size)
        return sub.commit({"name": TEACHER_ROW, "checkpoint": handoff.teacher_checkpoint_path(ctx),
                           "eval": evaluator(devices.replicate(params))}, metrics=("eval",))

    return runs.resumable(ctx, f"finetune_student/{TEACHER_ROW}", ctx.path(handoff.TINYMIM_FINETUNE_DIR, TEACHER_ROW),
                          body)["eval"]


def results_table(rows: list[dict], metric: str) -> str:
    """Markdown: run, target, teacher block, distillation loss before/after, fine-tuned metric."""
    lines = [f"| student | target | teacher block | distill loss (init -> final) | fine-tuned {metric} |",
             "|---|---|---|---|---|"]
    for r in rows:
        target = r["target"] + (" (paper's description, not released code)" if r.get("paper_only") else "")
        block = "-" if r.get("teacher_block") is None else f"{r['teacher_block']} of {r['teacher_layers']}"
        loss = "-"
        if r.get("initial") and r.get("final"):
            loss = f"{r['initial']['distill_loss']:.4f} -> {r['final']['distill_loss']:.4f}"
        lines.append(f"| {r['name']} | {target} | {block} | {loss} | {metrics.format_accuracy(r['finetune'], metric)} |")
    return "\n".join(lines + ["", metrics.STANDARD_ERROR_NOTE])


def finetune_student(ctx: common.RunContext) -> stages.StageOutput:
    """The `finetune_student` stage: every distilled student, then the scratch baseline."""
    distilled = []
    setup = DistillSetup(ctx)
    for spec in setup.specs():
        summary = handoff.tinymim_student(ctx, spec.name)
        if summary is None:
            raise errors.UserError(
                f"No distilled student {spec.name!r} in {ctx.path(handoff.TINYMIM_DIR)}; run the 'relation_distill' "
                "stage first (put it before 'finetune_student' in config.stages).")
        distilled.append(summary)
    rows = []
    for summary in distilled:
        rows.append({**{k: summary[k] for k in ("name", "target", "teacher_block", "teacher_layers", "paper_only",
                                                 "initial", "final")},
                     "finetune": finetune_one(ctx, summary["name"], summary["student_checkpoint"])["eval"]})
    if ctx.config.student_finetune.scratch_baseline:
        result = finetune_one(ctx, SCRATCH, scratch_checkpoint(ctx, setup))
        rows.append({"name": SCRATCH, "target": SCRATCH, "teacher_block": None, "paper_only": False,
                     "finetune": result["eval"]})
    teacher_eval = teacher_evaluation(ctx, setup)
    if teacher_eval is not None:
        rows.insert(0, {"name": TEACHER_ROW, "target": "- (the frozen teacher itself, not fine-tuned)",
                        "teacher_block": None, "paper_only": False, "finetune": teacher_eval})
    metric = ctx.metric
    table = results_table(rows, metric)
    if common.is_chief():
        print(table)
    return stages.StageOutput({"rows": rows, "metric": metric}, table)


def validate_tinymim(config) -> None:
    """config.tinymim (read by relation_distill, and by finetune_student for its run list)."""
    t = config.tinymim
    for name in ("steps", "batch_size", "eval_batches"):
        cv.positive_int(config, f"tinymim.{name}")
    try:
        vit.variant_config(t.student)
    except ValueError as e:
        raise errors.UserError(f"config.tinymim.student: {e}") from None
    for name in ("num_layers", "num_heads", "last_block_heads"):
        cv.optional_positive_int(config, f"tinymim.{name}", "the default")
    cv.image_size_fits_patches(config, vit.variant_config(t.student)["patch_size"], f"tinymim.student={t.student!r}")
    cv.one_of("tinymim.posemb", t.posemb, vit.POSEMB_KINDS)
    cv.check(0.0 <= t.drop_path < 1.0, "tinymim.drop_path", "in [0, 1)", t.drop_path)
    cv.one_of("tinymim.target", t.target, TARGETS)
    cv.optional_positive_int(config, "tinymim.teacher_block", "floor(0.75 L_t) if the teacher is deeper, else the last")
    cv.check(t.teacher_block is None or t.target == "relation", "tinymim.teacher_block",
             f"None when tinymim.target is {t.target!r} (cls and feature use the last layer)", t.teacher_block)
    cv.check(isinstance(t.compare, (tuple, list)) and all(isinstance(e, str) for e in t.compare), "tinymim.compare",
             "a tuple of 'relation@last', 'relation@<block>', 'cls', 'feature'", t.compare)
    for entry in t.compare:  # block numbers are checked against the teacher's depth when it is loaded
        parse_run(entry, teacher_layers=10**6, student_layers=0, field="tinymim.compare")
    cv.check(t.blr > 0, "tinymim.blr", "> 0", t.blr)
    cv.check(t.lr is None or t.lr > 0, "tinymim.lr", "None (blr * batch_size / 256) or > 0", t.lr)
    cv.warmup(config, "tinymim", "5% of steps")
    cv.cadence(config, "tinymim")
    cv.check(t.weight_decay >= 0, "tinymim.weight_decay", ">= 0", t.weight_decay)
    cv.check(0.0 <= t.adam_b2 < 1.0, "tinymim.adam_b2", "in [0, 1)", t.adam_b2)
    cv.check(t.grad_clip_norm >= 0, "tinymim.grad_clip_norm", ">= 0 (0: no clipping)", t.grad_clip_norm)
    cv.check(0.0 <= t.color_jitter < 1.0, "tinymim.color_jitter", "in [0, 1)", t.color_jitter)
    cv.one_of("tinymim.dtype", t.dtype, DTYPES)
    cv.check(isinstance(t.remat, bool), "tinymim.remat", "True or False", t.remat)


def validate_student_finetune(config) -> None:
    validate_tinymim(config)
    f = config.student_finetune
    for name in ("steps", "batch_size"):
        cv.positive_int(config, f"student_finetune.{name}")
    cv.one_of("student_finetune.optimizer", f.optimizer, optim.OPTIMIZERS)
    cv.check(f.lr > 0, "student_finetune.lr", "> 0", f.lr)
    cv.check(0.0 <= f.adam_b2 < 1.0, "student_finetune.adam_b2", "in [0, 1)", f.adam_b2)
    cv.check(f.weight_decay >= 0, "student_finetune.weight_decay", ">= 0", f.weight_decay)
    cv.warmup(config, "student_finetune", "min(500, 10% of steps)")
    cv.cadence(config, "student_finetune")
    cv.check(0.0 <= f.momentum < 1.0, "student_finetune.momentum", "in [0, 1)", f.momentum)
    cv.check(f.grad_clip_norm >= 0, "student_finetune.grad_clip_norm", ">= 0 (0: no clipping)", f.grad_clip_norm)
    cv.check(0.0 <= f.drop_path < 1.0, "student_finetune.drop_path", "in [0, 1)", f.drop_path)
    cv.check(0.0 < f.layer_decay <= 1.0, "student_finetune.layer_decay", "in (0, 1] (1: off)", f.layer_decay)
    cv.one_of("student_finetune.dtype", f.dtype, DTYPES)
    cv.check(isinstance(f.remat, bool), "student_finetune.remat", "True or False", f.remat)


def compared_distill(results: dict) -> list[seeds.Compared]:
    return [seeds.Compared(r["name"], "distill loss at the end", r["final"]["distill_loss"], accuracy=False)
            for r in results["runs"] if r.get("final")]


def compared_finetune(results: dict) -> list[seeds.Compared]:
    metric = results["metric"]
    return [seeds.Compared(r["name"], f"fine-tuned {metric}", r["finetune"][metric]) for r in results["rows"]]


STAGES = (
    stages.Stage("relation_distill", folder=handoff.TINYMIM_DIR, section="tinymim", run=relation_distill,
                 validate=validate_tinymim, global_batches=("tinymim.batch_size",), reads=("teacher.checkpoint", "teacher.dtype"),
                 needs=(stages.Need("pretrain_teacher", "the teacher npz (config.teacher.checkpoint='pretrain')",
                                    handoff.uses_pretrained_teacher),),
                 outputs="`<target>/student.npz` (an AugReg npz), `scratch/student.npz`", compared=compared_distill),
    # It re-reads config.tinymim for the run list and the scratch student's architecture.
    stages.Stage("finetune_student", folder=handoff.TINYMIM_FINETUNE_DIR, section="student_finetune",
                 run=finetune_student, validate=validate_student_finetune, reads=("tinymim.",),
                 global_batches=("student_finetune.batch_size",),
                 needs=(stages.Need("relation_distill", "the distilled students"),),
                 outputs="`<student>/summary.json` (fine-tuned accuracy)", compared=compared_finetune),
)
