"""The training loop shared by every stage: resume, steps, NaN guard, progress, eval, checkpoints."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from absl import logging

from remem_jax import devices, errors, files
from remem_jax.train import checkpointing, step as step_lib

StepFn = Callable[[Any, dict], tuple[Any, dict]]


@dataclasses.dataclass
class LoopConfig:
    """What the loop needs to know about one training run."""
    name: str                       # shown in logs and summaries, e.g. 'finetune/remem'
    num_steps: int
    global_batch_size: int
    log_every: int = 50
    eval_every: int = 0             # 0: evaluate only at kept steps and at the end
    checkpoint_every: int = 0       # 0: only kept steps and the end
    keep_steps: Sequence[int] = ()  # steps kept as checkpoints (and handed to `on_keep`)


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """The evaluations of one run: an exact one, and optionally a cheaper one for the steps between.

    Attributes:
      exact: `replicated_state -> metrics` on the whole eval split. The loop uses it at kept steps
        and at the final step (also when a resumed run re-evaluates that), so every number that
        summaries and tables report is exact; and at every evaluation when `periodic` is None.
      periodic: `replicated_state -> metrics` for the other evaluations (every `eval_every` steps),
        e.g. on a fixed subset of the eval split (then its metrics say how many examples it
        counted, 'eval_examples'); None: `exact`.
    """
    exact: Callable[[Any], dict[str, float]]
    periodic: Optional[Callable[[Any], dict[str, float]]] = None

    def __call__(self, replicated_state: Any) -> dict[str, float]:
        """The exact evaluation (what a caller that evaluates once wants)."""
        return self.exact(replicated_state)


class Progress:
    """Step, rate and ETA for a log line, measured between log points."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int):
        self.total, self.batch = total_steps, batch_size
        self._last_step, self._last_time = start_step, time.perf_counter()

    def update(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        step_time = (now - self._last_time) / steps
        self._last_step, self._last_time = step, now
        return {"step_time_s": step_time, "images_per_s": self.batch / step_time,
                "eta_s": step_time * (self.total - step)}


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def _check_finite(metrics: dict, step: int, name: str, last_saved: Optional[int]) -> None:
    if bool(np.asarray(metrics["is_finite"])[0]):
        return
    quantity = next((what for key, what in step_lib.FINITE_CHECKS.items()
                     if key in metrics and not bool(np.asarray(metrics[key])[0])), "the loss")
    loss = float(np.asarray(metrics["loss"])[0])
    raise errors.NonFiniteLossError(
        f"{name}: {quantity} became non-finite at step {step} (loss {loss}); stopped without saving that state "
        f"(last checkpoint: {'none' if last_saved is None else f'step {last_saved}'}). "
        "Lower the learning rate or sam_rho, or check the data.")


def _check_eval(record: dict, name: str, last_saved: Optional[int]) -> None:
    bad = {k: v for k, v in record.items() if isinstance(v, float) and not np.isfinite(v)}
    if bad:
        raise errors.NonFiniteLossError(
            f"{name}: the evaluation at step {record['step']} gave "
            f"{', '.join(f'{k} = {v}' for k, v in bad.items())}: the model diverged; stopped without saving that "
            f"state (last checkpoint: {'none' if last_saved is None else f'step {last_saved}'}). "
            "Lower the learning rate, or check the data.")


def run(config: LoopConfig, *, step_fn: StepFn, state: Any,
        make_train_iterator: Callable[[int], Iterator[dict]],
        checkpointer: checkpointing.StateCheckpointer,
        evaluate: Optional[Callable[[Any], dict[str, float]]] = None,
        on_keep: Optional[Callable[[int, Any, dict], None]] = None,
        writer: Any = None, history_path: Optional[str] = None) -> tuple[Any, list[dict]]:
    """Trains `state` (unreplicated, host) for `config.num_steps`, resuming if possible.

    Args:
      config: the run's settings.
      step_fn: a pmapped `(replicated_state, batch) -> (state, metrics)`; metrics
        carry `loss` and `is_finite` per device.
      state: the initial state; replaced by the latest checkpoint when one exists.
      make_train_iterator: `start_step -> iterator` yielding the batches of steps
        `start_step + 1, ...` exactly as an uninterrupted run would.
      checkpointer: where checkpoints live.
      evaluate: `replicated_state -> metrics` (exact eval), used at every evaluation; or an
        `Evaluator`, whose `periodic` evaluation serves the `eval_every` evaluations that are
        neither kept nor final; None for no eval.
      on_keep: called as `on_keep(step, host_state, eval_metrics)` at kept steps
        (e.g. to export a teacher npz).
      writer: a clu metric writer, or None.
      history_path: a JSON file holding the eval records (process 0 writes it after each
        evaluation, before that step's checkpoint). On resume the records up to the restored
        step are read back, so the returned history is the whole run's.

    Returns:
      The final host state and the list of eval records (`{'step': ..., **metrics}`); with
      `evaluate`, its last record is always the final step's, by the exact evaluation (evaluated
      now if a resumed run lacks it).

    Raises:
      NonFiniteLossError: a step produced a NaN/inf loss or gradient.
    """
    # `frozen` (a frozen base, a teacher) is rebuilt from its source checkpoint, never saved twice.
    frozen = state.frozen
    start = checkpointer.latest_step() or 0
    if start:
        logging.info("%s: resuming from step %d in %s", config.name, start, checkpointer.directory)
        state = checkpointer.restore(start, state.replace(frozen={})).replace(frozen=frozen)
    last_saved = start or None
    replicated = devices.replicate(state)  # as the step returns it: no second compile
    keep = set(config.keep_steps)
    history = _read_history(history_path, start)
    progress = Progress(config.num_steps, start, config.global_batch_size)
    window: list[dict] = []
    iterator = make_train_iterator(start)
    exact, periodic = _evaluations(evaluate)
    host_state = None  # the last saved state on the host; the final step always saves

    for step in range(start + 1, config.num_steps + 1):
        replicated, metrics = step_fn(replicated, next(iterator))
        window.append(metrics)
        is_log = step % config.log_every == 0 or step == config.num_steps
        is_eval = (config.eval_every and step % config.eval_every == 0) or step in keep or step == config.num_steps
        is_save = (config.checkpoint_every and step % config.checkpoint_every == 0) or step in keep \
            or step == config.num_steps
        if not (is_log or is_eval or is_save):
            continue
        host = [jax.device_get(m) for m in window]
        for offset, m in enumerate(host):
            _check_finite(m, step - len(host) + 1 + offset, config.name, last_saved)
        window = []
        if is_log:
            scalars = {k: float(np.mean([np.asarray(m[k])[0] for m in host]))
                       for k in host[-1] if k != "is_finite" and k not in step_lib.FINITE_CHECKS}
            scalars.update(progress.update(step))
            logging.info("%s step %d/%d: loss %.4f, %.1f img/s, %.3f s/step, ETA %s", config.name, step,
                         config.num_steps, scalars["loss"], scalars["images_per_s"], scalars["step_time_s"],
                         _format_eta(scalars["eta_s"]))
            if writer is not None:
                writer.write_scalars(step, {f"{config.name}/train/{k}": v for k, v in scalars.items()})
        record: dict = {}
        if is_eval and evaluate is not None:
            how = exact if step in keep or step == config.num_steps else periodic
            record = _evaluate(how, replicated, step, config.name, writer, history, history_path, last_saved)
        if is_save:
            host_state = devices.unreplicate(replicated)
            if step in keep and on_keep is not None:
                on_keep(step, host_state, record)
            checkpointer.save(step, host_state.replace(frozen={}))
            last_saved = step
    if evaluate is not None and (not history or history[-1]["step"] != config.num_steps):
        # Resumed from the final checkpoint of a run killed before its final evaluation was recorded.
        _evaluate(exact, replicated, config.num_steps, config.name, writer, history, history_path, last_saved)
    if writer is not None:
        writer.flush()
    if host_state is None:  # resumed at the last step: nothing ran
        host_state = devices.unreplicate(replicated)
    return host_state, history


def _evaluations(evaluate) -> tuple[Optional[Callable], Optional[Callable]]:
    """(exact, periodic) evaluation of `run`'s `evaluate` argument."""
    if isinstance(evaluate, Evaluator):
        return evaluate.exact, evaluate.periodic or evaluate.exact
    return evaluate, evaluate


def _read_history(path: Optional[str], start: int) -> list[dict]:
    """The eval records of steps <= `start` (the restored checkpoint); later ones are redone."""
    if path is None or not start:
        return []
    return [r for r in files.read_json(path, default=[]) if r["step"] <= start]


def _evaluate(evaluate, replicated, step: int, name: str, writer, history: list, history_path,
              last_saved: Optional[int]) -> dict:
    record = {"step": step, **evaluate(replicated)}
    _check_eval(record, name, last_saved)
    history.append(record)
    logging.info("%s step %d eval: %s", name, step, ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))
    if writer is not None:
        writer.write_scalars(step, {f"{name}/eval/{k}": v for k, v in record.items() if k != "step"})
    if history_path is not None and jax.process_index() == 0:
        files.write_json(history_path, history)
    return record
