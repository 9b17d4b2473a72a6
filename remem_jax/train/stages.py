"""The stage table: every stage of a run, declared once, in the module that implements it.

A stage module defines `STAGES`, a tuple of `Stage` entries: the stage's name (what
`config.stages` lists), its folder in the workdir, its config section, its run function, its
validation, the config fields it reads beyond its section, and what it needs from earlier stages.
`remem_jax.main` dispatches through the table, `remem_jax.config_validation` calls each listed
stage's `validate`, `remem_jax.workdir` asks it which stages read a config field, and `check_needs`
gives every "run X before Y" error. A new method is one module, one line in `STAGE_MODULES`
and one config section.

Stage modules never import each other: what they hand on lives in `train.handoff`, what they
share in `train.vit_finetune`, `train.runs` and `train.common`.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional, Sequence

from remem_jax import errors

# The modules that define stages, in the order their stages usually run.
STAGE_MODULES = (
    "remem_jax.train.teacher",
    "remem_jax.train.distill",
    "remem_jax.train.wecolora",
    "remem_jax.train.linear_probe",
    "remem_jax.train.tinymim",
    "remem_jax.analysis.stage",
)


@dataclasses.dataclass(frozen=True)
class Need:
    """A stage that must have run before this one (earlier in `config.stages`, or in an earlier run
    of the workdir), when `applies(config)` holds."""
    stage: str
    why: str                                            # what is read from it, for the error message
    applies: Callable[[Any], bool] = lambda config: True


@dataclasses.dataclass(frozen=True)
class StageOutput:
    """What a stage returns: its results (into `results.json`) and its markdown table."""
    results: dict
    table: str


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Attributes:
      name: the name `config.stages` lists.
      folder: its folder in the workdir (`DIR/<folder>/`: sub-runs, `results.json`, `results.md`).
      section: its config section (`config.<section>`), None for none.
      run: `run(ctx) -> StageOutput`; resumable (finished sub-runs are skipped).
      validate: `validate(config)` raises `UserError` naming the first bad field of what it reads.
      reads: other config fields or sections (`'teacher.dtype'`, `'finetune.'`) whose change alters
        its results; any field no stage claims is read by every stage (dataset, seed, data.*).
      needs: stages that must have run before it.
      outputs: what it writes in its folder besides `results.{json,md}` (for the README's layout).
      global_batches: its config fields that are global batch sizes, split evenly over every device.
      train_data: what it trains on, recorded with its results and table (`data.sizes`): 'train'
        (the whole train split), 'few_shot' (the `data.few_shot_*` subset: only stages that are
        few-shot by definition), or None when the stage records its own data (or trains on none).
      compared: `compared(results) -> [seeds.Compared]`, the numbers its table compares (what
        `config.seeds` > 1 reports as mean and spread); None for a stage that compares none.
    """
    name: str
    folder: str
    section: Optional[str]
    run: Callable[[Any], StageOutput]
    validate: Optional[Callable[[Any], None]] = None
    reads: Sequence[str] = ()
    needs: Sequence[Need] = ()
    outputs: str = ""
    global_batches: Sequence[str] = ()
    train_data: Optional[str] = "train"
    compared: Optional[Callable[[dict], list]] = None

    def reads_field(self, field: str) -> bool:
        """Whether a change of `field` alters what this stage computes (section, or `reads`)."""
        patterns = ((f"{self.section}.",) if self.section else ()) + tuple(self.reads)
        return any(field == p or (p.endswith(".") and field.startswith(p)) for p in patterns)


def table(modules: Sequence[str] = STAGE_MODULES) -> dict[str, Stage]:
    """name -> Stage of every stage the `modules` define, in their order."""
    out: dict[str, Stage] = {}
    for name in modules:
        for stage in importlib.import_module(name).STAGES:
            if stage.name in out:
                raise ValueError(f"Stage {stage.name!r} is defined twice ({name}).")
            out[stage.name] = stage
    return out


def stages_reading(field: str, stages: Mapping[str, Stage]) -> tuple[str, ...]:
    """The stages whose results a change of `field` alters: those claiming it, else every stage."""
    readers = tuple(name for name, stage in stages.items() if stage.reads_field(field))
    return readers or tuple(stages)


def check_needs(config, stages: Mapping[str, Stage], finished: Sequence[str]) -> None:
    """Raises UserError when a listed stage needs one that neither runs before it nor has finished.

    Args:
      config: the run's config.
      stages: the stage table.
      finished: stages that finished in earlier runs of this workdir.
    """
    order = tuple(config.stages)
    for position, name in enumerate(order):
        for need in stages[name].needs:
            if not need.applies(config) or need.stage in order[:position] or need.stage in finished:
                continue
            fix = "move" if need.stage in order else "add"
            raise errors.UserError(
                f"config.stages: {name!r} needs {need.why} from the {need.stage!r} stage, which has not run in "
                f"this workdir: {fix} {need.stage!r} before {name!r} (config.stages is {order}).")


def layout_markdown(stages: Mapping[str, Stage]) -> str:
    """The workdir layout of every stage, as the README shows it (generated from the table)."""
    lines = ["| stage (`config.stages`) | folder | config section | needs | writes there, besides results.json / .md |",
             "|---|---|---|---|---|"]
    for stage in stages.values():
        needs = ", ".join(f"`{n.stage}`" for n in stage.needs) or "-"
        section = f"`config.{stage.section}`" if stage.section else "-"
        lines.append(f"| `{stage.name}` | `DIR/{stage.folder}/` | {section} | {needs} | {stage.outputs or '-'} |")
    return "\n".join(lines)


README_START, README_END = "<!-- stage-layout:start -->", "<!-- stage-layout:end -->"


def readme_with_layout(readme: str, stages: Mapping[str, Stage]) -> str:
    """`readme` with the text between the layout markers replaced by `layout_markdown(stages)`."""
    head, rest = readme.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{layout_markdown(stages)}\n{README_END}{tail}"


if __name__ == "__main__":  # python -m remem_jax.train.stages README.md: regenerates the README's layout table
    import sys
    path = sys.argv[1]
    with open(path) as f:
        text = readme_with_layout(f.read(), table())
    with open(path, "w") as f:
        f.write(text)
