"""LoRA: low-rank deltas `W + scale * (A @ B).reshape(W.shape)` on chosen kernels.

The LoRA tree mirrors the parameter tree down to the adapted kernel and holds
`{'a': (d_in, r), 'b': (r, d_out)}` there, e.g.
`lora['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']['query']['kernel']['a']`
(nested dicts of arrays: orbax-checkpointable). The scale is static metadata in
a frozen `LoraConfig`, never a trainable leaf. In a train state the LoRA tree
lives under the top-level key `'lora'` (`attach_lora`).

Two ways to run a LoRA model, with the same maths:
  * factored (the train steps): `lora_variables(tree, config)` gives
    `{'params': base, 'lora': factors}` for `model.apply`; the ViT's block projections compute
    `x W + (x a)(scale b)`, so the frozen kernels are only read (no weight gradient, no
    `W + a b` per step). Targets outside the block projections (`FACTORED_TARGET`, e.g. a
    custom pattern on the patch embedding or the head), and by default targets whose rank is
    too large for factoring to save work (`factoring_pays`), are materialised with `apply_lora`.
  * materialised (export, analyses): `apply_lora` / `effective_params` / `merge_lora` form
    `W + scale * a b`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from remem_jax import tree
from remem_jax import tree as tree_lib  # `tree` is shadowed by arguments below
from remem_jax.surgery.base import ATTN, LORA_KEY, MLP, Params, SurgeryError, block_sort_key, num_blocks

LORA_INITS = ("gaussian", "uniform")
LORA_PRESETS: dict[str, str] = {
    # ReMem default: q and v of self-attention (also the "standard LoRA (q, v)" baseline).
    "qv": rf"Transformer/encoderblock_\d+/{ATTN}/(query|value)/kernel",
    # WeCoLoRA: every linear layer of every block.
    "all": (rf"Transformer/encoderblock_\d+/({ATTN}/(query|key|value|out)"
            rf"|{MLP}/Dense_[01])/kernel"),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Static LoRA metadata (hashable, so it can be closed over by a jitted step).

    Attributes:
      targets: flat `/`-paths of the adapted kernels.
      rank: the LoRA rank r.
      scale: the factor on `A @ B` (`alpha / rank`, or 1 when no alpha is given).
    """
    targets: tuple[str, ...]
    rank: int
    scale: float = 1.0


def lora_targets(params: Params, preset_or_patterns: Union[str, Sequence[str]], *,
                 blocks: Optional[Iterable[int]] = None) -> list[str]:
    """Flat `/`-paths of the kernels to adapt with LoRA.

    Args:
      params: a ViT parameter tree (arrays or anything with `.shape`, e.g.
        `jax.ShapeDtypeStruct`s). A top-level `'lora'` subtree is ignored.
      preset_or_patterns: `'qv'` (query and value kernels of every block, the
        ReMem default), `'all'` (query, key, value, out, MlpBlock_3/Dense_0 and
        Dense_1 kernels, WeCoLoRA), or a list of regular expressions that must
        each *fully* match at least one flat path (e.g.
        `[r'Transformer/encoderblock_\\d+/MlpBlock_3/Dense_1/kernel']`).
      blocks: optional subset of block indices to keep targets in.

    Returns:
      The matched paths, in block order then alphabetical order.

    Raises:
      SurgeryError: unknown preset, a pattern that matches nothing, a match
        that is not a kernel of rank >= 2, bad block indices, or no target left.
    """
    flat = {k: v for k, v in tree.flatten_params(params).items() if not k.startswith(LORA_KEY + "/")}
    if isinstance(preset_or_patterns, str):
        if preset_or_patterns not in LORA_PRESETS:
            raise SurgeryError(f"Unknown LoRA preset {preset_or_patterns!r}; expected one of "
                               f"{sorted(LORA_PRESETS)} or a list of regular expressions.")
        patterns = [LORA_PRESETS[preset_or_patterns]]
    else:
        patterns = list(preset_or_patterns)
        if not patterns:
            raise SurgeryError("lora_targets got an empty list of patterns.")
    matched = set()
    for pattern in patterns:
        hits = {k for k in flat if re.fullmatch(pattern, k)}
        if not hits:
            kernels = sorted((k for k in flat if k.endswith("/kernel")), key=block_sort_key)
            raise SurgeryError(f"LoRA target pattern {pattern!r} matches no parameter path "
                               f"(full match). Kernel paths look like: {kernels[:8]}.")
        matched |= hits
    bad = sorted(k for k in matched if not k.endswith("/kernel") or len(np.shape(flat[k])) < 2)
    if bad:
        raise SurgeryError(f"LoRA targets must be kernels of rank >= 2; these matches are not: {bad}.")
    if blocks is not None:
        blocks = sorted(set(int(b) for b in blocks))
        num = num_blocks(flat)
        outside = [b for b in blocks if not 0 <= b < num]
        if outside:
            raise SurgeryError(f"LoRA blocks {outside} are outside [0, {num}).")
        matched = {k for k in matched if tree.block_index(k) in blocks}
        if not matched:
            raise SurgeryError(f"No LoRA target of {preset_or_patterns!r} lies in blocks {blocks}.")
    return sorted(matched, key=block_sort_key)


