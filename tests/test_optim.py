"""Schedules, SGDW, SAM pieces and gradient accumulation against NumPy float64 references."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remem_jax import optim


# ----------------------------------------------------------------------------- schedules

def np_warmup_cosine(c, peak, total, warmup, end):
    if c < warmup:
        return peak * c / warmup
    frac = min(c - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


@pytest.mark.parametrize("peak,total,warmup,end", [(0.1, 100, 10, 0.0), (0.03, 50, 0, 1e-3), (1.0, 7, 6, 0.0)])
def test_warmup_cosine_schedule(peak, total, warmup, end):
    schedule = optim.warmup_cosine_schedule(peak, total, warmup, end_lr=end)
    for c in sorted({0, 1, max(warmup - 1, 0), warmup, (warmup + total) // 2, total - 1, total, total + 5}):
        np.testing.assert_allclose(float(schedule(c)), np_warmup_cosine(c, peak, total, warmup, end),
                                   rtol=1e-5, atol=1e-8, err_msg=f"count {c}")


def test_default_warmup_steps():
    assert optim.default_warmup_steps(10_000) == 500
    assert optim.default_warmup_steps(3000) == 300
    assert optim.default_warmup_steps(500) == 50
    assert optim.default_warmup_steps(7) == 0


def test_schedule_validation():
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.warmup_cosine_schedule(0.1, 100, 100)
    with pytest.raises(ValueError, match="total_steps"):
        optim.warmup_cosine_schedule(0.1, 0, 0)
    with pytest.raises(ValueError, match="peak_lr"):
        optim.warmup_cosine_schedule(-0.1, 10, 1)


# ----------------------------------------------------------------------------- SGDW

def np_sgdw(params, grads_seq, *, lr_fn, momentum, wd, clip, nesterov=False):
    """Reference: clip -> momentum trace -> + wd * w on ndim > 1 leaves -> -lr_t. float64."""
    params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    trace = {k: np.zeros_like(v) for k, v in params.items()}
    history = []
    for c, grads in enumerate(grads_seq):
        grads = {k: np.asarray(v, np.float64) for k, v in grads.items()}
        norm = np.sqrt(sum((g ** 2).sum() for g in grads.values()))
        if clip is not None and norm > clip:
            grads = {k: g * clip / norm for k, g in grads.items()}
        new = {}
        for k in params:
            trace[k] = grads[k] + momentum * trace[k]
            direction = grads[k] + momentum * trace[k] if nesterov else trace[k]
            decay = wd * params[k] if params[k].ndim > 1 else 0.0
            new[k] = params[k] - lr_fn(c) * (direction + decay)
        params = new
        history.append(params)
    return history


# momentum 0.5 as well as the default 0.9, over four updates: the trace of every earlier gradient
# enters with weight momentum^age, so a hard-coded 0.9 (or a trace that ignores momentum) fails.
@pytest.mark.parametrize("momentum", [0.9, 0.5])
@pytest.mark.parametrize("nesterov", [False, True])
def test_optimizer_matches_reference_over_several_steps(nesterov, momentum):
    rng = np.random.RandomState(0)
    params = {"kernel": rng.randn(4, 3).astype(np.float32), "bias": rng.randn(3).astype(np.float32)}
    # Gradient norms ~3.5, ~0.35, ~7, ~0.7: the clip (1.0) is active on steps 1 and 3 only.
    scales = [1.0, 0.1, 2.0, 0.2]
    grads_seq = [{k: (s * rng.randn(*v.shape)).astype(np.float32) for k, v in params.items()} for s in scales]
    schedule = optim.warmup_cosine_schedule(0.5, 10, 2)
    tx = optim.make_optimizer(learning_rate=schedule, momentum=momentum, weight_decay=0.1, grad_clip_norm=1.0,
                              nesterov=nesterov)
    expected = np_sgdw(params, grads_seq, lr_fn=lambda c: np_warmup_cosine(c, 0.5, 10, 2, 0.0),
                       momentum=momentum, wd=0.1, clip=1.0, nesterov=nesterov)
    state = tx.init(params)
    p = jax.tree.map(jnp.asarray, params)
    for c, grads in enumerate(grads_seq):
        updates, state = tx.update(grads, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        chex.assert_trees_all_close(p, expected[c], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(optim.learning_rate_of(state), np_warmup_cosine(c, 0.5, 10, 2, 0.0), rtol=1e-6)


def test_optimizer_constant_lr_no_clip_custom_mask():
    params = {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)}
    grads = {"kernel": np.full((2, 2), 10.0, np.float32), "bias": np.full(2, 10.0, np.float32)}
    tx = optim.make_optimizer(learning_rate=0.1, momentum=0.0, weight_decay=0.5, grad_clip_norm=None,
                              weight_decay_mask={"kernel": False, "bias": True})
    updates, _ = tx.update(grads, tx.init(params), params)
    # No clip: -0.1 * 10 on both; decay only on the bias: -0.1 * 0.5 * 1.
    np.testing.assert_allclose(updates["kernel"], -1.0, rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -1.05, rtol=1e-6)


def test_vit_layer_ids_follow_beit_on_a_real_vit():
    from remem_jax.models import vit
    shapes = vit.param_shapes(vit.create_vit("Ti_16", 10, num_layers=2), 32)
    ids = {"/".join(str(k.key) for k in path): optim.vit_layer_id(path, 2)
           for path, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert ids["embedding/kernel"] == ids["cls"] == ids["Transformer/posembed_input/pos_embedding"] == 0
    assert ids["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"] == 1
    assert ids["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/bias"] == 2
    assert ids["Transformer/encoder_norm/scale"] == ids["head/kernel"] == 3
    assert len(ids) == len(jax.tree.leaves(shapes))


def test_layer_decay_scales_each_leaf_update_weight_decay_included():
    # Two blocks (L = 2), decay 0.5: the head x 1, block 1 x 0.5, block 0 x 0.25, the embedding x 0.125.
    params = {"embedding": {"kernel": np.full((2, 2), 2.0, np.float32)},
              "Transformer": {"encoderblock_0": {"k": np.full((2, 2), 2.0, np.float32)},
                              "encoderblock_1": {"k": np.full((2, 2), 2.0, np.float32)}},
              "head": {"kernel": np.full((2, 2), 2.0, np.float32)}}
    grads = jax.tree.map(lambda x: np.full_like(x, 10.0), params)
    tx = optim.make_optimizer(learning_rate=0.1, momentum=0.0, weight_decay=0.5, grad_clip_norm=None,
                              lr_scale=optim.vit_layer_decay(0.5, 2))
    updates, _ = tx.update(grads, tx.init(params), params)
    plain = -0.1 * (10.0 + 0.5 * 2.0)  # SGD step with decoupled decay, at the full learning rate
    np.testing.assert_allclose(updates["head"]["kernel"], plain, rtol=1e-6)
    np.testing.assert_allclose(updates["Transformer"]["encoderblock_1"]["k"], 0.5 * plain, rtol=1e-6)
    np.testing.assert_allclose(updates["Transformer"]["encoderblock_0"]["k"], 0.25 * plain, rtol=1e-6)
    np.testing.assert_allclose(updates["embedding"]["kernel"], 0.125 * plain, rtol=1e-6)
    with pytest.raises(ValueError, match="layer decay"):
        optim.vit_layer_decay(0.0, 2)


def test_make_tx_applies_a_sections_layer_decay():
    import ml_collections
    from remem_jax.train import common
    section = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=0, momentum=0.0, weight_decay=0.0,
                                             grad_clip_norm=0.0, optimizer="sgd", layer_decay=0.5))
    params = {"Transformer": {"encoderblock_0": {"k": np.ones(3, np.float32)}}, "head": {"k": np.ones(3, np.float32)}}
    grads = jax.tree.map(np.ones_like, params)
    tx = common.make_tx(section, 10, num_layers=1)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Step 0 of a cosine without warmup is the peak 0.1; block 0 of 1 gets 0.5 of it.
    np.testing.assert_allclose(updates["head"]["k"], -0.1, rtol=1e-6)
    np.testing.assert_allclose(updates["Transformer"]["encoderblock_0"]["k"], -0.05, rtol=1e-6)
    with pytest.raises(ValueError, match="num_layers"):
        common.make_tx(section, 10)


def test_default_mask_is_ndim_greater_than_one():
    mask = optim.kernel_mask({"k": np.zeros((2, 3)), "conv": np.zeros((3, 3, 2, 4)), "b": np.zeros(3),
                              "s": np.zeros(())})
    assert mask == {"k": True, "conv": True, "b": False, "s": False}


@pytest.mark.parametrize("kwargs,name", [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(learning_rate=0.1, momentum=1.0), "momentum"),
    (dict(learning_rate=0.1, momentum=-0.5), "momentum"),
    (dict(learning_rate=0.1, weight_decay=-1e-4), "weight_decay"),
    (dict(learning_rate=0.1, grad_clip_norm=0.0), "grad_clip_norm"),
])
def test_optimizer_validation(kwargs, name):
    with pytest.raises(ValueError, match=name) as info:
        optim.make_optimizer(**kwargs)
    assert str(list(kwargs.values())[-1]) in str(info.value)


# ----------------------------------------------------------------------------- SAM pieces

class SamPerturbationTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_global_norm(self):
        grads = {"a": np.array([3.0, 0.0], np.float32), "b": {"c": np.array([[4.0]], np.float32)}}
        e = self.variant(functools.partial(optim.sam_perturbation, rho=0.5))(grads)
        chex.assert_trees_all_close(e, {"a": np.array([0.3, 0.0]), "b": {"c": np.array([[0.4]])}}, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_gradient_gives_zero_perturbation(self):
        e = self.variant(functools.partial(optim.sam_perturbation, rho=0.5))({"a": np.zeros(3, np.float32)})
        np.testing.assert_array_equal(e["a"], 0.0)


def masked_regression(n=8, d=5, seed=0):
    """loss(w) = 0.5 * mean_i (m_i * (x_i . [a; b] - y_i))^2 with a dropout-like mask m from the key."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, d).astype(np.float32)
    y = rng.randn(n).astype(np.float32)
    params = {"a": rng.randn(3).astype(np.float32), "b": rng.randn(d - 3).astype(np.float32)}

    def mask_of(key):
        return jax.random.bernoulli(key, 0.7, (x.shape[0],)).astype(jnp.float32)

    def loss(p, xb, yb, key):
        w = jnp.concatenate([p["a"], p["b"]])
        r = mask_of(key)[: xb.shape[0]] * (xb @ w - yb)
        return 0.5 * jnp.mean(r ** 2), {"w_sum": jnp.sum(w)}

    def np_grad(w, key):
        m = np.asarray(mask_of(key), np.float64)
        r = m * (x.astype(np.float64) @ w - y)
        return x.T.astype(np.float64) @ (m * r) / n, 0.5 * np.mean(r ** 2)
    return params, x, y, loss, np_grad


