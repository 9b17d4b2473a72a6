"""TinyMIM: relation / CLS / feature losses against NumPy float64, the ViT options a student needs
(drop-path, per-block heads, sin-cos position embeddings), the distillation step, the export."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remem_jax import checkpoints, devices, relation_losses, surgery, tree
from remem_jax.data import color_jitter
from remem_jax.models import vit
from remem_jax.train import state as state_lib, step as step_lib, tinymim

TOL = 1e-5  # float32 losses against float64 references (relative)


# ----------------------------------------------------------------------------- NumPy references

def _softmax64(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _relation64(a, b):
    """[B, N, H, d] x2 -> softmax(a_h b_h^T / sqrt(d)) [B, H, N, N], written from the formula."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    B, N, H, d = a.shape
    out = np.zeros((B, H, N, N))
    for i in range(B):
        for h in range(H):
            out[i, h] = _softmax64(a[i, :, h, :] @ b[i, :, h, :].T / np.sqrt(d))
    return out


def _kl64(p, q):
    """KL(p || q) per row, summed over keys, averaged over batch, heads and queries."""
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)))


def _relation_loss64(student, teacher, tokens=slice(None)):
    def rel(m, x, y):
        return _relation64(m[x][:, tokens], m[y][:, tokens])
    return (_kl64(rel(teacher, "q", "k"), rel(student, "q", "k"))
            + _kl64(rel(teacher, "v", "v"), rel(student, "v", "v")))


def _qkv(rng, batch, tokens, heads, dim, scale=1.0):
    return {n: (scale * rng.standard_normal((batch, tokens, heads, dim))).astype(np.float32) for n in "qkv"}


def _mae_sincos(embed_dim, grid_size):
    """MAE's util/pos_embed.py get_2d_sincos_pos_embed(cls_token=True), transcribed as NumPy."""
    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


# ----------------------------------------------------------------------------- relation loss

def test_relation_loss_matches_numpy_with_different_head_dims_and_cls():
    rng = np.random.default_rng(0)
    student = _qkv(rng, 2, 5, 3, 4)           # d_s = 4
    teacher = _qkv(rng, 2, 5, 3, 8, scale=1.5)  # d_t = 8: each model scales by its own d_h
    loss, parts = relation_losses.relation_loss(student, teacher)
    want = _relation_loss64(student, teacher)
    assert abs(float(loss) - want) / want < TOL
    assert abs(float(parts["relation_qk"] + parts["relation_vv"]) - want) / want < TOL
    # The class token's row and column count: dropping token 0 gives another value.
    without_cls = _relation_loss64(student, teacher, tokens=slice(1, None))
    assert abs(without_cls - want) / want > 100 * TOL
    # A shared sqrt(d_t) scale for both models would also give another value.
    rescaled = {n: v * np.sqrt(np.sqrt(4 / 8)) for n, v in student.items()}
    assert abs(_relation_loss64(rescaled, teacher) - want) / want > 100 * TOL


def test_relation_loss_is_zero_for_equal_models_and_has_finite_gradients():
    rng = np.random.default_rng(1)
    teacher = _qkv(rng, 2, 5, 2, 4, scale=3.0)
    loss, _ = relation_losses.relation_loss(teacher, teacher)
    assert abs(float(loss)) < 1e-6
    student = _qkv(rng, 2, 5, 2, 6)
    grads = jax.grad(lambda s: relation_losses.relation_loss(s, teacher)[0])(
        {n: jnp.asarray(v) for n, v in student.items()})
    for name, g in grads.items():
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert float(jnp.max(jnp.abs(g))) > 0, name
    # Teacher targets are constants.
    t_grads = jax.grad(lambda t: relation_losses.relation_loss(student, t)[0])(
        {n: jnp.asarray(v) for n, v in teacher.items()})
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in t_grads.values())


def test_cls_and_feature_losses_match_numpy():
    rng = np.random.default_rng(2)
    s, t = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    cos = np.sum(s * t, -1) / (np.linalg.norm(s, axis=-1) * np.linalg.norm(t, axis=-1))
    assert abs(float(relation_losses.cls_loss(s.astype(np.float32), t.astype(np.float32))) + cos.mean()) < 1e-6
    fs, ft = 3 * rng.standard_normal((2, 5, 6)), 4 * rng.standard_normal((2, 5, 6)) + 1
    white = (ft - ft.mean(-1, keepdims=True)) / np.sqrt(ft.var(-1, keepdims=True) + 1e-6)
    d = np.abs(fs - white)
    want = np.mean(np.where(d < 2.0, 0.5 * d ** 2 / 2.0, d - 1.0))
    assert (d >= 2.0).any() and (d < 2.0).any()  # both branches of Smooth-L1 exercised
    got = float(relation_losses.feature_loss(fs.astype(np.float32), ft.astype(np.float32), beta=2.0))
    assert abs(got - want) / want < TOL


