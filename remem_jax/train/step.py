"""The generic (SAM-)SGD train step, built once per objective and pmapped over axis 'batch'.

The stages plug in a loss function with the contract

    loss_fn(params, frozen, batch_stats, batch, rng) -> (loss, aux)
    aux = {'batch_stats': new_batch_stats_or_{}, 'metrics': {name: scalar}}

where `params` is what is differentiated and trained, `frozen` and `batch_stats` are constants of
the step, `batch` is the per-device batch and `rng` the per-device dropout key.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from remem_jax import optim
from remem_jax.train.state import TrainState

LossFn = Callable[[Any, Any, Any, Any, jax.Array], tuple[jax.Array, dict]]
StepFn = Callable[[TrainState, Any], tuple[TrainState, dict]]


# The step's finiteness flags, and what the loop calls each quantity when it stops a run.
FINITE_CHECKS = {"finite_loss": "the loss", "finite_gradients": "a gradient", "finite_parameters": "a parameter",
                 "finite_batch_stats": "a BatchNorm statistic"}


def _all_finite(tree: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def _check_aux(aux: Any) -> None:
    if not isinstance(aux, dict) or set(aux) != {"batch_stats", "metrics"}:
        got = sorted(aux) if isinstance(aux, dict) else type(aux).__name__
        raise ValueError(f"loss_fn must return (loss, aux) with aux = {{'batch_stats': ..., 'metrics': {{...}}}}; "
                         f"got aux keys {got}.")
    reserved = {"loss", "grad_norm", "param_norm", "learning_rate", "is_finite", *FINITE_CHECKS} & set(aux["metrics"])
    if reserved:
        raise ValueError(f"loss_fn metrics must not use the step's own names {sorted(reserved)}.")


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, sam_rho: float = 0.0,
                    sync_perturbations: bool = False, accum_steps: int = 1,
                    axis_name: str = "batch") -> StepFn:
    """Builds `step(state, batch) -> (new_state, metrics)`, to be run under pmap/vmap over `axis_name`.

    Per step: `rng, step_rng = split(state.rng)`; each device uses
    `fold_in(step_rng, axis_index)` as its dropout key (the same key in both SAM passes); the
    gradient is the (micro-batch accumulated) SAM gradient of the per-device batch (the ascent is
    per device unless `sync_perturbations`); gradients, loss and metrics are pmean-ed; the clean
    pass's BatchNorm statistics are pmean-ed; then `tx.update` and `optax.apply_updates`.

    Gradient accumulation wraps each SAM pass: the ascent direction is the gradient of the whole
    per-device batch, so accumulation only saves memory and does not change the maths (except for
    batch-coupled terms such as BatchNorm or DIST's intra-class relation, computed per micro-batch).

    Metrics (identical on every device): `loss` (clean pass), the loss_fn's metrics, `grad_norm`
    (global norm of the averaged gradient, before clipping), `param_norm` (of the updated params),
    `learning_rate` (when the optimizer records it, as `optim.make_optimizer` does), the flags of
    `FINITE_CHECKS` (loss, every gradient, every updated parameter and BatchNorm statistic finite)
    and `is_finite` (all of them). A non-finite step is applied anyway: the loop stops on
    `is_finite == False`, naming the quantity, and never checkpoints that state.

    Args:
      loss_fn: see the module docstring.
      tx: the optimizer (its update receives the params, for decoupled weight decay).
      sam_rho: SAM radius; 0 gives plain SGD with a single gradient pass.
      sync_perturbations: one global ascent direction (pmean of the clean gradient) instead of
        per-device ascents.
      accum_steps: micro-batches per device batch (must divide it).
      axis_name: the mapped axis name the step is run under.

    Returns:
      The un-mapped step function (wrap it with `pmap_train_step`).
    """
    if not sam_rho >= 0:
        raise ValueError(f"sam_rho must be >= 0, got {sam_rho!r}.")
    if int(accum_steps) != accum_steps or accum_steps < 1:
        raise ValueError(f"accum_steps must be an integer >= 1, got {accum_steps!r}.")

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        device_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))

        def value_and_grad(params, micro_batch, key):
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, state.frozen, state.batch_stats, micro_batch, key)
            _check_aux(aux)
            return (loss, aux), grads

        def grad_fn(params, full_batch, key):
            return optim.accumulate_gradients(value_and_grad, params, full_batch, key, accum_steps)

        (loss, aux), grads = optim.sam_gradient(
            grad_fn, state.params, batch, device_rng, rho=sam_rho,
            sync_perturbations=sync_perturbations, axis_name=axis_name)
        grads, loss, metrics, batch_stats = jax.lax.pmean(
            (grads, loss, aux["metrics"], aux["batch_stats"]), axis_name)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = {"finite_loss": jnp.isfinite(loss), "finite_gradients": _all_finite(grads),
                  "finite_parameters": _all_finite(params), "finite_batch_stats": _all_finite(batch_stats)}
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(params), is_finite=jnp.all(jnp.stack(list(finite.values()))),
                       **finite)
        learning_rate = optim.learning_rate_of(opt_state)
        if learning_rate is not None:
            metrics["learning_rate"] = learning_rate
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  batch_stats=batch_stats, rng=rng)
        return new_state, metrics

    return step


def pmap_train_step(step: StepFn, donate: bool = True, axis_name: str = "batch") -> StepFn:
    """`jax.pmap(step, axis_name=axis_name, donate_argnums=(0,))`: state replicated, batch sharded."""
    return jax.pmap(step, axis_name=axis_name, donate_argnums=(0,) if donate else ())
