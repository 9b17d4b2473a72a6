"""Regression tests for bugs the rest of the suite let through, one test per bug.

Each test checks the library against a hand formula or a NumPy reference (never against itself):
LoRA merge scale, TinyMIM's teacher block / last-block heads / drop-path schedules / eval loss,
the weight-copy depth, WeCoLoRA's AdamW (mask and betas), the probe's data order and features,
and the LoRA factor-shape check.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from remem_jax import surgery, tree
from remem_jax.models import vit
from remem_jax.train import linear_probe, tinymim, wecolora
from tests import augreg_format as fmt

SIZE = 16  # Ti/8 at 16 px: 4 patches + class token
NUM_CLASSES = 5
ATTN = "MultiHeadDotProductAttention_1"


def _ti8(num_layers, seed=0):
    """A random AugReg-layout Ti/8 checkpoint: (flat float32 NumPy tree, nested tree)."""
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 8, SIZE, NUM_CLASSES, num_layers=num_layers),
                                 seed=seed)
    return flat, tree.unflatten_params(flat)


def _tinymim_section(**overrides):
    from configs import common
    t = common.get_config().tinymim
    for k, v in overrides.items():
        t[k] = v
    return t


def _images(n=2, seed=3):
    return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


# ----------------------------------------------------------------------------- 1. merge_lora scale

def test_merge_lora_applies_alpha_over_rank_scale():
    _, params = _ti8(1)
    targets = surgery.lora_targets(params, "qv")
    rank, alpha = 4, 8.0  # scale 2: a merge that forgets it differs from W + 2 A B
    lora, config = surgery.init_lora(jax.random.PRNGKey(0), params, targets, rank=rank, alpha=alpha)
    rng = np.random.default_rng(1)
    lora = tree.unflatten_params({k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) if k.endswith("/b")
                                  else np.asarray(v) for k, v in tree.flatten_params(lora).items()})
    merged = tree.flatten_params(surgery.merge_lora(params, lora, config))
    base, factors = tree.flatten_params(params), tree.flatten_params(lora)
    for t in targets:
        w = np.asarray(base[t], np.float64)
        a, b = np.asarray(factors[f"{t}/a"], np.float64), np.asarray(factors[f"{t}/b"], np.float64)
        want = w + (alpha / rank) * (a @ b).reshape(w.shape)
        assert np.abs(want - w).max() > 1e-3  # the delta is not negligible
        np.testing.assert_allclose(np.asarray(merged[t], np.float64), want, rtol=0, atol=1e-6, err_msg=t)


# ----------------------------------------------------------------------------- 2. TinyMIM teacher block

def _tiny_teacher():
    return vit.VisionTransformer(num_classes=3, patch_size=8, hidden_size=32, num_layers=4, num_heads=4,
                                 mlp_dim=64)


def _tiny_student():
    return vit.VisionTransformer(num_classes=None, patch_size=8, hidden_size=24, num_layers=2, num_heads=2,
                                 mlp_dim=48, last_block_heads=4, posemb="sincos2d", init_style="mae",
                                 drop_path_rate=(0.1, 0.0))


@pytest.mark.parametrize("teacher_block", [1, 3])
def test_build_objective_uses_the_1_indexed_teacher_block(teacher_block):
    teacher, student = _tiny_teacher(), _tiny_student()
    objective = tinymim.build_objective(_tinymim_section(), teacher, student,
                                        tinymim.RunSpec("relation", teacher_block))
    assert objective.teacher.qkv_only_block == teacher_block - 1
    assert objective.student.qkv_only_block == student.num_layers - 1
    # The targets are the q/k/v of the full teacher's block `teacher_block` (1-indexed).
    images = _images()
    params = jax.jit(teacher.init)(jax.random.PRNGKey(0), images)["params"]
    _, state = teacher.apply({"params": params}, images, mutable=["qkv"])
    full = vit.collect_intermediates(state)
    got = objective.teacher_targets(params, images)
    for name in ("query", "key", "value"):
        np.testing.assert_allclose(got[name], full[name][teacher_block - 1], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- 3. student's last-block heads

def test_student_model_last_block_takes_the_teacher_heads():
    t = _tinymim_section(student="Ti_8", num_layers=3)
    assert t.last_block_heads is None
    model = tinymim.student_model(t, 6)  # Ti has 3 heads of 64; the teacher 6 (of 32 at width 192)
    shapes = tree.flatten_params(vit.param_shapes(model, SIZE))
    for i, heads in ((0, 3), (1, 3), (2, 6)):
        for proj in ("query", "key", "value"):
            assert shapes[f"Transformer/encoderblock_{i}/{ATTN}/{proj}/kernel"].shape == (192, heads, 192 // heads)
    # An explicit last_block_heads wins over the teacher's.
    t2 = _tinymim_section(student="Ti_8", num_layers=3, last_block_heads=4)
    shapes2 = tree.flatten_params(vit.param_shapes(tinymim.student_model(t2, 6), SIZE))
    assert shapes2[f"Transformer/encoderblock_2/{ATTN}/query/kernel"].shape == (192, 4, 48)


# ----------------------------------------------------------------------------- 4. weight-copy depth

def test_weight_copy_keeps_ceil_l_over_d_blocks_when_d_does_not_divide_l():
    assert surgery.student_depth(5, 2) == 3  # ceil(5 / 2)
    assert surgery.student_depth(7, 3) == 3 and surgery.student_depth(6, 3) == 2 and surgery.student_depth(5, 5) == 1
    flat, params = _ti8(5)
    student = tree.flatten_params(surgery.copy_every_dth_block(params, 2))
    blocks = sorted({tree.block_index(k) for k in student if k.startswith("Transformer/encoderblock_")})
    assert blocks == [0, 1, 2]
    for new, old in enumerate([0, 2, 4]):
        for suffix in (f"{ATTN}/query/kernel", "MlpBlock_3/Dense_1/bias", "LayerNorm_2/scale"):
            np.testing.assert_array_equal(student[f"Transformer/encoderblock_{new}/{suffix}"],
                                          flat[f"Transformer/encoderblock_{old}/{suffix}"])


# ----------------------------------------------------------------------------- 5. WeCoLoRA AdamW

def _wecolora_section():
    return ml_collections.ConfigDict(dict(blr=0.01, batch_size=512, weight_decay=0.05, adam_betas=(0.9, 0.95)))


def _opt_params():
    rng = np.random.default_rng(0)
    p = {
        "cls": rng.standard_normal((1, 1, 4)),
        "Transformer": {"encoderblock_0": {
            ATTN: {"query": {"kernel": rng.standard_normal((4, 2, 2)), "bias": rng.standard_normal((2, 2))}},
            "LayerNorm_0": {"scale": 1 + rng.standard_normal((4,)), "bias": rng.standard_normal((4,))},
            "MlpBlock_3": {"Dense_0": {"kernel": rng.standard_normal((4, 3)), "bias": rng.standard_normal((3,))}},
        }},
    }
    return jax.tree.map(lambda x: np.asarray(x, np.float32), p)


# Decayed by hand: every leaf of rank >= 2 that is not a bias (timm's rule; the (heads, head_dim) q bias is not).
_DECAYED = {"cls": True,
            f"Transformer/encoderblock_0/{ATTN}/query/kernel": True,
            f"Transformer/encoderblock_0/{ATTN}/query/bias": False,
            "Transformer/encoderblock_0/LayerNorm_0/scale": False,
            "Transformer/encoderblock_0/LayerNorm_0/bias": False,
            "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": True,
            "Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias": False}


def test_wecolora_adamw_decays_only_matrices_and_uses_the_configured_betas():
    w = _wecolora_section()
    peak, total = w.blr * w.batch_size / 256, 10
    tx = wecolora.make_tx(w, total, 0)
    params = _opt_params()
    flat0 = {k: np.asarray(v, np.float64) for k, v in tree.flatten_params(params).items()}
    assert sorted(flat0) == sorted(_DECAYED)

    # A zero gradient: Adam's part is 0, so the update is -lr * wd * w on decayed leaves and 0 elsewhere.
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    for k, u in tree.flatten_params(updates).items():
        want = -peak * w.weight_decay * flat0[k] if _DECAYED[k] else np.zeros_like(flat0[k])
        np.testing.assert_allclose(np.asarray(u, np.float64), want, rtol=1e-5, atol=1e-9, err_msg=k)

    # Several steps with varying gradients against a float64 NumPy AdamW with betas (0.9, 0.95).
    b1, b2 = w.adam_betas
    rng = np.random.default_rng(1)
    grads_seq = [{k: rng.standard_normal(v.shape) * (1 + 3 * s) for k, v in flat0.items()} for s in range(4)]
    p, state = params, tx.init(params)
    ref = dict(flat0)
    m = {k: np.zeros_like(v) for k, v in flat0.items()}
    v2 = {k: np.zeros_like(v) for k, v in flat0.items()}
    for step, grads in enumerate(grads_seq):
        g_tree = tree.unflatten_params({k: g.astype(np.float32) for k, g in grads.items()})
        updates, state = tx.update(g_tree, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        lr = peak * 0.5 * (1 + np.cos(np.pi * step / total))  # no warmup: cosine from the first update
        want_u = {}
        for k, g in grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g ** 2
            mhat, vhat = m[k] / (1 - b1 ** (step + 1)), v2[k] / (1 - b2 ** (step + 1))
            u = mhat / (np.sqrt(vhat) + 1e-8) + (w.weight_decay * ref[k] if _DECAYED[k] else 0.0)
            want_u[k] = -lr * u
            ref[k] = ref[k] + want_u[k]
        for k, u in tree.flatten_params(updates).items():
            np.testing.assert_allclose(np.asarray(u, np.float64), want_u[k], rtol=2e-4, atol=1e-8,
                                       err_msg=f"step {step}: {k}")


# ----------------------------------------------------------------------------- 6. drop-path schedules

def test_tinymim_drop_path_schedules():
    t = _tinymim_section(student="Ti_8", num_layers=4, drop_path=0.1)
    model = tinymim.student_model(t, 3)
    assert tuple(model.drop_path_rate) == (0.1, 0.1, 0.1, 0.0)  # no drop-path in the distilled last block
    # Fine-tuning: timm's linspace(0, rate, L), block i gets rate * i / (L - 1).
    got = tinymim.finetune_drop_path(0.2, 5)
    np.testing.assert_allclose(got, [0.2 * i / 4 for i in range(5)], rtol=0, atol=1e-12)
    assert got[0] == 0.0 and got[-1] == pytest.approx(0.2)


# ----------------------------------------------------------------------------- 7. TinyMIM eval loss

def test_tinymim_eval_loss_does_not_depend_on_the_rng():
    teacher, student = _tiny_teacher(), _tiny_student()
    objective = tinymim.build_objective(_tinymim_section(color_jitter=0.4), teacher, student,
                                        tinymim.RunSpec("relation", 3))
    images = _images(4)
    t_params = jax.jit(teacher.init)(jax.random.PRNGKey(0), images)["params"]
    s_params = jax.jit(student.init)(jax.random.PRNGKey(1), images)["params"]
    trained, frozen = tinymim.split_used(s_params, objective.student, SIZE)
    args = ({"student": trained, "projection": {}}, {"teacher": t_params, "student": frozen}, {}, {"image": images})

    def loss(train, seed):
        fn = jax.jit(lambda key: objective.loss_fn(train=train)(*args, key)[0])
        return float(fn(jax.random.PRNGKey(seed)))

    assert loss(False, 0) == loss(False, 1) == loss(False, 7)
    assert loss(True, 0) != loss(True, 1)  # the train loss does see the jitter (the check has power)


# ----------------------------------------------------------------------------- 8. probe iterator

def test_probe_iterator_reshuffles_every_epoch_and_covers_each_example_once():
    ld = jax.local_device_count()
    batch = 2 * ld
    steps_per_epoch = 3
    n = steps_per_epoch * batch
    features = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    labels = np.arange(n, dtype=np.int32)
    it = linear_probe.cached_train_iterator(features, labels, global_batch_size=batch,
                                            steps_per_epoch=steps_per_epoch, seed=0, start_step=0)
    epochs = []
    for _ in range(3):
        batches = [next(it) for _ in range(steps_per_epoch)]
        for b in batches:
            assert b["feature"].shape == (ld, 2, 2) and b["label"].shape == (ld, 2)
            np.testing.assert_array_equal(b["feature"][..., 0], b["label"])
        epochs.append(np.concatenate([b["label"].reshape(-1) for b in batches]))
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(n))  # every example exactly once
    for e in (1, 2):
        assert not np.array_equal(epochs[e], epochs[e - 1]), f"epoch {e} repeats epoch {e - 1}'s order"


# ----------------------------------------------------------------------------- 9. probe features

def test_probe_features_are_the_cls_token_after_the_final_norm():
    flat, params = _ti8(1, seed=2)  # encoder_norm scale ~ 1 + 0.2 N(0, 1), bias ~ 0.05 N(0, 1)
    model = vit.create_vit("Ti_8", NUM_CLASSES, num_layers=1)
    ld = jax.local_device_count()
    rng = np.random.default_rng(4)
    data, want_images, want_labels = [], [], []
    for i in range(2):
        images = rng.uniform(-1, 1, (ld, 1, SIZE, SIZE, 3)).astype(np.float32)
        labels = rng.integers(0, NUM_CLASSES, (ld, 1)).astype(np.int32)
        mask = np.ones((ld, 1), np.float32)
        if i == 1:
            mask[-3:] = 0.0  # padding at the end of the last batch
        data.append({"image": images, "label": labels, "mask": mask})
        keep = mask.reshape(-1) > 0
        want_images.append(images.reshape(-1, SIZE, SIZE, 3)[keep])
        want_labels.append(labels.reshape(-1)[keep])
    features, labels = linear_probe.extract_features(model, params, data)
    want_labels = np.concatenate(want_labels)
    assert features.shape == (len(want_labels), 192) and features.dtype == np.float32
    np.testing.assert_array_equal(labels, want_labels)

    tokens = np.asarray(vit.encoder_tokens(model, params, jnp.asarray(np.concatenate(want_images)),
                                           after_norm=False), np.float64)
    cls = tokens[:, 0]
    mean = cls.mean(-1, keepdims=True)
    var = ((cls - mean) ** 2).mean(-1, keepdims=True)
    want = ((cls - mean) / np.sqrt(var + 1e-6) * flat["Transformer/encoder_norm/scale"]
            + flat["Transformer/encoder_norm/bias"])
    np.testing.assert_allclose(np.asarray(features, np.float64), want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- 10. LoRA factor shapes

def test_lora_rejects_a_wrong_b_factor_shape():
    _, params = _ti8(1)
    target = f"Transformer/encoderblock_0/{ATTN}/query/kernel"
    rank = 4
    lora, config = surgery.init_lora(jax.random.PRNGKey(0), params, [target], rank=rank)
    flat = tree.flatten_params(lora)
    assert flat[f"{target}/a"].shape == (192, rank) and flat[f"{target}/b"].shape == (rank, 192)
    bad = tree.unflatten_params({f"{target}/a": flat[f"{target}/a"],
                                 f"{target}/b": jnp.zeros((rank + 1, 192), jnp.float32)})
    expected = r"LoRA factors of .*query/kernel have shapes \(192, 4\) and \(5, 192\)"
    # Factored: no matmul runs, so the shape check is the only thing between a wrong B and the model.
    for policy in ("always", "never"):
        with pytest.raises(surgery.SurgeryError, match=expected):
            surgery.lora_variables(surgery.attach_lora(params, bad), config, policy=policy)
    with pytest.raises(surgery.SurgeryError, match=expected):
        surgery.apply_lora(params, bad, config)
