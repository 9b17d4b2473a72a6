"""The whole ReMem pipeline offline, on scikit-learn's bundled handwritten digits (no download).

A small ViT teacher is first trained from scratch and saved as an AugReg npz (so
the real checkpoint-loading path runs), then fine-tuned twice, vanilla and with
ReMem (SAM with a large rho plus MLP down-weighting); every kept teacher
checkpoint is distilled into a ResNet-18 student, next to a student trained from
labels only, and the table is printed and written to $WORKDIR/distill/results.md
($WORKDIR/results.md has every stage's table).

Run (about 10 minutes on 2 CPU cores):
  python -m remem_jax.main --config=configs/digits.py --workdir=/tmp/remem_digits

Expected: teachers and students far above chance (10%); see the README for the
figures of a measured run.
"""
from configs import remem


def get_config():
    c = remem.get_config("digits")
    # Digits are not flip-invariant and an 8x8 glyph does not survive a 5% crop.
    c.data.update(dict(image_size=32, shuffle_buffer=2048, crop_area_min=0.7, random_flip=False))
    c.stages = ("pretrain_teacher", "finetune_teacher", "distill_student")
    c.teacher.checkpoint = "pretrain"

    c.pretrain.variant = "Ti_8"       # 4x4 = 16 patches of 8 px at 32 px
    c.pretrain.num_layers = 4
    c.pretrain.steps = 500
    c.pretrain.batch_size = 64
    c.pretrain.lr = 1e-3              # Adam (configs/common.py default optimizer for pretraining)
    c.pretrain.warmup_steps = 30
    c.pretrain.checkpoint_every = 100

    c.finetune.steps = 100
    c.finetune.keep_steps = (50, 100)
    c.finetune.batch_size = 64
    c.finetune.lr = 0.01
    c.finetune.warmup_steps = 10
    c.finetune.sam_rho = 0.5
    c.finetune.mlp_alpha = 0.8
    c.finetune.eval_every = 50
    c.finetune.checkpoint_every = 50
    c.finetune.log_every = 25

    c.distill.student = "resnet18"
    c.distill.method = "kd"
    c.distill.steps = 100
    c.distill.batch_size = 32
    c.distill.lr = 0.05
    c.distill.temperature = 2.0
    c.distill.kd_weight = 0.5
    c.distill.checkpoint_every = 100
    c.distill.log_every = 50
    return c
