"""ReMem on caltech101: ViT-B/16 AugReg i21k teacher fine-tuned (ReMem and vanilla), distilled into ResNet-18.

Run:
  python -m remem_jax.main --config=configs/caltech101.py --workdir=$WORKDIR

Expected (ReMem paper, student | teacher top-1 or mean per-class, %, KD unless stated):
  Table 8 (DIST): vanilla 57.6 | 90.2, ReMem 78.1 | 88.5; Table 9 (LoRA): 56.7 | 96.0, LoRA+ReMem 78.8 | 88.5.
Every field and its default is documented in configs/common.py.
"""
from configs import common


def get_config():
    return common.for_dataset("caltech101")
