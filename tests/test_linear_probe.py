"""The linear probe: LARS against a NumPy float64 MoCo v3 LARS, the head, the cached batches, a probe run."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from remem_jax import optim
from remem_jax.models.probe_head import ProbeHead
from remem_jax.train import common, linear_probe, runs


def _numpy_lars(params, grads_seq, lrs, *, momentum, weight_decay, trust):
    """MoCo v3 / MAE `LARS.step` in float64, written from its source description."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    for grads, lr in zip(grads_seq, lrs):
        for k in p:
            dp = np.asarray(grads[k], np.float64)
            if p[k].ndim > 1:
                dp = dp + weight_decay * p[k]
                pn, un = np.linalg.norm(p[k]), np.linalg.norm(dp)
                q = trust * pn / un if (pn > 0 and un > 0) else 1.0
                dp = dp * q
            mu[k] = momentum * mu[k] + dp
            p[k] = p[k] - lr * mu[k]
    return p


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lars_matches_a_numpy_reference(weight_decay):
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(4,)), "zero": np.zeros((3, 3))}
    grads_seq = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(5)]
    schedule = optim.warmup_cosine_schedule(0.5, 5, 2)
    lrs = [float(schedule(i)) for i in range(5)]
    tx = optim.make_lars(learning_rate=schedule, momentum=0.9, weight_decay=weight_decay, trust_coefficient=0.001)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = tx.init(p)
    for grads in grads_seq:
        updates, state = tx.update({k: jnp.asarray(v, jnp.float32) for k, v in grads.items()}, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    want = _numpy_lars(params, grads_seq, lrs, momentum=0.9, weight_decay=weight_decay, trust=0.001)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k], np.float64), want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The 1-D bias takes plain momentum SGD steps (no trust scaling), so it moves much more than the kernel.
    assert np.abs(want["bias"] - params["bias"]).max() > 10 * np.abs(want["kernel"] - params["kernel"]).max()
    assert optim.learning_rate_of(state) == pytest.approx(lrs[-1])


def test_probe_head_is_non_affine_batchnorm_then_dense():
    head = ProbeHead(3)
    x = jnp.asarray(np.random.default_rng(0).normal(2.0, 5.0, (64, 8)), jnp.float32)
    variables = head.init(jax.random.PRNGKey(0), x)
    assert set(variables["params"]) == {"head"}  # BatchNorm has no scale or offset
    assert abs(float(np.std(variables["params"]["head"]["kernel"])) - 0.01) < 0.004
    logits, _ = head.apply(variables, x, train=True, mutable=["batch_stats"])
    kernel, bias = variables["params"]["head"]["kernel"], variables["params"]["head"]["bias"]
    xn = (np.asarray(x, np.float64) - np.mean(x, 0)) / np.sqrt(np.var(x, 0) + 1e-6)
    np.testing.assert_allclose(logits, xn @ np.asarray(kernel, np.float64) + np.asarray(bias), rtol=1e-4, atol=1e-6)


def test_cached_train_iterator_is_deterministic_and_resumable():
    n = jax.local_device_count()
    feats = np.arange(40 * 3, dtype=np.float32).reshape(40, 3)
    labels = np.arange(40, dtype=np.int32)
    it = linear_probe.cached_train_iterator(feats, labels, global_batch_size=2 * n, steps_per_epoch=40 // (2 * n),
                                            seed=3)
    first = [next(it) for _ in range(7)]
    resumed = linear_probe.cached_train_iterator(feats, labels, global_batch_size=2 * n,
                                                 steps_per_epoch=40 // (2 * n), seed=3, start_step=4)
    for a, b in zip(first[4:], [next(resumed) for _ in range(3)]):
        np.testing.assert_array_equal(a["label"], b["label"])
    epoch = np.concatenate([b["label"].reshape(-1) for b in first[:40 // (2 * n)]])
    assert len(set(epoch.tolist())) == len(epoch)  # no example twice within an epoch
    np.testing.assert_array_equal(first[0]["feature"][..., 0] / 3, first[0]["label"])


def test_cached_eval_batches_pad_and_mask():
    n = jax.local_device_count()
    feats, labels = np.ones((n + 3, 4), np.float32), np.arange(n + 3, dtype=np.int32)
    batches = linear_probe.cached_eval_batches(feats, labels, n)
    assert len(batches) == 2 and batches[0]["image"].shape == (n, 1, 4)
    assert sum(float(b["mask"].sum()) for b in batches) == n + 3


def _probe_config(**changes):
    from configs import common
    p = common.get_config().linear_probe
    p.update(changes)
    return p


def test_linear_probe_on_separable_features_reaches_100_percent(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (4, 16)) * 4
    def draw(k):
        y = rng.integers(0, 4, k).astype(np.int32)
        return (centres[y] + rng.normal(0, 0.5, (k, 16))).astype(np.float32), y
    # LARS moves a matrix by about lr * trust * |w| / (1 - momentum) per step: a few hundred steps need
    # lr ~ 1 (the reference's blr 0.1 at batch 512, lr 0.2, is meant for ~10^5 steps). The 1-D bias takes
    # plain SGD steps, so a much larger lr makes it oscillate.
    p = _probe_config(epochs=30, warmup_epochs=3, batch_size=32, blr=8.0, log_every=10_000)
    sub = runs.SubRun(common.RunContext(config=ml_collections.ConfigDict(), workdir=str(tmp_path)), "probe",
                      str(tmp_path))
    result = linear_probe.train_probe(sub, p, draw(512), draw(200), num_classes=4, rng=jax.random.PRNGKey(0), seed=0)
    assert result["final"]["top1"] >= 0.99, result["final"]
    assert result["max_over_epochs"]["top1"] >= result["final"]["top1"]
    assert len(result["history"]) == 30 and result["final"]["num_examples"] == 200


def test_probe_data_config_replaces_the_few_shot_subset():
    from tests.helpers import data_config
    cfg = linear_probe.probe_data_config(data_config(few_shot_fraction=0.01, few_shot_per_class=None), None)
    assert cfg.few_shot_fraction is None and cfg.few_shot_per_class is None
    cfg = linear_probe.probe_data_config(data_config(few_shot_per_class=3), 0.5)
    assert cfg.few_shot_fraction == 0.5 and cfg.few_shot_per_class is None
    assert isinstance(cfg, ml_collections.ConfigDict)
