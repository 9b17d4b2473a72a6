"""The distillation step: frozen teacher, and teacher and student fed the identical mixed batch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import digits
from remem_jax import devices, losses
from remem_jax.data import pipeline
from remem_jax.models import students, vit
from remem_jax.train import distill, state as state_lib, step as step_lib

SIZE = 16
# Non-default weights, so that the step is seen to pass each one to its loss.
OBJECTIVE_CONFIG = ml_collections.ConfigDict(dict(temperature=2.0, kd_weight=0.7, dist_beta=0.5, dist_gamma=2.0,
                                                  dist_tau=1.5))


@pytest.fixture(scope="module")
def teacher_and_batch():
    """A one-block ViT teacher with a random head (a zero head would give uniform predictions)
    and one mixed-up digits batch of 32 (4 images per device)."""
    teacher = vit.create_vit("Ti_8", 10, num_layers=1)
    teacher_params = jax.jit(teacher.init)(jax.random.PRNGKey(0), np.zeros((1, SIZE, SIZE, 3)))["params"]
    teacher_params["head"]["kernel"] = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (192, 10)))
    data_config = digits.get_config().data
    data_config.image_size = SIZE
    batch = next(pipeline.make_train_iterator(data_config, "digits", global_batch_size=32, seed=0, mixup_alpha=0.8))
    # Mixed rows are soft; a row whose partner has the same label stays one-hot.
    assert (batch["soft_label"].max(-1) < 1.0).mean() > 0.5, "mixup must have produced soft labels"
    return teacher, teacher_params, batch


def run_step(method, student, params, batch_stats, teacher, teacher_params, batch):
    """One pmapped distillation step, built as the distill stage builds it (plain SGD)."""
    tx = optax.sgd(0.1)
    step = step_lib.pmap_train_step(step_lib.make_train_step(
        distill.distillation_loss(student, teacher, distill.distillation_objective(method, OBJECTIVE_CONFIG)), tx))
    state = state_lib.create_train_state(params, tx, rng=jax.random.PRNGKey(3), frozen={"teacher": teacher_params},
                                         batch_stats=batch_stats)
    return step(devices.replicate(state), batch)


def reference_logits(student, params, batch_stats, teacher, teacher_params, batch):
    """Independent reference: both models on the same (mixed) images of each device's shard
    (student in train mode, BatchNorm over all devices); `[devices, per_device, classes]` each."""
    def per_device(images):
        t = teacher.apply({"params": teacher_params}, images)
        s, _ = student.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                             mutable=["batch_stats"])
        return s, t
    return jax.pmap(per_device, axis_name="batch")(batch["image"])


def mean_over_devices(loss, student_logits, teacher_logits, soft_labels):
    """`loss(student_logits, teacher_logits, soft_labels)` on each device's shard, then the mean
    over devices (the step's pmean)."""
    return float(jnp.mean(jax.jit(jax.vmap(loss))(student_logits, teacher_logits, soft_labels)))


def test_teacher_is_untouched_and_sees_the_students_mixed_batch(teacher_and_batch):
    teacher, teacher_params, batch = teacher_and_batch
    student = students.create_student("resnet18", 10, bn_axis_name="batch")
    params, batch_stats = students.init_student(student, jax.random.PRNGKey(2), SIZE)

    new_state, metrics = run_step("kd", student, params, batch_stats, teacher, teacher_params, batch)

    # The teacher's parameters are bit-identical on every device after the step.
    for replica in range(jax.local_device_count()):
        jax.tree.map(np.testing.assert_array_equal,
                     jax.tree.map(lambda x: x[replica], new_state.frozen["teacher"]), teacher_params)
    s, t = reference_logits(student, params, batch_stats, teacher, teacher_params, batch)
    want = mean_over_devices(lambda s, t, y: losses.kd_loss(s, t, y, temperature=2.0, kd_weight=0.7),
                             s, t, batch["soft_label"])
    np.testing.assert_allclose(np.asarray(metrics["loss"]), want, rtol=1e-5)
    # The student did learn something from the step.
    assert not np.allclose(new_state.params["fc"]["kernel"][0], params["fc"]["kernel"])


class TinyStudent(nn.Module):
    """Conv, cross-device BatchNorm, pooled linear head: the student contract of `students`
    (`apply(v, x, train=True, mutable=['batch_stats'], rngs=...)` -> float32 logits), but it
    compiles in seconds where a ResNet-18 step takes a minute on two CPU cores."""
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(8, (3, 3), strides=2)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, axis_name="batch")(x)
        return nn.Dense(self.num_classes)(jnp.mean(nn.relu(x), axis=(1, 2)))


@pytest.mark.parametrize("method,loss", [
    # Pure KL(teacher || student): swapped arguments give another value and, the second argument
    # being detached, no gradient for the student at all.
    ("patient", lambda s, t, y: losses.patient_kd_loss(s, t, temperature=2.0)),
    # CE on the soft labels + DIST (Pearson inter- and, per device, intra-class relations).
    ("dist", lambda s, t, y: losses.dist_objective(s, t, y, beta=0.5, gamma=2.0, tau=1.5)),
], ids=["patient", "dist"])
def test_step_loss_is_the_objective_of_student_and_teacher_logits(teacher_and_batch, method, loss):
    teacher, teacher_params, batch = teacher_and_batch
    student = TinyStudent()
    variables = jax.jit(student.init)(jax.random.PRNGKey(2), np.zeros((1, SIZE, SIZE, 3), np.float32))
    params, batch_stats = variables["params"], variables["batch_stats"]

    new_state, metrics = run_step(method, student, params, batch_stats, teacher, teacher_params, batch)

    s, t = reference_logits(student, params, batch_stats, teacher, teacher_params, batch)
    want = mean_over_devices(loss, s, t, batch["soft_label"])
    np.testing.assert_allclose(np.asarray(metrics["loss"]), want, rtol=1e-5)
    swapped = mean_over_devices(lambda s, t, y: loss(t, s, y), s, t, batch["soft_label"])
    assert abs(swapped - want) > 1e-3, "the test must tell the argument order apart"
    # The student gets a gradient, and the step applies it.
    assert float(metrics["grad_norm"][0]) > 1e-4
    assert not np.allclose(new_state.params["Dense_0"]["kernel"][0], params["Dense_0"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[0], new_state.frozen["teacher"]),
                 teacher_params)
