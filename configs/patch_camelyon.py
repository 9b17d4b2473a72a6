"""ReMem on patch_camelyon: ViT-B/16 AugReg i21k teacher fine-tuned (ReMem and vanilla), distilled into ResNet-18.

Run:
  python -m remem_jax.main --config=configs/patch_camelyon.py --workdir=$WORKDIR

Expected (ReMem paper, student | teacher top-1 or mean per-class, %, KD unless stated):
  Table 8 (DIST): vanilla 91.8 | 91.5, ReMem 91.2 | 91.8; Table 9 (LoRA): 89.3 | 89.2, LoRA+ReMem 90.7 | 90.6.
Every field and its default is documented in configs/common.py.
"""
from configs import common


def get_config():
    return common.for_dataset("patch_camelyon")
