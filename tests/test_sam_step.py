"""The generic (SAM-)SGD train step against a NumPy float64 SAM step on softmax regression.

Model: logits = x @ w + b, mean softmax cross-entropy on one-hot labels; its gradient is
written by hand below (dL/dz = (softmax(z) - y) / n). Tolerance: float32 code vs float64
reference, rtol 1e-5 / atol 1e-6 on parameters of size ~1 after three steps.
"""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from remem_jax import devices as device_lib, losses, optim
from remem_jax.train import state as state_lib
from remem_jax.train import step as step_lib

D, C, GLOBAL_BATCH, NDEV = 6, 4, 32, 8
RTOL, ATOL = 1e-5, 1e-6
PEAK_LR, MOMENTUM, WD, CLIP = 0.5, 0.9, 0.01, 0.5


# ----------------------------------------------------------------------------- NumPy reference

def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_loss_and_grads(p, x, y):
    x, y = x.astype(np.float64), y.astype(np.float64)
    prob = np_softmax(x @ p["w"] + p["b"])
    loss = -np.mean(np.sum(y * np.log(prob), -1))
    d = (prob - y) / x.shape[0]
    return loss, {"w": x.T @ d, "b": d.sum(0)}


def np_norm(tree):
    return np.sqrt(sum(np.sum(v ** 2) for v in tree.values()))


def np_ascent(p, g, rho):
    n = np_norm(g)
    return {k: p[k] + rho * g[k] / (n + 1e-12) for k in p}


def np_sam_grads(p, x, y, rho):
    """Clean loss and the gradient at w + rho g / ||g|| on one shard."""
    loss, g = np_loss_and_grads(p, x, y)
    if rho == 0:
        return loss, g
    return loss, np_loss_and_grads(np_ascent(p, g, rho), x, y)[1]


def np_mean(trees):
    return {k: np.mean([t[k] for t in trees], axis=0) for k in trees[0]}


def np_device_grads(p, xs, ys, rho, sync):
    """Averaged gradient over shards: per-shard ascent (m-sharpness) or one synced ascent."""
    if not sync:
        return np_mean([np_sam_grads(p, x, y, rho)[1] for x, y in zip(xs, ys)])
    g = np_mean([np_loss_and_grads(p, x, y)[1] for x, y in zip(xs, ys)])
    pert = np_ascent(p, g, rho)
    return np_mean([np_loss_and_grads(pert, x, y)[1] for x, y in zip(xs, ys)])


class NpSGDW:
    """clip by global norm -> momentum trace -> + wd * w on ndim > 1 -> -lr(c)."""

    def __init__(self, params, lr_fn):
        self.params = {k: np.asarray(v, np.float64) for k, v in params.items()}
        self.trace = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.lr_fn, self.count = lr_fn, 0

    def apply(self, grads):
        n = np_norm(grads)
        if n > CLIP:
            grads = {k: g * CLIP / n for k, g in grads.items()}
        lr = self.lr_fn(self.count)
        for k in self.params:
            self.trace[k] = grads[k] + MOMENTUM * self.trace[k]
            decay = WD * self.params[k] if self.params[k].ndim > 1 else 0.0
            self.params[k] = self.params[k] - lr * (self.trace[k] + decay)
        self.count += 1
        return self.params


def np_lr(c, total=10):
    return PEAK_LR * 0.5 * (1 + np.cos(np.pi * min(c, total) / total))


# ----------------------------------------------------------------------------- set-up

def make_data(seed=0, steps=3):
    rng = np.random.RandomState(seed)
    params = {"w": (0.5 * rng.randn(D, C)).astype(np.float32), "b": (0.1 * rng.randn(C)).astype(np.float32)}
    xs = [rng.randn(GLOBAL_BATCH, D).astype(np.float32) for _ in range(steps)]
    ys = [np.eye(C, dtype=np.float32)[rng.randint(0, C, GLOBAL_BATCH)] for _ in range(steps)]
    return params, xs, ys


def make_tx():
    return optim.make_optimizer(learning_rate=optim.warmup_cosine_schedule(PEAK_LR, 10, 0),
                                momentum=MOMENTUM, weight_decay=WD, grad_clip_norm=CLIP)


