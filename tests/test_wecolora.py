"""WeCoLoRA's students, loss placement, step and export, against the float64 NumPy ViT and hand counts."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from remem_jax import checkpoints, devices, optim, surgery, tree
from remem_jax.models import vit
from remem_jax.train import state as state_lib, step as step_lib, wecolora
from tests import augreg_format as fmt

SIZE = 16       # Ti/8 at 16 px: 4 patches + class token
NUM_CLASSES = 5


def _teacher(num_layers=4, seed=0):
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 8, SIZE, NUM_CLASSES, num_layers=num_layers), seed=seed)
    model = vit.create_vit("Ti_8", NUM_CLASSES, num_layers=num_layers)
    return flat, model, tree.unflatten_params(flat)


def _images(n=8, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _rel(got, want):
    want = np.asarray(want, np.float64)
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_copied_student_is_the_teacher_without_the_other_blocks(d):
    flat, model, params = _teacher(num_layers=6)
    setup = wecolora.build_student("weco_kd", model, params, d=d, lora_rank=2, image_size=SIZE,
                                   rng=jax.random.PRNGKey(0))
    assert setup.model.num_layers == len(range(0, 6, d)) == surgery.student_depth(6, d)
    others = [i for i in range(6) if i % d]
    images = _images(2)
    got = setup.model.apply({"params": setup.combine(setup.trainable, setup.frozen)}, images)
    want = fmt.reference_forward(flat, images, patch=8, prune_attn=others, prune_mlp=others)
    assert _rel(got, want) < 1e-5


def test_weight_copy_factor_out_of_range_is_a_clear_error():
    _, model, params = _teacher(num_layers=4)
    for d in (0, 5):
        with pytest.raises(surgery.SurgeryError, match=r"integer in \[1, 4\]"):
            wecolora.build_student("wecolora", model, params, d=d, lora_rank=2, image_size=SIZE,
                                   rng=jax.random.PRNGKey(0))
    with pytest.raises(Exception, match="unknown variant 'lora'"):
        wecolora.build_student("lora", model, params, d=2, lora_rank=2, image_size=SIZE, rng=jax.random.PRNGKey(0))


def test_trainable_parameter_counts_on_vit_b():
    layout = fmt.documented_layout("B", 16, 32, 10, num_layers=4)
    shapes = tree.unflatten_params({k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in layout.items()})
    model = vit.create_vit("B_16", 10, num_layers=4)
    r = 4
    every = wecolora.build_student("wecolora", model, shapes, d=2, lora_rank=r, image_size=32,
                                   rng=jax.random.PRNGKey(0))
    # q, k, v, out: 4 * (768 r + r 768); Dense_0: 768 r + r 3072; Dense_1: 3072 r + r 768.
    assert tree.param_count(every.trainable) == 2 * 13_824 * r
    assert set(every.trainable) == {"lora"}
    qv = wecolora.build_student("lora_qv", model, shapes, d=2, lora_rank=r, image_size=32, rng=jax.random.PRNGKey(0))
    assert tree.param_count(qv.trainable) == 2 * 4 * 768 * r
    full = wecolora.build_student("weco_kd", model, shapes, d=2, lora_rank=r, image_size=32, rng=jax.random.PRNGKey(0))
    assert "head" not in full.trainable and "head" in full.frozen  # the token loss never reaches it
    assert tree.param_count(full.trainable) + tree.param_count(full.frozen) == tree.param_count(
        surgery.copy_every_dth_block(shapes, 2))


def test_lora_init_is_uniform_with_b_zero_so_the_student_starts_as_the_copy():
    _, model, params = _teacher(num_layers=4)
    setup = wecolora.build_student("wecolora", model, params, d=2, lora_rank=4, image_size=SIZE,
                                   rng=jax.random.PRNGKey(3))
    flat = tree.flatten_params(setup.trainable)
    for key, value in flat.items():
        if key.endswith("/b"):
            assert not np.any(np.asarray(value))
        else:
            d_in = value.shape[0]
            assert np.max(np.abs(value)) <= 1 / np.sqrt(d_in)
            assert np.std(value) > 0.8 / np.sqrt(3 * d_in)  # U(-b, b) has std b / sqrt(3)
    copy = surgery.copy_every_dth_block(params, 2)
    images = _images(2)
    got = vit.encoder_tokens(setup.model, setup.combine(setup.trainable, setup.frozen), images, after_norm=False)
    want = vit.encoder_tokens(setup.model, copy, images, after_norm=False)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("variant,after_norm", [("wecolora", False), ("lora_qv", False), ("weco_kd", True),
                                                ("scratch_kd", True)])
def test_l1_target_placement(variant, after_norm):
    """The loss equals the float64 L1 at the documented place, and not at the other one."""
    flat, model, params = _teacher(num_layers=4)
    setup = wecolora.build_student(variant, model, params, d=2, lora_rank=2, image_size=SIZE,
                                   rng=jax.random.PRNGKey(0))
    assert wecolora.VARIANTS[variant].after_norm is after_norm
    images = _images(2)
    loss, _ = wecolora.feature_distillation_loss(model, setup, wecolora.VARIANTS[variant].after_norm)(
        setup.trainable, {"teacher": params, "student": setup.frozen}, {}, {"image": images}, jax.random.PRNGKey(0))
    student_flat = tree.flatten_params(jax.tree.map(np.asarray, setup.combine(setup.trainable, setup.frozen)))

    def tokens(f):
        _, blocks = fmt.reference_forward(f, images, patch=8, return_tokens=True)
        last = blocks[-1]
        return last, fmt.layer_norm(last, f["Transformer/encoder_norm/scale"], f["Transformer/encoder_norm/bias"])

    (t_pre, t_post), (s_pre, s_post) = tokens(flat), tokens(student_flat)
    pre, post = np.mean(np.abs(s_pre - t_pre)), np.mean(np.abs(s_post - t_post))
    want, other = (post, pre) if after_norm else (pre, post)
    assert abs(float(loss) - want) < 1e-5 * want
    assert abs(float(loss) - other) > 1e-2 * want


def _one_step(variant, params, model, lr=1e-2):
    setup = wecolora.build_student(variant, model, params, d=2, lora_rank=2, image_size=SIZE,
                                   rng=jax.random.PRNGKey(0))
    tx = optim.make_optimizer(learning_rate=lr, weight_decay=0.05, grad_clip_norm=None, optimizer="adam",
                              adam_betas=(0.9, 0.95), weight_decay_mask=optim.matrix_mask)
    frozen = {"teacher": params, "student": setup.frozen}
    state = state_lib.create_train_state(setup.trainable, tx, rng=jax.random.PRNGKey(1), frozen=frozen)
    step = step_lib.pmap_train_step(step_lib.make_train_step(
        wecolora.feature_distillation_loss(model, setup, wecolora.VARIANTS[variant].after_norm), tx), donate=False)
    n = jax.local_device_count()
    batch = {"image": _images(n).reshape(n, 1, SIZE, SIZE, 3)}
    new, metrics = step(devices.replicate(state), batch)
    return setup, state, devices.unreplicate(new), metrics


def test_a_step_changes_only_the_lora_leaves_and_the_merged_export_equals_the_unmerged_model(tmp_path):
    _, model, params = _teacher(num_layers=4)
    setup, before, after, metrics = _one_step("wecolora", jax.tree.map(jnp.asarray, params), model)
    assert bool(metrics["is_finite"][0])
    chex.assert_trees_all_equal(after.frozen, before.frozen)  # teacher and the copied base: bit-identical
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), after.params, before.params)
    assert all(jax.tree.leaves(changed)), "every LoRA factor moves in the first AdamW step"
    unmerged = setup.combine(after.params, after.frozen["student"])
    path = str(tmp_path / "student.npz")
    checkpoints.save_augreg(path, unmerged)
    loaded_model, loaded = checkpoints.load_augreg(path, image_size=SIZE)
    assert loaded_model.num_layers == 2 and "lora" not in loaded
    images = _images(3)
    want = vit.encoder_tokens(setup.model, unmerged, images, after_norm=True)
    got = vit.encoder_tokens(loaded_model, loaded, images, after_norm=True)
    chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
    # ... and the merge really changed the kernels (B != 0 after the step).
    copy = surgery.copy_every_dth_block(params, 2)
    q = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    assert np.any(tree.flatten_params(loaded)[q] != tree.flatten_params(copy)[q])


def test_weco_kd_trains_the_norm_but_not_the_head():
    _, model, params = _teacher(num_layers=4)
    _, before, after, _ = _one_step("weco_kd", jax.tree.map(jnp.asarray, params), model)
    norm = after.params["Transformer"]["encoder_norm"]["scale"]
    assert np.any(np.asarray(norm) != np.asarray(before.params["Transformer"]["encoder_norm"]["scale"]))
    chex.assert_trees_all_equal(after.frozen["student"]["head"], before.frozen["student"]["head"])


def test_matrix_mask_decays_kernels_and_lora_but_not_biases_or_norms():
    _, _, params = _teacher(num_layers=1)
    mask = tree.flatten_params(optim.matrix_mask(params))
    attn = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"
    assert mask[attn + "query/kernel"] and mask[attn + "out/kernel"] and mask["embedding/kernel"]
    assert mask["cls"] and mask["Transformer/posembed_input/pos_embedding"]
    assert not mask[attn + "query/bias"]  # 2-D in Flax, 1-D (part of qkv.bias) in timm
    assert not mask["Transformer/encoder_norm/scale"] and not mask["head/bias"]
    lora = optim.matrix_mask({"lora": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 4))}})
    assert lora == {"lora": {"a": True, "b": True}}


def test_adam_betas_reach_the_optimizer():
    params = {"w": jnp.ones((3, 3))}
    grads = {"w": jnp.full((3, 3), 0.5)}
    tx = optim.make_optimizer(learning_rate=1.0, weight_decay=0.0, grad_clip_norm=None, optimizer="adam",
                              adam_betas=(0.9, 0.95))
    ref = optax.scale_by_adam(b1=0.9, b2=0.95)
    state, ref_state = tx.init(params), ref.init(params)
    for _ in range(3):
        upd, state = tx.update(grads, state, params)
        ref_upd, ref_state = ref.update(grads, ref_state, params)
    chex.assert_trees_all_close(upd, jax.tree.map(lambda u: -u, ref_upd), rtol=1e-6)
    with pytest.raises(ValueError, match="adam_betas"):
        optim.make_optimizer(learning_rate=1.0, optimizer="adam", adam_betas=(0.9, 1.0))


def test_schedule_steps_drop_the_last_partial_batch_and_reject_an_empty_epoch():
    assert optim.epoch_schedule_steps(135, 32, 10, 2, section="wecolora") == (4, 40, 8)
    with pytest.raises(Exception, match=r"config.wecolora.batch_size=64 is larger than the 40"):
        optim.epoch_schedule_steps(40, 64, 10, 2, section="wecolora")
