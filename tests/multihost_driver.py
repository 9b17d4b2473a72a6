"""One JAX process of tests/test_multihost.py: the digits pipeline, shrunk to seconds.

  python tests/multihost_driver.py --workdir=DIR [--num_processes=2 --process_id=I --port=P]

With --num_processes=1 it is the single-process reference (give it several CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=K). Otherwise it first joins the distributed
runtime on 127.0.0.1:P with gloo CPU collectives. It prints `TOPOLOGY {...}` once JAX is up and
`RESULTS {...}` (what `remem_jax.main.run` returned) at the end, one JSON line each.

--slow_commits=S makes this process commit every file of the workdir S seconds late, as a slow
shared file system would: a host that reads a file before process 0 has written it then fails
every time instead of once in a while.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TINY_STUDENT = "resnet_tiny"


def register_tiny_student():
    """The library's ResNet with two 8-channel basic blocks: ResNet-18's code at a fraction of
    its compile time (the test is about hosts, not about the student's depth)."""
    from remem_jax.models import resnet, students

    students.STUDENTS[TINY_STUDENT] = functools.partial(resnet.ResNet, stage_sizes=(1, 1), width=8,
                                                        block_cls=resnet.BasicBlock)


def tiny_config():
    """configs/digits.py at 16 px: a one-block ViT-Ti/8, batch 8, 4 + 4 + 3 steps, one ReMem
    setting (SAM + reweighting) keeping two teachers, the last one distilled (so the best student
    is the one just written); eval on a 5% hold-out."""
    from configs import digits

    c = digits.get_config()
    c.data.update(dict(image_size=16, digits_source_size=16, validation_percent=5, shuffle_buffer=64,
                       num_parallel_calls=1, prefetch=1))
    c.pretrain.update(dict(variant="Ti_8", num_layers=1, steps=4, batch_size=8, lr=3e-3, warmup_steps=1,
                           checkpoint_every=2, log_every=2))
    c.finetune.update(dict(settings=("remem",), steps=4, keep_steps=(2, 4), batch_size=8, warmup_steps=1,
                           eval_every=0, checkpoint_every=2, log_every=2))
    c.distill.update(dict(student=TINY_STUDENT, steps=3, batch_size=8, warmup_steps=1, checkpoint_every=3,
                          log_every=3, teachers="last", scratch_baseline=False,
                          # Serving export is process 0's post-processing (tests/test_export.py covers it);
                          # its files would differ from the one-process run's only by being absent elsewhere.
                          export_formats=()))
    return c


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--slow_commits", type=float, default=0.0)
    args = parser.parse_args()
    if args.slow_commits:
        slow_commits(args.workdir, args.slow_commits)

    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # jax 0.10's default; explicit
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                                   num_processes=args.num_processes, process_id=args.process_id)
        # The first cross-process collective sets up the gloo communicator, whose rendezvous gives
        # up when the processes arrive more than 30 s apart (jaxlib 0.10.2; later collectives wait
        # as long as needed). Do it now, while the processes are in step, not at orbax's first
        # barrier after minutes of compiling on a loaded machine.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("multihost_driver: gloo up")
    topology = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                    local_device_count=jax.local_device_count(), device_count=jax.device_count())
    print("TOPOLOGY " + json.dumps(topology), flush=True)

    from absl import logging
    logging.set_verbosity(os.environ.get("DRIVER_VERBOSITY", "warning"))
    from remem_jax import main as main_lib

    register_tiny_student()
    results = main_lib.run(tiny_config(), args.workdir)
    print("RESULTS " + json.dumps(results, sort_keys=True), flush=True)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