def loss_fn(params, frozen, batch_stats, batch, rng, *, counter=None, dropout=False):
    """Softmax regression; optional input dropout (keep 0.75) from the step's per-device key."""
    if counter is not None:
        counter.append(1)  # runs at trace time only
    x = batch["x"]
    if dropout:
        x = x * jax.random.bernoulli(rng, 0.75, x.shape).astype(x.dtype)
    logits = x @ params["w"] + params["b"]
    loss = losses.softmax_cross_entropy(logits, batch["y"])
    stats = {"logit_mean": jnp.mean(logits, axis=0)} if batch_stats else {}
    return loss, {"batch_stats": stats, "metrics": {"accuracy": jnp.mean(logits.argmax(-1) == batch["y"].argmax(-1))}}


def shard(x, n):
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def unreplicate(tree):
    return jax.tree.map(lambda a: np.asarray(a)[0], tree)


def run(params, xs, ys, *, ndev, batch_stats=None, loss=loss_fn, **step_kwargs):
    """Runs len(xs) pmapped steps on `ndev` devices; returns host states and metrics."""
    tx = make_tx()
    state = state_lib.create_train_state(params, tx, rng=jax.random.PRNGKey(7), batch_stats=batch_stats)
    devices = jax.devices()[:ndev]
    step = jax.pmap(step_lib.make_train_step(loss, tx, **step_kwargs), axis_name="batch", devices=devices)
    replicated = device_lib.replicate(state, devices=devices)
    states, metrics = [], []
    for x, y in zip(xs, ys):
        replicated, m = step(replicated, {"x": shard(x, ndev), "y": shard(y, ndev)})
        states.append(unreplicate(replicated))
        metrics.append(unreplicate(m))
    return states, metrics


# ----------------------------------------------------------------------------- one device

class OneDeviceTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_sam_step_matches_numpy(self):
        params, xs, ys = make_data()
        tx = make_tx()
        state = state_lib.create_train_state(params, tx, rng=jax.random.PRNGKey(0))
        # vmap over a size-1 axis named 'batch' provides the collectives without pmap.
        step = self.variant(jax.vmap(step_lib.make_train_step(loss_fn, tx, sam_rho=0.5), axis_name="batch"))
        state = jax.tree.map(lambda a: a[None], state)
        ref = NpSGDW(params, np_lr)
        for x, y in zip(xs, ys):
            state, metrics = step(state, {"x": x[None], "y": y[None]})
            p = {k: v.astype(np.float64) for k, v in ref.params.items()}
            loss, g = np_sam_grads(p, x, y, 0.5)
            expected = ref.apply(g)
            chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], state.params), expected, rtol=RTOL, atol=ATOL)
            np.testing.assert_allclose(metrics["loss"][0], loss, rtol=RTOL)
            np.testing.assert_allclose(metrics["grad_norm"][0], np_norm(g), rtol=RTOL)
            np.testing.assert_allclose(metrics["learning_rate"][0], np_lr(ref.count - 1), rtol=1e-6)
            np.testing.assert_allclose(metrics["param_norm"][0], np_norm(expected), rtol=RTOL)
            assert bool(metrics["is_finite"][0])
        assert int(state.step[0]) == 3


def test_pmap_one_device_compiles_once_and_advances_rng():
    params, xs, ys = make_data()
    tx = make_tx()
    state = state_lib.create_train_state(params, tx, rng=jax.random.PRNGKey(0))
    step = step_lib.make_train_step(loss_fn, tx, sam_rho=0.5)
    step = jax.pmap(chex.assert_max_traces(step, n=1), axis_name="batch", devices=jax.devices()[:1])
    replicated = device_lib.replicate(state, devices=jax.devices()[:1])
    expected_rng = np.asarray(state.rng)
    ref = NpSGDW(params, np_lr)
    for x, y in zip(xs, ys):
        replicated, _ = step(replicated, {"x": x[None], "y": y[None]})
        expected_rng = np.asarray(jax.random.split(expected_rng)[0])
        ref.apply(np_sam_grads({k: v.copy() for k, v in ref.params.items()}, x, y, 0.5)[1])
    np.testing.assert_array_equal(replicated.rng[0], expected_rng)
    chex.assert_trees_all_close(unreplicate(replicated).params, ref.params, rtol=RTOL, atol=ATOL)


