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
# # remem-jax analysis: how much a teacher keeps of its input
#
# ReMem's evidence is the **information plane**: a teacher's error against an estimate of the
# mutual information I(X; Z) between the input and its last-layer features. This notebook takes
# two ViT teachers (any AugReg npz, a downloaded one or one the pipeline exported) and runs
#
# 1. the **MI estimate**: a CNN decoder reconstructs the input from the patch tokens after the
#    final LayerNorm; held-out BCE and a lower bound in nats;
# 2. **expertness** of every block's MLP (spectral co-clustering of inputs and neurons);
# 3. the **information-plane plot**.
#
# The same runs from the command line: `python -m remem_jax.analyze --config=... --workdir=DIR`
# (see the README). With `REMEM_SMOKE=1` the notebook switches to tiny offline settings: a small
# ViT trained on digits first and its ReMem-reweighted copy (MLP weight 0.8 folded into the
# weights, training-free) as the two teachers, and a short decoder training, so that CI runs it
# on a CPU in about a minute.

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
    DATASET = "digits"           # scikit-learn's bundled digits: no download
    CHECKPOINTS = None           # None: train a tiny teacher first; the second is its ReMem-reweighted copy
    IMAGE_SIZE = 16
    NUM_IMAGES, NUM_TRAIN_IMAGES = 48, 64
    DECODER_CHANNELS, DECODER_STEPS = (8,), 20
    WORKDIR = tempfile.mkdtemp(prefix="remem_analysis_smoke_")
else:
    DATASET = "cifar100"         # any name of remem_jax.data.registry; TFDS downloads it
    # Two teachers of equal feature size (MI estimates are comparable only then): AugReg names,
    # or the npz files a pipeline run exported (WORKDIR/finetune/<setting>/teachers/step_N.npz).
    CHECKPOINTS = "B_16,B_16-i1k"
    IMAGE_SIZE = 224
    NUM_IMAGES, NUM_TRAIN_IMAGES = 1024, 4096
    DECODER_CHANNELS, DECODER_STEPS = (256, 128, 64), 5000
    WORKDIR = "/content/remem_analysis" if os.path.isdir("/content") else os.path.expanduser("~/remem_analysis")
print(f"SMOKE={SMOKE}: {DATASET} at {IMAGE_SIZE}px, workdir {WORKDIR}")

# %% The run config (configs/common.py lists every field; section `analysis` is this notebook's)
from remem_jax.configs import common

config = common.get_config()
config.dataset = DATASET
config.data.image_size = IMAGE_SIZE
config.stages = ("analyze",)
config.analysis.update(dict(
    checkpoints=CHECKPOINTS or "", tools="mi,expertness", mi_layers="encoded", num_images=NUM_IMAGES,
    num_train_images=NUM_TRAIN_IMAGES, decoder_channels=DECODER_CHANNELS, decoder_steps=DECODER_STEPS))
if SMOKE:
    config.data.update(dict(random_flip=False, crop_area_min=0.7, shuffle_buffer=512))
    config.pretrain.update(dict(variant="Ti_8", num_layers=1, steps=10, batch_size=16, lr=3e-3,
                                checkpoint_every=10, log_every=10))
    config.analysis.batch_size = 16
else:
    from remem_jax.data import registry

    spec = registry.get_spec(DATASET)
    if spec.kind == "tfds":
        import tensorflow_datasets as tfds

        tfds.builder(spec.tfds_name, data_dir=config.data.data_dir).download_and_prepare()

# %% Smoke settings only: the two teachers (a tiny ViT trained from scratch, and its ReMem-reweighted copy)
from remem_jax import checkpoints, main, surgery

if SMOKE:
    config.stages = ("pretrain_teacher",)
    main.run(config, WORKDIR)
    plain = os.path.join(WORKDIR, "pretrain", "teacher.npz")
    model, params = checkpoints.load_augreg(plain)
    reweighted = os.path.join(WORKDIR, "reweighted_alpha0.8.npz")
    checkpoints.save_augreg(reweighted, surgery.fold_reweighting(params, mlp_alpha=0.8, num_layers=model.num_layers))
    config.stages = ("analyze",)
    config.analysis.checkpoints = f"{plain},{reweighted}"

# %% [markdown]
# ## Run the analyses
#
# `main.run` checks the config and runs the `analyze` stage, which writes `WORKDIR/analysis/`: `mi.json`, `expertness.json`,
# `analysis.json`, `analysis.md` and the PNG plots. A re-run reuses every finished checkpoint.

# %%
results = main.run(config, WORKDIR)
for row in results["analyze"]["checkpoints"]:
    print(f"{row['label']:>16}: {results['analyze']['metric']} {100 * row[results['analyze']['metric']]:.2f}%, "
          f"MI bound {row['mi']:.1f} nats")

# %% [markdown]
# ## The numbers
#
# BCE is the decoder's held-out pixel-mean binary cross-entropy (lower = more information kept);
# the Gaussian bound is a lower bound on I(X; Z) in nats under independent Gaussian pixels (see
# `remem_jax/analysis/mutual_information.py` for the formula and its assumptions). Expertness is
# the fraction of the input-neuron graph's squared weight inside the co-clusters, against a
# random partition of the same sizes.

# %%
from IPython.display import Image, Markdown, display

analysis_dir = os.path.join(WORKDIR, "analysis")
display(Markdown(open(os.path.join(analysis_dir, "analysis.md")).read()))

# %% [markdown]
# ## The information plane and the expertness per block

# %%
for name in ("information_plane.png", "expertness.png"):
    display(Image(filename=os.path.join(analysis_dir, name)))

# %% [markdown]
# ## The same with the library functions
#
# Each tool is a function on arrays: here the MI estimate of the first teacher from its encoded
# tokens, called directly (`features` collects the sown intermediates of a frozen ViT).

# %%
from remem_jax.analysis import features
from remem_jax.analysis import mutual_information as mi
from remem_jax.analysis import stage
from remem_jax.train import common as train_common

ctx = train_common.RunContext(config=config, workdir=WORKDIR)
first = stage.analysis_checkpoints(ctx)[0]
model, params = checkpoints.load_augreg(first["checkpoint"], num_classes=ctx.num_classes, image_size=IMAGE_SIZE)
train_x, _ = features.split_images(config.data, DATASET, "train", NUM_TRAIN_IMAGES)
test_x, _ = features.split_images(config.data, DATASET, "eval", NUM_IMAGES)
tokens = {role: features.layer_tokens(model, params, x, ["encoded"])["encoded"]
          for role, x in (("train", train_x), ("test", test_x))}
estimate = mi.estimate_mi(features.patch_grid(tokens["train"]), train_x, features.patch_grid(tokens["test"]), test_x,
                          mi.DecoderConfig(channels=DECODER_CHANNELS, steps=DECODER_STEPS), jax.random.PRNGKey(0))
print(f"{first['label']}: held-out BCE {estimate['bce']:.4f}, Gaussian bound {estimate['gaussian_bound_nats']:.1f} nats")
