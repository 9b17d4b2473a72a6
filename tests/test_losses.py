"""Losses against NumPy float64 references written from the formulas (float32 code, rtol 1e-5)."""
import functools

import chex
import jax
import numpy as np
import pytest
from absl.testing import parameterized

from remem_jax import losses

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------- references (float64)

def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_ce(logits, y):
    return -(np.asarray(y, np.float64) * np_log_softmax(logits)).sum(-1)


def np_kl(s, t, temp):
    p_t = np_softmax(np.asarray(t, np.float64) / temp)
    return (p_t * (np_log_softmax(np.asarray(t, np.float64) / temp)
                   - np_log_softmax(np.asarray(s, np.float64) / temp))).sum(-1)


def np_kd(s, t, y, temp, lam):
    return np.mean((1 - lam) * np_ce(s, y) + lam * temp ** 2 * np_kl(s, t, temp))


def np_pearson_rows(a, b, eps):
    """Pearson per row, eps added to the product of the two norms (DIST code)."""
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / (np.sqrt((a * a).sum(1)) * np.sqrt((b * b).sum(1)) + eps)


def np_dist(s, t, beta, gamma, tau, eps=1e-8):
    y_s = np_softmax(np.asarray(s, np.float64) / tau)
    y_t = np_softmax(np.asarray(t, np.float64) / tau)
    inter = 1 - np_pearson_rows(y_s, y_t, eps).mean()
    intra = 1 - np_pearson_rows(y_s.T, y_t.T, eps).mean()
    return beta * tau ** 2 * inter + gamma * tau ** 2 * intra


def data(b=6, c=5, seed=0, scale=3.0):
    rng = np.random.RandomState(seed)
    s = (scale * rng.randn(b, c)).astype(np.float32)
    t = (scale * rng.randn(b, c)).astype(np.float32)
    y = rng.dirichlet(np.ones(c), size=b).astype(np.float32)
    return s, t, y


# ----------------------------------------------------------------------------- values

class LossValuesTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy_soft_and_hard(self):
        s, _, y = data()
        ce = self.variant(losses.softmax_cross_entropy)
        np.testing.assert_allclose(ce(s, y), np_ce(s, y).mean(), rtol=RTOL)
        onehot = np.eye(5, dtype=np.float32)[[0, 3, 1, 4, 2, 2]]
        np.testing.assert_allclose(ce(s, onehot), np_ce(s, onehot).mean(), rtol=RTOL)

    @chex.variants(with_jit=True, without_jit=True)
    def test_cross_entropy_weights(self):
        s, _, y = data()
        w = np.array([1, 1, 0, 1, 0, 1], np.float32)
        got = self.variant(losses.softmax_cross_entropy)(s, y, w)
        np.testing.assert_allclose(got, (w * np_ce(s, y)).sum() / w.sum(), rtol=RTOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1.0, 0.1), (2.0, 0.5), (4.0, 0.9))
    def test_kd(self, temp, lam):
        s, t, y = data()
        fn = self.variant(functools.partial(losses.kd_loss, temperature=temp, kd_weight=lam))
        np.testing.assert_allclose(fn(s, t, y), np_kd(s, t, y, temp, lam), rtol=RTOL)

    def test_kd_limits(self):
        s, t, y = data()
        # lam = 0 is plain CE; lam = 1 with teacher == student is exactly 0 (any T).
        np.testing.assert_allclose(losses.kd_loss(s, t, y, temperature=4.0, kd_weight=0.0),
                                   np_ce(s, y).mean(), rtol=RTOL)
        np.testing.assert_allclose(losses.kd_loss(s, s, y, temperature=2.0, kd_weight=1.0), 0.0, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1.0, 2.0, 4.0)
    def test_patient_kd(self, temp):
        s, t, _ = data()
        got = self.variant(functools.partial(losses.patient_kd_loss, temperature=temp))(s, t)
        np.testing.assert_allclose(got, temp ** 2 * np_kl(s, t, temp).mean(), rtol=RTOL)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters((1.0, 1.0, 1.0), (2.0, 2.0, 1.0), (1.0, 0.5, 4.0))
    def test_dist(self, beta, gamma, tau):
        s, t, _ = data(b=8, c=7)
        got = self.variant(functools.partial(losses.dist_loss, beta=beta, gamma=gamma, tau=tau))(s, t)
        np.testing.assert_allclose(got, np_dist(s, t, beta, gamma, tau), rtol=RTOL, atol=ATOL)

    def test_dist_tau_squared_scaling(self):
        # tau enters twice: softmax(z / tau) and the tau^2 factor. Compare with tau=1 on z / 4.
        s, t, _ = data(b=8, c=7)
        at_tau4 = losses.dist_loss(s, t, tau=4.0)
        at_tau1_scaled = losses.dist_loss(s / 4.0, t / 4.0, tau=1.0)
        np.testing.assert_allclose(at_tau4, 16.0 * at_tau1_scaled, rtol=RTOL)

    def test_dist_eps_placement(self):
        # A large eps makes the placement visible: eps is added to ||a|| * ||b||.
        s, t, _ = data(b=8, c=7)
        eps = 1e-2
        got = float(losses.dist_loss(s, t, eps=eps))
        np.testing.assert_allclose(got, np_dist(s, t, 1.0, 1.0, 1.0, eps=eps), rtol=RTOL)
        y_s, y_t = np_softmax(s), np_softmax(t)

        def per_norm_eps(a, b):  # the wrong variant: eps on each norm
            a = a - a.mean(1, keepdims=True)
            b = b - b.mean(1, keepdims=True)
            return (a * b).sum(1) / ((np.linalg.norm(a, axis=1) + eps) * (np.linalg.norm(b, axis=1) + eps))
        wrong = 2 - per_norm_eps(y_s, y_t).mean() - per_norm_eps(y_s.T, y_t.T).mean()
        assert abs(got - wrong) > 100 * RTOL * abs(got)

    def test_dist_objective(self):
        s, t, y = data(b=8, c=7)
        got = losses.dist_objective(s, t, y, ce_weight=0.5, beta=1.0, gamma=2.0, tau=1.0)
        np.testing.assert_allclose(got, 0.5 * np_ce(s, y).mean() + np_dist(s, t, 1.0, 2.0, 1.0), rtol=RTOL)

    def test_dist_identical_inputs_is_zero(self):
        s, _, _ = data(b=8, c=7)
        np.testing.assert_allclose(losses.dist_loss(s, s), 0.0, atol=1e-5)

    def test_l1(self):
        s, t, _ = data()
        np.testing.assert_allclose(losses.l1_feature_loss(s, t),
                                   np.abs(s.astype(np.float64) - t).mean(), rtol=RTOL)


