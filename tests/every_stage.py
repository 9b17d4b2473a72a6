"""One reduced run with every stage kind, for the resume-under-kill tests and scripts.

pretrain -> ReMem fine-tune -> distill (CNN student) -> WeCoLoRA few-shot distill -> linear probe ->
TinyMIM relation distill -> student fine-tune -> analyze, on 16 px digits, each stage a few steps.
"""
from configs import digits


def every_stage_config():
    c = digits.get_config()
    c.stages = ("pretrain_teacher", "finetune_teacher", "distill_student", "fewshot_distill", "linear_probe",
                "relation_distill", "finetune_student", "analyze")
    c.teacher.checkpoint = "pretrain"
    c.data.image_size = 16
    c.pretrain.update(dict(num_layers=2, steps=8, batch_size=32, lr=3e-3, warmup_steps=2, checkpoint_every=4,
                           log_every=4))
    c.finetune.update(dict(settings=("remem",), steps=6, keep_steps=(3, 6), batch_size=16, warmup_steps=1,
                           eval_every=0, checkpoint_every=3, log_every=3))
    c.distill.update(dict(steps=6, batch_size=16, warmup_steps=1, checkpoint_every=3, log_every=3,
                          teachers="last", export_formats=("stablehlo",)))
    c.data.few_shot_per_class = 4  # 40 images: 2 steps per epoch at batch 16
    c.wecolora.update(dict(variants=("wecolora", "scratch_kd"), lora_rank=2, epochs=2, warmup_epochs=1,
                           batch_size=16, checkpoint_every=2, log_every=2))
    c.linear_probe.update(dict(epochs=2, warmup_epochs=1, batch_size=64, checkpoint_every=3, log_every=3,
                               reference_rows=True))
    c.tinymim.update(dict(student="Ti_8", num_layers=1, steps=4, batch_size=16, lr=3e-3, warmup_steps=0,
                          eval_batches=1, checkpoint_every=2, log_every=2))
    c.student_finetune.update(dict(steps=4, batch_size=16, warmup_steps=0, checkpoint_every=2, log_every=2))
    c.analysis.update(dict(tools="mi,expertness,pruning", num_images=32, num_train_images=32, batch_size=16,
                           decoder_steps=4, decoder_batch_size=8, decoder_channels=(8,), prune_max_blocks=1,
                           kept_steps="last"))
    return c


def quick_config():
    """`every_stage_config` with a tenth of the digits for the probe (the CI kill test's run)."""
    c = every_stage_config()
    c.linear_probe.update(dict(train_fraction=0.1, batch_size=32, checkpoint_every=2))
    return c
