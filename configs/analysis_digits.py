"""The analyses offline: digits teachers (vanilla vs ReMem, several kept steps) through every tool.

First the digits pipeline's own teacher stages at small step counts (a small ViT pretrained from
scratch, then fine-tuned vanilla and with ReMem, teachers kept at three steps each), then the
`analyze` stage on the six kept teachers: MI from every layer, expertness of every block,
criticality of the top block's neurons, a top-down pruning sweep (top attention or MLP branch
removed, 10 fine-tuning steps) on the last teacher of each setting, and attention rollout.

Run:
  python -m remem_jax.analyze --config=configs/analysis_digits.py --workdir=/tmp/analysis_digits

Timing: 5 min 43 s wall (7 min 02 s user, 51 s sys), teacher stages included (about 1 min 50 s of
it), on 2 idle cores (AMD EPYC), cold start, measured 2026-12-02; the target is under 8 minutes.
An earlier measurement on a slower 2-core machine shared with other jobs (load 6-8) took about 11
minutes for the teachers and 21 for `analyze`.

Outputs: /tmp/analysis_digits/analysis/{analysis.md, *.json, *.png}. Expected: teachers far above
chance (10%); MI estimates far above the noise level (0 nats); see the README for a measured run.
"""
from configs import digits


def get_config():
    c = digits.get_config()
    c.stages = ("pretrain_teacher", "finetune_teacher", "analyze")

    c.pretrain.steps = 300
    c.pretrain.checkpoint_every = 300
    c.finetune.steps = 60
    c.finetune.keep_steps = (20, 40, 60)
    c.finetune.warmup_steps = 6
    c.finetune.eval_every = 0
    c.finetune.checkpoint_every = 60

    a = c.analysis
    a.num_images = 256
    a.num_train_images = 512
    a.mi_layers = "all"
    a.decoder_channels = (32, 16, 8)  # 4x4 patch grid -> 8 -> 16 -> 32 px
    a.decoder_steps = 150
    a.decoder_batch_size = 64
    a.criticality_images = 32
    a.prune_max_blocks = 1
    a.prune_finetune_steps = 10
    a.prune_checkpoints = "last"
    return c
