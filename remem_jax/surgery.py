"""Pure pytree -> pytree transforms on ViT parameter trees (the raw AugReg npz tree).

Nothing here runs a network (except `init_adapters`, which initialises one to
get fresh adapter weights); every function takes nested dicts of arrays and
returns new nested dicts whose untouched leaves are the *same objects* as the
input's (no copies), so the transforms are cheap inside and outside `jax.jit`.

* **LoRA** (`lora_targets`, `init_lora`, `apply_lora`, `merge_lora`,
  `lora_param_count`, `attach_lora` / `detach_lora` / `effective_params`):
  low-rank deltas `W + scale * (A @ B).reshape(W.shape)` on chosen kernels.
  The LoRA tree mirrors the parameter tree down to the adapted kernel and holds
  `{'a': (d_in, r), 'b': (r, d_out)}` there, e.g.
  `lora['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_1']['query']['kernel']['a']`
  (nested dicts of arrays: orbax-checkpointable). The scale is static metadata
  in a frozen `LoraConfig`, never a trainable leaf.
* **Trainable / frozen split** (`trainable_predicate`, `partition`,
  `merge_partitions`, `split_trainable`, `trainable_mask`): the train state
  keeps only trainable leaves in `params` and the rest in `frozen`.
  For mode `'lora'` the LoRA tree lives in the same tree under the top-level
  key `'lora'` (`attach_lora`), and the step calls
  `effective_params(merge_partitions(params, frozen), lora_config)`.
* **Adapters** (`init_adapters`): fresh Houlsby adapter leaves for a model
  built with `adapter_dim`.
* **ReMem reweighting fold** (`fold_reweighting`): a reweighted model as a plain
  ViT tree (exact up to the LayerNorm epsilon).
* **WeCoLoRA weight copy** (`copy_every_dth_block`) and **block pruning**
  (`drop_blocks`, `zero_mlp_neurons`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from remem_jax import checkpoints, errors
from remem_jax.models import vit

Params = Mapping[str, Any]
Predicate = Callable[[str], bool]

LORA_KEY = "lora"
TRAINABLE_MODES = ("full", "head", "lora", "adapter")
LORA_INITS = ("gaussian", "uniform")

_ATTN = "MultiHeadDotProductAttention_1"
_BLOCK_RE = re.compile(r"encoderblock_(\d+)")
_BLOCK_PATH_RE = re.compile(r"Transformer/encoderblock_(\d+)/")
LORA_PRESETS: dict[str, str] = {
    # ReMem default: q and v of self-attention (also the "standard LoRA (q, v)" baseline).
    "qv": rf"Transformer/encoderblock_\d+/{_ATTN}/(query|value)/kernel",
    # WeCoLoRA: every linear layer of every block.
    "all": (rf"Transformer/encoderblock_\d+/({_ATTN}/(query|key|value|out)"
            r"|MlpBlock_3/Dense_[01])/kernel"),
}


class SurgeryError(errors.UserError, ValueError):
    """A parameter transform asked for something the tree or the arguments do not allow."""


# ----------------------------------------------------------------------------- tree helpers

def _flat(params: Params) -> dict[str, Any]:
    return checkpoints.flatten_params(params)


def _unflat(flat: Mapping[str, Any]) -> dict[str, Any]:
    return checkpoints.unflatten_params(flat)


def _block_indices(flat: Mapping[str, Any]) -> list[int]:
    return sorted({int(m.group(1)) for k in flat for m in [_BLOCK_PATH_RE.match(k)] if m})


def _num_blocks(flat: Mapping[str, Any]) -> int:
    blocks = _block_indices(flat)
    if not blocks:
        raise SurgeryError("The parameter tree has no Transformer/encoderblock_* keys; "
                           "is it a ViT (AugReg) tree?")
    if blocks != list(range(len(blocks))):
        raise SurgeryError(f"Encoder block indices must be 0..{len(blocks) - 1}, got {blocks}.")
    return len(blocks)


def _renumber_blocks(params: Params, keep: Sequence[int]) -> dict[str, Any]:
    """Keeps blocks `keep` (old indices, in order) renumbered 0..; other leaves pass unchanged.

    Any path component `encoderblock_{i}` counts, so a LoRA subtree under
    `'lora'` is renumbered together with the base tree.
    """
    new_index = {old: new for new, old in enumerate(keep)}
    out = {}
    for key, value in _flat(params).items():
        parts = key.split("/")
        drop = False
        for i, part in enumerate(parts):
            m = _BLOCK_RE.fullmatch(part)
            if m:
                old = int(m.group(1))
                if old not in new_index:
                    drop = True
                    break
                parts[i] = f"encoderblock_{new_index[old]}"
        if not drop:
            out["/".join(parts)] = value
    return _unflat(out)


def _block_sort_key(path: str):
    m = _BLOCK_PATH_RE.match(path)
    return (int(m.group(1)) if m else -1, path)


# ----------------------------------------------------------------------------- LoRA

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
    flat = {k: v for k, v in _flat(params).items() if not k.startswith(LORA_KEY + "/")}
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
            kernels = sorted((k for k in flat if k.endswith("/kernel")), key=_block_sort_key)
            raise SurgeryError(f"LoRA target pattern {pattern!r} matches no parameter path "
                               f"(full match). Kernel paths look like: {kernels[:8]}.")
        matched |= hits
    bad = sorted(k for k in matched if not k.endswith("/kernel") or len(np.shape(flat[k])) < 2)
    if bad:
        raise SurgeryError(f"LoRA targets must be kernels of rank >= 2; these matches are not: {bad}.")
    if blocks is not None:
        blocks = sorted(set(int(b) for b in blocks))
        num = _num_blocks(flat)
        outside = [b for b in blocks if not 0 <= b < num]
        if outside:
            raise SurgeryError(f"LoRA blocks {outside} are outside [0, {num}).")
        matched = {k for k in matched
                   if (m := _BLOCK_PATH_RE.match(k)) and int(m.group(1)) in blocks}
        if not matched:
            raise SurgeryError(f"No LoRA target of {preset_or_patterns!r} lies in blocks {blocks}.")
    return sorted(matched, key=_block_sort_key)


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
    flat = _flat(params)
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
    return _unflat(out), LoraConfig(targets=targets, rank=int(rank), scale=scale)


def _lora_factors(lora_params: Params, config: LoraConfig) -> dict[str, tuple[Any, Any]]:
    flat = _flat(lora_params)
    want = {f"{t}/{ab}" for t in config.targets for ab in ("a", "b")}
    missing, extra = sorted(want - set(flat)), sorted(set(flat) - want)
    if missing or extra:
        raise SurgeryError(f"LoRA params do not match the LoraConfig targets: missing {missing}, "
                           f"unexpected {extra}.")
    return {t: (flat[f"{t}/a"], flat[f"{t}/b"]) for t in config.targets}


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
    flat = dict(_flat(params))
    for target, (a, b) in factors.items():
        if target not in flat:
            raise SurgeryError(f"LoRA target {target!r} is not in the parameter tree.")
        w = flat[target]
        d_in, d_out = lora_dims(target, w.shape)
        if tuple(a.shape) != (d_in, config.rank) or tuple(b.shape) != (config.rank, d_out):
            raise SurgeryError(f"LoRA factors of {target} have shapes {tuple(a.shape)} and "
                               f"{tuple(b.shape)}; expected ({d_in}, {config.rank}) and "
                               f"({config.rank}, {d_out}) for the kernel {tuple(w.shape)}.")
        delta = (config.scale * jnp.matmul(a, b)).reshape(w.shape)
        flat[target] = (w + delta).astype(w.dtype)
    return _unflat(flat)


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
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(lora_params)))


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


# ----------------------------------------------------------------------------- trainable split

def _is_head(path: str) -> bool:
    return path.startswith("head/")


def _is_lora(path: str) -> bool:
    return path.startswith(LORA_KEY + "/")


def _is_adapter(path: str) -> bool:
    return any(part.startswith("Adapter_") for part in path.split("/"))


def trainable_predicate(mode: str, *, train_head: bool = True) -> Predicate:
    """Which flat paths are trainable in a fine-tuning mode.

    Args:
      mode: `'full'` (every leaf), `'head'` (the head only: linear probe),
        `'lora'` (the `'lora'` subtree and the head; the base is frozen) or
        `'adapter'` (every `Adapter_*` leaf and the head).
      train_head: for `'lora'` and `'adapter'`, whether the head trains too
        (False for WeCoLoRA feature distillation, where only LoRA trains).

    Returns:
      A function from a flat `/`-path to bool.
    """
    if mode not in TRAINABLE_MODES:
        raise SurgeryError(f"Trainable mode must be one of {TRAINABLE_MODES}, got {mode!r}.")
    head = _is_head if train_head else (lambda path: False)
    if mode == "full":
        return lambda path: True
    if mode == "head":
        return _is_head
    if mode == "lora":
        return lambda path: _is_lora(path) or head(path)
    return lambda path: _is_adapter(path) or head(path)


def partition(params: Params, predicate: Predicate) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a tree into `(trainable, frozen)` nested dicts by a path predicate.

    Leaves are not copied. `merge_partitions` is the exact inverse; a side
    with no leaves is `{}`.
    """
    trainable, frozen = {}, {}
    for key, value in _flat(params).items():
        (trainable if predicate(key) else frozen)[key] = value
    return _unflat(trainable), _unflat(frozen)


