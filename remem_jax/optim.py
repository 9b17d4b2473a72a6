"""Optimizers, learning-rate schedules, SAM gradients and gradient accumulation.

The optimizer is SGDW: `update = -lr_t * (trace_t + wd * w)` with `trace_t = g + momentum * trace_{t-1}`,
after a global-norm clip of the gradient. Weight decay is decoupled, so it is not part of the loss
and not part of the SAM ascent (a documented deviation from google-research/sam, which puts an L2
penalty in the loss).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[jax.Array], jax.Array]
GradFn = Callable[..., tuple[tuple[jax.Array, Any], Any]]


# ----------------------------------------------------------------------------- schedules

def warmup_cosine_schedule(peak_lr: float, total_steps: int, warmup_steps: int,
                           end_lr: float = 0.0) -> Schedule:
    """Linear warmup from 0 to `peak_lr`, then cosine decay to `end_lr` at `total_steps`.

    The schedule is evaluated at the 0-based update count c (optax convention), so the first
    update uses lr(0), which is 0 when `warmup_steps > 0`:
    `lr(c) = peak * c / warmup` for c < warmup, else
    `end + (peak - end) * (1 + cos(pi * (c - warmup) / (total - warmup))) / 2`, constant after total.

    Args:
      peak_lr: the learning rate at the end of the warmup (>= 0).
      total_steps: number of optimizer updates (> 0).
      warmup_steps: linear-warmup updates, in [0, total_steps).
      end_lr: the final learning rate.

    Returns:
      An optax schedule `count -> lr`.
    """
    if peak_lr < 0:
        raise ValueError(f"peak_lr must be >= 0, got {peak_lr!r}.")
    if int(total_steps) != total_steps or total_steps <= 0:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}.")
    if int(warmup_steps) != warmup_steps or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be an integer in [0, total_steps={total_steps}), "
                         f"got {warmup_steps!r}.")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=int(warmup_steps),
        decay_steps=int(total_steps), end_value=end_lr)


def default_warmup_steps(total_steps: int) -> int:
    """min(500, 10% of the steps): vision_transformer's 500-of-10k, scaled down for short runs."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps!r}.")
    return min(500, int(0.1 * total_steps))


# ----------------------------------------------------------------------------- optimizer

OPTIMIZERS = ("sgd", "adam")  # what `make_optimizer(optimizer=...)` accepts


def kernel_mask(params: Any) -> Any:
    """The default weight-decay mask: True for leaves with ndim > 1 (kernels, embeddings).

    Biases, LayerNorm/BatchNorm scales and offsets (ndim <= 1) are not decayed.
    """
    return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def make_optimizer(*, learning_rate: Union[float, Schedule], momentum: float = 0.9,
                   weight_decay: float = 1e-4, grad_clip_norm: Optional[float] = 1.0,
                   nesterov: bool = False, weight_decay_mask: Any = None,
                   optimizer: str = "sgd", adam_b2: float = 0.999) -> optax.GradientTransformation:
    """SGD with momentum and decoupled weight decay (SGDW), after a global-norm clip.

    Chain: clip by global norm -> momentum trace -> add `weight_decay * w` (masked) -> scale by
    `-lr_t`. With `optimizer='adam'` the momentum trace is replaced by Adam's scaling (AdamW,
    for ViTs trained from scratch); `momentum` and `nesterov` are then unused. The learning rate is wrapped in `optax.inject_hyperparams`, so the value used by the
    last update is in the state under the key 'learning_rate' (see `learning_rate_of`).

    Args:
      learning_rate: a float >= 0 or a schedule `count -> lr`.
      momentum: trace decay in [0, 1).
      weight_decay: decoupled decay coefficient (>= 0), added after the momentum.
      grad_clip_norm: maximum global gradient norm (> 0), or None for no clipping.
      nesterov: Nesterov momentum (`g + momentum * trace`).
      weight_decay_mask: a pytree of bools or a callable `params -> mask`; None uses
        `kernel_mask` (decay leaves with ndim > 1 only).
      optimizer: 'sgd' (the paper's fine-tuning and distillation) or 'adam'.
      adam_b2: Adam's second-moment decay (0.95 for MAE / TinyMIM pretraining); b1 is 0.9.

    Returns:
      An `optax.GradientTransformation`.
    """
    if not callable(learning_rate) and not (isinstance(learning_rate, numbers.Real) and learning_rate >= 0):
        raise ValueError(f"learning_rate must be a float >= 0 or a schedule, got {learning_rate!r}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if grad_clip_norm is not None and not grad_clip_norm > 0:
        raise ValueError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm!r}.")
    parts = []
    if grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    parts.append(optax.trace(decay=momentum, nesterov=nesterov) if optimizer == "sgd"
                 else optax.scale_by_adam(b1=0.9, b2=adam_b2))
    if weight_decay > 0:
        mask = kernel_mask if weight_decay_mask is None else weight_decay_mask
        parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
    parts.append(optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=learning_rate))
    return optax.chain(*parts)


