"""Start-up validation of a run config; every error names the field, the expected and the actual value.

This module checks the fields every stage reads (`stages`, `dataset`, `data.*`, `teacher.dtype`)
and holds the generic checkers (`check`, `one_of`, `positive_int`, ...). Each stage validates its
own section with them (`Stage.validate` in the stage table), next to the code that owns the
allowed values; `validate` calls the validation of every stage the config lists.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import ml_collections

from remem_jax.data import registry
from remem_jax.dtypes import DTYPES
from remem_jax.errors import UserError


def check(condition: bool, field: str, expected: str, value, detail: Optional[str] = None) -> None:
    if not condition:
        raise UserError(f"config.{field} must be {expected}, got {value!r}" + (f"; {detail}." if detail else "."))


def one_of(field: str, value, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    check(value in allowed, field, f"one of {', '.join(allowed)}", value)


def get(c, field):
    node = c
    for part in field.split("."):
        node = node[part]
    return node


def positive_int(c, field):
    value = get(c, field)
    check(isinstance(value, int) and value > 0, field, "a positive integer", value)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def optional_positive_int(c, field, default: str):
    value = get(c, field)
    check(value is None or (is_int(value) and value > 0), field, f"None ({default}) or a positive integer", value)


def warmup(c, section, default: str):
    s = c[section]
    w = s.warmup_steps
    check(w is None or (is_int(w) and 0 <= w < s.steps), f"{section}.warmup_steps",
          f"None ({default}) or an integer in [0, {section}.steps={s.steps})", w)


def cadence(c, section):
    """log_every > 0; eval_every and checkpoint_every >= 0 (0: only kept steps and the end)."""
    positive_int(c, f"{section}.log_every")
    for name in ("eval_every", "checkpoint_every"):
        value = c[section][name]
        check(is_int(value) and value >= 0, f"{section}.{name}", "an integer >= 0 (0: only kept steps and the end)",
              value)


def image_size_fits_patches(c, patch_size: int, model: str) -> None:
    """data.image_size must be a positive multiple of `patch_size` (the patches tile the image)."""
    size = c.data.image_size
    check(is_int(size) and size >= patch_size and size % patch_size == 0, "data.image_size",
          f"a multiple of the patch size {patch_size} of config.{model}", size)


def global_batches(c, stages: Mapping[str, Any], num_devices: int) -> None:
    """Every global batch of the listed stages splits evenly over the `num_devices` devices of the run."""
    for name in c.stages:
        for field in stages[name].global_batches:
            value = get(c, field)
            check(value % num_devices == 0, field, f"a multiple of the {num_devices} devices of this run (each "
                  "gets an equal share of the global batch)", value)


# Registry kinds whose data is wherever the user says: the fields that must say it.
_REQUIRED_DATA_PATHS = {
    "image_folder": {"image_folder": "a folder holding train/<class>/*.jpg and test/<class>/*.jpg "
                                     "(or val/<class>/*.jpg)"},
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
        check(bool(value), f"data.{name}", f"{expected} (dataset {config.dataset!r})", value)


def validate(config: ml_collections.ConfigDict, stages: Mapping[str, Any]) -> None:
    """Raises UserError for the first invalid field of `config` (UnknownDatasetError for config.dataset).

    Checks the fields every stage reads, then calls the `validate` of each stage `config.stages`
    lists (`stages`: the stage table, `remem_jax.train.stages.table()`).
    """
    listed = tuple(config.stages)
    check(len(listed) > 0, "stages", "a non-empty list of stages", config.stages)
    for s in listed:
        check(s in stages, "stages", f"a list of {sorted(stages)}", s)
    check(len(set(listed)) == len(listed), "stages", "a list without repeats", config.stages)
    _dataset(config)
    positive_int(config, "seeds")
    check(is_int(config.seed) and config.seed >= 0, "seed", "an integer >= 0", config.seed)
    check(isinstance(config.data.image_size, int) and config.data.image_size > 0, "data.image_size",
          "a positive integer", config.data.image_size)
    check(0 <= config.data.validation_percent < 100, "data.validation_percent", "in [0, 100)",
          config.data.validation_percent)
    data = config.data
    check(data.few_shot_fraction is None or 0.0 < data.few_shot_fraction <= 1.0, "data.few_shot_fraction",
          "None (whole train split) or in (0, 1]", data.few_shot_fraction)
    optional_positive_int(config, "data.few_shot_per_class", "off")
    check(data.few_shot_fraction is None or data.few_shot_per_class is None, "data.few_shot_per_class",
          f"None when data.few_shot_fraction is set ({data.few_shot_fraction})", data.few_shot_per_class)
    optional_positive_int(config, "data.num_parallel_calls", "tf.data.AUTOTUNE")
    optional_positive_int(config, "data.eval_examples", "every evaluation uses the whole eval split")
    one_of("data.image_folder_metric", config.data.image_folder_metric, registry.METRICS)

    one_of("teacher.dtype", config.teacher.dtype, DTYPES)
    from remem_jax import export
    formats = config.get("vit_export_formats", ())
    check(isinstance(formats, (tuple, list)) and all(f in export.VIT_FORMATS for f in formats), "vit_export_formats",
          f"a tuple of {', '.join(export.VIT_FORMATS)} (() for none)", formats)
    for name in listed:
        if stages[name].validate is not None:
            stages[name].validate(config)