# ----------------------------------------------------------------------------- models

def _teacher(**kw):
    fields = dict(num_classes=3, patch_size=8, hidden_size=32, num_layers=4, num_heads=4, mlp_dim=64)
    fields.update(kw)
    return vit.VisionTransformer(**fields)


def _student(**kw):
    fields = dict(num_classes=None, patch_size=8, hidden_size=24, num_layers=2, num_heads=2, mlp_dim=48,
                  last_block_heads=4, posemb="sincos2d", init_style="mae", drop_path_rate=(0.1, 0.0))
    fields.update(kw)
    return vit.VisionTransformer(**fields)


def _images(n=2, size=16, seed=3):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _init(model, images, seed):
    return jax.jit(model.init)(jax.random.PRNGKey(seed), images)["params"]


def _qkv_of(model, params, images, block=-1):
    @jax.jit
    def run(p, x):
        _, state = model.apply({"params": p}, x, mutable=["qkv"])
        got = vit.collect_intermediates(state)
        return {n: got[n][block] for n in ("query", "key", "value")}
    return run(params, images)


def test_student_last_block_has_the_teacher_heads_and_mismatch_is_a_clear_error():
    images = _images()
    teacher = _teacher()
    t_params = _init(teacher, images, 0)
    student = _student()
    s_params = _init(student, images, 1)
    t_qkv, s_qkv = _qkv_of(teacher, t_params, images, 2), _qkv_of(student, s_params, images)
    assert s_qkv["query"].shape == (2, 5, 4, 6) and t_qkv["query"].shape == (2, 5, 4, 8)
    assert _qkv_of(student, s_params, images, 0)["query"].shape == (2, 5, 2, 12)  # other blocks: own heads
    chex.assert_equal_shape([relation_losses.relation_logits(s_qkv["query"], s_qkv["key"]),
                             relation_losses.relation_logits(t_qkv["query"], t_qkv["key"])])
    wrong = _student(last_block_heads=None)
    w_params = _init(wrong, images, 1)
    with pytest.raises(ValueError, match="last_block_heads"):
        relation_losses.relation_loss(_qkv_of(wrong, w_params, images), t_qkv)


def test_qkv_only_block_runs_no_later_parameters():
    images = _images()
    full = _teacher()
    params = _init(full, images, 0)
    cut = full.clone(qkv_only_block=2)
    used = set(tree.flatten_params(vit.param_shapes(cut, 16)))
    assert "Transformer/encoderblock_2/MultiHeadDotProductAttention_1/query/kernel" in used
    assert not any(k.startswith(("Transformer/encoderblock_3", "Transformer/encoder_norm", "head"))
                   or "encoderblock_2/MlpBlock_3" in k or "encoderblock_2/LayerNorm_2" in k
                   or "encoderblock_2/MultiHeadDotProductAttention_1/out" in k for k in used)
    np.testing.assert_array_equal(_qkv_of(cut, params, images)["value"], _qkv_of(full, params, images, 2)["value"])


def test_drop_path_identity_at_zero_and_inference_and_bernoulli_expectation():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4000, 3, 2)), jnp.float32)
    rngs = {"dropout": jax.random.PRNGKey(5)}
    assert vit.DropPath(0.0).apply({}, x, deterministic=False, rngs=rngs) is x
    assert vit.DropPath(0.3).apply({}, x, deterministic=True) is x
    out = np.asarray(vit.DropPath(0.3).apply({}, jnp.ones_like(x), deterministic=False, rngs=rngs))
    per_example = out.reshape(4000, -1)
    assert np.all(per_example == per_example[:, :1])  # one mask per example
    values = np.unique(per_example)
    assert len(values) == 2 and values[0] == 0 and abs(values[1] - 1 / 0.7) < 1e-6
    kept = float(np.mean(per_example[:, 0] > 0))
    sigma = np.sqrt(0.7 * 0.3 / 4000)
    assert abs(kept - 0.7) < 4 * sigma and abs(out.mean() - 1.0) < 4 * sigma / 0.7


