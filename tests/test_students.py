"""Tests of the CNN students: reference parameter counts, forward passes, BatchNorm under pmap."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remem_jax.models import layers
from remem_jax.models.students import STUDENTS, create_student, init_student

# Parameter counts at 224 px and 1000 classes (BatchNorm running statistics excluded).
REFERENCE_PARAM_COUNTS = {
    # torchvision.models.resnet18().parameters() (torchvision 0.28); also torchvision's docs.
    "resnet18": 11_689_512,
    # torchvision.models.resnet34() (torchvision 0.28); also torchvision's docs.
    "resnet34": 21_797_672,
    # torchvision.models.resnet50() (torchvision 0.28); also torchvision's docs.
    "resnet50": 25_557_032,
    # torchvision.models.mobilenet_v2() (torchvision 0.28); also torchvision's docs.
    "mobilenet_v2": 3_504_872,
    # timm 1.0.31 tf_efficientnetv2_b0() and _gen_efficientnetv2_base('efficientnetv2_b0').
    "efficientnet_v2_b0": 7_139_704,
    # torchvision.models.efficientnet_v2_s() (torchvision 0.28, and its docs);
    # timm 1.0.31 efficientnetv2_s() agrees.
    "efficientnet_v2_s": 21_458_488,
}
# torchvision.models.mobilenet_v2(width_mult=w) (torchvision 0.28).
MOBILENET_V2_WIDTH_COUNTS = {0.5: 1_968_680, 0.75: 2_636_424, 1.4: 6_108_776}


def _compile(transform, fn, *args):
    """`transform(fn)` compiled for `args` at XLA optimisation level 0 (halves CPU compile time)."""
    return transform(fn).lower(*args).compile({"xla_backend_optimization_level": 0})


def _count_params(model: nn.Module, image_size: int = 224) -> int:
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes["params"]))


def test_registry_has_every_student():
    assert set(STUDENTS) == set(REFERENCE_PARAM_COUNTS)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAM_COUNTS))
def test_param_count_matches_reference(name):
    assert _count_params(create_student(name, 1000)) == REFERENCE_PARAM_COUNTS[name]


@pytest.mark.parametrize("width", sorted(MOBILENET_V2_WIDTH_COUNTS))
def test_mobilenet_v2_width_multiplier_matches_reference(width):
    model = create_student("mobilenet_v2", 1000, width_multiplier=width)
    assert _count_params(model) == MOBILENET_V2_WIDTH_COUNTS[width]


def test_make_divisible_matches_torchvision():
    # Values of torchvision `_make_divisible(v, 8)` worked by hand from its definition.
    assert layers.make_divisible(32 * 0.5) == 16
    # int(18 + 4) // 8 * 8 = 16 < 0.9 * 18, so one more step of 8.
    assert layers.make_divisible(24 * 0.75) == 24
    assert layers.make_divisible(1280 * 1.4) == 1792
    assert layers.make_divisible(3) == 8


def test_unknown_student_lists_known_names():
    with pytest.raises(ValueError, match="resnet18.*efficientnet_v2_s"):
        create_student("vgg16", 10)


def _synthetic_variables(model: nn.Module, image_size: int) -> dict:
    """Variables of the right shapes filled from NumPy (a jitted init compiles slowly)."""
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def resnet18_variables():
    # An "rbg" key: threefry initialisers take three times longer to compile on CPU.
    rng = jax.random.key(0, impl="rbg")
    params, batch_stats = init_student(create_student("resnet18", 10), rng, 32)
    return {"params": params, "batch_stats": batch_stats}


def test_init_student_gives_float32_trees_of_the_declared_shapes(resnet18_variables):
    model = create_student("resnet18", 10, bn_axis_name="batch")
    expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    chex.assert_trees_all_equal_shapes_and_dtypes(resnet18_variables, expected)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(resnet18_variables))
    # torchvision's BatchNorm init (weight 1, bias 0) and fresh running statistics (0, 1).
    bn = resnet18_variables["params"]["layer1_0"]["bn1"]
    chex.assert_trees_all_equal(bn["scale"], jnp.ones(64))
    chex.assert_trees_all_equal(resnet18_variables["batch_stats"]["bn1"]["var"], jnp.ones(64))
    # Kaiming-normal fan-out convolutions: std sqrt(2 / (64 * 7 * 7)) = 0.0253 over 9408 weights.
    conv1 = np.asarray(resnet18_variables["params"]["conv1"]["kernel"])
    assert conv1.shape == (7, 7, 3, 64)
    np.testing.assert_allclose(conv1.std(), np.sqrt(2 / (64 * 49)), rtol=0.05)
    # torch nn.Linear default: weight and bias uniform in +-1 / sqrt(fan_in = 512).
    fc = resnet18_variables["params"]["fc"]
    for leaf in (fc["kernel"], fc["bias"]):
        assert 0.8 / np.sqrt(512) < np.max(np.abs(leaf)) <= 1 / np.sqrt(512)


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAM_COUNTS))
def test_forward_train_and_eval(name):
    model = create_student(name, 10)
    variables = _synthetic_variables(model, 32)
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)

    def forward(variables, images, rng):
        train_out = model.apply(variables, images, train=True, mutable=["batch_stats"],
                                rngs={"dropout": rng})
        eval_out = model.apply(variables, images, train=False, mutable=["batch_stats"])
        return train_out, eval_out

    forward = _compile(jax.jit, forward, variables, images, jax.random.key(0))
    (logits, updates), (eval_logits, eval_state) = forward(variables, images, jax.random.key(2))
    for out in (logits, eval_logits):
        chex.assert_shape(out, (2, 10))
        chex.assert_tree_all_finite(out)
        assert out.dtype == jnp.float32
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"],
                           variables["batch_stats"])
    assert all(jax.tree.leaves(changed)), "every BatchNorm statistic should move in train mode"
    chex.assert_trees_all_equal(eval_state["batch_stats"], variables["batch_stats"])
    # Eval mode draws no randomness: another rng gives the same logits.
    (_, _), (eval_again, _) = forward(variables, images, jax.random.key(3))
    chex.assert_trees_all_equal(eval_again, eval_logits)


def test_stochastic_depth_drops_whole_samples():
    x = jnp.ones((64, 2, 2, 3))
    y = jnp.full((64, 2, 2, 3), 0.5)

    class Residual(nn.Module):
        @nn.compact
        def __call__(self, x, y, train):
            return layers.residual(x, y, 1, 0.25, train)

    out = Residual().apply({}, x, y, True, rngs={"dropout": jax.random.key(0)})
    # A sample keeps its branch scaled by 1 / (1 - 0.25) or drops it entirely.
    per_sample = np.asarray(out).reshape(64, -1)
    assert np.all(per_sample == per_sample[:, :1])
    kept = np.isclose(per_sample[:, 0], 1.0 + 0.5 / 0.75, rtol=1e-6)
    dropped = per_sample[:, 0] == 1.0
    assert np.all(kept | dropped) and kept.any() and dropped.any()
    chex.assert_trees_all_equal(Residual().apply({}, x, y, False), x + y)


def test_batchnorm_under_pmap_matches_full_batch(resnet18_variables):
    n_dev = jax.local_device_count()
    assert n_dev == 8
    images = jax.random.uniform(jax.random.key(1), (2 * n_dev, 32, 32, 3), minval=-1.0, maxval=1.0)
    single = create_student("resnet18", 10)
    apply = functools.partial(nn.Module.apply, train=True, mutable=["batch_stats"])
    logits, state = _compile(jax.jit, functools.partial(apply, single), resnet18_variables, images)(
        resnet18_variables, images)

    sharded = create_student("resnet18", 10, bn_axis_name="batch")
    replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (n_dev,) + x.shape), resnet18_variables)
    per_device = images.reshape(n_dev, 2, 32, 32, 3)
    pmapped = _compile(functools.partial(jax.pmap, axis_name="batch"),
                       functools.partial(apply, sharded), replicated, per_device)
    p_logits, p_state = pmapped(replicated, per_device)

    # Every device holds the full-batch statistics (each device's own 2 images would give
    # different ones); only the float32 reduction order differs.
    for device in range(n_dev):
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[device], p_state["batch_stats"]),
                                    state["batch_stats"], atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(p_logits.reshape(2 * n_dev, 10), logits, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits(resnet18_variables):
    images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
    model32 = create_student("resnet18", 10)
    model16 = create_student("resnet18", 10, dtype=jnp.bfloat16)
    shapes16 = jax.eval_shape(functools.partial(model16.init, train=False), jax.random.key(0),
                              jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes16))

    def forward(variables, images):
        logits32 = model32.apply(variables, images, train=False)
        logits16 = model16.apply(variables, images, train=False)
        _, state16 = model16.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits32, logits16, state16

    logits32, logits16, state16 = _compile(jax.jit, forward, resnet18_variables, images)(
        resnet18_variables, images)
    assert logits16.dtype == jnp.float32
    # bfloat16 keeps 8 mantissa bits; through 18 layers the logits stay within 3 % of their scale.
    # (Eval mode: train-mode BatchNorm over 2 images at 1x1 resolution amplifies rounding.)
    scale = float(jnp.max(jnp.abs(logits32)))
    np.testing.assert_allclose(logits16, logits32, atol=0.03 * scale)
    assert not np.array_equal(logits16, logits32)  # the bfloat16 path really ran in bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state16))