def test_sam_gradient_matches_reference_and_reuses_the_key():
    params, x, y, loss, np_grad = masked_regression()
    key = jax.random.PRNGKey(3)
    rho = 0.3
    (value, aux), g = jax.jit(lambda p: optim.sam_gradient(
        jax.value_and_grad(loss, has_aux=True), p, x, y, key, rho=rho))(params)
    w = np.concatenate([params["a"], params["b"]]).astype(np.float64)
    g0, loss0 = np_grad(w, key)
    g1, _ = np_grad(w + rho * g0 / np.linalg.norm(g0), key)
    np.testing.assert_allclose(np.concatenate([g["a"], g["b"]]), g1, rtol=1e-5, atol=1e-6)
    # Loss and aux come from the clean pass at w.
    np.testing.assert_allclose(value, loss0, rtol=1e-5)
    np.testing.assert_allclose(aux["w_sum"], w.sum(), rtol=1e-5)


def test_sam_gradient_rho_zero_is_one_pass():
    params, x, y, loss, np_grad = masked_regression()
    calls = []

    def grad_fn(p, *args):
        calls.append(1)
        return jax.value_and_grad(loss, has_aux=True)(p, *args)
    key = jax.random.PRNGKey(0)
    _, g = optim.sam_gradient(grad_fn, params, x, y, key, rho=0.0)
    assert len(calls) == 1
    w = np.concatenate([params["a"], params["b"]]).astype(np.float64)
    np.testing.assert_allclose(np.concatenate([g["a"], g["b"]]), np_grad(w, key)[0], rtol=1e-5, atol=1e-6)
    optim.sam_gradient(grad_fn, params, x, y, key, rho=0.05)
    assert len(calls) == 3
    with pytest.raises(ValueError, match="rho"):
        optim.sam_gradient(grad_fn, params, x, y, key, rho=-1.0)


