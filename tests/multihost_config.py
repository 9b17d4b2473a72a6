"""The config of the command-line runs of tests/test_multihost.py: the digits pipeline, shrunk to seconds.

  python -m remem_jax.main --config=tests/multihost_config.py --workdir=DIR [--coordinator_address=...]

Loading it (in the process that runs the command) also registers the tiny student the config
names, and with REMEM_TEST_SLOW_COMMITS=S makes this process commit every file of the workdir
REMEM_TEST_WORKDIR S seconds late, as a slow shared file system would: a host that reads a file
before process 0 has written it then fails every time instead of once in a while.
"""
from __future__ import annotations

import functools
import os
import time

TINY_STUDENT = "resnet_tiny"


def register_tiny_student():
    """The library's ResNet with two 8-channel basic blocks: ResNet-18's code at a fraction of
    its compile time (the test is about hosts, not about the student's depth)."""
    from remem_jax.models import resnet, students

    students.STUDENTS[TINY_STUDENT] = functools.partial(resnet.ResNet, stage_sizes=(1, 1), width=8,
                                                        block_cls=resnet.BasicBlock)


def slow_commits(workdir: str, seconds: float) -> None:
    """Delays every rename of a file into `workdir` (how the library commits its files) by `seconds`."""
    import tensorflow as tf

    root = os.path.abspath(workdir) + os.sep

    def slow(rename):
        @functools.wraps(rename)
        def wrapper(src, dst, *args, **kwargs):
            if os.path.abspath(os.fspath(dst)).startswith(root) and os.path.isfile(src):
                time.sleep(seconds)
            return rename(src, dst, *args, **kwargs)
        return wrapper

    os.replace, os.rename = slow(os.replace), slow(os.rename)
    tf.io.gfile.rename = slow(tf.io.gfile.rename)


def get_config():
    """configs/digits.py at 16 px: a one-block ViT-Ti/8, batch 8, 4 + 4 + 3 steps, one ReMem
    setting (SAM + reweighting) keeping two teachers, the last one distilled with mixup (which
    pairs examples across the hosts' parts of a batch), so the best student is the one just
    written; eval on a 5% hold-out."""
    from configs import digits

    register_tiny_student()
    if float(os.environ.get("REMEM_TEST_SLOW_COMMITS", "0")):
        slow_commits(os.environ["REMEM_TEST_WORKDIR"], float(os.environ["REMEM_TEST_SLOW_COMMITS"]))
    c = digits.get_config()
    c.data.update(dict(image_size=16, digits_source_size=16, validation_percent=5, shuffle_buffer=64,
                       num_parallel_calls=1, prefetch=1))
    c.pretrain.update(dict(variant="Ti_8", num_layers=1, steps=4, batch_size=8, lr=3e-3, warmup_steps=1,
                           checkpoint_every=2, log_every=2))
    c.finetune.update(dict(settings=("remem",), steps=4, keep_steps=(2, 4), batch_size=8, warmup_steps=1,
                           eval_every=0, checkpoint_every=2, log_every=2))
    c.distill.update(dict(student=TINY_STUDENT, steps=3, batch_size=8, warmup_steps=1, checkpoint_every=3,
                          log_every=3, teachers="last", scratch_baseline=False, mixup_alpha=0.8,
                          # Serving export is process 0's post-processing (tests/test_export.py covers it);
                          # its files would differ from the one-process run's only by being absent elsewhere.
                          export_formats=()))
    return c
