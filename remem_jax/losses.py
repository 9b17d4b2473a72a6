"""Losses: cross-entropy, KD, DIST, patient KD and feature L1.

Every loss is a pure `jnp` function of logits (or features) that computes a per-example value in
float32 and returns its (optionally weighted) mean. Log-probabilities come from `log_softmax`, so
values and gradients stay finite for extreme logits. Teacher inputs are treated as constants
(`stop_gradient`): no loss here ever trains a teacher.
"""
from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_positive(name: str, value) -> None:
    if isinstance(value, numbers.Real) and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


def _check_same_shape(name_a: str, a: Array, name_b: str, b: Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}.")


def _weighted_mean(per_example: Array, weights: Optional[Array]) -> Array:
    """Mean of `per_example`; with `weights`, sum(w * l) / sum(w) (0 when all weights are 0)."""
    if weights is None:
        return jnp.mean(per_example)
    weights = jnp.asarray(weights, jnp.float32)
    if weights.shape != per_example.shape:
        raise ValueError(f"weights must have shape {per_example.shape} (one per example), got {weights.shape}.")
    return jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1e-12)


def _log_softmax(logits: Array, temperature=1.0) -> Array:
    return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)


def softmax_cross_entropy(logits: Array, soft_labels: Array, weights: Optional[Array] = None) -> Array:
    """Mean cross-entropy `-sum_c y_c log softmax(z)_c` against (soft or one-hot) labels.

    Args:
      logits: `[B, C]` (any leading shape) unnormalised scores.
      soft_labels: same shape as `logits`; rows are distributions (one-hot for hard labels).
      weights: optional per-example weights of shape `logits.shape[:-1]` (e.g. a padding mask).

    Returns:
      A float32 scalar.
    """
    _check_same_shape("logits", logits, "soft_labels", soft_labels)
    per_example = -jnp.sum(jnp.asarray(soft_labels, jnp.float32) * _log_softmax(logits), axis=-1)
    return _weighted_mean(per_example, weights)


def _kl_per_example(student_logits: Array, teacher_logits: Array, temperature) -> Array:
    """`KL(softmax(t/T) || softmax(s/T))` per example, teacher detached."""
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    _check_positive("temperature", temperature)
    log_p_t = _log_softmax(jax.lax.stop_gradient(teacher_logits), temperature)
    log_p_s = _log_softmax(student_logits, temperature)
    # exp(log_p_t) underflows to exactly 0 where log_p_t is very negative; 0 * finite = 0.
    return jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def kd_loss(student_logits: Array, teacher_logits: Array, soft_labels: Array, *, temperature: float,
            kd_weight: float, weights: Optional[Array] = None) -> Array:
    """Hinton KD: `(1 - lam) * CE(y, s) + lam * T^2 * KL(softmax(t/T) || softmax(s/T))`.

    The CE term uses the student logits at temperature 1; `T^2` keeps the KL gradient scale
    independent of T. `lam = kd_weight`.

    Args:
      student_logits: `[B, C]`.
      teacher_logits: `[B, C]`, treated as constants.
      soft_labels: `[B, C]` label distributions.
      temperature: T > 0.
      kd_weight: lam in [0, 1].
      weights: optional per-example weights `[B]`.

    Returns:
      A float32 scalar.
    """
    if isinstance(kd_weight, numbers.Real) and not 0.0 <= kd_weight <= 1.0:
        raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight!r}.")
    _check_same_shape("student_logits", student_logits, "soft_labels", soft_labels)
    ce = -jnp.sum(jnp.asarray(soft_labels, jnp.float32) * _log_softmax(student_logits), axis=-1)
    kl = _kl_per_example(student_logits, teacher_logits, temperature)
    per_example = (1.0 - kd_weight) * ce + kd_weight * temperature ** 2 * kl
    return _weighted_mean(per_example, weights)


