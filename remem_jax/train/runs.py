"""The resumable run frame every sub-run of every stage goes through, and the stages' result files.

A sub-run (one teacher setting, one student, one probe, ...) lives in its own `run_dir`:

  run_dir/checkpoints/<step>/   orbax train states (the loop resumes from the latest)
  run_dir/eval_history.json     every evaluation so far, written before the checkpoint of its step
  run_dir/summary.json          the commit point: written last, with "complete": true

Whatever a kill interrupts (training, the final evaluation, an export, the summary), the rerun
finds no summary and redoes the sub-run's body from its latest checkpoint: the loop restores the
state, keeps the evaluations made up to that checkpoint, evaluates the final step if that is
missing, and the body exports again. A summary is never written with an empty or non-finite
metric, so no later step (picking the best student, a table) reads an incomplete one.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from absl import logging

from remem_jax import errors, files
from remem_jax.train import common, loop

SUMMARY = "summary.json"
HISTORY = "eval_history.json"
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"


class SubRun:
    """One resumable unit of a stage, in `run_dir` (see the module docstring)."""

    def __init__(self, ctx: common.RunContext, name: str, run_dir: str):
        self.ctx, self.name, self.run_dir = ctx, name, run_dir

    @property
    def summary_path(self) -> str:
        return os.path.join(self.run_dir, SUMMARY)

    def committed(self) -> Optional[dict]:
        """The summary of a finished sub-run, or None."""
        summary = files.read_json(self.summary_path)
        return summary if summary and summary.get("complete") else None

    def train(self, state: Any, step_fn: loop.StepFn, *, loop_config: loop.LoopConfig,
              make_train_iterator: Callable[[int], Any], evaluate: Optional[Callable[[Any], dict]] = None,
              on_keep=None) -> tuple[Any, list[dict]]:
        """`loop.run` in this sub-run's folder: resumes from its checkpoints and eval history.

        Returns:
          The final host state and every evaluation of the run, the final step's included
          (when `evaluate` is given), whether or not the run was interrupted.
        """
        checkpointer = common.checkpointer(os.path.join(self.run_dir, "checkpoints"), loop_config.keep_steps)
        return loop.run(loop_config, step_fn=step_fn, state=state, make_train_iterator=make_train_iterator,
                        checkpointer=checkpointer, evaluate=evaluate, on_keep=on_keep, writer=self.ctx.writer,
                        history_path=os.path.join(self.run_dir, HISTORY))

    def commit(self, summary: dict, *, metrics: Iterable[str] = ()) -> dict:
        """Checks `summary` and writes it as the sub-run's commit point; returns it.

        Raises:
          NonFiniteLossError: a key of `metrics` is missing or empty, or any number in the
            summary is NaN or infinite; nothing is written.
        """
        for key in metrics:
            if not summary.get(key):
                raise errors.NonFiniteLossError(
                    f"{self.name}: the final evaluation {key!r} is empty; nothing was recorded "
                    f"({self.summary_path} not written). This is a bug: please report it.")
        bad = _non_finite(summary)
        if bad:
            raise errors.NonFiniteLossError(
                f"{self.name}: {bad[0]} is {bad[1]}; nothing was recorded ({self.summary_path} not written). "
                "Lower the learning rate, or check the data.")
        summary = dict(summary, complete=True)
        common.write_json(self.summary_path, summary)
        return summary


def resumable(ctx: common.RunContext, name: str, run_dir: str, body: Callable[[SubRun], dict]) -> dict:
    """The summary of sub-run `name`: read back when it finished before, else `body(SubRun)`.

    `body` trains (through `SubRun.train`), exports, and returns `SubRun.commit(summary, ...)`.
    """
    sub = SubRun(ctx, name, run_dir)
    done = sub.committed()
    if done is not None:
        logging.info("%s: complete in %s, skipping.", name, run_dir)
        return done
    summary = body(sub)
    if not summary.get("complete"):
        raise RuntimeError(f"{name}: the sub-run's body returned without SubRun.commit.")
    return summary


def _non_finite(value: Any, path: str = "summary") -> Optional[tuple[str, float]]:
    """The first (path, value) of a NaN or infinite float inside `value`, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = _non_finite(v, f"{path}.{k}")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{path}[{i}]")
            if found:
                return found
    return None


# ----------------------------------------------------------------------------- result files

def stage_results_paths(workdir: str, folder: str) -> tuple[str, str]:
    """`(DIR/<folder>/results.json, DIR/<folder>/results.md)`."""
    return (os.path.join(workdir, folder, RESULTS_JSON), os.path.join(workdir, folder, RESULTS_MD))


def write_stage_results(workdir: str, name: str, folder: str, results: dict, table: str) -> None:
    """Writes a stage's `results.json` and `results.md` in its folder (process 0)."""
    json_path, md_path = stage_results_paths(workdir, folder)
    common.write_json(json_path, {"stage": name, **results})
    common.write_text(md_path, f"## {name}\n\n{table.rstrip()}\n")


def write_run_table(workdir: str, stage_folders: Sequence[tuple[str, str]]) -> None:
    """`DIR/results.md`: the table of every stage of `(name, folder)` that has one, in that order."""
    parts = []
    for _, folder in stage_folders:
        path = stage_results_paths(workdir, folder)[1]
        if files.exists(path):
            parts.append(files.read_bytes(path).decode("utf-8").rstrip())
    common.write_text(os.path.join(workdir, RESULTS_MD), "\n\n".join(parts) + "\n")