def merge_partitions(trainable: Params, frozen: Params) -> dict[str, Any]:
    """Inverse of `partition`: the union of two trees with disjoint leaf paths."""
    flat_t, flat_f = _flat(trainable), _flat(frozen)
    both = sorted(set(flat_t) & set(flat_f))
    if both:
        raise SurgeryError(f"Trainable and frozen trees share leaves: {both}.")
    return _unflat({**flat_f, **flat_t})


def split_trainable(params: Params, mode: str, *, train_head: bool = True
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`partition(params, trainable_predicate(mode))`, checking the mode fits the tree.

    Raises:
      SurgeryError: a mode whose trainable leaves are absent (no head for
        `'head'`, no `'lora'` subtree for `'lora'`, no adapters for `'adapter'`).
    """
    flat = _flat(params)
    needs = {"head": (_is_head, "a head"), "lora": (_is_lora, f"a {LORA_KEY!r} subtree "
                                                   "(call attach_lora first)"),
             "adapter": (_is_adapter, "Adapter_* leaves (call init_adapters first)")}
    if mode in needs:
        test, what = needs[mode]
        if not any(test(k) for k in flat):
            raise SurgeryError(f"Trainable mode {mode!r} needs {what}, but the tree has none.")
    return partition(params, trainable_predicate(mode, train_head=train_head))


def trainable_mask(params: Params, mode: str, *, train_head: bool = True) -> dict[str, Any]:
    """A tree of bools (True = trainable) with the structure of `params` (for `optax.masked`)."""
    predicate = trainable_predicate(mode, train_head=train_head)
    return _unflat({k: predicate(k) for k in _flat(params)})


# ----------------------------------------------------------------------------- adapters

def init_adapters(rng: jax.Array, model: vit.VisionTransformer, params: Params,
                  image_size: int) -> dict[str, Any]:
    """`params` plus freshly initialised `Adapter_attn` / `Adapter_mlp` leaves.

    The adapters come from `model.init` (down N(0, 1e-3^2), up zero, so every
    adapter starts as the identity and the forward pass is unchanged). Under
    `jax.jit` only the adapter leaves are materialised.

    Args:
      rng: PRNG key for `model.init`.
      model: a `VisionTransformer` built with `adapter_dim` (e.g. `D // 16`).
      params: the tree without adapters; its leaves must match the model's
        non-adapter parameters (they are returned unchanged).
      image_size: square input resolution the position embeddings are for.

    Raises:
      SurgeryError: the model has no adapters, params already has adapters, or
        params does not match the model's non-adapter parameters.
    """
    if not model.adapter_dim:
        raise SurgeryError("init_adapters needs a model built with adapter_dim "
                           "(e.g. hidden_size // 16); this one has none.")
    flat = _flat(params)
    if any(_is_adapter(k) for k in flat):
        raise SurgeryError("params already has Adapter_* leaves.")
    shapes = _flat(checkpoints.expected_param_shapes(model, image_size))
    expected = {k: v for k, v in shapes.items() if not _is_adapter(k)}
    try:
        checkpoints.check_params_match(params, _unflat(expected), "init_adapters(params)")
    except checkpoints.CheckpointError as e:
        raise SurgeryError(str(e)) from e
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)

    @jax.jit
    def adapters(key):
        fresh = _flat(model.init(key, images)["params"])
        return {k: v for k, v in fresh.items() if _is_adapter(k)}

    return _unflat({**flat, **adapters(rng)})


# ----------------------------------------------------------------------------- ReMem fold

def fold_reweighting(params: Params, *, mlp_alpha: vit.BlockFactor = 1.0,
                     attn_beta: vit.BlockFactor = 1.0, residual_mode: str = "two_minus",
                     num_layers: Optional[int] = None, prune_attn: Sequence[int] = (),
                     prune_mlp: Sequence[int] = ()) -> dict[str, Any]:
    """Folds ReMem reweighting into the weights of a plain ViT.

    The reweighted block l computes `h' = r(b_l) h + b_l Attn(LN0 h)` and
    `h_out = r(a_l) h' + a_l MLP(LN2 h')` (`r(w) = 2 - w` or `1 / w`, as
    `VisionTransformer(mlp_alpha, attn_beta, residual_mode)`).

    Derivation. Every reader of the stream (LN0, LN2 of each block and the
    final encoder_norm) is a LayerNorm, and LN(c x) = LN(x) for c > 0 up to
    eps. Write the reweighted stream as `h = c g` with g the plain model's
    stream and c > 0 a scalar; c = 1 at the input, so embedding, cls and
    posemb are unchanged. A branch with weight w and residual factor r turns
    `c g` into `r c g + w F(LN g) = (r c) (g + (w / (r c)) F(LN g))`, so the
    new scale is `c <- r c` and the plain branch must output
    `k F` with `k = w / c_new`. Both branch outputs end in an affine map
    (attention `out`, MLP `Dense_1`), so scaling its kernel *and* bias by k
    scales the branch by exactly k. Hence c_l is the running product of the
    residual factors and every plain LayerNorm sees the reweighted input
    divided by c. Pruned branches (`prune_attn` / `prune_mlp`) change nothing.

    Adapters (`Adapter(y) = y + up(gelu(down y))`) follow the projection, and
    `Adapter(k y) != k Adapter(y)`; instead we scale the projection by k, the
    adapter's `down` kernel by 1/k (its input is then unchanged) and its `up`
    kernel and bias by k, which gives `k Adapter(y)` exactly.

    Accuracy: the only difference is the LayerNorm epsilon: the reweighted
    model normalises `c g` with eps, i.e. `g` with eps / c^2, the plain one `g`
    with eps = 1e-6, a relative change of about `eps |1 - 1/c^2| / (2 var(g))`
    per LayerNorm (< 1e-6 for realistic streams; it grows only if c becomes
    tiny, i.e. `two_minus` weights near 2). Measured on a 12-block Ti with
    realistic random weights, alpha in {0.8, 0.9}, beta in {0.8, 1}, both
    residual modes: max |err| / max |logit| <= 2e-6 for the float32 folded
    model against the float64 reweighted one (tests assert < 2e-5); with
    eps = 0 in float64 the fold is exact to 1e-15.

    Args:
      params: a plain ViT tree (raw AugReg names), possibly with adapters; no
        `'lora'` subtree (merge LoRA first).
      mlp_alpha, attn_beta: the branch weights, a number or one per block.
      residual_mode: `'two_minus'` or `'inverse'`.
      num_layers: optional check of the block count.
      prune_attn, prune_mlp: blocks whose branch the model skips (the folded
        tree must then be run with the same pruning).

    Returns:
      A tree with the same structure whose plain forward pass (alpha = beta = 1)
      gives the reweighted model's logits. Untouched leaves are the same objects.

    Raises:
      SurgeryError: a LoRA subtree, a block-count mismatch, or a residual
        factor <= 0 (weight 2 with `two_minus` drops the stream; no plain model
        can express that).
    """
    if LORA_KEY in params:
        raise SurgeryError(f"fold_reweighting got a tree with a {LORA_KEY!r} subtree; merge it "
                           "first (merge_lora / effective_params).")
    flat = dict(_flat(params))
    num = _num_blocks(flat)
    if num_layers is not None and num_layers != num:
        raise SurgeryError(f"num_layers is {num_layers} but the tree has {num} blocks.")
    alphas = vit.per_block(mlp_alpha, num, "mlp_alpha")
    betas = vit.per_block(attn_beta, num, "attn_beta")
    for field, idx in (("prune_attn", prune_attn), ("prune_mlp", prune_mlp)):
        bad = [i for i in idx if not 0 <= i < num]
        if bad:
            raise SurgeryError(f"{field} has block indices {bad} outside [0, {num}).")

    def scale(key, k):
        if key in flat:
            flat[key] = flat[key] * np.asarray(k, np.asarray(flat[key]).dtype)

    c = 1.0
    for i in range(num):
        block = f"Transformer/encoderblock_{i}"
        branches = ((betas[i], i in prune_attn, f"{block}/{_ATTN}/out", f"{block}/Adapter_attn"),
                    (alphas[i], i in prune_mlp, f"{block}/MlpBlock_3/Dense_1", f"{block}/Adapter_mlp"))
        for weight, pruned, proj, adapter in branches:
            if pruned:
                continue
            r = 1.0 if weight == 1.0 else vit.residual_factor(weight, residual_mode)
            if not r > 0:
                raise SurgeryError(f"Block {i}: weight {weight} with residual_mode "
                                   f"{residual_mode!r} gives residual factor {r} <= 0; "
                                   "the reweighting cannot be folded.")
            c *= r
            k = weight / c
            if k == 1.0:
                continue
            scale(f"{proj}/kernel", k)
            scale(f"{proj}/bias", k)
            scale(f"{adapter}/down/kernel", 1.0 / k)
            scale(f"{adapter}/up/kernel", k)
            scale(f"{adapter}/up/bias", k)
    return _unflat(flat)


# ----------------------------------------------------------------------------- weight copy, pruning

def copy_every_dth_block(params: Params, d: int) -> dict[str, Any]:
    """WeCoLoRA weight copy: keep teacher blocks {0, d, 2d, ...}, renumbered 0, 1, ...

    The student has ceil(L / d) blocks (the code's `range(0, L, d)`), student
    block i = teacher block i*d. Everything outside the blocks (embedding, cls,
    posemb, encoder_norm, pre_logits, head) is kept as the same objects.

    Raises:
      SurgeryError: d < 1 or d > L.
    """
    num = _num_blocks(_flat(params))
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= num:
        raise SurgeryError(f"Weight-copy factor d must be an integer in [1, {num}] "
                           f"(the teacher has {num} blocks), got {d!r}.")
    return _renumber_blocks(params, list(range(0, num, int(d))))


def drop_blocks(params: Params, indices: Iterable[int]) -> dict[str, Any]:
    """Removes whole blocks and renumbers the rest.

    The result, run by a ViT with `L - len(indices)` layers, equals the
    original model with both branches of those blocks pruned
    (`prune_attn = prune_mlp = indices`): a block without branches is the
    identity.

    Raises:
      SurgeryError: indices outside [0, L), duplicates, or every block dropped.
    """
    indices = [int(i) for i in indices]
    num = _num_blocks(_flat(params))
    bad = [i for i in indices if not 0 <= i < num]
    if bad:
        raise SurgeryError(f"drop_blocks indices {bad} are outside [0, {num}).")
    if len(set(indices)) != len(indices):
        raise SurgeryError(f"drop_blocks indices contain duplicates: {indices}.")
    keep = [i for i in range(num) if i not in set(indices)]
    if not keep:
        raise SurgeryError(f"drop_blocks would remove all {num} blocks.")
    return _renumber_blocks(params, keep)


def zero_mlp_neurons(params: Params, block: int, neuron_indices: Union[Sequence[int], jax.Array]
                     ) -> dict[str, Any]:
    """Switches off MLP hidden neurons of one block (neuron criticality).

    Zeroes the chosen columns of `MlpBlock_3/Dense_0` kernel and bias, so the
    neurons' pre-activation is 0 and their GELU output is exactly 0
    (GELU(0) = 0). Works under `jax.jit` (indices may be traced). The two
    changed leaves become jax arrays; all others are the same objects.

    Raises:
      SurgeryError: unknown block or (concrete) indices outside [0, mlp_dim).
    """
    flat = dict(_flat(params))
    prefix = f"Transformer/encoderblock_{block}/MlpBlock_3/Dense_0"
    if f"{prefix}/kernel" not in flat:
        raise SurgeryError(f"No {prefix}/kernel in the tree (blocks: {_block_indices(flat)}).")
    kernel, bias = flat[f"{prefix}/kernel"], flat[f"{prefix}/bias"]
    mlp_dim = kernel.shape[-1]
    if not isinstance(neuron_indices, jax.core.Tracer):
        idx = np.asarray(neuron_indices, np.int64).reshape(-1)
        bad = idx[(idx < 0) | (idx >= mlp_dim)]
        if bad.size:
            raise SurgeryError(f"Neuron indices {bad.tolist()} are outside [0, {mlp_dim}) "
                               f"in block {block}.")
        neuron_indices = idx
    flat[f"{prefix}/kernel"] = jnp.asarray(kernel).at[:, neuron_indices].set(0)
    flat[f"{prefix}/bias"] = jnp.asarray(bias).at[neuron_indices].set(0)
    return _unflat(flat)
