"""TinyMIM on ImageNet-1k: a ViT-S/16 (or Ti/16) student distilled from a ViT teacher's token relations.

The teacher is any AugReg npz (`config.teacher.checkpoint`: a known name such as `B_16`, or a local
/ gs:// path); the paper used MAE ViT-B/16 and ViT-L/16 encoders, which this library does not read
(AugReg layout only), so the numbers below are the paper's, not a reproduction. Run:

  python -m remem_jax.main --config=configs/tinymim_imagenet.py --workdir=$WORKDIR \\
      --config.data.data_dir=gs://my-bucket/tensorflow_datasets
  # ViT-Ti student:  --config.tinymim.student=Ti_16 --config.tinymim.num_heads=6
  # other rows:      --config.tinymim.compare="('relation@last', 'cls', 'feature')"

Stages: `relation_distill` (relations of the teacher's block floor(0.75 L_t) when it is deeper than
the student, else its last, into the student's last block; AdamW (0.9, 0.95), wd 0.05,
blr 1.5e-4 * batch / 256, 5% warmup then cosine, crop 0.2-1 + flip shared, colour jitter 0.4 on
the student only, drop-path 0.1 except the last block) and `finetune_student` (the distilled
student and a scratch student of the same architecture, identical AdamW fine-tuning with layer-wise
learning-rate decay 0.65, the README's fine-tuning command, which it gives for ViT-B only).

Paper (TinyMIM README, ImageNet-1K fine-tune top-1 / ADE20K mIoU; 300 distillation epochs at
batch 4096 from MAE teachers, 100 fine-tune epochs with layer decay 0.65, mixup/cutmix, RandAug):
  ViT-T: MAE 71.6 / 37.6, TinyMIM 75.8 / 44.0, TinyMIM*-T 79.6 / 45.0
  ViT-S: MAE 80.6 / 42.8, TinyMIM 83.0 / 48.4
  ViT-B: MAE 83.6 / 48.1, TinyMIM 85.0 / 52.2
Not reproduced here: MAE teachers, mixup/cutmix/RandAug/random erasing, label smoothing and
global-pool + fc_norm in fine-tuning (this library's ViT classifies from the class token).
"""
from configs import remem


def get_config():
    c = remem.get_config("imagenet2012")
    c.stages = ("relation_distill", "finetune_student")
    c.data.crop_area_min = 0.2        # RandomResizedCrop(224, scale=(0.2, 1.0)), shared by both models
    c.teacher.checkpoint = "B_16"     # AugReg ViT-B/16 i21k; use a local copy or any ViT npz

    t = c.tinymim
    t.student = "S_16"                # last block: the teacher's 12 heads (d_h 32), others 6
    t.target = "relation"
    # 300 epochs of 1,281,167 images at batch 4096 (the README's recipe).
    t.batch_size = 4096
    t.steps = 300 * 1_281_167 // 4096
    t.warmup_steps = 15 * 1_281_167 // 4096
    t.eval_batches = 4
    t.eval_every = 5000
    t.checkpoint_every = 2000
    t.log_every = 100

    f = c.student_finetune
    f.batch_size = 1024
    f.steps = 100 * 1_281_167 // 1024
    f.warmup_steps = 5 * 1_281_167 // 1024
    f.lr = 5e-4 * 1024 / 256          # blr 5e-4 (README ViT-B; ViT-S/T use 5e-4 .. 1e-3)
    f.weight_decay = 0.05
    f.layer_decay = 0.65              # README: --layer_decay 0.65
    f.drop_path = 0.1
    f.eval_every = 5000
    f.checkpoint_every = 2000
    return c
