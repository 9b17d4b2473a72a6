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


# ----------------------------------------------------------------------------- BatchNorm

# Every student, shrunk: the registered architecture (so every BatchNorm of it), fewer channels
# where the model has a width knob, and no dropout or stochastic depth, so that one device and
# eight compute the same function.
BN_TEST_KWARGS = {
    "resnet18": dict(width=16),
    "resnet34": dict(width=16),
    "resnet50": dict(width=16),
    "mobilenet_v2": dict(width_multiplier=0.25, dropout_rate=0.0),
    "efficientnet_v2_b0": dict(dropout_rate=0.0, stochastic_depth_rate=0.0),
    "efficientnet_v2_s": dict(dropout_rate=0.0, stochastic_depth_rate=0.0),
}
BN_SIZE, BN_PER_DEVICE = 32, 4


def _train_forward_recording_bn_inputs(model: nn.Module):
    """`(variables, images) -> (logits, new batch_stats, {BatchNorm path: its input})`, train mode."""
    def forward(variables, images):
        inputs = {}

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
                inputs["/".join(context.module.path)] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            logits, state = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits, state["batch_stats"], inputs
    return forward


def _bn_layers(batch_stats) -> dict:
    """{'a/b/bn': {'mean': ..., 'var': ...}} of a (possibly device-stacked) batch_stats tree."""
    flat = {"/".join(k.key for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(batch_stats)}
    layers = {}
    for key, leaf in flat.items():
        layer, stat = key.rsplit("/", 1)
        layers.setdefault(layer, {})[stat] = leaf
    return layers


def _np_running_stats(x: np.ndarray) -> dict:
    """Flax BatchNorm (momentum 0.9) after one train step from mean 0, var 1, in float64:
    `0.9 * old + 0.1 * batch value`, with the biased variance over all axes but the channels."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return {"mean": 0.9 * 0.0 + 0.1 * x.mean(0), "var": 0.9 * 1.0 + 0.1 * x.var(0)}


@pytest.fixture(scope="module", params=sorted(STUDENTS))
def bn_forwards(request):
    """One student's train-mode forward on a 32-image batch: once on one device under jit, once
    pmapped over 8 devices with `bn_axis_name='batch'` (4 images each), both from the fresh
    statistics (mean 0, var 1) and recording every BatchNorm's input."""
    name = request.param
    n_dev = jax.local_device_count()
    assert n_dev == 8
    kwargs = BN_TEST_KWARGS.get(name, {})
    single = create_student(name, 10, **kwargs)
    variables = _synthetic_variables(single, BN_SIZE)
    images = np.asarray(jax.random.uniform(jax.random.key(1), (n_dev * BN_PER_DEVICE, BN_SIZE, BN_SIZE, 3),
                                           minval=-1.0, maxval=1.0))
    full = _compile(jax.jit, _train_forward_recording_bn_inputs(single), variables, images)(variables, images)

    sharded = create_student(name, 10, bn_axis_name="batch", **kwargs)
    # NumPy leaves go to the devices in one transfer each (jnp leaves would be re-laid out slowly).
    replicated = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n_dev,) + x.shape), variables)
    per_device = images.reshape((n_dev, BN_PER_DEVICE) + images.shape[1:])
    pmapped = _compile(functools.partial(jax.pmap, axis_name="batch"), _train_forward_recording_bn_inputs(sharded),
                       replicated, per_device)(replicated, per_device)
    return {"name": name, "variables": variables, "full": full, "pmapped": pmapped}


def test_batchnorm_under_pmap_matches_full_batch(bn_forwards):
    logits, stats, _ = bn_forwards["full"]
    p_logits, p_stats, p_inputs = bn_forwards["pmapped"]
    n_dev = jax.local_device_count()
    # Every device holds the full-batch statistics (each device's own 4 images would give
    # different ones); only the float32 reduction order differs.
    chex.assert_trees_all_close(p_stats, jax.tree.map(lambda x: np.broadcast_to(x, (n_dev,) + x.shape), stats),
                                atol=1e-5, rtol=5e-5)
    # Train-mode BatchNorm divides by the batch standard deviation of each of 20 to 110 layers,
    # some of which see one pixel per image: the float32 rounding grows to ~5e-4 on logits of ~5.
    chex.assert_trees_all_close(p_logits.reshape(logits.shape), logits, atol=2e-3, rtol=1e-4)
    # Layer by layer, free of that amplification: each BatchNorm's new statistics are those of
    # its own input gathered over all eight devices (NumPy float64).
    layers = _bn_layers(p_stats)
    assert set(p_inputs) == set(layers), "every BatchNorm runs once per forward"
    for path, x in p_inputs.items():
        want = _np_running_stats(np.asarray(x))  # [8, 4, H, W, C]: the whole batch
        for stat in ("mean", "var"):
            got = layers[path][stat]  # [8, C]: one copy per device
            np.testing.assert_allclose(got, np.broadcast_to(want[stat], got.shape), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{bn_forwards['name']} {path} {stat}")


def test_batchnorm_running_average_keeps_0_9_of_the_old_value(bn_forwards):
    # From the fresh statistics (mean 0, var 1), one train step gives 0.9 * old + 0.1 * batch
    # (flax's momentum convention; torch's momentum=0.1 means the same update), for every layer.
    _, stats, inputs = bn_forwards["full"]
    initial = _bn_layers(bn_forwards["variables"]["batch_stats"])
    layers = _bn_layers(stats)
    assert set(inputs) == set(layers) == set(initial)
    for path, x in inputs.items():
        np.testing.assert_array_equal(initial[path]["mean"], 0.0)
        np.testing.assert_array_equal(initial[path]["var"], 1.0)
        want = _np_running_stats(np.asarray(x))
        for stat in ("mean", "var"):
            np.testing.assert_allclose(layers[path][stat], want[stat], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{bn_forwards['name']} {path} {stat}")


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
