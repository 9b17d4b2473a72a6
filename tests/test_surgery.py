"""Parameter surgery against hand-written expectations and the float64 NumPy ViT."""
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from remem_jax import checkpoints, surgery, tree
from remem_jax.models import vit
from tests import augreg_format as fmt

ATTN = "MultiHeadDotProductAttention_1"
NUM_CLASSES = 5
SIZE = 32  # Ti/16 at 32 px: 4 patches + class token.
# Fold tolerances, as max|err| / max|ref| on the logits of a 12-block model with realistic
# weights (measured: <= 1.1e-6 and <= 1.9e-6; the gap comes from the LayerNorm eps seeing the
# stream at another scale, plus float32 rounding of the rescaled weights).
EPS_RTOL = 1e-5  # float64 reference on the folded float32 weights vs float64 reweighted.
FOLD_RTOL = 2e-5  # float32 plain ViT on the folded weights vs float64 reweighted.


def _ckpt(num_layers, seed=0):
    flat = fmt.random_checkpoint(
        fmt.documented_layout("Ti", 16, SIZE, NUM_CLASSES, num_layers=num_layers), seed=seed)
    return flat, tree.unflatten_params(flat)


def _model(num_layers, **overrides):
    return vit.create_vit("Ti_16", NUM_CLASSES, num_layers=num_layers, **overrides)


