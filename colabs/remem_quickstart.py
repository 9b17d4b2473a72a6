# ---
# jupyter:
#   accelerator: TPU
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # remem-jax quickstart
#
# Strong pretrained ViTs make poor teachers for small models; **ReMem** (SAM with a large radius
# plus down-weighting of the top MLP blocks) fine-tunes them into good ones. This notebook runs
# the whole path on one accelerator:
#
# 1. install and find the accelerator (Colab TPU = one v5e chip, GPU, or CPU);
# 2. load an AugReg checkpoint by name and look at its predictions;
# 3. fine-tune it on a TFDS dataset twice, **ReMem** and **vanilla**;
# 4. distil a **ResNet-18** from each fine-tuned teacher (plus a student trained from labels only);
# 5. compare teachers and students in a table and a plot;
# 6. export the best student (StableHLO, TF SavedModel, TFLite; each verified against the Flax
#    model) and classify images with it.
#
# Everything is set in **one settings cell**. With `REMEM_SMOKE=1` in the environment the
# notebook switches to tiny offline settings (scikit-learn digits, a small ViT teacher trained
# first, a few steps) so that CI can run it top to bottom on a CPU in about a minute.

# %% Install (skipped when remem_jax is already importable, e.g. in a checkout or in CI)
import importlib.util
import os
import subprocess
import sys

# A built wheel of remem-jax (`pip wheel --no-deps .` in a checkout), uploaded next to this notebook
# (Colab: the Files pane) or given by URL; any pip requirement works (a path, gs:// copied first, git+https://...).
REMEM_JAX = os.environ.get("REMEM_JAX", "remem_jax-0.1.0-py3-none-any.whl")

if importlib.util.find_spec("remem_jax") is None:
    # Colab TPU runtimes come without TensorFlow; remem_jax's input pipeline and its
    # SavedModel/TFLite exports need it, so tensorflow-cpu is installed explicitly.
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", REMEM_JAX, "tensorflow-cpu"])
# The run configs ship inside the package: `remem_jax.configs` (configs/ in the repository).

import remem_jax

print("remem_jax from", os.path.dirname(remem_jax.__file__))

# %% The accelerator
import jax

devices = jax.devices()
PLATFORM = devices[0].platform  # 'tpu', 'gpu' or 'cpu'
print(f"{len(devices)} {PLATFORM.upper()} device(s): {devices}")
if PLATFORM == "tpu":
    print("Colab's TPU runtime is a single v5e chip (16 GiB HBM): batch sizes below are sized for it.")
elif PLATFORM == "cpu":
    print("No accelerator: fine for the smoke settings; the full settings want a TPU or GPU.")

# %% Settings: the only cell to edit
import tempfile

SMOKE = os.environ.get("REMEM_SMOKE") == "1"  # CI: tiny, offline, CPU

if SMOKE:
    DATASET = "digits"          # scikit-learn's bundled digits: no download
    TEACHER = "pretrain"        # a tiny ViT trained from scratch first (stage pretrain_teacher)
    IMAGE_SIZE = 16
    BATCH_SIZE = 16
    PRETRAIN_STEPS = 10
    FINETUNE_STEPS, KEEP_STEPS = 4, (2, 4)
    DISTILL_STEPS = 4
    SCRATCH_BASELINE = False    # one compiled distillation step instead of two
    # The SavedModel and TFLite conversions of a full-width ResNet-18 (and their checks) take
    # about a minute on two CPU cores; tests/test_export.py covers them.
    EXPORT_FORMATS = ("stablehlo",)
    WORKDIR = tempfile.mkdtemp(prefix="remem_smoke_")
else:
    DATASET = "cifar100"        # any name of remem_jax.data.registry; TFDS downloads it
    TEACHER = "B_16"            # an AugReg name (B_16, S_16, ...) or a local / gs:// npz
    IMAGE_SIZE = 224
    BATCH_SIZE = 128            # fits one v5e chip with a ViT-B/16 teacher
    PRETRAIN_STEPS = 0
    FINETUNE_STEPS, KEEP_STEPS = 1000, (500, 1000)
    DISTILL_STEPS = 5000
    SCRATCH_BASELINE = True
    EXPORT_FORMATS = ("stablehlo", "savedmodel", "tflite")
    WORKDIR = "/content/remem_quickstart" if os.path.isdir("/content") else os.path.expanduser("~/remem_quickstart")