# ----------------------------------------------------------------------------- accumulation

def linear_value_and_grad(p, batch, key):
    def loss(p):
        r = batch["x"] @ p["w"] - batch["y"]
        return jnp.mean(r ** 2), {"mean_r": jnp.mean(r), "key": jax.random.key_data(jax.random.wrap_key_data(key))}
    return jax.value_and_grad(loss, has_aux=True)(p)


def test_accumulate_gradients_equals_full_batch():
    rng = np.random.RandomState(1)
    batch = {"x": rng.randn(12, 4).astype(np.float32), "y": rng.randn(12).astype(np.float32)}
    params = {"w": rng.randn(4).astype(np.float32)}
    key = jax.random.PRNGKey(0)
    r = batch["x"].astype(np.float64) @ params["w"] - batch["y"]
    expected_grad = 2 * batch["x"].T.astype(np.float64) @ r / 12
    for steps in (1, 3, 4):
        (value, aux), grads = jax.jit(functools.partial(
            optim.accumulate_gradients, linear_value_and_grad, accum_steps=steps))(params, batch, key)
        np.testing.assert_allclose(value, np.mean(r ** 2), rtol=1e-5)
        np.testing.assert_allclose(aux["mean_r"], r.mean(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(grads["w"], expected_grad, rtol=1e-5, atol=1e-6)
    # accum_steps=1 is a plain call: the key is passed through unchanged.
    (_, aux), _ = optim.accumulate_gradients(linear_value_and_grad, params, batch, key, 1)
    np.testing.assert_array_equal(aux["key"], key)


def test_accumulate_gradients_rejects_indivisible_batch():
    batch = {"x": np.zeros((10, 4), np.float32), "y": np.zeros(10, np.float32)}
    with pytest.raises(ValueError, match=r"accum_steps=4.*\['x'\].*\(10, 4\)"):
        optim.accumulate_gradients(linear_value_and_grad, {"w": np.zeros(4, np.float32)}, batch,
                                   jax.random.PRNGKey(0), 4)
    with pytest.raises(ValueError, match="accum_steps"):
        optim.accumulate_gradients(linear_value_and_grad, {"w": np.zeros(4, np.float32)}, batch,
                                   jax.random.PRNGKey(0), 0)