def patient_kd_loss(student_logits: Array, teacher_logits: Array, *, temperature: float = 1.0,
                    weights: Optional[Array] = None) -> Array:
    """Patient ("function matching") KD: `T^2 * KL(softmax(t/T) || softmax(s/T))`, no CE term.

    Teacher and student must have seen the same (augmented, mixed) image; that is the caller's job.

    Returns:
      A float32 scalar.
    """
    kl = _kl_per_example(student_logits, teacher_logits, temperature)
    return _weighted_mean(temperature ** 2 * kl, weights)


def _safe_norm(x: Array, axis: int) -> Array:
    """L2 norm whose gradient at 0 is 0 (not NaN), as torch's `norm` backward."""
    sq = jnp.sum(x * x, axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _pearson(a: Array, b: Array, eps: float) -> Array:
    """Row-wise `(a - a_bar).(b - b_bar) / (||a - a_bar|| * ||b - b_bar|| + eps)`."""
    a = a - jnp.mean(a, axis=1, keepdims=True)
    b = b - jnp.mean(b, axis=1, keepdims=True)
    return jnp.sum(a * b, axis=1) / (_safe_norm(a, 1) * _safe_norm(b, 1) + eps)


def dist_loss(student_logits: Array, teacher_logits: Array, *, beta: float = 1.0, gamma: float = 1.0,
              tau: float = 1.0, eps: float = 1e-8) -> Array:
    """DIST (Huang et al. 2022): `beta * tau^2 * L_inter + gamma * tau^2 * L_intra`.

    With `Y = softmax(Z / tau)` row-wise (`[B, C]`):
    `L_inter = 1 - mean_i rho(Y^s_i, Y^t_i)` (per example, across classes) and
    `L_intra = 1 - mean_j rho(Y^s_:j, Y^t_:j)` (per class, across the batch), where
    `rho(u, v) = (u - u_bar).(v - v_bar) / (||u - u_bar|| ||v - v_bar|| + eps)`: eps is added to the
    product of the norms, as in the reference code.

    The intra-class term couples the examples of a batch: under pmap it is computed over each
    device's batch (and over each micro-batch with gradient accumulation), as the reference does
    per GPU. There is no per-example weighting for the same reason.

    Args:
      student_logits: `[B, C]`.
      teacher_logits: `[B, C]`, treated as constants.
      beta: inter-class weight.
      gamma: intra-class weight.
      tau: softmax temperature (> 0).
      eps: added to the denominator product of the Pearson correlation.

    Returns:
      A float32 scalar.
    """
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    if student_logits.ndim != 2:
        raise ValueError(f"dist_loss expects [batch, classes] logits, got shape {student_logits.shape}.")
    _check_positive("tau", tau)
    y_s = jnp.exp(_log_softmax(student_logits, tau))
    y_t = jnp.exp(_log_softmax(jax.lax.stop_gradient(teacher_logits), tau))
    inter = 1.0 - jnp.mean(_pearson(y_s, y_t, eps))
    intra = 1.0 - jnp.mean(_pearson(y_s.T, y_t.T, eps))
    return beta * tau ** 2 * inter + gamma * tau ** 2 * intra


def dist_objective(student_logits: Array, teacher_logits: Array, soft_labels: Array, *,
                   ce_weight: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                   tau: float = 1.0) -> Array:
    """ReMem's DIST objective: `ce_weight * CE(y, s) + dist_loss(s, t; beta, gamma, tau)`.

    ReMem (Table 6) uses beta = gamma = 1, and we take tau = 1 and ce_weight = 1 (the DIST repo's
    `kd_loss_weight=2` corresponds to beta = gamma = 2).
    """
    ce = softmax_cross_entropy(student_logits, soft_labels)
    return ce_weight * ce + dist_loss(student_logits, teacher_logits, beta=beta, gamma=gamma, tau=tau)


def l1_feature_loss(student: Array, teacher: Array) -> Array:
    """Mean absolute error over all elements (torch `nn.L1Loss`), teacher detached (WeCoLoRA)."""
    _check_same_shape("student", student, "teacher", teacher)
    diff = jnp.asarray(student, jnp.float32) - jnp.asarray(jax.lax.stop_gradient(teacher), jnp.float32)
    return jnp.mean(jnp.abs(diff))