STUDENT = "resnet18"
print(f"SMOKE={SMOKE}: {DATASET} at {IMAGE_SIZE}px, teacher {TEACHER}, student {STUDENT}, workdir {WORKDIR}")

# %% The run config (configs/common.py lists every field)
from remem_jax.configs import common

config = common.get_config()
config.dataset = DATASET
config.data.image_size = IMAGE_SIZE
config.teacher.checkpoint = TEACHER
config.finetune.update(dict(settings=("remem", "vanilla"), steps=FINETUNE_STEPS, keep_steps=KEEP_STEPS,
                            batch_size=BATCH_SIZE, eval_every=0, checkpoint_every=FINETUNE_STEPS,
                            log_every=max(1, FINETUNE_STEPS // 4)))
config.distill.update(dict(student=STUDENT, method="kd", steps=DISTILL_STEPS, batch_size=BATCH_SIZE,
                           teachers="last", scratch_baseline=SCRATCH_BASELINE, export_formats=EXPORT_FORMATS,
                           checkpoint_every=DISTILL_STEPS, log_every=max(1, DISTILL_STEPS // 4)))
if SMOKE:
    # Digits are not flip-invariant and an 8x8 glyph does not survive a small crop.
    config.data.update(dict(random_flip=False, crop_area_min=0.7, shuffle_buffer=512))
    config.pretrain.update(dict(variant="Ti_8", num_layers=1, steps=PRETRAIN_STEPS, batch_size=BATCH_SIZE,
                                lr=3e-3, checkpoint_every=PRETRAIN_STEPS, log_every=PRETRAIN_STEPS))
    config.finetune.lr = 0.01

# %% The dataset: TFDS downloads and prepares it once (digits are bundled with scikit-learn)
from remem_jax.data import registry

spec = registry.get_spec(DATASET)
if spec.kind == "tfds":
    import tensorflow_datasets as tfds

    tfds.builder(spec.tfds_name, data_dir=config.data.data_dir).download_and_prepare()
print(f"{DATASET}: {spec.note or spec.tfds_name}")

# %% [markdown]
# ## 1. An AugReg teacher and its predictions
#
# `load_augreg` takes an AugReg name (resolved to `gs://vit_models/augreg/...npz`) or a path, and
# returns the Flax ViT and its parameters, whose tree *is* the npz tree. Kept with its own head,
# the ImageNet-21k checkpoint predicts 21,843 ImageNet-21k classes (we show their indices). In
# the smoke settings the teacher is first trained from scratch on digits.

# %%
import matplotlib.pyplot as plt
import numpy as np

from remem_jax import checkpoints, main
from remem_jax.data import pipeline

if TEACHER == "pretrain":
    config.stages = ("pretrain_teacher",)
    main.run(config, WORKDIR)
    teacher_path = os.path.join(WORKDIR, "pretrain", "teacher.npz")
else:
    teacher_path = TEACHER
teacher, teacher_params = checkpoints.load_augreg(teacher_path, image_size=IMAGE_SIZE)
print(f"{teacher_path}: ViT with {teacher.num_layers} blocks, width {teacher.hidden_size}, "
      f"{teacher.num_classes} classes")

eval_data = pipeline.make_eval_data(config.data, DATASET, global_batch_size=8 * jax.device_count())
batch = next(eval_data.as_dataset().take(1).as_numpy_iterator())
images = batch["image"].reshape((-1, IMAGE_SIZE, IMAGE_SIZE, 3))[:8]
labels = batch["label"].reshape(-1)[:8]
probs = jax.nn.softmax(jax.jit(lambda x: teacher.apply({"params": teacher_params}, x, train=False))(images))
top5 = np.argsort(-np.asarray(probs), axis=-1)[:, :5]

fig, axes = plt.subplots(1, len(images), figsize=(2 * len(images), 2.4))
for ax, image, label, top in zip(axes, images, labels, top5):
    ax.imshow((image + 1) / 2)
    ax.set_title(f"label {label}\ntop-1 {top[0]}", fontsize=8)
    ax.axis("off")
plt.show()
print("top-5 class indices per image:", top5.tolist())

# %% [markdown]
# ## 2. ReMem vs vanilla fine-tuning
#
# `remem`: SAM with `rho = 0.5` and the MLP branches weighted by `alpha = 0.8`; `vanilla`: plain
# SGD (rho 0, alpha = beta = 1). Both keep teacher checkpoints at `KEEP_STEPS`.

# %%
config.stages = ("finetune_teacher",)
results = main.run(config, WORKDIR)
for setting in ("remem", "vanilla"):
    for kept in results["finetune_teacher"][setting]["kept"]:
        print(f"{setting:8s} step {kept['step']:5d}: top-1 {100 * kept['top1']:.2f}%")

# %% [markdown]
# ## 3. Distil a ResNet-18 from each teacher
#
# KD (`(1 - lambda) CE + lambda T^2 KL`); the teacher runs inside the step on the same batch. The
# best student is exported for serving, each format checked against the Flax model.

# %%
config.stages = ("distill_student",)
results = main.run(config, WORKDIR)

# %% The students' table (WORKDIR/distill/results.md; WORKDIR/results.md has every stage's)
from IPython.display import Markdown, display

display(Markdown(open(os.path.join(WORKDIR, "distill", "results.md")).read()))

# %% Teacher and student accuracies
rows = results["distill_student"]["rows"]
names = [r["name"] for r in rows]
student_acc = [100 * r["student_eval"]["top1"] for r in rows]
teacher_acc = [100 * (r["teacher"] or {}).get("top1", np.nan) for r in rows]
x = np.arange(len(rows))
fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.5))
ax.bar(x - 0.2, teacher_acc, 0.4, label="teacher (ViT)")
ax.bar(x + 0.2, student_acc, 0.4, label=f"student ({STUDENT})")
ax.set_xticks(x, names)
ax.set_ylabel("top-1 (%)")
ax.set_title(f"{DATASET}: teachers and their students")
ax.legend()
plt.show()

# %% [markdown]
# ## 4. The exported student
#
# `best_student/` holds `student.npz`, `model.json` (architecture, classes, image size, class
# names, input contract), `student.stablehlo.bin` (`jax.export`, cpu/cuda/tpu, symbolic batch),
# `saved_model/` (jax2tf; signatures `serving_default` for float32 images in [-1, 1] and
# `serving_uint8` for raw pixels), `student.tflite` (builtin ops) and `verification.json`: each
# format's max |logit difference| from the Flax model on real eval images. (The smoke settings
# export StableHLO only.)

# %%
import json

from PIL import Image

from remem_jax import predict

best_dir = results["distill_student"]["best_dir"]
verification = json.load(open(os.path.join(best_dir, "verification.json")))
for fmt, entry in verification["formats"].items():
    print(f"{fmt:10s} {entry['file']:22s} max |logit diff| {entry['max_abs_diff']:.1e} "
          f"(tolerance {verification['tolerance']:g}): {'ok' if entry['passed'] else 'FAILED'}")

# A few eval images as PNG files, classified with each exported format.
png_dir = os.path.join(WORKDIR, "pngs")
os.makedirs(png_dir, exist_ok=True)
paths = []
for i, image in enumerate(images[:4]):
    paths.append(os.path.join(png_dir, f"eval_{i}_label_{labels[i]}.png"))
    Image.fromarray(np.round((image + 1) * 127.5).clip(0, 255).astype(np.uint8)).save(paths[-1])
for fmt in EXPORT_FORMATS:
    predictions = predict.classify(best_dir, paths, fmt)
    print(f"{fmt:10s} top-1 of images labelled {[int(l) for l in labels[:4]]}: {[p.names[0] for p in predictions]}")
print(predict.format_predictions(predictions[:1]))
print(f"\nFrom a shell: python -m remem_jax.predict --model={best_dir} --images='{png_dir}/*.png'")