def learning_rate_of(opt_state: Any) -> Optional[jax.Array]:
    """The learning rate of the last update in a `make_optimizer` state, or None if absent."""
    try:
        return optax.tree_utils.tree_get(
            opt_state, "learning_rate", default=None,
            filtering=lambda path, value: isinstance(value, (jax.Array, float)))
    except KeyError:  # several optimizers in a chain record one: ambiguous, report none
        return None


# ----------------------------------------------------------------------------- SAM

def sam_perturbation(grads: Any, rho: float, eps: float = 1e-12) -> Any:
    """The SAM ascent step `rho * g / (||g|| + eps)`, with the global L2 norm over all leaves.

    The eps (as in big_vision's GSAM; google-research/sam has none) keeps an all-zero gradient
    from producing 0/0.
    """
    norm = optax.tree.norm(grads)
    return jax.tree.map(lambda g: (rho * g / (norm + eps)).astype(g.dtype), grads)


def sam_gradient(grad_fn: GradFn, params: Any, *args, rho: float, sync_perturbations: bool = False,
                 axis_name: str = "batch") -> tuple[tuple[jax.Array, Any], Any]:
    """The SAM gradient `grad L(w + e)`, `e = rho * g / (||g|| + 1e-12)`, `g = grad L(w)`.

    Both passes get the same `*args` (same batch, same dropout key). The returned loss and aux
    (e.g. BatchNorm statistics, metrics) are those of the clean pass at `w`; the perturbed pass's
    aux is discarded. The gradient is returned un-averaged across devices: the caller pmeans it.

    Args:
      grad_fn: `(params, *args) -> ((loss, aux), grads)`.
      params: the trainable parameters w.
      *args: the rest of `grad_fn`'s arguments.
      rho: the perturbation radius (>= 0). A Python 0 skips the second pass entirely (plain
        gradient); a traced rho always runs both passes.
      sync_perturbations: pmean the clean gradient over `axis_name` before the ascent (one
        global ascent direction). False: each device ascends along its own gradient
        (m-sharpness with m = per-device batch, as google-research/sam). Needs a mapped axis.
      axis_name: the pmap/vmap axis for `sync_perturbations`.

    Returns:
      `((loss, aux), grads)` with the clean pass's loss and aux and the gradient at `w + e`.
    """
    if isinstance(rho, numbers.Real) and not rho >= 0:
        raise ValueError(f"rho must be >= 0, got {rho!r}.")
    (loss, aux), grads = grad_fn(params, *args)
    if isinstance(rho, numbers.Real) and rho == 0:
        return (loss, aux), grads
    if sync_perturbations:
        grads = jax.lax.pmean(grads, axis_name)
    perturbation = sam_perturbation(grads, rho)
    perturbed = jax.tree.map(lambda w, e: w + e.astype(w.dtype), params, perturbation)
    _, sam_grads = grad_fn(perturbed, *args)
    return (loss, aux), sam_grads


# ----------------------------------------------------------------------------- accumulation

def _split_micro_batches(batch: Any, accum_steps: int) -> Any:
    def split(path, x):
        if x.ndim == 0 or x.shape[0] % accum_steps:
            raise ValueError(
                f"accum_steps={accum_steps} must divide the per-device batch size; batch leaf "
                f"{jax.tree_util.keystr(path)} has shape {x.shape}.")
        return x.reshape((accum_steps, x.shape[0] // accum_steps) + x.shape[1:])
    return jax.tree_util.tree_map_with_path(split, batch)


def _accumulator_dtype(dtype) -> jnp.dtype:
    return jnp.result_type(dtype, jnp.float32)


def accumulate_gradients(value_and_grad_fn: GradFn, params: Any, batch: Any, rng: jax.Array,
                         accum_steps: int) -> tuple[tuple[jax.Array, Any], Any]:
    """Mean loss, aux and gradient over `accum_steps` micro-batches of `batch` (a `lax.scan`).

    Micro-batch i gets `fold_in(rng, i)`; with `accum_steps == 1` this is exactly
    `value_and_grad_fn(params, batch, rng)`. For a loss that is a per-example mean without
    batch-coupled terms (no BatchNorm, no DIST intra-class term) the result equals the full-batch
    gradient. Aux leaves (metrics, BatchNorm statistics) are averaged in float32 and cast back.

    Args:
      value_and_grad_fn: `(params, batch, rng) -> ((loss, aux), grads)`.
      params: the parameters.
      batch: a pytree whose leaves share the leading (per-device batch) axis.
      rng: a PRNG key.
      accum_steps: number of micro-batches (>= 1), dividing the batch size.

    Returns:
      `((mean_loss, mean_aux), mean_grads)`.
    """
    if int(accum_steps) != accum_steps or accum_steps < 1:
        raise ValueError(f"accum_steps must be an integer >= 1, got {accum_steps!r}.")
    if accum_steps == 1:
        return value_and_grad_fn(params, batch, rng)
    micro = _split_micro_batches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    out_shape = jax.eval_shape(value_and_grad_fn, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, _accumulator_dtype(s.dtype)), out_shape)

    def body(acc, xs):
        index, micro_batch = xs
        out = value_and_grad_fn(params, micro_batch, jax.random.fold_in(rng, index))
        return jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    return jax.tree.map(lambda t, s: (t / accum_steps).astype(s.dtype), total, out_shape)
