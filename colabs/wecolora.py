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
# # WeCoLoRA: a shallow ViT from a deep one, with a few unlabeled images
#
# **Weight Copy + LoRA** (WACV 2025): the student is every d-th block of the teacher (blocks 0, d,
# 2d, ...); LoRA is attached to every linear layer of the kept blocks and only LoRA trains, with an
# L1 loss between the teacher's and the student's last-block tokens, on a small unlabeled subset.
# LoRA is merged into the weights afterwards and the student is judged by linear probing.
#
# This notebook runs the two stages of `configs/wecolora_imagenet.py` (`fewshot_distill`, then
# `linear_probe`) with the method's baselines (standard LoRA on q and v, WeCo+KD with every weight
# trained, KD from a random student), shows the table, plots the probe accuracies and the
# distillation loss, and loads a merged student back as an ordinary ViT.
#
# Everything is set in **one settings cell**. With `REMEM_SMOKE=1` in the environment it switches to
# tiny offline settings (scikit-learn digits, a small ViT teacher trained first) so that CI runs it
# top to bottom on a CPU.

# %% Install (skipped when remem_jax is already importable, e.g. in a checkout or in CI)
import importlib.util
import os
import subprocess
import sys

# A built wheel of remem-jax (`pip wheel --no-deps .` in a checkout), uploaded next to this notebook
# (Colab: the Files pane) or given by URL; any pip requirement works (a path, gs:// copied first, git+https://...).
REMEM_JAX = os.environ.get("REMEM_JAX", "remem_jax-0.1.0-py3-none-any.whl")

if importlib.util.find_spec("remem_jax") is None:
    # Colab TPU runtimes come without TensorFlow, which the input pipeline needs.
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", REMEM_JAX, "tensorflow-cpu"])
# The run configs ship inside the package: `remem_jax.configs` (configs/ in the repository).

import jax

print(f"{jax.device_count()} {jax.devices()[0].platform.upper()} device(s)")

# %% Settings: the only cell to edit
import tempfile

SMOKE = os.environ.get("REMEM_SMOKE") == "1"  # CI: tiny, offline, CPU

if SMOKE:
    BASE_CONFIG = "wecolora_digits"   # trains its own small ViT teacher first
    OVERRIDES = dict(image_size=16, pretrain_layers=2, pretrain_steps=20, epochs=2, batch_size=16,
                     probe_epochs=2, probe_batch_size=64, lora_rank=2)
    VARIANTS = ("wecolora", "weco_kd")
    WORKDIR = tempfile.mkdtemp(prefix="wecolora_smoke_")
else:
    BASE_CONFIG = "wecolora_imagenet"  # ViT-B/16 AugReg teacher, 1% of ImageNet-1k (TFDS, prepared by you)
    OVERRIDES = dict(batch_size=256)   # one v5e chip; the reference's effective batch is 1024
    VARIANTS = ("wecolora", "lora_qv", "weco_kd", "scratch_kd")
    WORKDIR = "/content/wecolora" if os.path.isdir("/content") else os.path.expanduser("~/wecolora")
D = 2                                  # weight-copy factor: blocks 0, 2, 4, ...
print(f"SMOKE={SMOKE}: configs/{BASE_CONFIG}.py, d={D}, variants {VARIANTS}, workdir {WORKDIR}")

# %% The run config (configs/common.py documents every field)
import importlib

config = importlib.import_module(f"remem_jax.configs.{BASE_CONFIG}").get_config()
config.wecolora.d = D
config.wecolora.variants = VARIANTS
o = OVERRIDES
if "image_size" in o:
    config.data.image_size = o["image_size"]
if "pretrain_steps" in o:
    config.pretrain.update(dict(num_layers=o["pretrain_layers"] * D, steps=o["pretrain_steps"], batch_size=16,
                                warmup_steps=2, checkpoint_every=0, log_every=10))
if "epochs" in o:
    config.wecolora.update(dict(epochs=o["epochs"], warmup_epochs=1, lora_rank=o["lora_rank"]))
    config.linear_probe.update(dict(epochs=o["probe_epochs"], warmup_epochs=1, batch_size=o["probe_batch_size"]))
config.wecolora.batch_size = o["batch_size"]
print(config.wecolora)

# %% [markdown]
# ## 1. Few-shot feature distillation, then linear probing
#
# `fewshot_distill` trains one student per variant and exports each, LoRA merged, as an AugReg npz;
# `linear_probe` extracts the CLS token after the final LayerNorm once per model and trains a
# BatchNorm + linear head with LARS on the cached features (the teacher and the untrained weight copy
# are probed too, as reference rows).

# %%
from remem_jax import main

results = main.run(config, WORKDIR)

# %% The probe table (WORKDIR/linear_probe/results.md; WORKDIR/results.md has every stage's)
from IPython.display import Markdown, display

display(Markdown(open(os.path.join(WORKDIR, "linear_probe", "results.md")).read()))

# %% Probe accuracy and distillation loss
import matplotlib.pyplot as plt

rows = results["linear_probe"]["rows"]
metric = results["linear_probe"]["metric"]
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
left.bar([r["name"] for r in rows], [100 * r["final"][metric] for r in rows], color="tab:blue")
left.set_ylabel(f"linear-probe {metric} (%)")
left.set_title("final epoch")
left.tick_params(axis="x", rotation=30)
distilled = results["fewshot_distill"]["rows"]
for i, r in enumerate(distilled):
    right.plot([0, 1], [r["l1_initial"], r["l1_final"]], marker="o", label=r["variant"])
right.set_xticks([0, 1], ["start", "end"])
right.set_ylabel("L1 to the teacher's tokens (test images)")
right.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. A merged student is an ordinary ViT
#
# The exported npz has no LoRA factors left: `load_augreg` builds a plain ViT with ceil(L / d)
# blocks from it, usable as a backbone anywhere the AugReg checkpoints are.

# %%
from remem_jax import checkpoints

path = os.path.join(WORKDIR, "fewshot_distill", "wecolora", "student.npz")
student, student_params = checkpoints.load_augreg(path, image_size=config.data.image_size)
print(f"{path}: {student.num_layers} blocks (teacher: {results['fewshot_distill']['teacher_blocks']}), "
      f"width {student.hidden_size}")