def lora_dims(path: str, shape: Sequence[int]) -> tuple[int, int]:
    """`(d_in, d_out)` of a kernel seen as a matrix.

    query/key/value kernels `(D, heads, head_dim)` map D -> heads * head_dim;
    every other kernel (attention `out` `(heads, head_dim, D)`, Dense
    `(in, out)`, Conv `(kh, kw, c_in, c_out)`) maps all but its last axis to
    the last axis.
    """
    shape = tuple(int(s) for s in shape)
    module = path.split("/")[-2] if "/" in path else ""
    in_ndim = 1 if module in ("query", "key", "value") else len(shape) - 1
    return math.prod(shape[:in_ndim]), math.prod(shape[in_ndim:])


def init_lora(rng: jax.Array, params: Params, targets: Sequence[str], *, rank: int,
              alpha: Optional[float] = None, init: str = "gaussian"
              ) -> tuple[dict[str, Any], LoraConfig]:
    """Fresh LoRA factors for `targets`: A random, B zero (the delta starts at 0).

    Args:
      rng: PRNG key (one sub-key per target, in `targets` order).
      params: the base tree (arrays or ShapeDtypeStructs; only shapes are read).
      targets: flat kernel paths, e.g. from `lora_targets`.
      rank: r, with 1 <= r <= min(d_in, d_out) for every target.
      alpha: LoRA alpha; the scale is `alpha / rank`. None (WeCoLoRA, which
        has no scaling) gives scale 1.
      init: `'gaussian'`: A ~ N(0, 1 / (3 d_in)), variance-matched to
        kaiming-uniform(a=sqrt(5)) (ReMem; the paper gives no std), or
        `'uniform'`: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), PyTorch's exact
        kaiming_uniform_(a=sqrt(5)) (WeCoLoRA).

    Returns:
      `(lora_params, config)`: a nested dict mirroring the parameter tree down
      to each target kernel, holding float32 `{'a': (d_in, r), 'b': (r, d_out)}`;
      and the static `LoraConfig`.

    Raises:
      SurgeryError: bad rank, alpha or init, or a target missing from params.
    """
    if init not in LORA_INITS:
        raise SurgeryError(f"LoRA init must be one of {LORA_INITS}, got {init!r}.")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise SurgeryError(f"LoRA rank must be an integer >= 1, got {rank!r}.")
    if alpha is not None and not alpha > 0:
        raise SurgeryError(f"LoRA alpha must be positive (or None for scale 1), got {alpha!r}.")
    targets = tuple(targets)
    if not targets:
        raise SurgeryError("init_lora got no targets.")
    if len(set(targets)) != len(targets):
        raise SurgeryError(f"init_lora got duplicate targets: {sorted(targets)}.")
    flat = tree.flatten_params(params)
    missing = [t for t in targets if t not in flat]
    if missing:
        raise SurgeryError(f"LoRA targets not in the parameter tree: {missing}.")
    out = {}
    for key, target in zip(jax.random.split(rng, len(targets)), targets):
        d_in, d_out = lora_dims(target, np.shape(flat[target]))
        if rank > min(d_in, d_out):
            raise SurgeryError(f"LoRA rank {rank} exceeds min(d_in, d_out) = min({d_in}, {d_out}) "
                               f"of {target}.")
        if init == "gaussian":
            a = jax.random.normal(key, (d_in, rank), jnp.float32) / np.sqrt(3.0 * d_in)
        else:
            bound = 1.0 / np.sqrt(d_in)
            a = jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound)
        out[f"{target}/a"] = a
        out[f"{target}/b"] = jnp.zeros((rank, d_out), jnp.float32)
    scale = 1.0 if alpha is None else float(alpha) / rank
    return tree.unflatten_params(out), LoraConfig(targets=targets, rank=int(rank), scale=scale)