def _images(n=2, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _forward(model, params, images, **kw):
    return model.apply({"params": params}, images, **kw)


def rel_err(got, want):
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def _flat(params):
    return tree.flatten_params(params)


@pytest.fixture(scope="module")
def ckpt12():
    return _ckpt(12)


def _vit_b_shapes():
    layout = fmt.documented_layout("B", 16, 224, 1000)
    return tree.unflatten_params(
        {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in layout.items()})


# ----------------------------------------------------------------------------- LoRA targets

def test_lora_target_presets_on_a_two_block_model():
    _, params = _ckpt(2)
    qv = ["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel",
          "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/value/kernel",
          "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel",
          "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/value/kernel"]
    assert surgery.lora_targets(params, "qv") == qv
    every = []
    for i in range(2):
        b = f"Transformer/encoderblock_{i}/"
        every += [b + "MlpBlock_3/Dense_0/kernel", b + "MlpBlock_3/Dense_1/kernel",
                  b + "MultiHeadDotProductAttention_1/key/kernel",
                  b + "MultiHeadDotProductAttention_1/out/kernel",
                  b + "MultiHeadDotProductAttention_1/query/kernel",
                  b + "MultiHeadDotProductAttention_1/value/kernel"]
    assert surgery.lora_targets(params, "all") == every
    assert surgery.lora_targets(params, "all", blocks=[1]) == every[6:]
    assert surgery.lora_targets(params, [r".*/MlpBlock_3/Dense_1/kernel", "head/kernel"]) == [
        "head/kernel", "Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel",
        "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"]


def test_lora_target_errors():
    _, params = _ckpt(2)
    with pytest.raises(ValueError, match="Unknown LoRA preset 'qkv'"):
        surgery.lora_targets(params, "qkv")
    with pytest.raises(ValueError, match="matches no parameter path"):
        surgery.lora_targets(params, ["query/kernel"])  # not a full match
    with pytest.raises(ValueError, match="kernels of rank >= 2"):
        surgery.lora_targets(params, [r".*/query/bias"])
    with pytest.raises(ValueError, match=r"blocks \[2\] are outside \[0, 2\)"):
        surgery.lora_targets(params, "qv", blocks=[0, 2])
    with pytest.raises(ValueError, match="empty list"):
        surgery.lora_targets(params, [])


# ----------------------------------------------------------------------------- LoRA init / apply

def test_init_lora_shapes_and_zero_b_gives_the_base_exactly():
    _, params = _ckpt(2)
    targets = surgery.lora_targets(params, "all")
    lora, config = surgery.init_lora(jax.random.PRNGKey(0), params, targets, rank=4, alpha=8)
    assert config == surgery.LoraConfig(tuple(targets), 4, 2.0)
    flat_lora = _flat(lora)
    assert sorted(flat_lora) == sorted(f"{t}/{ab}" for t in targets for ab in "ab")
    b0 = "Transformer/encoderblock_0/"
    dims = {f"{b0}{ATTN}/query/kernel": (192, 192), f"{b0}{ATTN}/out/kernel": (192, 192),
            f"{b0}MlpBlock_3/Dense_0/kernel": (192, 768), f"{b0}MlpBlock_3/Dense_1/kernel": (768, 192)}
    for target, (d_in, d_out) in dims.items():
        assert flat_lora[f"{target}/a"].shape == (d_in, 4)
        assert flat_lora[f"{target}/b"].shape == (4, d_out)
        assert not np.any(flat_lora[f"{target}/b"])
    effective = _flat(surgery.apply_lora(params, lora, config))
    base = _flat(params)
    assert sorted(effective) == sorted(base)
    for key, value in base.items():
        if key in targets:
            np.testing.assert_array_equal(effective[key], value)
        else:
            assert effective[key] is value  # Non-target leaves are not copied.


def _random_b(lora, seed=3):
    rng = np.random.default_rng(seed)
    return tree.unflatten_params({
        k: (rng.standard_normal(v.shape).astype(np.float32) * 0.05 if k.endswith("/b") else v)
        for k, v in _flat(lora).items()})


def test_apply_lora_matches_float64_reference():
    _, params = _ckpt(2)
    targets = surgery.lora_targets(params, "all")
    lora, config = surgery.init_lora(jax.random.PRNGKey(1), params, targets, rank=4, alpha=16,
                                     init="uniform")
    lora = _random_b(lora)
    got = _flat(jax.jit(surgery.apply_lora, static_argnums=2)(params, lora, config))
    base, fl = _flat(params), _flat(lora)
    for t in targets:
        w = np.asarray(base[t], np.float64)
        a, b = np.asarray(fl[f"{t}/a"], np.float64), np.asarray(fl[f"{t}/b"], np.float64)
        want = w + 4.0 * (a @ b).reshape(w.shape)  # scale = 16 / 4.
        assert got[t].dtype == jnp.float32 and got[t].shape == w.shape
        np.testing.assert_allclose(np.asarray(got[t], np.float64), want, rtol=0, atol=1e-6)
    # Spot-check the reshape convention: out (heads, head_dim, D) rows are head-major.
    t = f"Transformer/encoderblock_1/{ATTN}/out/kernel"
    a, b = np.asarray(fl[f"{t}/a"], np.float64), np.asarray(fl[f"{t}/b"], np.float64)
    h, hd = 3, 64
    np.testing.assert_allclose(np.asarray(got[t][2, 5], np.float64),
                               base[t][2, 5] + 4.0 * a[2 * hd + 5] @ b, atol=1e-6)
    assert h * hd == a.shape[0]


def test_merge_equals_apply_and_loads_as_augreg(tmp_path):
    flat, params = _ckpt(2)
    targets = surgery.lora_targets(params, "qv")
    lora, config = surgery.init_lora(jax.random.PRNGKey(2), params, targets, rank=8, alpha=8)
    lora = _random_b(lora)
    model, images = _model(2), _images()
    applied = surgery.apply_lora(params, lora, config)
    merged = surgery.merge_lora(params, lora, config)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in jax.tree.leaves(merged))
    chex.assert_trees_all_close(merged, jax.device_get(applied), rtol=0, atol=0)
    with_lora = jax.jit(lambda p, l, x: _forward(model, surgery.apply_lora(p, l, config), x))(
        params, lora, images)
    want = fmt.reference_forward(_flat(merged), images, patch=16)
    assert rel_err(with_lora, want) < 1e-5
    assert rel_err(with_lora, fmt.reference_forward(flat, images, patch=16)) > 1e-3  # B != 0 matters.
    path = str(tmp_path / "merged.npz")
    checkpoints.save_augreg(path, merged)
    loaded_model, loaded = checkpoints.load_augreg(path)
    assert loaded_model.num_layers == 2
    chex.assert_trees_all_close(loaded, merged, rtol=0, atol=0)


