"""The ReMem fold: a reweighted ViT as a plain ViT tree (exact up to the LayerNorm epsilon)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from remem_jax import tree
from remem_jax.models import vit
from remem_jax.surgery.base import ATTN, LORA_KEY, MLP, Params, SurgeryError, block_path, num_blocks


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
    flat = dict(tree.flatten_params(params))
    num = num_blocks(flat)
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
        block = block_path(i)
        branches = ((betas[i], i in prune_attn, f"{block}/{ATTN}/out", f"{block}/Adapter_attn"),
                    (alphas[i], i in prune_mlp, f"{block}/{MLP}/Dense_1", f"{block}/Adapter_mlp"))
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
    return tree.unflatten_params(flat)
