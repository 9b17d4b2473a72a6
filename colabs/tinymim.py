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
# # TinyMIM: distilling a small ViT from a big ViT's token relations
#
# TinyMIM (Ren et al., CVPR 2023) pre-trains a small ViT by matching, in its **last block**, the
# **Q-K and V-V token relations** (per-head softmax attention-like maps, class token included) of
# an intermediate block of a large teacher, then fine-tunes it. This notebook:
#
# 1. loads (or, in the smoke settings, first trains) a ViT teacher;
# 2. distils a student with the `relation_distill` stage (optionally also `cls` / `feature`
#    distillation and the teacher's last block, for comparison);
# 3. looks at the teacher's and the student's relation maps;
# 4. fine-tunes every distilled student and a scratch student with identical settings
#    (`finetune_student`) and compares them.
#
# With `REMEM_SMOKE=1` it switches to tiny offline settings (scikit-learn digits, a tiny ViT teacher
# trained first, a few steps) so that CI runs it on a CPU in about a minute.

# %% Install (skipped when remem_jax is already importable, e.g. in a checkout or in CI)
import importlib.util
import os
import subprocess
import sys

# A built wheel of remem-jax (`pip wheel --no-deps .` in a checkout), uploaded next to this notebook
# (Colab: the Files pane) or given by URL; any pip requirement works (a path, gs:// copied first, git+https://...).
REMEM_JAX = os.environ.get("REMEM_JAX", "remem_jax-0.1.0-py3-none-any.whl")

if importlib.util.find_spec("remem_jax") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", REMEM_JAX, "tensorflow-cpu"])
# The run configs ship inside the package: `remem_jax.configs` (configs/ in the repository).

import jax

print(f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)")

# %% Settings: the only cell to edit
import tempfile

SMOKE = os.environ.get("REMEM_SMOKE") == "1"  # CI: tiny, offline, CPU

if SMOKE:
    DATASET, TEACHER, IMAGE_SIZE, BATCH_SIZE = "digits", "pretrain", 16, 16
    STUDENT, STUDENT_LAYERS = "Ti_8", 1
    COMPARE = ()                 # the full settings add 'relation@last', 'cls', 'feature'
    DISTILL_STEPS, FINETUNE_STEPS = 6, 2
    WORKDIR = tempfile.mkdtemp(prefix="tinymim_smoke_")
else:
    DATASET, TEACHER, IMAGE_SIZE, BATCH_SIZE = "cifar100", "B_16", 224, 128
    STUDENT, STUDENT_LAYERS = "S_16", None
    COMPARE = ("relation@last", "cls", "feature")
    DISTILL_STEPS, FINETUNE_STEPS = 5000, 2000
    WORKDIR = "/content/tinymim" if os.path.isdir("/content") else os.path.expanduser("~/tinymim")
print(f"SMOKE={SMOKE}: {DATASET} at {IMAGE_SIZE}px, teacher {TEACHER}, student {STUDENT}, workdir {WORKDIR}")

# %% The run config (configs/common.py lists every field; configs/tinymim_digits.py is the offline twin)
from remem_jax.configs import common

