"""Runs the analyses on ViT teachers: `python -m remem_jax.analyze --config=CONFIG --workdir=DIR`.

  python -m remem_jax.analyze --config=configs/analysis_digits.py --workdir=/tmp/analysis_digits
  python -m remem_jax.analyze --config=configs/remem.py:cifar100 --workdir=/tmp/a \\
      --config.analysis.checkpoints=B_16,/path/teacher.npz --config.analysis.tools=mi,expertness

A config whose `stages` include `analyze` runs as a pipeline (`remem_jax.main.run`: the earlier
stages, e.g. the teachers' pretraining and fine-tuning, then `analyze`, which reads the teachers
they kept). Any other config runs the `analyze` stage alone, on `config.analysis.checkpoints`
(or the teachers already kept in DIR). Outputs: DIR/analysis/*.json, analysis.md and PNG plots;
see `remem_jax.analysis.stage`. Mistakes in the input end with one line
`remem_jax: error: ...` and exit status 2.
"""
from __future__ import annotations

STAGE = "analyze"


def analysis_config(config):
    """`config` as run by this command: unchanged if its stages include `analyze`, else `analyze` alone."""
    if STAGE in tuple(config.stages):
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.stages = (STAGE,)
    return config


def _flags():
    # remem_jax.main defines --config, --workdir and --allow_config_change when imported: the same flags here.
    from remem_jax import main as main_lib
    return main_lib._flags()


if __name__ == "__main__":
    from remem_jax import cli
    from remem_jax import main as main_lib
    cli.run(main_lib.make_main(analysis_config), _flags, progress=True)