def test_lora_param_counts_on_vit_b():
    shapes = _vit_b_shapes()
    key = jax.random.PRNGKey(0)
    qv = jax.eval_shape(lambda k: surgery.init_lora(
        k, shapes, surgery.lora_targets(shapes, "qv"), rank=32, alpha=32)[0], key)
    assert surgery.lora_param_count(qv) == 12 * 2 * (768 * 32 + 32 * 768) == 1_179_648
    r = 8
    per_block = 4 * 2 * 768 * r + 2 * (768 + 3072) * r
    assert per_block == 13_824 * r
    every = jax.eval_shape(lambda k: surgery.init_lora(
        k, shapes, surgery.lora_targets(shapes, "all"), rank=r)[0], key)
    assert surgery.lora_param_count(every) == 12 * per_block
    small, _ = surgery.init_lora(key, _ckpt(1)[1], ["head/kernel"], rank=2)  # Concrete arrays too.
    assert surgery.lora_param_count(small) == 192 * 2 + 2 * NUM_CLASSES


@pytest.mark.parametrize("init", ["gaussian", "uniform"])
def test_lora_init_statistics(init):
    shapes = _vit_b_shapes()
    targets = surgery.lora_targets(shapes, "all")
    lora, config = surgery.init_lora(jax.random.PRNGKey(4), shapes, targets, rank=32, init=init)
    assert config.scale == 1.0  # No alpha: WeCoLoRA's unscaled LoRA.
    flat = _flat(lora)
    for d_in, suffix in ((768, f"{ATTN}/query/kernel/a"), (768, f"{ATTN}/out/kernel/a"),
                         (3072, "MlpBlock_3/Dense_1/kernel/a")):
        a = np.concatenate([np.asarray(v).ravel() for k, v in flat.items() if k.endswith(suffix)])
        assert a.size == 12 * d_in * 32
        assert abs(a.mean()) < 5 * a.std() / math.sqrt(a.size)
        np.testing.assert_allclose(a.std(), 1 / math.sqrt(3 * d_in), rtol=0.01)
        if init == "uniform":
            bound = 1 / math.sqrt(d_in)
            assert a.max() <= bound and a.min() >= -bound
            assert a.max() > 0.999 * bound and a.min() < -0.999 * bound
        else:  # Gaussian tails reach past the uniform bound.
            assert np.abs(a).max() > 3 / math.sqrt(3 * d_in)
    # Distinct targets get distinct draws.
    q, v = (flat[f"Transformer/encoderblock_0/{ATTN}/{m}/kernel/a"] for m in ("query", "value"))
    assert q.shape == v.shape and not np.array_equal(q, v)


def test_lora_init_and_apply_errors():
    _, params = _ckpt(2)
    qv = surgery.lora_targets(params, "qv")
    key = jax.random.PRNGKey(0)
    for kwargs, msg in [(dict(rank=0), "rank must be an integer >= 1"),
                        (dict(rank=2.0), "rank must be an integer"),
                        (dict(rank=193), r"exceeds min\(d_in, d_out\) = min\(192, 192\)"),
                        (dict(rank=4, init="normal"), "init must be one of"),
                        (dict(rank=4, alpha=0.0), "alpha must be positive")]:
        with pytest.raises(ValueError, match=msg):
            surgery.init_lora(key, params, qv, **kwargs)
    with pytest.raises(ValueError, match="not in the parameter tree"):
        surgery.init_lora(key, params, ["Transformer/encoderblock_7/MlpBlock_3/Dense_0/kernel"],
                          rank=4)
    lora, config = surgery.init_lora(key, params, qv, rank=4)
    with pytest.raises(ValueError, match="do not match the LoraConfig"):
        surgery.apply_lora(params, lora, surgery.LoraConfig(tuple(qv[:2]), 4, 1.0))
    with pytest.raises(ValueError, match="expected"):
        surgery.apply_lora(params, lora, surgery.LoraConfig(tuple(qv), 5, 1.0))
    with pytest.raises(ValueError, match="no LoraConfig"):
        surgery.effective_params(surgery.attach_lora(params, lora))
    with pytest.raises(ValueError, match="already has"):
        surgery.attach_lora(surgery.attach_lora(params, lora), lora)


# ----------------------------------------------------------------------------- training split

