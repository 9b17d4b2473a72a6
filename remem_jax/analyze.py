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
    return {"config": main_lib._CONFIG, "workdir": main_lib._WORKDIR,
            "allow_config_change": main_lib._ALLOW_CONFIG_CHANGE}


def main(argv, flag_values) -> None:
    del argv
    from remem_jax import errors
    for name in ("config", "workdir"):
        if flag_values[name].value is None:
            raise errors.UserError(f"--{name} is required.")
    from remem_jax import main as main_lib
    main_lib.run(analysis_config(flag_values["config"].value), flag_values["workdir"].value,
                 allow_config_change=flag_values["allow_config_change"].value)


if __name__ == "__main__":
    from remem_jax import cli
    cli.run(main, _flags, progress=True)
