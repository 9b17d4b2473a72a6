"""ReMem on i_naturalist2017: ViT-B/16 AugReg i21k teacher fine-tuned (ReMem and vanilla), distilled into ResNet-18.

Run:
  python -m remem_jax.main --config=configs/i_naturalist2017.py --workdir=$WORKDIR

Expected (ReMem paper, student | teacher top-1 or mean per-class, %, KD unless stated):
  Table 8 (DIST): vanilla 39.4 | 64.0, ReMem 41.6 | 62.9; Table 9 (LoRA): 42.0 | 61.2, LoRA+ReMem 43.0 | 59.1.
Every field and its default is documented in configs/common.py.
"""
from configs import common


def get_config():
    return common.for_dataset("i_naturalist2017")