def test_sgd_step_changes_only_lora_and_head():
    _, params = _ckpt(2)
    model, images = _model(2), _images(4)
    labels = jnp.arange(4) % NUM_CLASSES
    lora, config = surgery.init_lora(jax.random.PRNGKey(0), params,
                                     surgery.lora_targets(params, "qv"), rank=4, alpha=4)
    trainable, frozen = surgery.split_trainable(surgery.attach_lora(params, lora), "lora")
    frozen_before = dict(_flat(frozen))

    def loss_fn(train, frozen):
        p = surgery.effective_params(surgery.merge_partitions(train, frozen), config)
        logits = _forward(model, p, images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    opt = optax.sgd(0.5)
    opt_state = opt.init(trainable)

    @jax.jit
    def step(train, opt_state, frozen):
        grads = jax.grad(loss_fn)(train, frozen)
        updates, opt_state = opt.update(grads, opt_state, train)
        return optax.apply_updates(train, updates), opt_state, grads

    history = [trainable]
    for _ in range(2):
        trainable, opt_state, grads = step(trainable, opt_state, frozen)
        history.append(trainable)
        expected = {"head/kernel", "head/bias"} | {f"lora/{k}" for k in _flat(lora)}
        assert set(_flat(grads)) == expected
    assert set(_flat(frozen)) == set(_flat(params)) - {"head/kernel", "head/bias"}
    for k, v in _flat(frozen).items():
        assert v is frozen_before[k] and v is _flat(params)[k]
    f0, f1, f2 = (_flat(t) for t in history)
    b = "lora/Transformer/encoderblock_1/MultiHeadDotProductAttention_1/value/kernel/"
    # B starts at 0 so A's first gradient is 0; B moves first, then A.
    np.testing.assert_array_equal(f1[b + "a"], f0[b + "a"])
    assert np.any(f1[b + "b"] != 0)
    assert np.any(f2[b + "a"] != f1[b + "a"])
    assert np.any(f1["head/kernel"] != f0["head/kernel"])


def _tree_with_everything():
    _, params = _ckpt(2)
    model = _model(2, adapter_dim=12)
    with_adapters = surgery.init_adapters(jax.random.PRNGKey(0), model, params, SIZE)
    lora, _ = surgery.init_lora(jax.random.PRNGKey(1), with_adapters,
                                surgery.lora_targets(with_adapters, "qv"), rank=2)
    return surgery.attach_lora(with_adapters, lora)


def test_trainable_predicates_select_the_right_leaves():
    params_tree = _tree_with_everything()
    paths = set(_flat(params_tree))
    head = {"head/kernel", "head/bias"}
    lora = {p for p in paths if p.startswith("lora/")}
    adapters = {f"Transformer/encoderblock_{i}/Adapter_{m}/{d}/{leaf}"
                for i in range(2) for m in ("attn", "mlp") for d in ("down", "up")
                for leaf in ("kernel", "bias")}
    assert len(lora) == 2 * 2 * 2 and adapters <= paths
    cases = [("full", True, paths), ("head", True, head), ("lora", True, lora | head),
             ("lora", False, lora), ("adapter", True, adapters | head), ("adapter", False, adapters)]
    for mode, train_head, want in cases:
        trainable, frozen = surgery.split_trainable(params_tree, mode, train_head=train_head)
        assert set(_flat(trainable)) == want, mode
        assert set(_flat(frozen)) == paths - want, mode
        mask = surgery.trainable_mask(params_tree, mode, train_head=train_head)
        assert jax.tree.structure(mask) == jax.tree.structure(params_tree)
        assert {k for k, v in _flat(mask).items() if v} == want


@pytest.mark.parametrize("mode", surgery.TRAINABLE_MODES)
def test_partition_and_merge_are_exact_inverses(mode):
    params_tree = _tree_with_everything()
    predicate = surgery.trainable_predicate(mode)
    trainable, frozen = surgery.partition(params_tree, predicate)
    merged = surgery.merge_partitions(trainable, frozen)
    assert jax.tree.structure(merged) == jax.tree.structure(params_tree)
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree.leaves(params_tree)):
        assert got is want, path
    again = surgery.partition(merged, predicate)
    assert jax.tree.structure(again) == jax.tree.structure((trainable, frozen))
    assert all(a is b for a, b in zip(jax.tree.leaves(again), jax.tree.leaves((trainable, frozen))))


