"""ReMem on imagenet_lt: ViT-B/16 AugReg i21k teacher fine-tuned (ReMem and vanilla), distilled into ResNet-18.

Run:
  python -m remem_jax.main --config=configs/imagenet_lt.py --workdir=$WORKDIR
  --config.data.imagenet_lt_train_list=ImageNet_LT_train.txt --config.data.imagenet_lt_eval_list=ImageNet_LT_test.txt

Expected (ReMem paper, student | teacher top-1 or mean per-class, %, KD unless stated):
  Table 8 (DIST): vanilla 40.5 | 75.1, ReMem 44.3 | 57.2; Table 9 (LoRA): 43.1 | 76.8, LoRA+ReMem 46.4 | 69.6.
Every field and its default is documented in configs/common.py.
"""
from configs import common


def get_config():
    return common.for_dataset("imagenet_lt")