def test_drop_path_zero_keeps_the_vit_bit_identical_and_nonzero_is_per_block():
    images = _images()
    plain = _teacher(num_classes=None)  # pre-logits: a zero-initialised head would hide differences
    params = _init(plain, images, 0)
    rngs = {"dropout": jax.random.PRNGKey(1)}
    want = plain.apply({"params": params}, images, train=True, rngs=rngs)
    got = _teacher(num_classes=None, drop_path_rate=0.0).apply({"params": params}, images, train=True, rngs=rngs)
    np.testing.assert_array_equal(got, want)
    dropped = _teacher(num_classes=None, drop_path_rate=(0.5, 0.5, 0.5, 0.0))
    a = dropped.apply({"params": params}, images, train=True, rngs=rngs)
    np.testing.assert_array_equal(dropped.apply({"params": params}, images), plain.apply({"params": params}, images))
    assert not np.allclose(a, want)
    with pytest.raises(ValueError, match="drop_path_rate"):
        _teacher(drop_path_rate=(0.1, 0.1)).apply({"params": params}, images)


def test_sincos_posemb_matches_mae_reference_and_has_no_parameter():
    for width, grid in ((16, 4), (24, 2), (192, 14)):
        got = vit.sincos_posemb_2d(width, grid)
        assert got.shape == (1, grid * grid + 1, width)
        np.testing.assert_allclose(got[0], _mae_sincos(width, grid), atol=1e-6, rtol=0)
    student = _student()
    shapes = tree.flatten_params(vit.param_shapes(student, 16))
    assert not any("posembed_input" in k for k in shapes)


def test_mae_init():
    params = tree.flatten_params(_student().init(jax.random.PRNGKey(0), _images())["params"])
    assert all(np.all(np.asarray(v) == 0) for k, v in params.items() if k.endswith("bias"))
    assert 0.01 < float(np.std(params["cls"])) < 0.03
    kernel = np.asarray(params["embedding/kernel"])  # (8, 8, 3, 24): xavier over (192, 24)
    bound = np.sqrt(6 / (8 * 8 * 3 + 24))
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
    q = np.asarray(params["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"])
    assert np.abs(q).max() <= np.sqrt(6 / (24 + 3 * 24))  # MAE's fused qkv Linear(D, 3D)


def test_color_jitter_range_and_identity():
    images = jnp.asarray(_images(4))
    assert color_jitter.color_jitter(jax.random.PRNGKey(0), images, 0.0) is images
    out = color_jitter.color_jitter(jax.random.PRNGKey(0), images, 0.4)
    assert out.shape == images.shape and float(out.min()) >= -1 and float(out.max()) <= 1
    assert not np.allclose(out, images)


# ----------------------------------------------------------------------------- the step

def _objective(target="relation", teacher_block=3):
    teacher, student = _teacher(), _student()
    spec = tinymim.RunSpec(target, teacher_block if target == "relation" else None)
    if target == "relation":
        teacher_run = teacher.clone(qkv_only_block=teacher_block - 1)
        student_run = student.clone(qkv_only_block=student.num_layers - 1)
    else:
        teacher_run, student_run = teacher, student
    return tinymim.Objective(spec, student_run, teacher_run, teacher.hidden_size, 0.4), teacher, student


def test_relation_gradient_reaches_only_what_the_loss_reads():
    objective, teacher, student = _objective()
    images = _images()
    t_params = _init(teacher, images, 0)
    s_params = _init(student, images, 1)
    loss_fn = objective.loss_fn(train=True)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, {"teacher": t_params, "student": {}}, {}, {"image": images},
                                       jax.random.PRNGKey(2))[0]))({"student": s_params, "projection": {}})
    flat = tree.flatten_params(grads["student"])
    unused = [k for k in flat if k.startswith("Transformer/encoder_norm") or any(
        p in k for p in ("encoderblock_1/MlpBlock_3", "encoderblock_1/LayerNorm_2",
                         "encoderblock_1/MultiHeadDotProductAttention_1/out"))]
    assert len(unused) == 2 + 4 + 2 + 2
    assert all(float(np.abs(flat[k]).max()) == 0 for k in unused)
    assert float(np.abs(flat["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"]).max()) > 0
    assert float(np.abs(flat["embedding/kernel"]).max()) > 0
    # ... and split_used puts exactly those leaves in the frozen part.
    _, frozen = tinymim.split_used(s_params, objective.student, 16)
    assert sorted(tree.flatten_params(frozen)) == sorted(unused)