def test_split_errors():
    _, params = _ckpt(2)
    with pytest.raises(ValueError, match="must be one of"):
        surgery.trainable_predicate("bias")
    with pytest.raises(ValueError, match="needs a 'lora' subtree"):
        surgery.split_trainable(params, "lora")
    with pytest.raises(ValueError, match="needs Adapter_"):
        surgery.split_trainable(params, "adapter")
    with pytest.raises(ValueError, match="share leaves"):
        surgery.merge_partitions(params, {"head": params["head"]})


# ----------------------------------------------------------------------------- adapters

def test_init_adapters_adds_identity_adapters():
    flat, params = _ckpt(2)
    model = _model(2, adapter_dim=192 // 16)
    out = surgery.init_adapters(jax.random.PRNGKey(0), model, params, SIZE)
    got = _flat(out)
    added = {k: v for k, v in got.items() if "Adapter_" in k}
    assert len(added) == 2 * 2 * 4
    assert added["Transformer/encoderblock_1/Adapter_mlp/down/kernel"].shape == (192, 12)
    assert added["Transformer/encoderblock_1/Adapter_attn/up/kernel"].shape == (12, 192)
    assert 0 < np.std(added["Transformer/encoderblock_0/Adapter_attn/down/kernel"]) < 1e-2
    for k, v in _flat(params).items():
        assert got[k] is v
    images = _images()
    assert rel_err(_forward(model, out, images), fmt.reference_forward(flat, images, patch=16)) < 1e-5
    with pytest.raises(ValueError, match="adapter_dim"):
        surgery.init_adapters(jax.random.PRNGKey(0), _model(2), params, SIZE)
    with pytest.raises(ValueError, match="missing keys"):
        surgery.init_adapters(jax.random.PRNGKey(0), _model(3, adapter_dim=12), params, SIZE)
    with pytest.raises(ValueError, match="already has Adapter_"):
        surgery.init_adapters(jax.random.PRNGKey(0), model, out, SIZE)


# ----------------------------------------------------------------------------- ReMem fold

FOLD_CASES = [  # (mlp_alpha, attn_beta, residual_mode, prune_mlp)
    (0.8, 1.0, "two_minus", ()),
    (0.9, 0.8, "two_minus", ()),
    (0.8, 1.0, "inverse", ()),
    (0.9, 0.8, "inverse", ()),
    (tuple(np.linspace(0.8, 1.0, 12)), tuple(np.linspace(1.1, 0.9, 12)), "two_minus", (10, 11)),
]
RESIDUAL = {"two_minus": lambda w: 2.0 - w, "inverse": lambda w: 1.0 / w}


@functools.lru_cache(maxsize=None)
def _plain_forward12(prune_mlp):
    """One compiled plain 12-block forward per pruning, shared by the fold cases."""
    return jax.jit(lambda p, x: _forward(_model(12, prune_mlp=prune_mlp), p, x))


@pytest.mark.parametrize("alpha,beta,mode,prune_mlp", FOLD_CASES)
def test_fold_reweighting_matches_reweighted_reference(ckpt12, alpha, beta, mode, prune_mlp):
    flat, params = ckpt12
    images = _images()
    alphas = vit.per_block(alpha, 12, "alpha")
    betas = vit.per_block(beta, 12, "beta")
    want = fmt.reference_forward(flat, images, patch=16, mlp_alpha=alphas, attn_beta=betas,
                                 residual=RESIDUAL[mode], prune_mlp=prune_mlp)
    folded = surgery.fold_reweighting(params, mlp_alpha=alpha, attn_beta=beta, residual_mode=mode,
                                      num_layers=12, prune_mlp=prune_mlp)
    # Exact arithmetic: only the LayerNorm eps differs.
    plain64 = fmt.reference_forward(_flat(folded), images, patch=16, prune_mlp=prune_mlp)
    assert rel_err(plain64, want) < EPS_RTOL
    # The float32 plain ViT on folded weights.
    logits = _plain_forward12(prune_mlp)(folded, images)
    assert rel_err(logits, want) < FOLD_RTOL
    # Not vacuous: the unfolded plain model is far off.
    assert rel_err(fmt.reference_forward(flat, images, patch=16, prune_mlp=prune_mlp), want) > 1e-2
    # Only out / Dense_1 kernels and biases change.
    changed = {k for k, v in _flat(folded).items() if v is not _flat(params)[k]}
    assert changed and all(k.endswith(("/out/kernel", "/out/bias", "/Dense_1/kernel", "/Dense_1/bias"))
                           for k in changed)


@pytest.mark.parametrize("mode", ["two_minus", "inverse"])
def test_fold_is_exact_without_layernorm_eps(ckpt12, monkeypatch, mode):
    """In float64 with eps = 0 the fold is an identity of the network, to rounding."""
    flat, params = ckpt12
    monkeypatch.setattr(fmt, "layer_norm", functools.partial(fmt.layer_norm, eps=0.0))
    params64 = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    images = _images()
    folded = surgery.fold_reweighting(params64, mlp_alpha=0.9, attn_beta=0.8, residual_mode=mode)
    want = fmt.reference_forward(flat, images, patch=16, mlp_alpha=(0.9,) * 12,
                                 attn_beta=(0.8,) * 12, residual=RESIDUAL[mode])
    assert rel_err(fmt.reference_forward(_flat(folded), images, patch=16), want) < 1e-12


def test_fold_handles_adapters():
    _, params = _ckpt(12, seed=5)
    rng = np.random.default_rng(6)
    model_plain = _model(12, adapter_dim=12)
    params = surgery.init_adapters(jax.random.PRNGKey(0), model_plain, params, SIZE)
    # Non-trivial adapters: realistic random down / up weights and biases.
    params = tree.unflatten_params({
        k: (rng.standard_normal(np.shape(v)).astype(np.float32)
            * (0.3 / math.sqrt(np.shape(v)[0]) if k.endswith("kernel") else 0.05)
            if "Adapter_" in k else v)
        for k, v in _flat(params).items()})
    images = _images()
    reweighted = _model(12, adapter_dim=12, mlp_alpha=0.8, attn_beta=0.9, residual_mode="inverse")
    want = np.asarray(_forward(reweighted, params, images), np.float64)
    folded = surgery.fold_reweighting(params, mlp_alpha=0.8, attn_beta=0.9, residual_mode="inverse")
    assert rel_err(_forward(model_plain, folded, images), want) < FOLD_RTOL
    no_adapters = {k: v for k, v in _flat(params).items() if "Adapter_" not in k}
    unadapted = _forward(_model(12, mlp_alpha=0.8, attn_beta=0.9, residual_mode="inverse"),
                         tree.unflatten_params(no_adapters), images)
    assert rel_err(unadapted, want) > 1e-2  # The adapters matter.


def test_fold_errors():
    _, params = _ckpt(2)
    with pytest.raises(ValueError, match="residual factor 0.0 <= 0"):
        surgery.fold_reweighting(params, mlp_alpha=2.0)
    with pytest.raises(ValueError, match="num_layers is 3 but the tree has 2 blocks"):
        surgery.fold_reweighting(params, mlp_alpha=0.8, num_layers=3)
    with pytest.raises(ValueError, match="merge it first"):
        lora, _ = surgery.init_lora(jax.random.PRNGKey(0), params,
                                    surgery.lora_targets(params, "qv"), rank=2)
        surgery.fold_reweighting(surgery.attach_lora(params, lora), mlp_alpha=0.8)
    with pytest.raises(ValueError, match="one entry per block"):
        surgery.fold_reweighting(params, mlp_alpha=(0.8, 0.9, 1.0))
    identity = surgery.fold_reweighting(params)  # alpha = beta = 1: nothing to fold.
    assert all(a is b for a, b in zip(jax.tree.leaves(identity), jax.tree.leaves(params)))


# ----------------------------------------------------------------------------- weight copy, pruning

@pytest.mark.parametrize("d,kept", [(1, list(range(12))), (2, [0, 2, 4, 6, 8, 10]),
                                    (3, [0, 3, 6, 9]), (5, [0, 5, 10]), (12, [0])])
def test_copy_every_dth_block(ckpt12, d, kept):
    _, params = ckpt12
    student = surgery.copy_every_dth_block(params, d)
    blocks = student["Transformer"]
    assert sorted(k for k in blocks if k.startswith("encoderblock_")) == sorted(
        f"encoderblock_{i}" for i in range(len(kept)))
    for new, old in enumerate(kept):
        for a, b in zip(jax.tree.leaves(blocks[f"encoderblock_{new}"]),
                        jax.tree.leaves(params["Transformer"][f"encoderblock_{old}"])):
            assert a is b
    for key in ("embedding", "cls", "head"):
        assert all(a is b for a, b in zip(jax.tree.leaves(student[key]), jax.tree.leaves(params[key])))
    for key in ("posembed_input", "encoder_norm"):
        assert all(a is b for a, b in zip(jax.tree.leaves(blocks[key]),
                                          jax.tree.leaves(params["Transformer"][key])))
    assert len(_flat(student)) == len(_flat(params)) - 16 * (12 - len(kept))


def test_copy_every_dth_block_errors(ckpt12):
    _, params = ckpt12
    for d in (0, -1, 13, 2.0):
        with pytest.raises(ValueError, match=r"integer in \[1, 12\]"):
            surgery.copy_every_dth_block(params, d)


def test_drop_blocks_equals_pruning_both_branches():
    flat, params = _ckpt(4)
    images = _images()
    dropped = surgery.drop_blocks(params, [1, 2])
    assert sorted(k for k in dropped["Transformer"] if k.startswith("encoderblock_")) == [
        "encoderblock_0", "encoderblock_1"]
    assert dropped["Transformer"]["encoderblock_1"]["MlpBlock_3"] is not None
    got = _forward(_model(2), dropped, images)
    want = fmt.reference_forward(flat, images, patch=16, prune_attn=(1, 2), prune_mlp=(1, 2))
    assert rel_err(got, want) < 1e-5
    pruned = _forward(_model(4, prune_attn=(1, 2), prune_mlp=(1, 2)), params, images)
    chex.assert_trees_all_close(got, pruned, rtol=1e-6, atol=1e-6)
    for bad, msg in (([4], r"outside \[0, 4\)"), ([1, 1], "duplicates"), ([0, 1, 2, 3], "all 4")):
        with pytest.raises(ValueError, match=msg):
            surgery.drop_blocks(params, bad)


def test_copy_every_dth_block_is_dropping_the_others(ckpt12):
    _, params = ckpt12
    by_copy = surgery.copy_every_dth_block(params, 3)
    by_drop = surgery.drop_blocks(params, [i for i in range(12) if i % 3])
    assert jax.tree.structure(by_copy) == jax.tree.structure(by_drop)
    assert all(a is b for a, b in zip(jax.tree.leaves(by_copy), jax.tree.leaves(by_drop)))


def test_zero_mlp_neurons_silences_exactly_those_neurons():
    _, params = _ckpt(2)
    model, images = _model(2), _images()
    neurons = [0, 5, 767]
    zeroed = surgery.zero_mlp_neurons(params, 1, neurons)
    _, state = _forward(model, zeroed, images, mutable=["mlp_hidden"])
    hidden = vit.collect_intermediates(state)["mlp_hidden"]
    _, state0 = _forward(model, params, images, mutable=["mlp_hidden"])
    hidden0 = vit.collect_intermediates(state0)["mlp_hidden"]
    assert np.all(np.asarray(hidden[1])[..., neurons] == 0.0)
    assert np.all(np.asarray(hidden0[1])[..., neurons] != 0.0)
    others = np.delete(np.asarray(hidden[1]), neurons, axis=-1)
    np.testing.assert_array_equal(others, np.delete(np.asarray(hidden0[1]), neurons, axis=-1))
    np.testing.assert_array_equal(hidden[0], hidden0[0])
    assert all(a is b for a, b in zip(jax.tree.leaves(zeroed["Transformer"]["encoderblock_0"]),
                                      jax.tree.leaves(params["Transformer"]["encoderblock_0"])))
    # Traced indices work under jit.
    traced = jax.jit(surgery.zero_mlp_neurons, static_argnums=1)(params, 1, jnp.asarray(neurons))
    chex.assert_trees_all_equal(traced, zeroed)
    with pytest.raises(ValueError, match=r"No Transformer/encoderblock_2/MlpBlock_3/Dense_0"):
        surgery.zero_mlp_neurons(params, 2, [0])
    with pytest.raises(ValueError, match=r"\[768\] are outside \[0, 768\)"):
        surgery.zero_mlp_neurons(params, 0, [768])
