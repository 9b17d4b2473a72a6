"""The ViT against the documented AugReg layout and an independent NumPy float64 model."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remem_jax import tree
from remem_jax.models import vit
from tests import augreg_format as fmt

# Published parameter counts (vit_jax models_test.py; 224 px, 1000 classes).
PUBLISHED_COUNTS = {"Ti_16": 5_717_416, "S_16": 22_050_664, "B_16": 86_567_656, "L_16": 304_326_632}
RTOL = 1e-5  # float32 model against the float64 reference: max |err| / max |ref|.


def param_shapes(model, image_size):
    return {k: tuple(v.shape) for k, v in tree.flatten_params(
        vit.param_shapes(model, image_size)).items()}


def rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("name", ["Ti_16", "S_16", "S_32", "B_16", "B_32", "L_16"])
def test_param_tree_is_the_documented_augreg_layout(name):
    variant, patch = name.split("_")
    model = vit.create_vit(name, 21843)
    want = fmt.documented_layout(variant, int(patch), 224, 21843)
    assert param_shapes(model, 224) == want
    assert len(want) == (392 if variant == "L" else 200)


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_param_counts_match_published(name):
    shapes = param_shapes(vit.create_vit(name, 1000), 224)
    assert sum(int(np.prod(s)) for s in shapes.values()) == PUBLISHED_COUNTS[name]


def test_pre_logits_layout():
    model = vit.create_vit("B_32", 1000, representation_size=768)
    assert param_shapes(model, 224) == fmt.documented_layout("B", 32, 224, 1000, representation_size=768)


def _model_and_ckpt(name, image_size, num_classes=7, representation_size=None, seed=0, **overrides):
    variant, patch = name.split("_")
    flat = fmt.random_checkpoint(fmt.documented_layout(
        variant, int(patch), image_size, num_classes, representation_size), seed=seed)
    model = vit.create_vit(name, num_classes, representation_size=representation_size, **overrides)
    return model, flat, tree.unflatten_params(flat)


def _images(n, size, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


FORWARD_CASES = [  # (name, image_size, representation_size)
    ("Ti_16", 224, None),
    ("S_32", 224, None),
    ("Ti_16", 384, None),
    ("B_32", 224, 768),  # the original 2020 checkpoints' pre_logits layer
]


@pytest.mark.parametrize("name,size,rep", FORWARD_CASES)
def test_forward_matches_numpy_float64_reference(name, size, rep):
    model, flat, params = _model_and_ckpt(name, size, representation_size=rep)
    images = _images(2, size)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
    want = fmt.reference_forward(flat, images, patch=model.patch_size)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 7)
    assert rel_err(logits, want) < RTOL
    # The reference would tell exact GELU apart: the tanh form is load-bearing.
    exact = fmt.reference_forward(flat, images, patch=model.patch_size, gelu=fmt.gelu_exact)
    assert rel_err(logits, exact) > 10 * RTOL


def test_exact_gelu_option_matches_exact_reference():
    model, flat, params = _model_and_ckpt("Ti_16", 64, approximate_gelu=False)
    images = _images(2, 64)
    logits = model.apply({"params": params}, images)
    assert rel_err(logits, fmt.reference_forward(flat, images, patch=16, gelu=fmt.gelu_exact)) < RTOL
    assert rel_err(logits, fmt.reference_forward(flat, images, patch=16)) > 10 * RTOL


class JitTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        model, flat, params = _model_and_ckpt("Ti_16", 32)
        images = _images(3, 32)
        logits = self.variant(lambda p, x: model.apply({"params": p}, x))(params, images)
        want = fmt.reference_forward(flat, images, patch=16)
        self.assertLess(rel_err(logits, want), RTOL)


def test_reweighting_with_unit_factors_is_bit_identical():
    model, _, params = _model_and_ckpt("Ti_16", 32)
    images = _images(2, 32)
    plain = model.apply({"params": params}, images)
    for mode in vit.RESIDUAL_MODES:
        unit = model.clone(mlp_alpha=(1.0,) * 12, attn_beta=1.0, residual_mode=mode)
        np.testing.assert_array_equal(unit.apply({"params": params}, images), plain)


@pytest.mark.parametrize("mode,residual", [("two_minus", lambda w: 2.0 - w), ("inverse", lambda w: 1.0 / w)])
def test_reweighting_matches_reference(mode, residual):
    alphas = tuple(np.linspace(0.7, 1.0, 12))
    betas = tuple(np.linspace(1.1, 0.8, 12))
    model, flat, params = _model_and_ckpt("Ti_16", 32, mlp_alpha=alphas, attn_beta=betas, residual_mode=mode)
    images = _images(2, 32)
    want = fmt.reference_forward(flat, images, patch=16, mlp_alpha=alphas, attn_beta=betas, residual=residual)
    assert rel_err(model.apply({"params": params}, images), want) < RTOL
    assert rel_err(want, fmt.reference_forward(flat, images, patch=16)) > 1e-3  # the knob does something


def test_pruning_a_branch_equals_removing_it():
    model, flat, params = _model_and_ckpt("Ti_16", 32, prune_attn=(3,), prune_mlp=(3, 7))
    images = _images(2, 32)
    want = fmt.reference_forward(flat, images, patch=16, prune_attn=(3,), prune_mlp=(3, 7))
    assert rel_err(model.apply({"params": params}, images), want) < RTOL
    # Pruning both branches of block 3 equals an 11-block model without that block.
    model_both = vit.create_vit("Ti_16", 7, prune_attn=(3,), prune_mlp=(3,))
    blocks = params["Transformer"]
    shorter = {**params, "Transformer": {
        **{k: v for k, v in blocks.items() if not k.startswith("encoderblock_")},
        **{f"encoderblock_{j}": blocks[f"encoderblock_{i}"] for j, i in enumerate(i for i in range(12) if i != 3)}}}
    model_11 = vit.create_vit("Ti_16", 7, num_layers=11)
    np.testing.assert_allclose(model_both.apply({"params": params}, images),
                               model_11.apply({"params": shorter}, images), rtol=1e-6, atol=1e-6)


def test_intermediates_match_reference_and_have_documented_shapes():
    model, flat, params = _model_and_ckpt("Ti_16", 32)
    images = _images(2, 32)
    logits, state = model.apply({"params": params}, images, mutable=list(vit.INTERMEDIATE_COLLECTIONS))
    got = vit.collect_intermediates(state)
    _, tokens = fmt.reference_forward(flat, images, patch=16, return_tokens=True)
    assert len(got["tokens"]) == 12
    for mine, ref in zip(got["tokens"], tokens):
        assert rel_err(mine, ref) < RTOL
    assert got["encoded"].shape == (2, 5, 192)
    assert [a.shape for a in got["attention"]] == [(2, 3, 5, 5)] * 12
    np.testing.assert_allclose(np.asarray(got["attention"][4]).sum(-1), 1.0, rtol=1e-5)
    assert got["query"][0].shape == got["value"][11].shape == (2, 5, 3, 64)
    assert [h.shape for h in got["mlp_hidden"]] == [(2, 5, 768)] * 12
    assert got["pre_logits"].shape == (2, 192)
    # Sowing nothing gives the same logits.
    np.testing.assert_array_equal(model.apply({"params": params}, images), logits)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model, flat, params = _model_and_ckpt("Ti_16", 32, dtype=jnp.bfloat16)
    fresh = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert {x.dtype for x in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.float32)}
    images = _images(2, 32)
    logits = model.apply({"params": params}, images)
    assert logits.dtype == jnp.float32
    assert rel_err(logits, fmt.reference_forward(flat, images, patch=16)) < 0.1


def test_dropout_only_in_train_mode():
    model, _, params = _model_and_ckpt("Ti_16", 32, dropout_rate=0.5)
    images = _images(2, 32)
    eval_a = model.apply({"params": params}, images)
    eval_b = model.apply({"params": params}, images, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    train = model.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
    assert not np.allclose(train, eval_a)


@pytest.mark.parametrize("kwargs,match", [
    (dict(residual_mode="bogus"), "residual_mode"),
    (dict(prune_mlp=(12,)), "prune_mlp"),
    (dict(mlp_alpha=(0.9, 0.9)), "mlp_alpha"),
    (dict(mlp_alpha=0.0), "mlp_alpha"),
])
def test_bad_model_settings_raise(kwargs, match):
    model = vit.create_vit("Ti_16", 3, **kwargs)
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_bad_inputs_raise():
    model, _, params = _model_and_ckpt("Ti_16", 32)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        model.apply({"params": params}, jnp.zeros((1, 40, 40, 3)))
    with pytest.raises(ValueError, match="image_size"):
        model.apply({"params": params}, jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(ValueError, match="Unknown ViT variant"):
        vit.variant_config("XL_16")
