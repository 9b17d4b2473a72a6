"""TinyMIM offline, on scikit-learn's bundled handwritten digits (no download).

A 4-block ViT-Ti/8 teacher is first trained from scratch (`pretrain_teacher`, as
configs/digits.py) and saved as an AugReg npz; a 2-block ViT-Ti/8 student (6 heads, d_h 32, in
its first block; the teacher's 3 heads, d_h 64, in its last) is distilled from it once per row:
token relations from the teacher's block 3 of 4 (floor(0.75 L_t), the default) and from its last
block, CLS distillation and feature distillation (these two follow the paper's description, not
released code). `finetune_student` then fine-tunes each student and an undistilled student of
the same architecture and init with identical settings; the table goes to $WORKDIR/results.md.

Run (under 8 minutes on 2 CPU cores; see the README for a measured run):
  python -m remem_jax.main --config=configs/tinymim_digits.py --workdir=/tmp/tinymim_digits

Expected: every relation loss falls during distillation; fine-tuned students far above chance
(10%). This toy setting is too small to reproduce the paper's ordering; configs/tinymim_imagenet.py
has the paper's numbers.
"""
from configs import digits


def get_config():
    c = digits.get_config()  # its data settings and its pretrain_teacher recipe
    c.stages = ("pretrain_teacher", "relation_distill", "finetune_student")
    c.teacher.checkpoint = "pretrain"

    t = c.tinymim
    t.student = "Ti_8"
    t.num_layers = 2
    t.num_heads = 6                   # as TinyMIM's tiny student: more heads in the other blocks
    t.target = "relation"             # teacher block None: floor(0.75 * 4) = 3 of 4
    t.compare = ("relation@last", "cls", "feature")
    t.steps = 150
    t.batch_size = 64
    t.lr = 1e-3                       # blr * 64 / 256 = 3.75e-5 is far too small for 150 steps
    t.warmup_steps = 10
    t.eval_batches = 2
    t.checkpoint_every = 150
    t.log_every = 50

    f = c.student_finetune
    f.steps = 150
    f.batch_size = 64
    f.lr = 1e-3
    f.warmup_steps = 10
    f.checkpoint_every = 150
    f.log_every = 50
    return c