def _lora_factors(lora_params: Params, config: LoraConfig) -> dict[str, tuple[Any, Any]]:
    flat = tree.flatten_params(lora_params)
    want = {f"{t}/{ab}" for t in config.targets for ab in ("a", "b")}
    missing, extra = sorted(want - set(flat)), sorted(set(flat) - want)
    if missing or extra:
        raise SurgeryError(f"LoRA params do not match the LoraConfig targets: missing {missing}, "
                           f"unexpected {extra}.")
    return {t: (flat[f"{t}/a"], flat[f"{t}/b"]) for t in config.targets}


def _checked_dims(flat: dict[str, Any], target: str, a: Any, b: Any, rank: int) -> tuple[int, int]:
    """`(d_in, d_out)` of `target` in the flat base tree, after checking its factors' shapes."""
    if target not in flat:
        raise SurgeryError(f"LoRA target {target!r} is not in the parameter tree.")
    shape = tuple(flat[target].shape)
    d_in, d_out = lora_dims(target, shape)
    if tuple(a.shape) != (d_in, rank) or tuple(b.shape) != (rank, d_out):
        raise SurgeryError(f"LoRA factors of {target} have shapes {tuple(a.shape)} and "
                           f"{tuple(b.shape)}; expected ({d_in}, {rank}) and "
                           f"({rank}, {d_out}) for the kernel {shape}.")
    return d_in, d_out


def apply_lora(params: Params, lora_params: Params, config: LoraConfig) -> dict[str, Any]:
    """Effective parameters `W + scale * (A @ B).reshape(W.shape)` on every target.

    Differentiable and jit-friendly; non-target leaves are returned as the same
    objects (no copy), so the gradient of a loss through this function reaches
    the base only where the caller lets it.

    Args:
      params: the base tree (without a `'lora'` key; see `effective_params`).
      lora_params: the tree from `init_lora` (possibly trained).
      config: the matching `LoraConfig`.

    Returns:
      The base tree with the target kernels replaced (in the kernel's dtype).
    """
    factors = _lora_factors(lora_params, config)
    flat = dict(tree.flatten_params(params))
    for target, (a, b) in factors.items():
        _checked_dims(flat, target, a, b, config.rank)
        w = flat[target]
        delta = (config.scale * jnp.matmul(a, b)).reshape(w.shape)
        flat[target] = (w + delta).astype(w.dtype)
    return tree.unflatten_params(flat)


def merge_lora(params: Params, lora_params: Params, config: LoraConfig) -> dict[str, Any]:
    """LoRA folded into the base: an ordinary float32 NumPy tree (a valid AugReg npz).

    This is `apply_lora` followed by a transfer to host memory as float32
    NumPy arrays, so `checkpoints.save_augreg` writes it and
    `checkpoints.load_augreg` loads it into a plain `VisionTransformer`
    (the paper's `W = W0 + BA` merge; the WeCoLoRA code never merges, which is
    functionally the same).
    """
    merged = apply_lora(params, lora_params, config)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), merged)


def lora_param_count(lora_params: Params) -> int:
    """Number of LoRA parameters (works on arrays or ShapeDtypeStructs)."""
    return tree.param_count(lora_params)


def attach_lora(params: Params, lora_params: Params) -> dict[str, Any]:
    """One tree `{**params, 'lora': lora_params}`, so that `partition` can split it."""
    if LORA_KEY in params:
        raise SurgeryError(f"params already has a top-level {LORA_KEY!r} subtree.")
    return {**params, LORA_KEY: lora_params}


def detach_lora(tree: Params) -> tuple[dict[str, Any], Optional[Any]]:
    """Inverse of `attach_lora`: `(base_params, lora_params or None)`."""
    base = {k: v for k, v in tree.items() if k != LORA_KEY}
    return base, tree.get(LORA_KEY)


