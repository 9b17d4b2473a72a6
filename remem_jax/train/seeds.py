"""`config.seeds`: a whole run repeated with different seeds, and each stage's compared numbers as
mean and spread over them.

With `config.seeds = K > 1` the run's stages run K times, with `config.seed` = seed, seed + 1, ...,
each in a workdir of its own (`DIR/seeds/seed_<s>/`, a complete run directory: resumable, with its
own tables). Everything a seed changes is redrawn (initialisations, data order, augmentation,
dropout, mixup); the data itself (splits, the few-shot subset, whose seed is
`data.few_shot_seed`) stays fixed, so the spread measures the training's randomness, not the
test set's (the standard error in each table measures that).

Each stage declares the numbers its table compares (`Stage.compared`: `results -> [Compared]`);
`DIR/<folder>/results.md` then holds, per row and number, the mean, the sample standard deviation,
the range and every seed's value, and `DIR/results.json` every seed's results.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import ml_collections
import numpy as np

SEEDS_DIR = "seeds"


@dataclasses.dataclass(frozen=True)
class Compared:
    """One number a stage's table compares: its row, its column, its value, and whether it is an accuracy."""
    row: str
    column: str
    value: float
    accuracy: bool = True


def seed_values(config) -> list[int]:
    """The seeds of a run: `config.seed` and the next `config.seeds - 1`."""
    return [config.seed + k for k in range(config.seeds)]


def seed_config(config, seed: int) -> ml_collections.ConfigDict:
    """`config` as one run of a repeated run: `seed` set, `seeds` 1."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.seed, cfg.seeds = seed, 1
    return cfg


def seed_workdir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, SEEDS_DIR, f"seed_{seed}")


def spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (ddof 1), min and max of one number over the seeds."""
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "values": [float(x) for x in v], "n": len(v)}


def aggregate(per_seed: Sequence[Sequence[Compared]]) -> list[dict]:
    """Per (row, column), in the first seed's order: its `spread` over the seeds.

    Raises:
      ValueError: the seeds' runs compared different rows (their configs differ beyond the seed).
    """
    keys = [(c.row, c.column) for c in per_seed[0]]
    accuracy = {(c.row, c.column): c.accuracy for c in per_seed[0]}
    values = {k: [] for k in keys}
    for compared in per_seed:
        found = {(c.row, c.column): c.value for c in compared}
        if set(found) != set(keys):
            raise ValueError(f"The seeds' runs compared different rows: {sorted(found)} vs {sorted(keys)}.")
        for k in keys:
            values[k].append(found[k])
    return [{"row": row, "column": column, "accuracy": accuracy[(row, column)], **spread(values[(row, column)])}
            for row, column in keys]


def markdown(name: str, rows: Sequence[dict], seeds: Sequence[int]) -> str:
    """The stage's table over the seeds: mean ± sample sd, range and every value (accuracies in %)."""
    lines = [f"| {name}: row | number | mean ± sd over {len(seeds)} seeds | min - max | per seed ({', '.join(map(str, seeds))}) |",
             "|---|---|---|---|---|"]
    for r in rows:
        scale, spec = (100.0, ".2f") if r["accuracy"] else (1.0, ".4f")
        fmt = lambda x: format(scale * x, spec)  # noqa: E731
        lines.append(f"| {r['row']} | {r['column']} | {fmt(r['mean'])} ± {fmt(r['std'])} | "
                     f"{fmt(r['min'])} - {fmt(r['max'])} | {', '.join(fmt(v) for v in r['values'])} |")
    lines += ["", "sd is the sample standard deviation of the seeds' values (training randomness: initialisation, "
              "data order, augmentation); a difference of means smaller than about two sd / sqrt(seeds) is within "
              f"that noise. Each seed's own table, with test-set standard errors, is in {SEEDS_DIR}/seed_<s>/."]
    return "\n".join(lines)
