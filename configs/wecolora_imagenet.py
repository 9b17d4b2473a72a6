"""WeCoLoRA (WACV 2025) on ImageNet-1k: a ViT-B/16 teacher compressed to ceil(12 / d) blocks from a few-shot subset.

  python -m remem_jax.main --config=configs/wecolora_imagenet.py --workdir=$WORKDIR \\
      --config.data.data_dir=gs://my-bucket/tensorflow_datasets \\
      [--config.wecolora.d=3] [--config.data.few_shot_fraction=0.01] [--config.teacher.checkpoint=B_16-i1k]

Stages: `fewshot_distill` (variants wecolora, lora_qv, weco_kd, scratch_kd; students exported merged as
AugReg npz) then `linear_probe` (CLS after encoder_norm, LARS head; also the teacher and the untrained
weight copy). Every field is documented in configs/common.py.

Recipe (the official code's README; ../shared/notes/methods.md section 1): 1% (paper main table) or 2%
(README command) of the train split, class-stratified with seed 12; RandomResizedCrop scale (0.2, 1)
and flip; d = 2, LoRA rank 128, 10 epochs (2 warmup), AdamW (0.9, 0.95), wd 0.05, blr 1e-3 with an
effective batch 1024; linear probe 50 epochs, batch 512, LARS blr 0.1, 10 warmup epochs.
Deviation: the input is the AugReg teachers' native [-1, 1] normalisation, not ImageNet mean/std
(ambiguity 16). The paper's teacher is timm's original ViT-B/16 (i21k -> i1k at 224); `B_16` here is
the AugReg i21k checkpoint (`B_16-i1k` its ImageNet fine-tune at 384, posemb resized to 224).

Expected (linear-probe top-1 %, the paper's README, supervised ViT-B teacher, 1% of ImageNet):
  d = 2: WeCoLoRA 60.5, WeCo+KD 35.5;  d = 3: WeCoLoRA 35.8, WeCo+KD 7.6.
  SSL (MAE) teacher, d = 2, 1%: KD from scratch 3.5, WeCo 30.2, WeCo + LoRA(q, v) 32.4, WeCoLoRA 36.8;
  10%: 15.8, 53.7, 33.0, 56.0. (The paper's reported number is the maximum over probe epochs on the
  validation split; results.md gives it next to the final-epoch number.)
"""
from configs import remem


def get_config():
    c = remem.get_config("imagenet2012")
    c.stages = ("fewshot_distill", "linear_probe")
    c.teacher.checkpoint = "B_16"
    c.data.few_shot_fraction = 0.01
    c.data.crop_area_min = 0.2        # RandomResizedCrop(224, scale=(0.2, 1.0))
    c.data.random_flip = True
    return c