# ----------------------------------------------------------------------------- gradients

def np_ce_grad(logits, y):
    """d mean CE / d logits = (softmax(z) * sum(y) - y) / B."""
    y = np.asarray(y, np.float64)
    return (np_softmax(logits) * y.sum(-1, keepdims=True) - y) / logits.shape[0]


def test_cross_entropy_gradient():
    s, _, y = data()
    np.testing.assert_allclose(jax.grad(losses.softmax_cross_entropy)(s, y), np_ce_grad(s, y), rtol=1e-5, atol=1e-7)


def test_kd_gradient_and_teacher_is_constant():
    s, t, y = data()
    temp, lam = 2.0, 0.5
    gs, gt = jax.grad(lambda a, b: losses.kd_loss(a, b, y, temperature=temp, kd_weight=lam), argnums=(0, 1))(s, t)
    # d/ds [T^2 KL(p_t^T || p_s^T)] = T (p_s^T - p_t^T), per example, / B.
    expected = (1 - lam) * np_ce_grad(s, y) + lam * temp * (np_softmax(s / temp) - np_softmax(t / temp)) / s.shape[0]
    np.testing.assert_allclose(gs, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(gt, 0.0)


EXTREME = np.array([[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, 1e4, 1e4], [0.0, 1e4, -1e4, -5e3]], np.float32)


@pytest.mark.parametrize("name", ["ce", "kd", "patient", "dist", "dist_objective", "l1"])
def test_extreme_logits_have_finite_values_and_gradients(name):
    y = np.eye(4, dtype=np.float32)[[1, 0, 3]]
    t = EXTREME[::-1].copy()
    fns = {
        "ce": lambda s: losses.softmax_cross_entropy(s, y),
        "kd": lambda s: losses.kd_loss(s, t, y, temperature=2.0, kd_weight=0.5),
        "patient": lambda s: losses.patient_kd_loss(s, t, temperature=1.0),
        "dist": lambda s: losses.dist_loss(s, t),
        "dist_objective": lambda s: losses.dist_objective(s, t, y),
        "l1": lambda s: losses.l1_feature_loss(s, t),
    }
    value, grad = jax.value_and_grad(fns[name])(EXTREME)
    assert np.isfinite(value), value
    assert np.all(np.isfinite(grad)), grad


def test_dist_gradient_finite_with_constant_class_column():
    # Batch of identical rows: every class column is constant over the batch, so the intra-class
    # centred vectors are exactly 0 (norm 0); the gradient must still be finite.
    s = np.tile(np.array([[1.0, 2.0, 3.0]], np.float32), (4, 1))
    t = np.tile(np.array([[3.0, 1.0, 0.0]], np.float32), (4, 1))
    grad = jax.grad(lambda a: losses.dist_loss(a, t))(s)
    assert np.all(np.isfinite(grad))


def test_bad_inputs_raise():
    s, t, y = data()
    with pytest.raises(ValueError, match="soft_labels"):
        losses.softmax_cross_entropy(s, y[:, :3])
    with pytest.raises(ValueError, match="kd_weight"):
        losses.kd_loss(s, t, y, temperature=1.0, kd_weight=1.5)
    with pytest.raises(ValueError, match="temperature"):
        losses.patient_kd_loss(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="tau"):
        losses.dist_loss(s, t, tau=-1.0)
    with pytest.raises(ValueError, match="weights"):
        losses.softmax_cross_entropy(s, y, np.ones(3, np.float32))
