"""Vision Transformer whose parameter tree is the raw AugReg npz tree.

The module names are the pre-Linen names the released checkpoints use
(`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1,
LayerNorm_2, MlpBlock_3}`, `embedding`, `cls`, `Transformer/posembed_input`,
`Transformer/encoder_norm`, optional `pre_logits`, `head`), so an npz loads with
no renaming and a saved tree is a valid AugReg npz. The architecture follows
vit_jax `models_vit.py`: pre-LayerNorm blocks, LayerNorm epsilon 1e-6,
tanh-approximate GELU, class-token classifier, NHWC images in [-1, 1].

Beyond the plain model it carries the knobs the ReMem analyses need, all of
which default to the unmodified network:
  * `mlp_alpha` / `attn_beta`: ReMem reweighting per block,
    `h' = r(beta) * h + beta * Attn(LN(h))`, `h_out = r(alpha) * h' + alpha * MLP(LN(h'))`
    with `r(a) = 2 - a` (`residual_mode='two_minus'`) or `1 / a` (`'inverse'`).
  * `prune_attn` / `prune_mlp`: block indices whose attention / MLP branch is skipped.
  * `adapter_dim`: Houlsby bottleneck adapters after each attention and MLP branch.

and the options a TinyMIM student needs (all off by default, so the AugReg path is unchanged):
  * `drop_path_rate`: stochastic depth per block (a number or one per block), 0 at inference.
  * `last_block_heads`: a different head count for the last block only.
  * `posemb='sincos2d'`: fixed 2-D sin-cos position embeddings (MAE), no parameter.
  * `init_style='mae'`: MAE's initialisation (xavier-uniform linears and patch embedding,
    class token N(0, 0.02), zero biases).
  * `qkv_only_block`: stop inside that block after its q/k/v (sown in `qkv`): no later
    computation, no parameters past it.

Intermediate values are recorded with `Module.sow` into separate collections, so
a caller pays only for what it asks for by making that collection mutable:

  logits, state = model.apply({'params': params}, images,
                              mutable=['tokens', 'mlp_hidden'])
  values = collect_intermediates(state)   # {'tokens': [L arrays], ...}

Collections: `tokens` (the output of every block, then `encoded`: all tokens
after encoder_norm), `attention` (softmax probabilities `[B, heads, N, N]` per
block), `qkv` (per-head `query`, `key`, `value` `[B, N, heads, head_dim]` per
block), `mlp_hidden` (activations after GELU `[B, N, mlp_dim]` per block) and
`pre_logits` (the pooled representation the head reads). Under `jax.jit`, sown
values that the caller drops are removed by dead-code elimination.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from remem_jax import tree

Dtype = Any
BlockFactor = Union[float, Sequence[float]]

# The published AugReg / ViT variants (vit_jax configs/models.py).
VARIANTS: dict[str, dict[str, int]] = {
    "Ti": dict(hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12),
    "S": dict(hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12),
    "B": dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12),
    "L": dict(hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24),
}
INTERMEDIATE_COLLECTIONS = ("tokens", "attention", "qkv", "mlp_hidden", "pre_logits")
RESIDUAL_MODES = ("two_minus", "inverse")
POSEMB_KINDS = ("learned", "sincos2d")
INIT_STYLES = ("vit", "mae")
ATTENTION_IMPLS = ("auto", "fused", "explicit")
LAYERNORM_EPSILON = 1e-6
# The model options that follow the checkpoint a ViT came from, not the run's config, with their
# AugReg (vit_jax) defaults: a timm or Hugging Face file sets them, and a saved npz keeps them.
NUMERIC_OPTIONS: dict[str, Any] = {"approximate_gelu": True, "layernorm_epsilon": LAYERNORM_EPSILON}


def variant_config(name: str) -> dict[str, int]:
    """Architecture of a named variant such as `B_16`, `S_32` or `Ti_16`.

    Args:
      name: `{Ti,S,B,L}_{patch}`.

    Returns:
      The keyword arguments of `VisionTransformer` that fix the architecture.
    """
    match = re.fullmatch(r"(Ti|S|B|L)[_/](\d+)", name)
    if match is None:
        known = ", ".join(f"{v}_16" for v in VARIANTS) + ", S_32, B_32"
        raise ValueError(f"Unknown ViT variant {name!r}; expected one of {known} "
                         "(any patch size is accepted, e.g. B_8).")
    return dict(VARIANTS[match.group(1)], patch_size=int(match.group(2)))


def residual_factor(weight: float, mode: str) -> float:
    """The factor on the residual stream that goes with branch weight `weight`."""
    if mode == "two_minus":
        return 2.0 - weight
    if mode == "inverse":
        return 1.0 / weight
    raise ValueError(f"residual_mode must be one of {RESIDUAL_MODES}, got {mode!r}.")


def _one_per_block(value: BlockFactor, num_layers: int, field: str) -> tuple[float, ...]:
    """A number repeated `num_layers` times, or a sequence of exactly `num_layers` numbers, as floats."""
    if isinstance(value, (int, float)):
        return (float(value),) * num_layers
    values = tuple(float(v) for v in value)
    if len(values) != num_layers:
        raise ValueError(f"{field} must be a number or have one entry per block "
                         f"({num_layers}), got {len(values)} entries.")
    return values


def per_block(value: BlockFactor, num_layers: int, field: str) -> tuple[float, ...]:
    """Expands a scalar or per-block sequence of factors to one float per block."""
    values = _one_per_block(value, num_layers, field)
    for v in values:
        if not 0.0 < v <= 2.0:
            raise ValueError(f"{field} entries must lie in (0, 2], got {v}.")
    return values


def per_block_rates(value: BlockFactor, num_layers: int, field: str) -> tuple[float, ...]:
    """Expands a scalar or per-block sequence of rates in [0, 1) to one float per block."""
    values = _one_per_block(value, num_layers, field)
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if bad:
        raise ValueError(f"{field} entries must lie in [0, 1), got {bad}.")
    return values


def sincos_posemb_2d(width: int, grid: int, class_token: bool = True):
    """Fixed 2-D sin-cos position embeddings `[1, (1 +) grid*grid, width]` (float32 NumPy).

    The layout of MAE's `get_2d_sincos_pos_embed`: the token of patch (row r, column c)
    (row-major, as the patch embedding flattens) gets `[e(c), e(r)]`, where
    `e(p) = [sin(p * w), cos(p * w)]` over `width // 4` frequencies `w_i = 10000^(-i / (width/4))`;
    the class token's row is zero.
    """
    import numpy as np  # the table is a trace-time constant
    if width % 4:
        raise ValueError(f"sin-cos position embeddings need a hidden size divisible by 4, got {width}.")
    quarter = width // 4
    freqs = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)

    def encode(position):
        angles = position[:, None] * freqs[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode(cols), encode(rows)], axis=1)
    if class_token:
        table = np.concatenate([np.zeros((1, width)), table], axis=0)
    return table[None].astype(np.float32)


class DropPath(nn.Module):
    """Stochastic depth: zeroes a whole example's branch with probability `rate`, scales the rest.

    `x * m / (1 - rate)` with one `m ~ Bernoulli(1 - rate)` per example (leading axis), drawn
    from the 'dropout' rng; the identity (no op at all) when `rate == 0` or `deterministic`.
    """
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        if self.rate == 0.0 or deterministic:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def _dense_init(init_style: str):
    """Kernel / bias initialisers of Dense layers: vit_jax's, or MAE's (zero biases)."""
    bias = nn.initializers.zeros if init_style == "mae" else nn.initializers.normal(stddev=1e-6)
    return nn.initializers.xavier_uniform(), bias


def _lora_delta(module: nn.Module, x: jax.Array, num_in_axes: int, features: tuple[int, ...]):
    """`(x a) b` of the module's `lora/kernel` factors, shaped like the layer's output; or None.

    The factors are the LoRA tree's `{'a': (d_in, r), 'b': (r, d_out)}` with the scale already
    folded into `b` (`surgery.lora_variables`); the trailing `num_in_axes` axes of `x` are the
    contracted ones, flattened row-major as `lora_dims` / `apply_lora` flatten the kernel.
    """
    if not module.has_variable("lora", "kernel"):
        return None
    factors = module.get_variable("lora", "kernel")
    dtype = module.dtype or x.dtype
    lead = x.shape[:x.ndim - num_in_axes]
    h = jnp.dot(x.reshape(lead + (-1,)).astype(dtype), jnp.asarray(factors["a"], dtype))
    return jnp.dot(h, jnp.asarray(factors["b"], dtype)).reshape(lead + tuple(features))


class LoraDense(nn.Dense):
    """`nn.Dense` (same parameters, initialisers and arithmetic) plus an optional factored LoRA term.

    With a `lora` collection holding `kernel = {'a', 'b'}` at this module's path it returns
    `x W + bias + (x a) b`: the kernel is only read, so a frozen `W` gets no weight gradient and
    `W + a b` is never formed. Without that collection it is exactly `nn.Dense`.
    """

    def __call__(self, inputs):
        y = super().__call__(inputs)
        delta = _lora_delta(self, inputs, 1, (self.features,))
        return y if delta is None else y + delta.astype(y.dtype)


class LoraDenseGeneral(nn.DenseGeneral):
    """`nn.DenseGeneral` plus an optional factored LoRA term (see `LoraDense`).

    Only trailing contracted axes (`axis=-1` or `(-2, -1)`, what the attention projections use).
    """

    def __call__(self, inputs):
        y = super().__call__(inputs)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        if sorted(a % inputs.ndim for a in axis) != list(range(inputs.ndim - len(axis), inputs.ndim)):
            raise ValueError(f"LoraDenseGeneral contracts trailing axes only, got axis={self.axis}.")
        delta = _lora_delta(self, inputs, len(axis), features)
        return y if delta is None else y + delta.astype(y.dtype)


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense -> dropout (vit_jax MlpBlock)."""
    mlp_dim: int
    dropout_rate: float = 0.0
    approximate_gelu: bool = True
    dtype: Dtype = jnp.float32
    init_style: str = "vit"

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        kernel_init, bias_init = _dense_init(self.init_style)
        dense = lambda features, name: LoraDense(
            features, dtype=self.dtype, name=name, kernel_init=kernel_init, bias_init=bias_init)
        out_dim = x.shape[-1]
        x = dense(self.mlp_dim, "Dense_0")(x)
        x = nn.gelu(x, approximate=self.approximate_gelu)
        self.sow("mlp_hidden", "hidden", x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = dense(out_dim, "Dense_1")(x)
        return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class MultiHeadSelfAttention(nn.Module):
    """Flax MultiHeadDotProductAttention's parameters, with the pieces exposed.

    Same parameter names and shapes as `nn.MultiHeadDotProductAttention`
    (`query`/`key`/`value` kernels `(D, heads, head_dim)`, `out` kernel
    `(heads, head_dim, D)`), written out so that q/k/v and the attention
    probabilities can be sown. The projections are `LoraDenseGeneral` (factored LoRA when a
    `lora` collection is given).

    `attention_impl` picks how softmax(q k^T / sqrt(d)) v is computed:
      * `'explicit'`: the written-out einsum / float32 softmax / einsum (what the analyses read).
      * `'fused'`: `jax.nn.dot_product_attention` (cuDNN flash attention on GPU, XLA elsewhere;
        logits and softmax in float32), used only when neither `attention` (probabilities) nor
        `qkv` is a mutable collection and attention dropout is off (rate 0 or deterministic);
        otherwise the explicit path runs.
      * `'auto'` (default): `'fused'` on GPU/TPU, `'explicit'` on CPU, so CPU results stay
        bit-identical to vit_jax (the fused XLA path scales the float32 logits instead of the
        inputs, which differs in the last bits).
    """
    num_heads: int
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    init_style: str = "vit"
    qkv_only: bool = False  # stop after sowing q, k, v and return them
    attention_impl: str = "auto"

    def _fused(self, deterministic: bool) -> bool:
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}.")
        if self.attention_impl == "explicit" or (self.attention_impl == "auto" and jax.default_backend() == "cpu"):
            return False
        if self.is_mutable_collection("attention") or self.is_mutable_collection("qkv"):
            return False
        return deterministic or self.dropout_rate == 0.0

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"hidden size {width} is not divisible by num_heads {self.num_heads}.")
        head_dim = width // self.num_heads
        if self.init_style == "mae":
            # MAE's fused qkv Linear(D, 3D), xavier-uniform: variance 2 / (D + 3D) per kernel
            # (DenseGeneral hands the initialiser the flattened (D, D) kernel shape).
            qkv_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")
        else:
            qkv_init = nn.initializers.xavier_uniform()
        out_init = nn.initializers.xavier_uniform()
        proj = lambda name: LoraDenseGeneral(
            (self.num_heads, head_dim), dtype=self.dtype, name=name, kernel_init=qkv_init)
        q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
        self.sow("qkv", "q", q)
        self.sow("qkv", "k", k)
        self.sow("qkv", "v", v)
        if self.qkv_only:
            return q, k, v
        if self._fused(deterministic):
            out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / float(head_dim) ** 0.5)
        else:
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(self.dtype)
            probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
            self.sow("attention", "probs", probs)
            probs = nn.Dropout(rate=self.dropout_rate, broadcast_dims=())(probs, deterministic=deterministic)
            out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return LoraDenseGeneral(width, axis=(-2, -1), dtype=self.dtype, name="out",
                                kernel_init=out_init)(out)


