"""The distillation step: frozen teacher, and teacher and student fed the identical mixed batch."""
import jax
import ml_collections
import numpy as np
import optax

from configs import digits
from remem_jax import losses
from remem_jax.data import pipeline
from remem_jax.models import students, vit
from remem_jax.train import distill, state as state_lib, step as step_lib

SIZE = 16


def test_teacher_is_untouched_and_sees_the_students_mixed_batch():
    teacher = vit.create_vit("Ti_8", 10, num_layers=1)
    teacher_params = jax.jit(teacher.init)(jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3)))["params"]
    teacher_params["head"]["kernel"] = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (192, 10)))
    student = students.create_student("resnet18", 10, bn_axis_name="batch")
    params, batch_stats = students.init_student(student, jax.random.PRNGKey(2), SIZE)

    cfg = ml_collections.ConfigDict(dict(temperature=2.0, kd_weight=0.7))
    tx = optax.sgd(0.1)
    step = step_lib.pmap_train_step(step_lib.make_train_step(
        distill.distillation_loss(student, teacher, distill.distillation_objective("kd", cfg)), tx))
    state = state_lib.create_train_state(params, tx, rng=jax.random.PRNGKey(3), frozen={"teacher": teacher_params},
                                         batch_stats=batch_stats)
    data_config = digits.get_config().data
    data_config.image_size = SIZE
    batch = next(pipeline.make_train_iterator(data_config, "digits", global_batch_size=16, seed=0, mixup_alpha=0.8))
    assert (batch["soft_label"].max(-1) < 1.0).all(), "mixup must have produced soft labels"

    new_state, metrics = step(step_lib.replicate(state), batch)

    # The teacher's parameters are bit-identical on every device after the step.
    for replica in range(jax.local_device_count()):
        jax.tree.map(np.testing.assert_array_equal,
                     jax.tree.map(lambda x: x[replica], new_state.frozen["teacher"]), teacher_params)
    # Independent reference: both models on the same (mixed) images of each device's shard.
    def reference(images, soft_labels):
        t = teacher.apply({"params": teacher_params}, images)
        s, _ = student.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                             mutable=["batch_stats"])
        return jax.lax.pmean(losses.kd_loss(s, t, soft_labels, temperature=2.0, kd_weight=0.7), "batch")
    want = jax.pmap(reference, axis_name="batch")(batch["image"], batch["soft_label"])
    np.testing.assert_allclose(np.asarray(metrics["loss"]), np.asarray(want), rtol=1e-5)
    # The student did learn something from the step.
    assert not np.allclose(new_state.params["fc"]["kernel"][0], params["fc"]["kernel"])
