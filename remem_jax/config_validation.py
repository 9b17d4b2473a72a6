"""Start-up validation of a run config; every error names the field, the expected and the actual value."""
from __future__ import annotations

import ml_collections

from remem_jax.errors import UserError


def _check(condition: bool, field: str, expected: str, value) -> None:
    if not condition:
        raise UserError(f"config.{field} must be {expected}, got {value!r}.")


def _positive_int(c, field):
    value = _get(c, field)
    _check(isinstance(value, int) and value > 0, field, "a positive integer", value)


def _get(c, field):
    node = c
    for part in field.split("."):
        node = node[part]
    return node


def _warmup(c, section):
    s = c[section]
    _check(s.warmup_steps == -1 or 0 <= s.warmup_steps < s.steps, f"{section}.warmup_steps",
           f"-1 (default) or in [0, {section}.steps={s.steps})", s.warmup_steps)


def validate(config: ml_collections.ConfigDict, stage_names) -> None:
    """Raises UserError for the first invalid field of `config`."""
    stages = tuple(config.stages)
    _check(len(stages) > 0, "stages", "a non-empty list of stages", config.stages)
    for s in stages:
        _check(s in stage_names, "stages", f"a list of {sorted(stage_names)}", s)
    _check(isinstance(config.data.image_size, int) and config.data.image_size > 0, "data.image_size",
           "a positive integer", config.data.image_size)
    _check(0 <= config.data.validation_percent < 100, "data.validation_percent", "in [0, 100)",
           config.data.validation_percent)
    _check(0.0 <= config.data.few_shot_fraction <= 1.0, "data.few_shot_fraction", "in [0, 1]",
           config.data.few_shot_fraction)

    if "pretrain_teacher" in stages:
        p = config.pretrain
        for f in ("steps", "batch_size"):
            _positive_int(config, f"pretrain.{f}")
        _check(p.lr > 0, "pretrain.lr", "> 0", p.lr)
        _warmup(config, "pretrain")
        _check(p.optimizer in ("sgd", "adam"), "pretrain.optimizer", "'sgd' or 'adam'", p.optimizer)

    if "finetune_teacher" in stages:
        f = config.finetune
        for name in ("steps", "batch_size", "accum_steps"):
            _positive_int(config, f"finetune.{name}")
        _check(f.lr > 0, "finetune.lr", "> 0", f.lr)
        _warmup(config, "finetune")
        _check(0.0 <= f.sam_rho <= 10.0, "finetune.sam_rho", "in [0, 10] (paper: 0.005, 0.05, 0.5)", f.sam_rho)
        _check(0.0 < f.mlp_alpha <= 2.0, "finetune.mlp_alpha", "in (0, 2] (1 = pretrained)", f.mlp_alpha)
        _check(0.0 < f.attn_beta <= 2.0, "finetune.attn_beta", "in (0, 2] (1 = pretrained)", f.attn_beta)
        _check(f.residual_mode in ("two_minus", "inverse"), "finetune.residual_mode",
               "'two_minus' or 'inverse'", f.residual_mode)
        _check(f.mode in ("full", "lora", "adapter", "head"), "finetune.mode",
               "one of full, lora, adapter, head", f.mode)
        _check(len(f.settings) > 0 and all(s in ("remem", "vanilla") for s in f.settings),
               "finetune.settings", "a non-empty list of 'remem', 'vanilla'", f.settings)
        _check(all(isinstance(s, int) and 0 < s for s in f.keep_steps), "finetune.keep_steps",
               "positive step numbers", f.keep_steps)
        _check(f.lora_rank > 0, "finetune.lora_rank", "a positive integer", f.lora_rank)
        _check(f.lora_targets in ("qv", "all"), "finetune.lora_targets", "'qv' or 'all'", f.lora_targets)
        _check(f.adapter_reduction > 0, "finetune.adapter_reduction", "a positive integer", f.adapter_reduction)
        _check(f.dtype in ("float32", "bfloat16"), "finetune.dtype", "'float32' or 'bfloat16'", f.dtype)
        _check(0.0 <= f.momentum < 1.0, "finetune.momentum", "in [0, 1)", f.momentum)
        _check(f.batch_size % f.accum_steps == 0, "finetune.accum_steps",
               f"a divisor of finetune.batch_size ({f.batch_size})", f.accum_steps)

    if "distill_student" in stages:
        d = config.distill
        for name in ("steps", "batch_size"):
            _positive_int(config, f"distill.{name}")
        _check(d.lr > 0, "distill.lr", "> 0", d.lr)
        _warmup(config, "distill")
        _check(d.method in ("kd", "dist", "patient"), "distill.method", "one of kd, dist, patient", d.method)
        _check(d.temperature > 0, "distill.temperature", "> 0", d.temperature)
        _check(0.0 <= d.kd_weight <= 1.0, "distill.kd_weight", "in [0, 1]", d.kd_weight)
        _check(d.mixup_alpha >= 0 or d.mixup_alpha == -1, "distill.mixup_alpha",
               "-1 (the method's default) or >= 0", d.mixup_alpha)
        _check(d.teachers in ("all", "last"), "distill.teachers", "'all' or 'last'", d.teachers)
        _check(d.dtype in ("float32", "bfloat16"), "distill.dtype", "'float32' or 'bfloat16'", d.dtype)
        from remem_jax.export import FORMATS
        _check(all(f in FORMATS for f in d.get("export_formats", ())), "distill.export_formats",
               f"a tuple of {', '.join(FORMATS)} (or () for none)", d.get("export_formats"))
    _check(config.teacher.dtype in ("float32", "bfloat16"), "teacher.dtype", "'float32' or 'bfloat16'",
           config.teacher.dtype)
