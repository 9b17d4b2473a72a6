"""ReMem on any registry dataset: ViT-B/16 AugReg i21k teacher fine-tuned (ReMem and vanilla), distilled into ResNet-18.

The dataset name follows the colon (`get_config(arg)`, as vit_jax's `vit.py:b16,cifar10`):
  python -m remem_jax.main --config=configs/remem.py:cifar100 --workdir=$WORKDIR
  python -m remem_jax.main --config=configs/remem.py:sun397 --workdir=$WORKDIR \\
      --config.data.data_dir=gs://my-bucket/tensorflow_datasets
  python -m remem_jax.main --config=configs/remem.py:image_folder --workdir=$WORKDIR \\
      --config.data.image_folder=/path/with/train_and_test_class_folders
  python -m remem_jax.main --config=configs/remem.py:imagenet_lt --workdir=$WORKDIR \\
      --config.data.imagenet_lt_train_list=ImageNet_LT_train.txt \\
      --config.data.imagenet_lt_eval_list=ImageNet_LT_test.txt

Datasets: every name of remem_jax/data/registry.py (`registry.known_datasets()`): the ReMem paper's
Table 5 plus cifar10, imagenet2012, imagenet_lt_tfds, sun397_tfds_test, digits and image_folder.

Expected: the paper's numbers for a dataset are its registry entry's `paper_results` (student |
teacher top-1 or mean per-class, %, KD unless stated; None where the paper's Table 1 numbers
were lost in extraction):
  python -c "from remem_jax.data import registry; print(registry.get_spec('cifar100').paper_results)"
  (cifar100: Table 8 (DIST): vanilla 80.7 | 93.4, ReMem 82.9 | 89.3; Table 9 (LoRA): 82.0 | 93.1,
  LoRA+ReMem 83.4 | 91.6.)
Every field and its default is documented in configs/common.py.
"""
from typing import Optional

import ml_collections

from configs import common


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """The defaults of configs/common.py on dataset `arg` (a registry name)."""
    from remem_jax.data import registry
    from remem_jax.errors import UserError

    dataset = (arg or "").strip()
    if not dataset:
        raise UserError("configs/remem.py needs a dataset name: --config=configs/remem.py:<dataset>, "
                        f"<dataset> one of {', '.join(registry.known_datasets())}.")
    registry.get_spec(dataset)  # An unknown name raises UnknownDatasetError listing the known ones.
    c = common.get_config()
    c.dataset = dataset
    return c
