"""The accelerator fast paths compute the same maths as the reference paths.

Factored LoRA (`surgery.lora_variables` + the ViT's `lora` collection) against the materialised
`apply_lora`; fused attention (`jax.nn.dot_product_attention`) against the written-out softmax;
`remat_blocks` against the plain backward pass.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remem_jax import surgery
from remem_jax.models import vit

TINY = dict(num_classes=5, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
SIZE = 16


def _model(**overrides):
    return vit.VisionTransformer(**{**TINY, **overrides})


def _images(seed=0, n=3):
    return jax.random.uniform(jax.random.PRNGKey(seed), (n, SIZE, SIZE, 3), minval=-1.0, maxval=1.0)


def _params(model):
    params = model.init(jax.random.PRNGKey(1), _images())["params"]
    # A non-zero head, so that gradients reach the blocks.
    params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(2), params["head"]["kernel"].shape)
    return params


def _lora(params, targets, scale_alpha=4.0, rank=3):
    lora, config = surgery.init_lora(jax.random.PRNGKey(3), params, targets, rank=rank, alpha=scale_alpha)
    # B is zero at init; random B so the delta is not trivially zero.
    lora = jax.tree_util.tree_map_with_path(
        lambda path, x: (jax.random.normal(jax.random.PRNGKey(len(str(path))), x.shape) * 0.1
                         if str(path[-1].key) == "b" else x), lora)
    return lora, config


def _xent(logits):
    return -jnp.mean(jax.nn.log_softmax(logits)[:, 0])


def _loss_fns(model, params, config, images):
    def factored(lora):
        return _xent(model.apply(surgery.lora_variables(surgery.attach_lora(params, lora), config,
                                                        policy="always"), images))

    def materialised(lora):
        return _xent(model.apply({"params": surgery.apply_lora(params, lora, config)}, images))
    return factored, materialised


def _assert_grads_close(got, want, tol=1e-5):
    """Float32 gradients equal within `tol`, absolute, or relative to the leaf's largest entry where that exceeds 1."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        scale = max(float(np.max(np.abs(w))), 1.0)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=tol * scale, rtol=tol)
    chex.assert_trees_all_equal_structs(got, want)


@pytest.mark.parametrize("preset", ["qv", "all"])
def test_factored_lora_forward_and_gradients_equal_materialised(preset):
    model = _model()
    params = _params(model)
    lora, config = _lora(params, surgery.lora_targets(params, preset))
    images = _images()
    variables = surgery.lora_variables(surgery.attach_lora(params, lora), config)
    assert set(variables) == {"params", "lora"}
    # The base is passed through untouched (nothing materialised) when every target is factored.
    chex.assert_trees_all_equal(variables["params"], params)
    factored, materialised = _loss_fns(model, params, config, images)
    got = model.apply(variables, images)
    want = model.apply({"params": surgery.apply_lora(params, lora, config)}, images)
    chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
    assert not np.allclose(got, model.apply({"params": params}, images), atol=1e-3)  # LoRA is on
    # Gradients w.r.t. A and B (float32; tolerance 1e-5 relative / absolute).
    _assert_grads_close(jax.grad(factored)(lora), jax.grad(materialised)(lora))


def test_lora_variables_scale_is_folded_into_b():
    params = _params(_model())
    lora, config = _lora(params, surgery.lora_targets(params, "qv"), scale_alpha=6.0, rank=3)
    variables = surgery.lora_variables(surgery.attach_lora(params, lora), config)
    path = ("Transformer", "encoderblock_1", "MultiHeadDotProductAttention_1", "value", "kernel")
    got, want = variables["lora"], lora
    for key in path:
        got, want = got[key], want[key]
    chex.assert_trees_all_close(got["a"], want["a"])
    chex.assert_trees_all_close(got["b"], want["b"] * 2.0)  # alpha / rank = 6 / 3


def test_targets_outside_the_block_projections_are_materialised():
    model = _model()
    params = _params(model)
    targets = surgery.lora_targets(params, [r"embedding/kernel", r"Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"])
    lora, config = _lora(params, targets)
    images = _images()
    variables = surgery.lora_variables(surgery.attach_lora(params, lora), config)
    assert list(variables["lora"]["Transformer"]) == ["encoderblock_0"]
    assert "embedding" not in variables["lora"]
    assert not np.allclose(variables["params"]["embedding"]["kernel"], params["embedding"]["kernel"])
    factored, materialised = _loss_fns(model, params, config, images)
    chex.assert_trees_all_close(model.apply(variables, images),
                                model.apply({"params": surgery.apply_lora(params, lora, config)}, images),
                                atol=1e-5, rtol=1e-5)
    _assert_grads_close(jax.grad(factored)(lora), jax.grad(materialised)(lora))


def test_merged_export_equals_the_factored_model():
    model = _model()
    params = _params(model)
    lora, config = _lora(params, surgery.lora_targets(params, "all"))
    images = _images()
    merged = surgery.merge_lora(params, lora, config)
    chex.assert_trees_all_close(
        model.apply({"params": merged}, images),
        model.apply(surgery.lora_variables(surgery.attach_lora(params, lora), config), images),
        atol=1e-5, rtol=1e-5)