class Adapter(nn.Module):
    """Houlsby bottleneck adapter `x + up(gelu(down(x)))`, identity at init."""
    bottleneck_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.bottleneck_dim, dtype=self.dtype, name="down",
                     kernel_init=nn.initializers.normal(stddev=1e-3))(x)
        h = nn.gelu(h)
        return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="up",
                            kernel_init=nn.initializers.zeros)(h)


def _layer_norm(name: str, epsilon: float) -> nn.LayerNorm:
    # Statistics in float32 even under a bfloat16 compute dtype.
    return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, name=name)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block with optional ReMem reweighting, pruning and adapters."""
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    approximate_gelu: bool = True
    attn_beta: float = 1.0
    mlp_alpha: float = 1.0
    residual_mode: str = "two_minus"
    skip_attn: bool = False
    skip_mlp: bool = False
    adapter_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    drop_path_rate: float = 0.0
    init_style: str = "vit"
    qkv_only: bool = False  # compute LayerNorm_0 and q/k/v only (sown), return the input
    attention_impl: str = "auto"
    layernorm_epsilon: float = LAYERNORM_EPSILON

    def _residual(self, stream, branch, weight):
        if weight == 1.0:  # Keeps the default model bit-identical to the plain one.
            return stream + branch
        return residual_factor(weight, self.residual_mode) * stream + weight * branch

    @nn.compact
    def __call__(self, x, deterministic: bool):
        # `deterministic` may be positional: nn.remat marks it static by position.
        drop_path = DropPath(self.drop_path_rate)
        if self.qkv_only:
            if self.skip_attn:
                raise ValueError("qkv_only needs the block's attention, but it is pruned.")
            y = _layer_norm("LayerNorm_0", self.layernorm_epsilon)(x).astype(self.dtype)
            MultiHeadSelfAttention(self.num_heads, self.attention_dropout_rate, self.dtype, self.init_style,
                                   qkv_only=True, attention_impl=self.attention_impl,
                                   name="MultiHeadDotProductAttention_1")(
                                       y, deterministic=deterministic)
            return x
        if not self.skip_attn:
            y = _layer_norm("LayerNorm_0", self.layernorm_epsilon)(x).astype(self.dtype)
            y = MultiHeadSelfAttention(
                self.num_heads, self.attention_dropout_rate, self.dtype, self.init_style,
                attention_impl=self.attention_impl, name="MultiHeadDotProductAttention_1")(y, deterministic=deterministic)
            y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
            if self.adapter_dim:
                y = Adapter(self.adapter_dim, self.dtype, name="Adapter_attn")(y)
            x = self._residual(x, drop_path(y, deterministic=deterministic), self.attn_beta)
        if not self.skip_mlp:
            y = _layer_norm("LayerNorm_2", self.layernorm_epsilon)(x).astype(self.dtype)
            y = MlpBlock(self.mlp_dim, self.dropout_rate, self.approximate_gelu, self.dtype, self.init_style,
                         name="MlpBlock_3")(y, deterministic=deterministic)
            if self.adapter_dim:
                y = Adapter(self.adapter_dim, self.dtype, name="Adapter_mlp")(y)
            x = self._residual(x, drop_path(y, deterministic=deterministic), self.mlp_alpha)
        self.sow("tokens", "out", x)
        return x


class AddPositionEmbs(nn.Module):
    """Learned position embeddings `(1, tokens, D)`; row 0 belongs to the class token.

    With `kind='sincos2d'` a fixed table (`sincos_posemb_2d`) is added instead and there is no
    parameter (export adds it as `pos_embedding`, so the npz is an ordinary AugReg file).
    """
    kind: str = "learned"

    @nn.compact
    def __call__(self, x):
        if self.kind == "sincos2d":
            grid = int(round((x.shape[1] - 1) ** 0.5))
            if grid * grid != x.shape[1] - 1:
                raise ValueError(f"sin-cos position embeddings need a square grid plus a class token, "
                                 f"got {x.shape[1]} tokens.")
            return x + jnp.asarray(sincos_posemb_2d(x.shape[2], grid), x.dtype)
        shape = (1, x.shape[1], x.shape[2])
        if self.has_variable("params", "pos_embedding"):
            stored = self.get_variable("params", "pos_embedding").shape
        else:
            stored = shape
        if stored != shape:
            raise ValueError(
                f"The input has {x.shape[1]} tokens but Transformer/posembed_input/pos_embedding "
                f"has shape {stored}; load the checkpoint with image_size=<this input's size> "
                "to resize the position embeddings.")
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), shape)
        return x + pos.astype(x.dtype)


class Encoder(nn.Module):
    """The stack of blocks (module name `Transformer` in the checkpoints)."""
    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    approximate_gelu: bool = True
    attn_beta: tuple[float, ...] = ()
    mlp_alpha: tuple[float, ...] = ()
    residual_mode: str = "two_minus"
    prune_attn: tuple[int, ...] = ()
    prune_mlp: tuple[int, ...] = ()
    adapter_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    drop_path_rate: tuple[float, ...] = ()
    last_block_heads: Optional[int] = None
    posemb: str = "learned"
    init_style: str = "vit"
    qkv_only_block: Optional[int] = None
    attention_impl: str = "auto"
    remat_blocks: bool = False
    layernorm_epsilon: float = LAYERNORM_EPSILON

    @nn.compact
    def __call__(self, x, *, deterministic: bool):
        # Rematerialisation keeps only each block's input for the backward pass (static_argnums
        # counts `self`: 2 is `deterministic`); parameter names are unchanged.
        block_cls = nn.remat(Encoder1DBlock, static_argnums=(2,)) if self.remat_blocks else Encoder1DBlock
        x = AddPositionEmbs(self.posemb, name="posembed_input")(x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            heads = self.last_block_heads if last and self.last_block_heads else self.num_heads
            x = block_cls(
                mlp_dim=self.mlp_dim, num_heads=heads,
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                approximate_gelu=self.approximate_gelu,
                attn_beta=self.attn_beta[i] if self.attn_beta else 1.0,
                mlp_alpha=self.mlp_alpha[i] if self.mlp_alpha else 1.0,
                residual_mode=self.residual_mode,
                skip_attn=i in self.prune_attn, skip_mlp=i in self.prune_mlp,
                adapter_dim=self.adapter_dim, dtype=self.dtype,
                drop_path_rate=self.drop_path_rate[i] if self.drop_path_rate else 0.0,
                init_style=self.init_style, qkv_only=i == self.qkv_only_block,
                attention_impl=self.attention_impl, layernorm_epsilon=self.layernorm_epsilon,
                name=f"encoderblock_{i}")(x, deterministic)
            if i == self.qkv_only_block:
                return x
        encoded = _layer_norm("encoder_norm", self.layernorm_epsilon)(x)
        self.sow("tokens", "encoded", encoded)
        return encoded


class VisionTransformer(nn.Module):
    """ViT classifier on NHWC images in [-1, 1]; returns float32 logits.

    Attributes:
      num_classes: classes of the `head`; 0 or None builds no head and returns
        the pre-logits representation.
      patch_size, hidden_size, num_layers, num_heads, mlp_dim: the architecture.
      representation_size: width of the `pre_logits` Dense+tanh layer of the
        original 2020 checkpoints; None (AugReg) for none.
      dropout_rate, attention_dropout_rate: dropout (0 in AugReg fine-tuning).
      approximate_gelu: tanh GELU (True, what the AugReg checkpoints were trained with)
        or the exact erf form (timm and Hugging Face ViTs).
      layernorm_epsilon: epsilon of every LayerNorm (1e-6 as vit_jax and timm; Hugging Face
        configs carry their own, 1e-12 by default).
      mlp_alpha, attn_beta: ReMem branch weights, a number or one per block.
      residual_mode: `'two_minus'` (residual factor 2 - w) or `'inverse'` (1 / w).
      prune_attn, prune_mlp: indices of blocks whose branch is removed.
      adapter_dim: bottleneck width of Houlsby adapters; None for none.
      dtype: compute dtype (bfloat16 on accelerators); parameters stay float32.
      drop_path_rate: stochastic depth of each block's two branches (a number or one per
        block, each in [0, 1)); 0 at inference.
      last_block_heads: head count of the last block (TinyMIM matches the teacher's there);
        None for `num_heads`.
      posemb: `'learned'` (AugReg) or `'sincos2d'` (fixed, no parameter; MAE).
      init_style: `'vit'` (vit_jax) or `'mae'` (xavier-uniform patch embedding and linears,
        class token N(0, 0.02), zero biases). Only matters for freshly initialised models.
      qkv_only_block: a 0-based block index: the forward pass stops after that block's
        LayerNorm_0 and q/k/v (sown in `qkv`) and returns that block's input tokens
        `[B, N, D]` (float32); later blocks, the norm and the head are neither run nor created.
      attention_impl: `'auto'` (fused `jax.nn.dot_product_attention` on GPU/TPU, the written-out
        softmax on CPU), `'fused'` or `'explicit'`; see `MultiHeadSelfAttention`. Probabilities
        and q/k/v requests always take the written-out path.
      remat_blocks: rematerialise each block in the backward pass (`nn.remat`): activation
        memory of one block instead of all, for about one extra forward pass.
      (`approximate_gelu` and `layernorm_epsilon` are the numeric options a checkpoint carries:
      see `NUMERIC_OPTIONS`.)

    A `lora` variable collection (`surgery.lora_variables`) adds factored LoRA terms to the
    block projections: `model.apply({'params': base, 'lora': factors}, images)`.
    """
    num_classes: Optional[int]
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    representation_size: Optional[int] = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    approximate_gelu: bool = True
    mlp_alpha: BlockFactor = 1.0
    attn_beta: BlockFactor = 1.0
    residual_mode: str = "two_minus"
    prune_attn: tuple[int, ...] = ()
    prune_mlp: tuple[int, ...] = ()
    adapter_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    drop_path_rate: BlockFactor = 0.0
    last_block_heads: Optional[int] = None
    posemb: str = "learned"
    init_style: str = "vit"
    qkv_only_block: Optional[int] = None
    attention_impl: str = "auto"
    remat_blocks: bool = False
    layernorm_epsilon: float = LAYERNORM_EPSILON

    def _check_config(self):
        if self.residual_mode not in RESIDUAL_MODES:
            raise ValueError(f"residual_mode must be one of {RESIDUAL_MODES}, got {self.residual_mode!r}.")
        if self.posemb not in POSEMB_KINDS:
            raise ValueError(f"posemb must be one of {POSEMB_KINDS}, got {self.posemb!r}.")
        if self.init_style not in INIT_STYLES:
            raise ValueError(f"init_style must be one of {INIT_STYLES}, got {self.init_style!r}.")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}.")
        if self.qkv_only_block is not None and not 0 <= self.qkv_only_block < self.num_layers:
            raise ValueError(f"qkv_only_block must be a block index in [0, {self.num_layers}), "
                             f"got {self.qkv_only_block}.")
        for field in ("prune_attn", "prune_mlp"):
            bad = [i for i in getattr(self, field) if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"{field} has block indices {bad} outside [0, {self.num_layers}).")

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        self._check_config()
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Expected NHWC RGB images, got shape {images.shape}.")
        n, h, w, _ = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {self.patch_size}.")
        mae = self.init_style == "mae"
        conv_init = (nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
                     if mae else nn.linear.default_kernel_init)
        x = nn.Conv(self.hidden_size, (self.patch_size, self.patch_size),
                    strides=(self.patch_size, self.patch_size), padding="VALID",
                    kernel_init=conv_init, dtype=self.dtype, name="embedding")(images.astype(self.dtype))
        x = x.reshape(n, -1, self.hidden_size)
        cls = self.param("cls", nn.initializers.normal(stddev=0.02) if mae else nn.initializers.zeros,
                         (1, 1, self.hidden_size))
        x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (n, 1, 1)), x], axis=1)
        x = Encoder(
            num_layers=self.num_layers, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
            dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
            approximate_gelu=self.approximate_gelu,
            attn_beta=per_block(self.attn_beta, self.num_layers, "attn_beta"),
            mlp_alpha=per_block(self.mlp_alpha, self.num_layers, "mlp_alpha"),
            residual_mode=self.residual_mode,
            prune_attn=tuple(self.prune_attn), prune_mlp=tuple(self.prune_mlp),
            adapter_dim=self.adapter_dim, dtype=self.dtype,
            drop_path_rate=per_block_rates(self.drop_path_rate, self.num_layers, "drop_path_rate"),
            last_block_heads=self.last_block_heads, posemb=self.posemb, init_style=self.init_style,
            qkv_only_block=self.qkv_only_block, attention_impl=self.attention_impl,
            remat_blocks=self.remat_blocks, layernorm_epsilon=self.layernorm_epsilon,
            name="Transformer")(x, deterministic=not train)
        if self.qkv_only_block is not None:
            return x.astype(jnp.float32)
        x = x[:, 0]
        if self.representation_size is not None:
            x = nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(x)
            x = jnp.tanh(x)
        self.sow("pre_logits", "representation", x)
        if not self.num_classes:
            return x.astype(jnp.float32)
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                     kernel_init=nn.initializers.zeros)(x)
        return x.astype(jnp.float32)


def create_vit(variant: str, num_classes: Optional[int], **overrides) -> VisionTransformer:
    """Builds a `VisionTransformer` for a named variant (`'B_16'`, `'Ti_16'`, ...)."""
    fields = {f.name for f in dataclasses.fields(VisionTransformer)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"Unknown VisionTransformer fields {unknown}; known: {sorted(fields)}.")
    return VisionTransformer(num_classes=num_classes, **{**variant_config(variant), **overrides})


def numeric_options(model: VisionTransformer) -> dict[str, Any]:
    """The model's `NUMERIC_OPTIONS` that differ from the AugReg defaults (empty for an AugReg ViT)."""
    return {name: getattr(model, name) for name, default in NUMERIC_OPTIONS.items()
            if getattr(model, name) != default}


def param_shapes(model: VisionTransformer, image_size: int) -> dict[str, Any]:
    """The model's parameter tree as ShapeDtypeStructs, without allocating it."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda im: model.init(jax.random.PRNGKey(0), im), x)["params"]


def collect_intermediates(state: Mapping[str, Any]) -> dict[str, Any]:
    """Turns the sown collections of one `apply` into plain per-block lists.

    Args:
      state: the mutable-collections dict returned by
        `model.apply(..., mutable=[...])`.

    Returns:
      A dict with the requested keys among: `tokens` (list over blocks of
      `[B, N, D]`), `encoded` (`[B, N, D]` after encoder_norm), `attention`
      (list of `[B, heads, N, N]`), `query`/`key`/`value` (lists of
      `[B, N, heads, head_dim]`), `mlp_hidden` (list of `[B, N, mlp_dim]`),
      `pre_logits` (`[B, D or representation_size]`). Pruned branches are
      missing from the per-block lists of that branch.
    """
    def blocks(collection):
        sown = state.get(collection, {}).get("Transformer", {})
        names = sorted((k for k in sown if tree.block_part_index(k) is not None), key=tree.block_part_index)
        return [sown[k] for k in names]

    out: dict[str, Any] = {}
    if "tokens" in state:
        out["tokens"] = [b["out"][0] for b in blocks("tokens")]
        out["encoded"] = state["tokens"]["Transformer"]["encoded"][0]
    if "attention" in state:
        out["attention"] = [b["MultiHeadDotProductAttention_1"]["probs"][0]
                            for b in blocks("attention") if "MultiHeadDotProductAttention_1" in b]
    if "qkv" in state:
        attn = [b["MultiHeadDotProductAttention_1"] for b in blocks("qkv")
                if "MultiHeadDotProductAttention_1" in b]
        for name, short in (("query", "q"), ("key", "k"), ("value", "v")):
            out[name] = [a[short][0] for a in attn]
    if "mlp_hidden" in state:
        out["mlp_hidden"] = [b["MlpBlock_3"]["hidden"][0] for b in blocks("mlp_hidden")
                             if "MlpBlock_3" in b]
    if "pre_logits" in state:
        out["pre_logits"] = state["pre_logits"]["representation"][0]
    return out


def encoder_tokens(model: VisionTransformer, params: Any, images: jax.Array, *, after_norm: bool,
                   train: bool = False, rng: Optional[jax.Array] = None,
                   lora: Optional[Any] = None) -> jax.Array:
    """All tokens `[B, N, D]` (CLS first) of the last block: before `encoder_norm`, or after it.

    The head and `pre_logits` are computed too but nothing depends on them, so under `jit` XLA
    drops them.

    Args:
      model, params: the ViT and its parameter tree.
      images: NHWC in [-1, 1].
      after_norm: True for `encoder_norm(x)` (WeCo+KD's target, the linear probe's CLS), False
        for the last block's output (WeCoLoRA's target).
      train: dropout on (needs `rng`).
      rng: dropout key.
      lora: an optional factored-LoRA collection (`surgery.lora_variables(...)['lora']`).
    """
    rngs = {"dropout": rng} if rng is not None else None
    variables = {"params": params} if lora is None else {"params": params, "lora": lora}
    _, state = model.apply(variables, images, train=train, rngs=rngs, mutable=["tokens"])
    sown = collect_intermediates(state)
    return sown["encoded"] if after_norm else sown["tokens"][-1]
