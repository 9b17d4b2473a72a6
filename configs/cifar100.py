"""ReMem on cifar100: ViT-B/16 AugReg i21k teacher fine-tuned (ReMem and vanilla), distilled into ResNet-18.

Run:
  python -m remem_jax.main --config=configs/cifar100.py --workdir=$WORKDIR

Expected (ReMem paper, student | teacher top-1 or mean per-class, %, KD unless stated):
  Table 8 (DIST): vanilla 80.7 | 93.4, ReMem 82.9 | 89.3; Table 9 (LoRA): 82.0 | 93.1, LoRA+ReMem 83.4 | 91.6.
Every field and its default is documented in configs/common.py.
"""
from configs import common


def get_config():
    return common.for_dataset("cifar100")