def test_matches_optax_contrib_sam():
    # optax.contrib.sam (opaque mode, sync_period=2, adversarial optimizer = normalize + sgd(rho))
    # is a different formulation (an optimizer wrapper calling back a grad_fn) of the same step:
    # w + rho * g / ||g|| (no eps), gradient there, then the outer optimizer. It checks the ascent
    # point and the descent gradient, with the outer optimizer shared.
    params, xs, ys = make_data(seed=1)
    rho = 0.5
    ours, _ = run(params, xs, ys, ndev=1, sam_rho=rho)

    def ce(p, x, y):
        return losses.softmax_cross_entropy(x @ p["w"] + p["b"], y)
    sam = optax.contrib.sam(make_tx(), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                            sync_period=2, opaque_mode=True)

    @jax.jit
    def optax_step(p, opt_state, x, y):
        updates, opt_state = sam.update(jax.grad(ce)(p, x, y), opt_state, p,
                                        grad_fn=lambda q, _: jax.grad(ce)(q, x, y))
        return optax.apply_updates(p, updates), opt_state
    p, opt_state = jax.tree.map(jnp.asarray, params), sam.init(params)
    for i, (x, y) in enumerate(zip(xs, ys)):
        p, opt_state = optax_step(p, opt_state, x, y)
        chex.assert_trees_all_close(ours[i].params, p, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- rho = 0

def test_rho_zero_is_plain_sgd_with_one_gradient_pass():
    params, xs, ys = make_data(seed=2)
    counter = []
    states, _ = run(params, xs, ys, ndev=1, sam_rho=0.0, loss=functools.partial(loss_fn, counter=counter))
    assert len(counter) == 1, "rho = 0 must trace the loss once (one gradient pass)"
    ref = NpSGDW(params, np_lr)
    for i, (x, y) in enumerate(zip(xs, ys)):
        expected = ref.apply(np_loss_and_grads({k: v.copy() for k, v in ref.params.items()}, x, y)[1])
        chex.assert_trees_all_close(states[i].params, expected, rtol=RTOL, atol=ATOL)
    # The same optimizer driven directly by optax with jax.grad.
    tx = make_tx()
    p, opt_state = jax.tree.map(jnp.asarray, params), tx.init(params)
    for i, (x, y) in enumerate(zip(xs, ys)):
        g = jax.grad(lambda q: losses.softmax_cross_entropy(x @ q["w"] + q["b"], y))(p)
        updates, opt_state = tx.update(g, opt_state, p)
        p = optax.apply_updates(p, updates)
        chex.assert_trees_all_close(states[i].params, p, rtol=RTOL, atol=ATOL)
    counter.clear()
    run(params, xs[:1], ys[:1], ndev=1, sam_rho=0.05, loss=functools.partial(loss_fn, counter=counter))
    assert len(counter) == 2


# ----------------------------------------------------------------------------- 8 devices

def test_sync_on_eight_devices_equals_one_device_on_the_whole_batch():
    assert jax.local_device_count() == NDEV
    params, xs, ys = make_data(seed=3)
    multi, multi_metrics = run(params, xs, ys, ndev=NDEV, sam_rho=0.5, sync_perturbations=True)
    single, single_metrics = run(params, xs, ys, ndev=1, sam_rho=0.5)
    for a, b, ma, mb in zip(multi, single, multi_metrics, single_metrics):
        chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
        np.testing.assert_allclose(ma["accuracy"], mb["accuracy"], rtol=1e-6)
    ref = NpSGDW(params, np_lr)
    for i, (x, y) in enumerate(zip(xs, ys)):
        p = {k: v.copy() for k, v in ref.params.items()}
        expected = ref.apply(np_device_grads(p, np.split(x, NDEV), np.split(y, NDEV), 0.5, sync=True))
        chex.assert_trees_all_close(multi[i].params, expected, rtol=RTOL, atol=ATOL)


def test_per_device_ascent_matches_reference_and_differs_from_sync():
    params, xs, ys = make_data(seed=4)
    # Input dropout from the step's key: device d uses fold_in(split(rng)[1], d) in both passes.
    per_device, _ = run(params, xs, ys, ndev=NDEV, sam_rho=0.5, sync_perturbations=False,
                        loss=functools.partial(loss_fn, dropout=True))
    ref = NpSGDW(params, np_lr)
    key = jax.random.PRNGKey(7)
    for i, (x, y) in enumerate(zip(xs, ys)):
        key, step_key = jax.random.split(key)
        x_shards = [s * np.asarray(jax.random.bernoulli(jax.random.fold_in(step_key, d), 0.75, s.shape), np.float32)
                    for d, s in enumerate(np.split(x, NDEV))]
        p = {k: v.copy() for k, v in ref.params.items()}
        expected = ref.apply(np_device_grads(p, x_shards, np.split(y, NDEV), 0.5, sync=False))
        chex.assert_trees_all_close(per_device[i].params, expected, rtol=RTOL, atol=ATOL)

    no_drop, _ = run(params, xs[:1], ys[:1], ndev=NDEV, sam_rho=0.5, sync_perturbations=False)
    synced, _ = run(params, xs[:1], ys[:1], ndev=NDEV, sam_rho=0.5, sync_perturbations=True)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    x_sh, y_sh = np.split(xs[0], NDEV), np.split(ys[0], NDEV)
    ref_per = NpSGDW(params, np_lr).apply(np_device_grads(p, x_sh, y_sh, 0.5, sync=False))
    ref_sync = NpSGDW(params, np_lr).apply(np_device_grads(p, x_sh, y_sh, 0.5, sync=True))
    chex.assert_trees_all_close(no_drop[0].params, ref_per, rtol=RTOL, atol=ATOL)
    gap = max(np.abs(no_drop[0].params[k] - synced[0].params[k]).max() for k in params)
    ref_gap = max(np.abs(ref_per[k] - ref_sync[k]).max() for k in params)
    assert gap > 1e-4 and ref_gap > 1e-4, (gap, ref_gap)


def test_batch_stats_come_from_the_clean_pass_and_are_averaged():
    params, xs, ys = make_data(seed=5, steps=1)
    init_stats = {"logit_mean": np.zeros(C, np.float32)}
    states, _ = run(params, xs, ys, ndev=NDEV, sam_rho=0.5, batch_stats=init_stats)
    clean = xs[0].astype(np.float64) @ params["w"] + params["b"]
    np.testing.assert_allclose(states[0].batch_stats["logit_mean"], clean.mean(0), rtol=1e-5, atol=1e-6)


def test_pmap_train_step_eight_devices_compiles_once():
    params, xs, ys = make_data(seed=6)
    tx = make_tx()
    state = state_lib.create_train_state(params, tx, rng=jax.random.PRNGKey(7))
    step = step_lib.pmap_train_step(chex.assert_max_traces(
        step_lib.make_train_step(loss_fn, tx, sam_rho=0.5, sync_perturbations=True), n=1))
    replicated = device_lib.replicate(state)
    for x, y in zip(xs, ys):
        replicated, metrics = step(replicated, {"x": shard(x, NDEV), "y": shard(y, NDEV)})
    # Metrics are global: identical on every device.
    assert np.unique(np.asarray(metrics["loss"])).size == 1
    assert int(replicated.step[0]) == 3


def test_pmapped_step_donates_the_state():
    """`pmap_train_step` gives the state's buffers to its output (no second copy of the model and
    its optimizer state in device memory): they are deleted after the step, on any backend. (A
    leaf the step returns unchanged, optax's injected learning-rate hyperparameter, is kept.)"""
    params, xs, ys = make_data(seed=6)
    tx = make_tx()
    devices = jax.local_devices()
    state = device_lib.replicate(state_lib.create_train_state(params, tx, rng=jax.random.PRNGKey(7)))
    step = step_lib.pmap_train_step(step_lib.make_train_step(loss_fn, tx, sam_rho=0.5))
    new_state, _ = step(state, {"x": shard(xs[0], len(devices)), "y": shard(ys[0], len(devices))})
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves((state.params, state.opt_state[1], state.rng)))
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))
    kept, _ = step_lib.pmap_train_step(step_lib.make_train_step(loss_fn, tx), donate=False)(
        new_state, {"x": shard(xs[1], len(devices)), "y": shard(ys[1], len(devices))})
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state))


