"""TinyMIM's distillation losses: token relations (Q-K, V-V), CLS token and features.

`relation_loss` follows the released code (`models_tinymim.py`, notes/methods.md section 2.1).
`cls_loss` and `feature_loss` follow the paper's description only (section 2.2, ambiguity row 22):
the released code implements relations alone, so those two are unverified against it.

Teacher inputs are treated as constants (`stop_gradient`); every loss is float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
QKV = dict  # {'query' | 'q': [B, N, H, d], 'key' | 'k': ..., 'value' | 'v': ...}


def _get(qkv: QKV, name: str) -> Array:
    for key in (name, name[0]):
        if key in qkv:
            return jnp.asarray(qkv[key], jnp.float32)
    raise KeyError(f"q/k/v dict has no {name!r} (or {name[0]!r}); it has {sorted(qkv)}.")


def relation_logits(a: Array, b: Array) -> Array:
    """Per-head token relation logits `a_h b_h^T / sqrt(d_h)`: `[B, N, H, d] x2 -> [B, H, N, N]`."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return jnp.einsum("bqhd,bkhd->bhqk", a, b) / jnp.sqrt(jnp.float32(a.shape[-1]))


def _kl_rows(teacher_logits: Array, student_logits: Array) -> Array:
    """Mean over all leading axes of `KL(softmax(t) || softmax(s))` over the last axis."""
    log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
    log_s = jax.nn.log_softmax(student_logits, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1))


def check_relation_shapes(student: QKV, teacher: QKV) -> None:
    """Raises a ValueError unless both models give relations of one shape `[B, H, N, N]`.

    Batch, token count and head count must agree; the head dims may differ (each model
    scales by its own `d_h`).
    """
    s, t = _get(student, "query").shape, _get(teacher, "query").shape
    if len(s) != 4 or len(t) != 4 or s[:3] != t[:3]:
        raise ValueError(
            f"TinyMIM relations need the student's last block and the teacher block to have the same "
            f"[batch, tokens, heads]; got student q/k/v {s} and teacher {t} ([B, N, heads, head_dim]). "
            f"Build the student with last_block_heads = the teacher's head count ({t[2] if len(t) == 4 else '?'}) "
            "and give both the same image size and patch grid.")


def relation_loss(student: QKV, teacher: QKV) -> tuple[Array, dict[str, Array]]:
    """TinyMIM's relation distillation loss `L_QK + L_VV` (released code).

    Per head h, `R^QK = softmax(Q K^T / sqrt(d_h))`, `R^VV = softmax(V V^T / sqrt(d_h))` over
    all N tokens (class token included), each model with its own head dim; each term is
    `KL(R_teacher || R_student)` summed over keys and averaged over batch, heads and queries;
    the two terms have weight 1.

    Args:
      student: the student's `query`, `key`, `value` of its last block, each `[B, N, H, d_s]`.
      teacher: the teacher block's, each `[B, N, H, d_t]` (constants).

    Returns:
      `(loss, {'relation_qk': L_QK, 'relation_vv': L_VV})`, float32 scalars.
    """
    check_relation_shapes(student, teacher)
    q_s, k_s, v_s = (_get(student, n) for n in ("query", "key", "value"))
    q_t, k_t, v_t = (_get(teacher, n) for n in ("query", "key", "value"))
    qk = _kl_rows(relation_logits(q_t, k_t), relation_logits(q_s, k_s))
    vv = _kl_rows(relation_logits(v_t, v_t), relation_logits(v_s, v_s))
    return qk + vv, {"relation_qk": qk, "relation_vv": vv}


def cls_loss(projected_student_cls: Array, teacher_cls: Array) -> Array:
    """`-cos(M c_s, c_t)` averaged over the batch (paper's description, not in the released code).

    Args:
      projected_student_cls: `M c_s`, `[B, D_t]` (the caller applies the learned projection M).
      teacher_cls: `c_t`, `[B, D_t]` (constant).
    """
    s = jnp.asarray(projected_student_cls, jnp.float32)
    t = jax.lax.stop_gradient(jnp.asarray(teacher_cls, jnp.float32))
    if s.shape != t.shape:
        raise ValueError(f"cls_loss: projected student {s.shape} and teacher {t.shape} must match.")
    eps = 1e-8  # torch.nn.functional.cosine_similarity's
    cos = jnp.sum(s * t, -1) / (jnp.maximum(jnp.linalg.norm(s, axis=-1) * jnp.linalg.norm(t, axis=-1), eps))
    return -jnp.mean(cos)


def whiten(features: Array, eps: float = 1e-6) -> Array:
    """Non-affine LayerNorm over the last axis (Feature Distillation's teacher-target whitening)."""
    x = jnp.asarray(features, jnp.float32)
    mean = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def smooth_l1(diff: Array, beta: float) -> Array:
    """Elementwise Smooth-L1 (torch `SmoothL1Loss` with `beta`): `0.5 x^2 / beta` if `|x| < beta`, else `|x| - beta / 2`."""
    a = jnp.abs(diff)
    return jnp.where(a < beta, 0.5 * jnp.square(diff) / beta, a - 0.5 * beta)


def feature_loss(projected_student: Array, teacher: Array, *, beta: float = 2.0) -> Array:
    """Smooth-L1 (beta 2) between `M F_s` and the whitened teacher features `LN(F_t)`, mean over elements.

    Paper's description ("Feature Distillation", Wei et al. 2022), not in the released code.

    Args:
      projected_student: `M F_s`, `[B, N, D_t]`.
      teacher: raw teacher features `F_t`, `[B, N, D_t]` (constant); whitened here.
    """
    s = jnp.asarray(projected_student, jnp.float32)
    t = whiten(jax.lax.stop_gradient(teacher))
    if s.shape != t.shape:
        raise ValueError(f"feature_loss: projected student {s.shape} and teacher {t.shape} must match.")
    return jnp.mean(smooth_l1(s - t, beta))
