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

from remem_jax import errors, tree

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


def epoch_schedule_steps(num_examples: int, batch_size: int, epochs: int, warmup_epochs: int, *,
                         section: str) -> tuple[int, int, int]:
    """`(steps_per_epoch, total_steps, warmup_steps)` of an epoch-based run (last partial batch dropped).

    Raises:
      UserError: `config.<section>.batch_size` exceeds the examples, so an epoch has no full batch.
    """
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch < 1:
        raise errors.UserError(
            f"config.{section}.batch_size={batch_size} is larger than the {num_examples} training examples, so "
            f"an epoch has no full batch; lower the batch size or use more data (config.data.few_shot_*).")
    return steps_per_epoch, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch


def kernel_mask(params: Any) -> Any:
    """The default weight-decay mask: True for leaves with ndim > 1 (kernels, embeddings).

    Biases, LayerNorm/BatchNorm scales and offsets (ndim <= 1) are not decayed.
    """
    return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def matrix_mask(params: Any) -> Any:
    """timm's `add_weight_decay` rule in Flax names: decay every leaf but biases and 1-D leaves.

    Flax keeps the per-head q/k/v biases as 2-D `(heads, head_dim)` leaves where PyTorch has one
    1-D `qkv.bias`, so `kernel_mask` (ndim > 1) would decay them; this mask does not. Kernels,
    LoRA factors, the patch embedding, `cls` and the position embedding are decayed (timm decays
    `cls_token` and `pos_embed` too unless a skip list names them; MAE's distillation passes none).
    """
    def decayed(path, x):
        name = _key_name(path[-1]) if path else ""
        return jnp.ndim(x) > 1 and name != "bias"
    return jax.tree_util.tree_map_with_path(decayed, params)


def _key_name(key) -> str:
    """The name in one entry of a JAX key path (a dict key or an attribute name)."""
    return str(getattr(key, "key", getattr(key, "name", key)))


def make_optimizer(*, learning_rate: Union[float, Schedule], momentum: float = 0.9,
                   weight_decay: float = 1e-4, grad_clip_norm: Optional[float] = 1.0,
                   nesterov: bool = False, weight_decay_mask: Any = None,
                   optimizer: str = "sgd", adam_betas: tuple[float, float] = (0.9, 0.999),
                   lr_scale: Optional[Callable[[tuple], float]] = None) -> optax.GradientTransformation:
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
      adam_betas: Adam's (b1, b2); WeCoLoRA and TinyMIM use (0.9, 0.95).
      lr_scale: optional `key path -> factor` multiplying the learning rate of each leaf (weight
        decay included, as PyTorch parameter groups do), e.g. `vit_layer_decay`.

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
    if optimizer == "sgd":
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    else:
        b1, b2 = adam_betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"adam_betas must be in [0, 1), got {adam_betas!r}.")
        parts.append(optax.scale_by_adam(b1=b1, b2=b2))
    if weight_decay > 0:
        mask = kernel_mask if weight_decay_mask is None else weight_decay_mask
        parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
    if lr_scale is not None:
        parts.append(scale_by_path(lr_scale))
    parts.append(optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=learning_rate))
    return optax.chain(*parts)


def scale_by_path(factor_of: Callable[[tuple], float]) -> optax.GradientTransformation:
    """Multiplies each update leaf by `factor_of(its key path)` (a Python float, fixed per leaf)."""
    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda path, u: u * factor_of(path), updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def vit_layer_id(path: tuple, num_layers: int) -> int:
    """BEiT/MAE's `get_layer_id_for_vit` in this ViT's Flax names.

    0 for the patch embedding, class token and position embedding; i + 1 for
    `Transformer/encoderblock_i` (its LoRA factors and adapters included); `num_layers + 1` for
    the rest (the final norm, `pre_logits`, the head).
    """
    names = [_key_name(k) for k in path]
    if names and names[0] in ("embedding", "cls"):
        return 0
    if len(names) > 1 and names[0] == "Transformer":
        if names[1] == "posembed_input":
            return 0
        block = tree.block_part_index(names[1])
        if block is not None:
            return block + 1
    return num_layers + 1


def vit_layer_decay(decay: float, num_layers: int) -> Callable[[tuple], float]:
    """Layer-wise learning-rate decay (BEiT, MAE fine-tuning): leaf factor `decay ** (L + 1 - layer id)`.

    The head keeps the full learning rate, block i gets `decay ** (L - i)`, the embeddings
    `decay ** (L + 1)`. Use as `make_optimizer(lr_scale=...)`.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layer decay must be in (0, 1], got {decay!r}.")
    return lambda path: float(decay) ** (num_layers + 1 - vit_layer_id(path, num_layers))


def make_lars(*, learning_rate: Union[float, Schedule], momentum: float = 0.9, weight_decay: float = 0.0,
              trust_coefficient: float = 0.001) -> optax.GradientTransformation:
    """LARS as MoCo v3 / MAE's linear probe (`util/lars.py`) has it.

    For every leaf with ndim > 1: `d = g + wd * w`, `d *= trust * ||w|| / ||d||` (1 when either
    norm is 0); 1-D leaves (biases, norms) get neither decay nor trust scaling. Then
    `mu = momentum * mu + d` and `w -= lr_t * mu`. The learning rate multiplies after the
    momentum (optax.lars multiplies before it, which differs when the rate changes).

    Args:
      learning_rate: a float >= 0 or a schedule `count -> lr` (recorded as 'learning_rate').
      momentum: trace decay in [0, 1).
      weight_decay: L2 coefficient folded into the update of ndim > 1 leaves (>= 0).
      trust_coefficient: the LARS trust coefficient (> 0).
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if not trust_coefficient > 0.0:
        raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient!r}.")
    parts = []
    if weight_decay > 0:
        parts.append(optax.add_decayed_weights(weight_decay, mask=kernel_mask))
    parts += [optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=0.0), kernel_mask),
              optax.trace(decay=momentum),
              optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=learning_rate)]
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