config = common.get_config()
config.dataset = DATASET
config.data.image_size = IMAGE_SIZE
config.teacher.checkpoint = TEACHER
config.tinymim.update(dict(student=STUDENT, num_layers=STUDENT_LAYERS, compare=COMPARE, steps=DISTILL_STEPS,
                           batch_size=BATCH_SIZE, lr=1e-3, eval_batches=1, checkpoint_every=DISTILL_STEPS,
                           log_every=max(1, DISTILL_STEPS // 4)))
config.student_finetune.update(dict(steps=FINETUNE_STEPS, batch_size=BATCH_SIZE, lr=1e-3, warmup_steps=0,
                                    checkpoint_every=FINETUNE_STEPS, log_every=max(1, FINETUNE_STEPS // 2)))
if SMOKE:
    config.data.update(dict(random_flip=False, crop_area_min=0.7, shuffle_buffer=512))
    config.pretrain.update(dict(variant="Ti_8", num_layers=2, steps=10, batch_size=BATCH_SIZE, lr=3e-3,
                                warmup_steps=1, checkpoint_every=10, log_every=10))
    config.tinymim.warmup_steps = 0
else:
    config.data.crop_area_min = 0.2

# %% The dataset: TFDS downloads and prepares it once (digits are bundled with scikit-learn)
from remem_jax.data import registry

spec = registry.get_spec(DATASET)
if spec.kind == "tfds":
    import tensorflow_datasets as tfds

    tfds.builder(spec.tfds_name, data_dir=config.data.data_dir).download_and_prepare()

# %% [markdown]
# ## 1. The teacher
# In the smoke settings a tiny ViT is trained from scratch first (`pretrain_teacher`).

# %%
from remem_jax import main

if TEACHER == "pretrain":
    config.stages = ("pretrain_teacher",)
    main.run(config, WORKDIR)

# %% [markdown]
# ## 2. Relation distillation
# The teacher stops after the q/k/v of its relation block (floor(0.75 L_t) when it is deeper than
# the student, else its last); the student after its last block's q/k/v. Loss: KL(teacher || student)
# of the Q-K and V-V relations. Teacher and student share crop and flip; only the student gets
# colour jitter.

# %%
config.stages = ("relation_distill",)
results = main.run(config, WORKDIR)
for run in results["relation_distill"]["runs"]:
    print(f"{run['name']:18s} distillation loss {run['initial']['distill_loss']:.4f} -> "
          f"{run['final']['distill_loss']:.4f}")

# %% Relation maps of the teacher block and of the distilled student (first eval image, head 0)
import matplotlib.pyplot as plt
import numpy as np

from remem_jax import checkpoints, relation_losses
from remem_jax.data import pipeline
from remem_jax.models import vit

teacher_path = os.path.join(WORKDIR, "pretrain", "teacher.npz") if TEACHER == "pretrain" else TEACHER
teacher, teacher_params = checkpoints.load_augreg(teacher_path, image_size=IMAGE_SIZE)
first = results["relation_distill"]["runs"][0]
student, student_params = checkpoints.load_augreg(first["student_checkpoint"], image_size=IMAGE_SIZE)
eval_data = pipeline.make_eval_data(config.data, DATASET, global_batch_size=8 * jax.device_count())
images = next(eval_data.as_dataset().take(1).as_numpy_iterator())["image"].reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 3)[:1]


def relations(model, params, block):
    _, state = model.clone(qkv_only_block=block).apply({"params": params}, images, mutable=["qkv"])
    got = vit.collect_intermediates(state)
    q, k, v = (got[n][-1] for n in ("query", "key", "value"))
    return [np.asarray(jax.nn.softmax(relation_losses.relation_logits(a, b), -1))[0, 0] for a, b in ((q, k), (v, v))]


maps = {"teacher": relations(teacher, teacher_params, first["teacher_block"] - 1),
        "student": relations(student, student_params, student.num_layers - 1)}
fig, axes = plt.subplots(2, 2, figsize=(6, 6))
for row, (who, (qk, vv)) in enumerate(maps.items()):
    for col, (name, m) in enumerate((("Q-K", qk), ("V-V", vv))):
        axes[row, col].imshow(m, vmin=0, vmax=1)
        axes[row, col].set_title(f"{who} {name} (token 0 = CLS)", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Fine-tune every distilled student and a scratch student, identical settings

# %%
config.stages = ("finetune_student",)
results = main.run(config, WORKDIR)

# %% The stage's table (WORKDIR/tinymim_finetune/results.md; WORKDIR/results.md has every stage's)
from IPython.display import Markdown, display

display(Markdown(open(os.path.join(WORKDIR, "tinymim_finetune", "results.md")).read()))
