"""What a stage trained and was evaluated on: which part of which split, and how many images.

Every stage's results (`results.json` and its table) carry this record, and the run logs it at
start-up, so that a reader of a table knows the data behind each number without the log.
"""
from __future__ import annotations

from typing import Any

from remem_jax.data import sources
from remem_jax.data.registry import get_spec


def train_part(data_config, few_shot: bool) -> str:
    """Which part of the train split a stage trains on, in words."""
    percent = data_config.validation_percent
    part = f"the train split less its held-out last {percent:g}%" if percent else "the whole train split"
    if not few_shot:
        return part
    if data_config.few_shot_fraction is not None:
        return (f"a few-shot subset of {part}: {100 * data_config.few_shot_fraction:g}% of each class "
                f"(seed {data_config.few_shot_seed})")
    if data_config.few_shot_per_class is not None:
        return (f"a few-shot subset of {part}: {data_config.few_shot_per_class} per class "
                f"(seed {data_config.few_shot_seed})")
    return part + " (no few-shot subset configured)"


def eval_split(data_config, dataset: str) -> str:
    """The split every evaluation reads, in words."""
    percent = data_config.validation_percent
    if percent:
        return f"the held-out last {percent:g}% of the train split"
    spec = get_spec(dataset)
    if spec.kind == "image_folder":
        return sources.image_folder_eval_split(data_config) + "/"
    return spec.eval_split


def split_sizes(data_config, dataset: str, *, few_shot: bool = False) -> dict[str, Any]:
    """The record of a stage's data: dataset, classes, and per split its part and example count.

    Args:
      data_config: the config.data section.
      dataset: registry name.
      few_shot: the stage trains on the `few_shot_*` subset (see `sources.build_source`).

    Returns:
      `{'dataset', 'num_classes', 'train': {'part', 'examples'}, 'eval': {'split', 'examples'}}`,
      counts over all hosts; 'eval' also has 'during_training' when `data.eval_examples` makes the
      evaluations during training use a stratified part (the final evaluation reads the whole split).
    """
    train = sources.build_source(data_config, dataset, "few_shot" if few_shot else "train")
    evaluation = sources.build_source(data_config, dataset, "eval")
    record = {"dataset": dataset, "num_classes": train.num_classes,
              "train": {"part": train_part(data_config, few_shot), "examples": train.total_examples},
              "eval": {"split": eval_split(data_config, dataset), "examples": evaluation.total_examples}}
    during = data_config.get("eval_examples")
    if during and during < evaluation.total_examples:
        record["eval"]["during_training"] = int(during)
    return record


def describe(record: dict[str, Any], label: str = "Data") -> str:
    """One line for logs and tables: 'Data: digits, 10 classes; trained on ... (1,347 images); ...'."""
    train, evaluation = record["train"], record["eval"]
    line = (f"{label}: {record['dataset']}, {record['num_classes']} classes; trained on {train['part']} "
            f"({train['examples']:,} images); evaluated on {evaluation['split']} ({evaluation['examples']:,} images")
    if "during_training" in evaluation:
        line += (f"; evaluations during training on a fixed class-stratified {evaluation['during_training']:,} "
                 "of them, the final one on all")
    return line + ")."
