"""ReMem on sun397_tfds: ViT-B/16 AugReg i21k teacher fine-tuned (ReMem and vanilla), distilled into ResNet-18.

Run:
  python -m remem_jax.main --config=configs/sun397_tfds.py --workdir=$WORKDIR

Expected (ReMem paper, student | teacher top-1 or mean per-class, %, KD unless stated):
  Table 8 (DIST): vanilla 65.8 | 77.3, ReMem 68.0 | 74.6; Table 9 (LoRA): 65.5 | 76.8, LoRA+ReMem 67.6 | 76.5.
Every field and its default is documented in configs/common.py.
"""
from configs import common


def get_config():
    return common.for_dataset("sun397_tfds")
