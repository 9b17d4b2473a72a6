"""ReMem on cifar100 (the README's example): the same as `--config=configs/remem.py:cifar100`.

Run:
  python -m remem_jax.main --config=configs/cifar100.py --workdir=$WORKDIR

Expected: `registry.get_spec('cifar100').paper_results`, see configs/remem.py.
"""
from configs import remem


def get_config():
    return remem.get_config("cifar100")
