"""Start-up validation of a run config; every error names the field, the expected and the actual value.

The allowed values of a field are owned by the module that implements them (modes in `surgery`,
methods in `train.distill`, students in `models.students`, ...); this module only reads them.
"""
from __future__ import annotations

from typing import Iterable, Optional

import ml_collections

from remem_jax import export, optim, surgery
from remem_jax.analysis import pruning as analysis_pruning
from remem_jax.analysis import stage as analysis_stage
from remem_jax.data import registry
from remem_jax.dtypes import DTYPES
from remem_jax.errors import UserError
from remem_jax.models import students, vit
from remem_jax.train import distill, teacher, tinymim, wecolora


def _check(condition: bool, field: str, expected: str, value, detail: Optional[str] = None) -> None:
    if not condition:
        raise UserError(f"config.{field} must be {expected}, got {value!r}" + (f"; {detail}." if detail else "."))


def _one_of(field: str, value, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    _check(value in allowed, field, f"one of {', '.join(allowed)}", value)


def _get(c, field):
    node = c
    for part in field.split("."):
        node = node[part]
    return node


def _positive_int(c, field):
    value = _get(c, field)
    _check(isinstance(value, int) and value > 0, field, "a positive integer", value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_positive_int(c, field, default: str):
    value = _get(c, field)
    _check(value is None or (_is_int(value) and value > 0), field, f"None ({default}) or a positive integer", value)


def _warmup(c, section, default: str):
    s = c[section]
    w = s.warmup_steps
    _check(w is None or (_is_int(w) and 0 <= w < s.steps), f"{section}.warmup_steps",
           f"None ({default}) or an integer in [0, {section}.steps={s.steps})", w)


def _cadence(c, section):
    """log_every > 0; eval_every and checkpoint_every >= 0 (0: only kept steps and the end)."""
    _positive_int(c, f"{section}.log_every")
    for name in ("eval_every", "checkpoint_every"):
        value = c[section][name]
        _check(_is_int(value) and value >= 0, f"{section}.{name}", "an integer >= 0 (0: only kept steps and the end)",
               value)


def _keep_steps(f) -> None:
    keep = tuple(f.keep_steps)
    _check(all(isinstance(s, int) and s > 0 for s in keep), "finetune.keep_steps", "positive step numbers", f.keep_steps)
    too_late = [s for s in keep if s > f.steps]
    _check(not too_late, "finetune.keep_steps", f"step numbers <= finetune.steps ({f.steps})", f.keep_steps,
           f"{too_late} would never be reached")


# Registry kinds whose data is wherever the user says: the fields that must say it.
_REQUIRED_DATA_PATHS = {
    "image_folder": {"image_folder": "a folder holding train/<class>/*.jpg and test/<class>/*.jpg"},
    "imagenet_lt": {"imagenet_lt_train_list": "the path of ImageNet_LT_train.txt",
                    "imagenet_lt_eval_list": "the path of ImageNet_LT_val.txt or ImageNet_LT_test.txt"},
}


def _dataset(config) -> None:
    spec = registry.get_spec(config.dataset)  # UnknownDatasetError names the known datasets.
    required = dict(_REQUIRED_DATA_PATHS.get(spec.kind, {}))
    if config.data.validation_percent:  # eval is held out of the train list: no eval list is read
        required.pop("imagenet_lt_eval_list", None)
    for name, expected in required.items():
        value = config.data[name]
        _check(bool(value), f"data.{name}", f"{expected} (dataset {config.dataset!r})", value)


def validate(config: ml_collections.ConfigDict, stage_names) -> None:
    """Raises UserError for the first invalid field of `config` (UnknownDatasetError for config.dataset)."""
    stages = tuple(config.stages)
    _check(len(stages) > 0, "stages", "a non-empty list of stages", config.stages)
    for s in stages:
        _check(s in stage_names, "stages", f"a list of {sorted(stage_names)}", s)
    _dataset(config)
    _check(isinstance(config.data.image_size, int) and config.data.image_size > 0, "data.image_size",
           "a positive integer", config.data.image_size)
    _check(0 <= config.data.validation_percent < 100, "data.validation_percent", "in [0, 100)",
           config.data.validation_percent)
    data = config.data
    _check(data.few_shot_fraction is None or 0.0 < data.few_shot_fraction <= 1.0, "data.few_shot_fraction",
           "None (whole train split) or in (0, 1]", data.few_shot_fraction)
    _optional_positive_int(config, "data.few_shot_per_class", "off")
    _check(data.few_shot_fraction is None or data.few_shot_per_class is None, "data.few_shot_per_class",
           f"None when data.few_shot_fraction is set ({data.few_shot_fraction})", data.few_shot_per_class)
    _optional_positive_int(config, "data.num_parallel_calls", "tf.data.AUTOTUNE")
    _one_of("data.image_folder_metric", config.data.image_folder_metric, registry.METRICS)

    if "pretrain_teacher" in stages:
        p = config.pretrain
        for f in ("steps", "batch_size"):
            _positive_int(config, f"pretrain.{f}")
        try:
            vit.variant_config(p.variant)
        except ValueError as e:
            raise UserError(f"config.pretrain.variant: {e}") from None
        _optional_positive_int(config, "pretrain.num_layers", "the variant's depth")
        _check(p.lr > 0, "pretrain.lr", "> 0", p.lr)
        _warmup(config, "pretrain", "min(500, 10% of steps)")
        _cadence(config, "pretrain")
        _one_of("pretrain.optimizer", p.optimizer, optim.OPTIMIZERS)
        _one_of("pretrain.dtype", p.dtype, DTYPES)
        _check(isinstance(p.remat, bool), "pretrain.remat", "True or False", p.remat)

    if "finetune_teacher" in stages:
        f = config.finetune
        for name in ("steps", "batch_size", "accum_steps"):
            _positive_int(config, f"finetune.{name}")
        _check(f.lr > 0, "finetune.lr", "> 0", f.lr)
        _warmup(config, "finetune", "min(500, 10% of steps)")
        _cadence(config, "finetune")
        _check(0.0 <= f.sam_rho <= 10.0, "finetune.sam_rho", "in [0, 10] (paper: 0.005, 0.05, 0.5)", f.sam_rho)
        _check(0.0 < f.mlp_alpha <= 2.0, "finetune.mlp_alpha", "in (0, 2] (1 = pretrained)", f.mlp_alpha)
        _check(0.0 < f.attn_beta <= 2.0, "finetune.attn_beta", "in (0, 2] (1 = pretrained)", f.attn_beta)
        _one_of("finetune.residual_mode", f.residual_mode, vit.RESIDUAL_MODES)
        _one_of("finetune.mode", f.mode, surgery.TRAINABLE_MODES)
        _check(len(f.settings) > 0 and all(s in teacher.SETTINGS for s in f.settings),
               "finetune.settings", f"a non-empty list of {', '.join(teacher.SETTINGS)}", f.settings)
        _keep_steps(f)
        _check(f.lora_rank > 0, "finetune.lora_rank", "a positive integer", f.lora_rank)
        _one_of("finetune.lora_targets", f.lora_targets, surgery.LORA_PRESETS)
        _check(f.adapter_reduction > 0, "finetune.adapter_reduction", "a positive integer", f.adapter_reduction)
        _one_of("finetune.dtype", f.dtype, DTYPES)
        _check(isinstance(f.remat, bool), "finetune.remat", "True or False", f.remat)
        _check(0.0 <= f.momentum < 1.0, "finetune.momentum", "in [0, 1)", f.momentum)
        _check(f.batch_size % f.accum_steps == 0, "finetune.accum_steps",
               f"a divisor of finetune.batch_size ({f.batch_size})", f.accum_steps)

    if "distill_student" in stages:
        d = config.distill
        for name in ("steps", "batch_size"):
            _positive_int(config, f"distill.{name}")
        _one_of("distill.student", d.student, students.STUDENTS)
        _check(d.lr > 0, "distill.lr", "> 0", d.lr)
        _warmup(config, "distill", "5% of steps")
        _cadence(config, "distill")
        _one_of("distill.method", d.method, distill.METHODS)
        _check(d.temperature > 0, "distill.temperature", "> 0", d.temperature)
        _check(0.0 <= d.kd_weight <= 1.0, "distill.kd_weight", "in [0, 1]", d.kd_weight)
        _check(d.mixup_alpha is None or d.mixup_alpha >= 0, "distill.mixup_alpha",
               f"None ({distill.PATIENT_MIXUP_ALPHA} for patient, 0 for kd/dist) or >= 0 (0: off)", d.mixup_alpha)
        _one_of("distill.teachers", d.teachers, distill.TEACHER_SELECTIONS)
        _one_of("distill.dtype", d.dtype, DTYPES)
        _check(isinstance(d.export_formats, (tuple, list)) and all(f in export.FORMATS for f in d.export_formats),
               "distill.export_formats", f"a tuple of {', '.join(export.FORMATS)} (() for none)", d.export_formats)
    if "fewshot_distill" in stages:
        w = config.wecolora
        for name in ("d", "lora_rank", "epochs", "batch_size", "accum_steps"):
            _positive_int(config, f"wecolora.{name}")
        _check(_is_int(w.warmup_epochs) and 0 <= w.warmup_epochs < w.epochs, "wecolora.warmup_epochs",
               f"an integer in [0, wecolora.epochs={w.epochs})", w.warmup_epochs)
        _check(len(w.variants) > 0 and all(v in wecolora.VARIANTS for v in w.variants), "wecolora.variants",
               f"a non-empty list of {', '.join(wecolora.VARIANTS)}", w.variants)
        _check(len(set(w.variants)) == len(w.variants), "wecolora.variants", "a list without repeats", w.variants)
        _check(w.blr > 0, "wecolora.blr", "> 0", w.blr)
        _check(w.weight_decay >= 0, "wecolora.weight_decay", ">= 0", w.weight_decay)
        _check(len(w.adam_betas) == 2 and all(0 <= b < 1 for b in w.adam_betas), "wecolora.adam_betas",
               "two numbers in [0, 1)", w.adam_betas)
        _check(w.batch_size % w.accum_steps == 0, "wecolora.accum_steps",
               f"a divisor of wecolora.batch_size ({w.batch_size})", w.accum_steps)
        _one_of("wecolora.dtype", w.dtype, DTYPES)
        _check(isinstance(w.remat, bool), "wecolora.remat", "True or False", w.remat)
        _positive_int(config, "wecolora.log_every")
        _check(_is_int(w.checkpoint_every) and w.checkpoint_every >= 0, "wecolora.checkpoint_every",
               "an integer >= 0 (0: only at the end)", w.checkpoint_every)

    if "linear_probe" in stages:
        lp = config.linear_probe
        for name in ("epochs", "batch_size", "log_every"):
            _positive_int(config, f"linear_probe.{name}")
        _check(_is_int(lp.warmup_epochs) and 0 <= lp.warmup_epochs < lp.epochs, "linear_probe.warmup_epochs",
               f"an integer in [0, linear_probe.epochs={lp.epochs})", lp.warmup_epochs)
        _check(lp.blr > 0, "linear_probe.blr", "> 0", lp.blr)
        _check(0.0 <= lp.momentum < 1.0, "linear_probe.momentum", "in [0, 1)", lp.momentum)
        _check(lp.trust_coefficient > 0, "linear_probe.trust_coefficient", "> 0", lp.trust_coefficient)
        _check(lp.weight_decay >= 0, "linear_probe.weight_decay", ">= 0", lp.weight_decay)
        _check(lp.train_fraction is None or 0.0 < lp.train_fraction <= 1.0, "linear_probe.train_fraction",
               "None (whole train split) or in (0, 1]", lp.train_fraction)
        _check(_is_int(lp.checkpoint_every) and lp.checkpoint_every >= 0, "linear_probe.checkpoint_every",
               "an integer >= 0 (0: only at the end)", lp.checkpoint_every)
    if "relation_distill" in stages or "finetune_student" in stages:
        _validate_tinymim(config)
    if "finetune_student" in stages:
        _validate_student_finetune(config)
    if "analyze" in stages:
        _analysis(config)
    _one_of("teacher.dtype", config.teacher.dtype, DTYPES)


def _validate_tinymim(config) -> None:
    """config.tinymim (read by relation_distill, and by finetune_student for its run list)."""
    t = config.tinymim
    for name in ("steps", "batch_size", "eval_batches"):
        _positive_int(config, f"tinymim.{name}")
    try:
        vit.variant_config(t.student)
    except ValueError as e:
        raise UserError(f"config.tinymim.student: {e}") from None
    for name in ("num_layers", "num_heads", "last_block_heads"):
        _optional_positive_int(config, f"tinymim.{name}", "the default")
    _one_of("tinymim.posemb", t.posemb, vit.POSEMB_KINDS)
    _check(0.0 <= t.drop_path < 1.0, "tinymim.drop_path", "in [0, 1)", t.drop_path)
    _one_of("tinymim.target", t.target, tinymim.TARGETS)
    _optional_positive_int(config, "tinymim.teacher_block", "floor(0.75 L_t) if the teacher is deeper, else the last")
    _check(t.teacher_block is None or t.target == "relation", "tinymim.teacher_block",
           f"None when tinymim.target is {t.target!r} (cls and feature use the last layer)", t.teacher_block)
    _check(isinstance(t.compare, (tuple, list)) and all(isinstance(e, str) for e in t.compare), "tinymim.compare",
           "a tuple of 'relation@last', 'relation@<block>', 'cls', 'feature'", t.compare)
    for entry in t.compare:  # block numbers are checked against the teacher's depth when it is loaded
        tinymim.parse_run(entry, teacher_layers=10**6, student_layers=0, field="tinymim.compare")
    _check(t.blr > 0, "tinymim.blr", "> 0", t.blr)
    _check(t.lr is None or t.lr > 0, "tinymim.lr", "None (blr * batch_size / 256) or > 0", t.lr)
    _warmup(config, "tinymim", "5% of steps")
    _cadence(config, "tinymim")
    _check(t.weight_decay >= 0, "tinymim.weight_decay", ">= 0", t.weight_decay)
    _check(0.0 <= t.adam_b2 < 1.0, "tinymim.adam_b2", "in [0, 1)", t.adam_b2)
    _check(t.grad_clip_norm >= 0, "tinymim.grad_clip_norm", ">= 0 (0: no clipping)", t.grad_clip_norm)
    _check(0.0 <= t.color_jitter < 1.0, "tinymim.color_jitter", "in [0, 1)", t.color_jitter)
    _one_of("tinymim.dtype", t.dtype, DTYPES)
    _check(isinstance(t.remat, bool), "tinymim.remat", "True or False", t.remat)


def _validate_student_finetune(config) -> None:
    f = config.student_finetune
    for name in ("steps", "batch_size"):
        _positive_int(config, f"student_finetune.{name}")
    _one_of("student_finetune.optimizer", f.optimizer, optim.OPTIMIZERS)
    _check(f.lr > 0, "student_finetune.lr", "> 0", f.lr)
    _check(0.0 <= f.adam_b2 < 1.0, "student_finetune.adam_b2", "in [0, 1)", f.adam_b2)
    _check(f.weight_decay >= 0, "student_finetune.weight_decay", ">= 0", f.weight_decay)
    _warmup(config, "student_finetune", "min(500, 10% of steps)")
    _cadence(config, "student_finetune")
    _check(0.0 <= f.momentum < 1.0, "student_finetune.momentum", "in [0, 1)", f.momentum)
    _check(f.grad_clip_norm >= 0, "student_finetune.grad_clip_norm", ">= 0 (0: no clipping)", f.grad_clip_norm)
    _check(0.0 <= f.drop_path < 1.0, "student_finetune.drop_path", "in [0, 1)", f.drop_path)
    _check(0.0 < f.layer_decay <= 1.0, "student_finetune.layer_decay", "in (0, 1] (1: off)", f.layer_decay)
    _one_of("student_finetune.dtype", f.dtype, DTYPES)
    _check(isinstance(f.remat, bool), "student_finetune.remat", "True or False", f.remat)


def _analysis(config) -> None:
    a = config.analysis
    tools = [t.strip() for t in str(a.tools).split(",") if t.strip()]
    _check(bool(tools) and all(t in analysis_stage.TOOLS for t in tools), "analysis.tools",
           f"a comma list of {', '.join(analysis_stage.TOOLS)}", a.tools)
    _check(isinstance(a.checkpoints, str), "analysis.checkpoints", "a comma-separated string of npz paths or names "
           "('' = the kept teachers)", a.checkpoints)
    _one_of("analysis.kept_steps", a.kept_steps, analysis_stage.KEPT_SELECTIONS)
    _one_of("analysis.prune_checkpoints", a.prune_checkpoints, analysis_stage.PRUNE_SELECTIONS)
    for name in ("num_images", "num_train_images", "batch_size", "decoder_steps", "decoder_batch_size",
                 "criticality_images", "criticality_chunk", "criticality_top_k", "rollout_images"):
        _positive_int(config, f"analysis.{name}")
    _optional_positive_int(config, "analysis.criticality_max_neurons", "every neuron")
    _check(a.decoder_lr > 0, "analysis.decoder_lr", "> 0", a.decoder_lr)
    _check(a.decoder_weight_decay >= 0, "analysis.decoder_weight_decay", ">= 0", a.decoder_weight_decay)
    _check(len(tuple(a.decoder_channels)) > 0 and all(_is_int(c) and c > 0 for c in a.decoder_channels),
           "analysis.decoder_channels", "a non-empty tuple of positive integers", a.decoder_channels)
    branches = [b.strip() for b in str(a.prune_branches).split(",") if b.strip()]
    _check(bool(branches) and all(b in analysis_pruning.BRANCHES for b in branches), "analysis.prune_branches",
           f"a comma list of {', '.join(analysis_pruning.BRANCHES)}", a.prune_branches)
    for name in ("prune_max_blocks", "prune_finetune_steps"):
        value = a[name]
        _check(_is_int(value) and value >= 0, f"analysis.{name}", "an integer >= 0", value)
    if a.prune_finetune_steps and "pruning" in tools:
        _positive_int(config, "finetune.batch_size")
        _check(config.finetune.lr > 0, "finetune.lr", "> 0 (the pruning sweep's fine-tune uses it)", config.finetune.lr)