@pytest.mark.parametrize("target", ["relation", "cls"])
def test_remat_student_gives_the_same_loss_and_gradients(target):
    objective, teacher, student = _objective(target)
    images = _images()
    t_params, s_params = _init(teacher, images, 0), _init(student, images, 1)
    params = {"student": s_params, "projection": objective.init_projection(jax.random.PRNGKey(3), 24)}
    frozen = {"teacher": t_params, "student": {}}

    def value_and_grad(obj):
        loss_fn = obj.loss_fn(train=True)  # drop-path and jitter on: the remat pass must replay the same keys
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, frozen, {}, {"image": images},
                                                            jax.random.PRNGKey(2))[0]))(params)

    remat = dataclasses.replace(objective, student=objective.student.clone(remat_blocks=True))
    (loss, grads), (loss_remat, grads_remat) = value_and_grad(objective), value_and_grad(remat)
    assert float(loss) != 0.0
    np.testing.assert_allclose(float(loss_remat), float(loss), rtol=1e-6)
    chex.assert_trees_all_close(grads_remat, grads, atol=1e-6, rtol=1e-5)


def test_step_keeps_teacher_and_student_last_mlp_bit_identical(target="relation"):
    objective, teacher, student = _objective(target)
    images = _images(8)
    t_params = _init(teacher, images, 0)
    s_params = _init(student, images, 1)
    teacher_used, _ = tinymim.split_used(t_params, objective.teacher, 16)
    trained, frozen_student = tinymim.split_used(s_params, objective.student, 16)
    params = {"student": trained, "projection": objective.init_projection(jax.random.PRNGKey(3), 24)}
    tx = tinymim.make_distill_tx(_section())
    state = state_lib.create_train_state(params, tx, rng=jax.random.PRNGKey(4),
                                         frozen={"teacher": teacher_used, "student": frozen_student})
    before = jax.tree.map(np.array, state)
    step = step_lib.pmap_train_step(step_lib.make_train_step(objective.loss_fn(train=True), tx))
    new, metrics = step(devices.replicate(state), {"image": images.reshape(8, 1, 16, 16, 3)})
    new = devices.unreplicate(new)
    assert bool(np.asarray(metrics["is_finite"])[0])
    chex.assert_trees_all_equal(new.frozen["teacher"], before.frozen["teacher"])
    full_before = surgery.merge_partitions(before.params["student"], before.frozen["student"])
    full_after = surgery.merge_partitions(new.params["student"], new.frozen["student"])
    last_mlp = lambda p: p["Transformer"]["encoderblock_1"]["MlpBlock_3"]
    chex.assert_trees_all_equal(last_mlp(full_after), last_mlp(full_before))
    changed = not np.array_equal(full_after["embedding"]["kernel"], full_before["embedding"]["kernel"])
    assert changed  # the step did train the student


def _section():
    import ml_collections
    from configs import common
    t = common.get_config().tinymim
    t.steps, t.batch_size, t.warmup_steps, t.lr = 10, 8, 0, 1e-2
    assert isinstance(t, ml_collections.ConfigDict)
    return t


def test_teacher_block_rule_and_run_names():
    assert tinymim.default_teacher_block(24, 12) == 18 and tinymim.default_teacher_block(12, 12) == 12
    assert tinymim.default_teacher_block(4, 2) == 3
    parse = lambda s: tinymim.parse_run(s, teacher_layers=4, student_layers=2, field="tinymim.compare")
    assert parse("relation") == tinymim.RunSpec("relation", 3)
    assert parse("relation@last").name == "relation_block4" and parse("cls").name == "cls"
    from remem_jax import errors
    with pytest.raises(errors.UserError, match="outside 1..4"):
        parse("relation@5")
    with pytest.raises(errors.UserError, match="only applies to 'relation'"):
        parse("cls@2")


def test_exported_student_loads_with_load_augreg_and_computes_the_same(tmp_path):
    student = _student(drop_path_rate=0.0)
    images = _images()
    params = _init(student, images, 1)
    path = str(tmp_path / "student.npz")
    checkpoints.save_augreg(path, tinymim.export_tree(student, params, 16, num_classes=5))
    model, loaded = checkpoints.load_augreg(path, num_classes=5)
    assert model.last_block_heads == 4 and model.num_heads == 2 and model.posemb == "learned"
    want = student.apply({"params": params}, images)  # pre-logits (headless student)
    _, state = model.apply({"params": loaded}, images, mutable=["pre_logits"])
    got = vit.collect_intermediates(state)["pre_logits"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