def effective_params(tree: Params, config: Optional[LoraConfig] = None) -> dict[str, Any]:
    """The parameters a forward pass uses: the base with LoRA applied when present.

    Args:
      tree: a parameter tree, possibly with a `'lora'` subtree (`attach_lora`).
      config: the `LoraConfig`; required iff the tree has a `'lora'` subtree.
    """
    base, lora = detach_lora(tree)
    if lora is None:
        if config is not None:
            raise SurgeryError(f"A LoraConfig was given but the tree has no {LORA_KEY!r} subtree.")
        return base
    if config is None:
        raise SurgeryError(f"The tree has a {LORA_KEY!r} subtree but no LoraConfig was given.")
    return apply_lora(base, lora, config)


# The kernels the ViT computes as `LoraDense` / `LoraDenseGeneral` (models/vit.py).
FACTORED_TARGET = LORA_PRESETS["all"]
FACTOR_POLICIES = ("auto", "always", "never")


def factoring_pays(d_in: int, d_out: int, rank: int) -> bool:
    """Whether the factored form is no more work than the materialised one, per token.

    Beyond the frozen layer's own forward and input-gradient matmuls (common to both), the
    factored form costs about `3 r (d_in + d_out)` multiply-adds per token (`(x a) b` forward;
    `dy b^T`, `da`, `db` and the input-gradient term backward), the materialised one `d_in d_out`
    (the weight gradient `x^T dy` of `W + a b`; forming `W + a b` is per step, not per token).
    So rank 32 on ViT-B's 768-wide projections factors (~4x less), while WeCoLoRA's rank 128 on
    ViT-Ti's 192-wide ones does not (~4x more).
    """
    return 3 * rank * (d_in + d_out) <= d_in * d_out


def lora_variables(tree: Params, config: Optional[LoraConfig] = None, *, policy: str = "auto"
                   ) -> dict[str, Any]:
    """The variables of a factored-LoRA forward pass: `{'params': base, 'lora': factors}`.

    `factors` mirrors the LoRA tree for the factored targets, with the static scale folded into
    `b` (`{'a': a, 'b': scale * b}`), which is the layout the ViT's `lora` collection reads; the
    other targets are materialised into `base` with `apply_lora`. Without LoRA it is
    `{'params': tree}`. `model.apply(lora_variables(t, c), x)` equals
    `model.apply({'params': effective_params(t, c)}, x)` up to float rounding.

    Args:
      tree: a parameter tree, possibly with a `'lora'` subtree (`attach_lora`).
      config: the `LoraConfig`; required iff the tree has a `'lora'` subtree.
      policy: which targets matching `FACTORED_TARGET` (the ViT block projections; nothing else
        can be factored) are factored: `'auto'` those where `factoring_pays`, `'always'` all,
        `'never'` none (the materialised path).
    """
    if policy not in FACTOR_POLICIES:
        raise SurgeryError(f"LoRA factor policy must be one of {FACTOR_POLICIES}, got {policy!r}.")
    base, lora = detach_lora(tree)
    if lora is None:
        effective_params(tree, config)  # the same checks
        return {"params": base}
    if config is None:
        raise SurgeryError(f"The tree has a {LORA_KEY!r} subtree but no LoraConfig was given.")
    factors = _lora_factors(lora, config)
    flat_base = tree_lib.flatten_params(base)
    factored, materialised, rest = {}, {}, []
    for target, (a, b) in factors.items():
        d_in, d_out = _checked_dims(flat_base, target, a, b, config.rank)
        factor = re.fullmatch(FACTORED_TARGET, target) and (
            policy == "always" or (policy == "auto" and factoring_pays(d_in, d_out, config.rank)))
        if factor:
            factored[f"{target}/a"] = a
            factored[f"{target}/b"] = b * jnp.asarray(config.scale, b.dtype)
        else:
            materialised[f"{target}/a"], materialised[f"{target}/b"] = a, b
            rest.append(target)
    if materialised:
        base = apply_lora(base, tree_lib.unflatten_params(materialised),
                          dataclasses.replace(config, targets=tuple(rest)))
    if not factored:
        return {"params": base}
    return {"params": base, "lora": tree_lib.unflatten_params(factored)}
