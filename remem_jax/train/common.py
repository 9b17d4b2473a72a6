"""What every stage shares: the run context, optimizers from config, data, result files."""
from __future__ import annotations

import dataclasses
import os
import zlib
from typing import Any, Callable, Optional

import jax
import ml_collections
from absl import logging

from remem_jax import checkpoints, files, optim
from remem_jax.data import pipeline
from remem_jax.train import checkpointing, evaluate, loop


@dataclasses.dataclass
class RunContext:
    """A run: its config, workdir, summary writer, and the results gathered so far."""
    config: ml_collections.ConfigDict
    workdir: str
    writer: Any = None
    results: dict = dataclasses.field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    @property
    def num_classes(self) -> int:
        return pipeline.get_num_classes(self.config.data, self.config.dataset)

    @property
    def metric(self) -> str:
        return pipeline.get_metric(self.config.data, self.config.dataset)

    def rng(self, *names: str) -> jax.Array:
        """A key derived from the run seed and a stage-specific name (deterministic)."""
        key = jax.random.PRNGKey(self.config.seed)
        for name in names:
            key = jax.random.fold_in(key, zlib.crc32(name.encode()))
        return key


def is_chief() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-host run)."""
    return jax.process_index() == 0


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically; process 0 only."""
    if is_chief():
        files.write_text(path, text)


def write_json(path: str, value: Any) -> None:
    """Writes JSON atomically; process 0 only."""
    if is_chief():
        files.write_json(path, value)


def save_params(path: str, params: Any, options: Optional[dict] = None) -> None:
    """Saves a parameter tree as a flat npz (AugReg layout); process 0 only.

    `options`: a ViT's `vit.numeric_options(model)`, kept in the file (see `checkpoints.save_augreg`).
    """
    if is_chief():
        checkpoints.save_augreg(path, params, options)


def save_vit(ctx: RunContext, path: str, params: Any, model) -> None:
    """Saves a ViT a stage hands on (an AugReg npz with the model's numeric options) and, when
    `config.vit_export_formats` names formats, exports it in them, verified on the run's eval images,
    to `<path without .npz>_export/` (`export.export_student`); process 0 only."""
    from remem_jax import export
    from remem_jax.models import vit
    save_params(path, params, vit.numeric_options(model))
    formats = tuple(ctx.config.get("vit_export_formats", ()))
    if formats and is_chief():
        export.export_student(path, os.path.splitext(path)[0] + "_export", formats=formats,
                              data_config=ctx.config.data, dataset=ctx.config.dataset)


def warmup_steps(configured: Optional[int], total_steps: int, default_fraction: Optional[float] = None) -> int:
    """None picks the default: `default_fraction` of the steps, or optim's min(500, 10%)."""
    if configured is not None:
        return configured
    if default_fraction is not None:
        return int(default_fraction * total_steps)
    return optim.default_warmup_steps(total_steps)


def make_tx(section: ml_collections.ConfigDict, total_steps: int, *, warmup_fraction: Optional[float] = None,
            num_layers: Optional[int] = None):
    """SGD momentum (or Adam) + cosine with linear warmup + decoupled wd + clip, from a config section.

    A section with `layer_decay` < 1 also gets ViT layer-wise learning-rate decay
    (`optim.vit_layer_decay`); `num_layers` is then the ViT's depth.
    """
    schedule = optim.warmup_cosine_schedule(
        section.lr, total_steps, warmup_steps(section.warmup_steps, total_steps, warmup_fraction))
    return optim.make_optimizer(
        learning_rate=schedule, momentum=section.momentum, weight_decay=section.weight_decay,
        grad_clip_norm=section.grad_clip_norm or None, optimizer=section.get("optimizer", "sgd"),
        adam_betas=(0.9, section.get("adam_b2", 0.999)), lr_scale=_layer_decay(section, num_layers))


def _layer_decay(section, num_layers: Optional[int]):
    decay = section.get("layer_decay", 1.0)
    if decay == 1.0:
        return None
    if num_layers is None:
        raise ValueError("layer_decay < 1 needs the ViT's num_layers.")
    return optim.vit_layer_decay(decay, num_layers)


def train_iterator_factory(ctx: RunContext, batch_size: int, *, seed: int, mixup_alpha: float = 0.0,
                           few_shot: bool = False) -> Callable[[int], Any]:
    """`start_step -> iterator` of the stage's training data (the few-shot subset when `few_shot`)."""
    def make(start_step: int):
        return pipeline.make_train_iterator(
            ctx.config.data, ctx.config.dataset, global_batch_size=batch_size, seed=seed,
            start_step=start_step, mixup_alpha=mixup_alpha, few_shot=few_shot)
    return make


def eval_data(ctx: RunContext, batch_size: int, *, eval_examples: Optional[int] = None) -> pipeline.EvalData:
    """The run's eval split (exact, padded); `eval_examples`: its fixed class-stratified subset of that many."""
    return pipeline.make_eval_data(ctx.config.data, ctx.config.dataset, global_batch_size=batch_size,
                                   eval_examples=eval_examples)


def make_evaluator(logits_fn: evaluate.LogitsFn, variables_of_state: Callable[[Any], Any],
                   ctx: RunContext, batch_size: int) -> loop.Evaluator:
    """The loop's evaluations of a classifier (`loop.Evaluator`).

    The exact evaluation covers the whole eval split; the loop uses it at kept steps and at the
    final step, which summaries and tables report. With `config.data.eval_examples` = n smaller
    than the split, the other evaluations (every `eval_every` steps) count a fixed
    class-stratified subset of n examples, the same at every evaluation and in every rerun, and
    their records say so: `'eval_examples': n`.
    """
    step = evaluate.make_eval_step(logits_fn, ctx.num_classes)
    data = eval_data(ctx, batch_size)

    def exact(state) -> dict:
        return evaluate.evaluate(step, variables_of_state(state), data)

    n = ctx.config.data.eval_examples
    if n is None or n >= data.total_examples:
        return loop.Evaluator(exact)
    subset = eval_data(ctx, batch_size, eval_examples=n)
    logging.info("Evaluations every eval_every steps count a fixed class-stratified subset of %d of the %d eval "
                 "examples (config.data.eval_examples); kept and final steps count all of them.",
                 subset.total_examples, data.total_examples)

    def periodic(state) -> dict:
        return {**evaluate.evaluate(step, variables_of_state(state), subset), "eval_examples": subset.total_examples}

    return loop.Evaluator(exact, periodic)


def loop_config(name: str, section: ml_collections.ConfigDict, steps: int, keep_steps=()) -> loop.LoopConfig:
    return loop.LoopConfig(
        name=name, num_steps=steps, global_batch_size=section.batch_size,
        log_every=section.log_every, eval_every=section.eval_every,
        checkpoint_every=section.checkpoint_every, keep_steps=tuple(keep_steps))


def checkpointer(directory: str, keep_steps=()) -> checkpointing.StateCheckpointer:
    return checkpointing.StateCheckpointer(os.path.abspath(directory), keep_steps=keep_steps)