# ----------------------------------------------------------------------------- accumulation

def test_gradient_accumulation_equals_one_pass():
    params, xs, ys = make_data(seed=8)
    one, m_one = run(params, xs, ys, ndev=2, sam_rho=0.5, accum_steps=1)
    four, m_four = run(params, xs, ys, ndev=2, sam_rho=0.5, accum_steps=4)
    for a, b, ma, mb in zip(one, four, m_one, m_four):
        chex.assert_trees_all_close(a.params, b.params, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
        np.testing.assert_allclose(ma["accuracy"], mb["accuracy"], rtol=1e-6)
    with pytest.raises(ValueError, match="accum_steps=3"):
        run(params, xs[:1], ys[:1], ndev=2, sam_rho=0.5, accum_steps=3)


def test_gradient_accumulation_gives_each_micro_batch_its_own_dropout_key():
    # Device d's key is fold_in(step_key, d) and its micro-batch j (of 4) draws its dropout from
    # fold_in(device_key, j) (optim.accumulate_gradients), in both SAM passes. One key shared by
    # the micro-batches would repeat one mask on all four.
    params, xs, ys = make_data(seed=10, steps=2)
    ndev, accum = 2, 4
    states, metrics = run(params, xs, ys, ndev=ndev, sam_rho=0.5, accum_steps=accum,
                          loss=functools.partial(loss_fn, dropout=True))
    ref = NpSGDW(params, np_lr)
    key = jax.random.PRNGKey(7)
    for i, (x, y) in enumerate(zip(xs, ys)):
        key, step_key = jax.random.split(key)
        x_shards = []
        for d, x_dev in enumerate(np.split(x, ndev)):
            device_key = jax.random.fold_in(step_key, d)
            x_shards.append(np.concatenate([
                m * np.asarray(jax.random.bernoulli(jax.random.fold_in(device_key, j), 0.75, m.shape), np.float32)
                for j, m in enumerate(np.split(x_dev, accum))]))
        y_shards = np.split(y, ndev)
        p = {k: v.copy() for k, v in ref.params.items()}
        # Equal micro-batches: the mean of their mean losses (and gradients) is that of the masked
        # device batch, so the per-device-ascent SAM reference applies to it unchanged.
        loss = np.mean([np_loss_and_grads(p, xd, yd)[0] for xd, yd in zip(x_shards, y_shards)])
        expected = ref.apply(np_device_grads(p, x_shards, y_shards, 0.5, sync=False))
        chex.assert_trees_all_close(states[i].params, expected, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(metrics[i]["loss"], loss, rtol=RTOL)


# ----------------------------------------------------------------------------- NaN and contract

def test_non_finite_loss_is_reported():
    params, xs, ys = make_data(seed=9, steps=1)
    xs[0][3, 2] = np.inf
    _, metrics = run(params, xs, ys, ndev=1, sam_rho=0.5)
    assert not bool(metrics[0]["is_finite"])
    _, metrics = run(params, [np.nan_to_num(xs[0], posinf=0.0)], ys, ndev=1, sam_rho=0.5)
    assert bool(metrics[0]["is_finite"])


def test_bad_loss_contract_and_arguments():
    params, xs, ys = make_data(steps=1)

    def bad_loss(p, f, bs, batch, rng):
        loss, aux = loss_fn(p, f, bs, batch, rng)
        return loss, aux["metrics"]
    with pytest.raises(ValueError, match="batch_stats"):
        run(params, xs, ys, ndev=1, loss=bad_loss)
    tx = make_tx()
    with pytest.raises(ValueError, match="sam_rho"):
        step_lib.make_train_step(loss_fn, tx, sam_rho=-0.1)
    with pytest.raises(ValueError, match="accum_steps"):
        step_lib.make_train_step(loss_fn, tx, accum_steps=0)
    with pytest.raises(ValueError, match="rng"):
        state_lib.create_train_state(params, tx, rng=np.zeros(3, np.uint32))


def test_create_train_state_defaults():
    params, _, _ = make_data(steps=1)
    state = state_lib.create_train_state(params, make_tx(), rng=jax.random.key(1))
    assert state.frozen == {} and state.batch_stats == {}
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    np.testing.assert_array_equal(state.rng, jax.random.PRNGKey(1))