def _eqn_output_shapes(jaxpr) -> list:
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in (param if isinstance(param, (list, tuple)) else [param]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    shapes += _eqn_output_shapes(getattr(inner, "jaxpr", inner))
    return shapes


def test_factored_lora_computes_no_weight_gradient_of_the_frozen_kernels():
    model = _model()
    params = _params(model)
    lora, config = _lora(params, surgery.lora_targets(params, "qv"))
    factored, materialised = _loss_fns(model, params, config, _images())
    kernel_shape = tuple(params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]
                         ["kernel"].shape)  # (D, heads, head_dim): only W or dL/dW have it
    assert kernel_shape not in _eqn_output_shapes(jax.make_jaxpr(jax.grad(factored))(lora).jaxpr)
    assert kernel_shape in _eqn_output_shapes(jax.make_jaxpr(jax.grad(materialised))(lora).jaxpr)

    def flops(fn):
        cost = jax.jit(jax.grad(fn)).lower(lora).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return (cost or {}).get("flops")
    f_fact, f_mat = flops(factored), flops(materialised)
    if f_fact is not None and f_mat is not None:
        assert f_fact < f_mat


def test_factor_policy_materialises_high_rank_targets_by_default():
    model = _model()
    params = _params(model)
    # d_in = d_out = 32: rank 8 costs 3 * 8 * 64 > 32 * 32 per token factored, so 'auto' materialises.
    lora, config = _lora(params, surgery.lora_targets(params, "qv"), rank=8)
    assert not surgery.factoring_pays(32, 32, 8) and surgery.factoring_pays(32, 32, 5)
    tree = surgery.attach_lora(params, lora)
    auto, always, never = (surgery.lora_variables(tree, config, policy=p) for p in ("auto", "always", "never"))
    assert set(auto) == {"params"} and set(never) == {"params"} and set(always) == {"params", "lora"}
    images = _images()
    want = model.apply({"params": surgery.apply_lora(params, lora, config)}, images)
    for variables in (auto, always, never):
        chex.assert_trees_all_close(model.apply(variables, images), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(surgery.SurgeryError, match="policy"):
        surgery.lora_variables(tree, config, policy="sometimes")


def test_lora_variables_without_lora_is_the_params():
    params = _params(_model())
    assert surgery.lora_variables(params) == {"params": params}
    with pytest.raises(surgery.SurgeryError, match="LoraConfig"):
        surgery.lora_variables(surgery.attach_lora(params, {}))


# ----------------------------------------------------------------------------- fused attention

@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_fused_attention_logits_equal_the_written_out_path(dtype, tol):
    params = _params(_model())
    images = _images()
    want = _model(attention_impl="explicit").apply({"params": params}, images)
    got = _model(attention_impl="fused", dtype=dtype).apply({"params": params}, images)
    scale = float(np.max(np.abs(want)))
    chex.assert_trees_all_close(got, want, atol=tol * max(scale, 1.0), rtol=tol)


def test_fused_attention_still_returns_probabilities_when_asked():
    params = _params(_model())
    images = _images()
    logits, state = _model(attention_impl="fused").apply({"params": params}, images, mutable=["attention"])
    probs = vit.collect_intermediates(state)["attention"]
    assert len(probs) == TINY["num_layers"]
    chex.assert_trees_all_close(jnp.sum(probs[0], -1), jnp.ones(probs[0].shape[:-1]), atol=1e-5)
    chex.assert_trees_all_close(logits, _model(attention_impl="explicit").apply({"params": params}, images),
                                atol=1e-6)


def test_auto_attention_is_the_written_out_path_on_cpu():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only property")
    params = _params(_model())
    images = _images()
    chex.assert_trees_all_equal(_model().apply({"params": params}, images),
                                _model(attention_impl="explicit").apply({"params": params}, images))


def test_unknown_attention_impl_is_rejected():
    with pytest.raises(ValueError, match="attention_impl"):
        _model(attention_impl="flash").init(jax.random.PRNGKey(0), _images())


# ----------------------------------------------------------------------------- remat

def test_remat_blocks_gives_the_same_loss_and_gradients():
    params = _params(_model(dropout_rate=0.1))
    images = _images()
    lora, config = _lora(params, surgery.lora_targets(params, "qv"))

    def loss(model):
        def fn(p, l):
            variables = surgery.lora_variables(surgery.attach_lora(p, l), config)
            logits = model.apply(variables, images, train=True, rngs={"dropout": jax.random.PRNGKey(7)})
            return _xent(logits)
        return jax.value_and_grad(fn, argnums=(0, 1))(params, lora)

    (l0, g0), (l1, g1) = loss(_model(dropout_rate=0.1)), loss(_model(dropout_rate=0.1, remat_blocks=True))
    chex.assert_trees_all_close(l0, l1, atol=1e-6)
    _assert_grads_close(g1, g0, tol=1e-5)  # float32: remat recomputes in another fusion order (1.1e-6 seen on an AMD EPYC)
    # Same parameter names as the plain model.
    assert jax.tree.structure(_model(remat_blocks=True).init(jax.random.PRNGKey(1), images)["params"]) == \
        jax.tree.structure(params)
