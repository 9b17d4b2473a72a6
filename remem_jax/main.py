"""Runs the stages of a config: `python -m remem_jax.main --config=configs/digits.py --workdir=DIR`.

Each stage reads what earlier stages wrote to the workdir and writes its own
outputs there; a re-run resumes from the checkpoints and skips finished work.
Each stage writes its results to `DIR/<its folder>/results.json` and its table to
`DIR/<its folder>/results.md`; `DIR/results.json` holds every stage's results and
`DIR/results.md` every stage's table in run order; TensorBoard summaries go to `DIR`.
The stages are those of the stage table (`remem_jax.train.stages`).

Mistakes in the input (an unknown config field or value, a missing checkpoint or
dataset) end the program with a one-line message and exit status 2. Start-up
checks come first, in this order, before any checkpoint is fetched: the config,
the workdir, the config the workdir was started with (`<workdir>/config.json`;
see `remem_jax.workdir`), and the dataset on disk.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and results.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Continue a workdir although fields that alter results of its started stages changed (finished "
    "work is not redone); the change is recorded in <workdir>/config.json.")


def run(config, workdir: str, *, allow_config_change: bool = False, stage_table=None) -> dict:
    """Checks `config`, `workdir` and the data, then runs the stages; returns every stage's results.

    Args:
      config: the run's config.
      workdir: where the stages write (see `remem_jax.train.handoff` for the layout).
      allow_config_change: continue a workdir whose started stages read changed fields.
      stage_table: name -> `Stage`; None: `remem_jax.train.stages.table()`, every stage of the library.
    """
    import jax
    from clu import metric_writers
    from jax.experimental import multihost_utils

    from remem_jax import config_validation, files
    from remem_jax import workdir as workdir_lib
    from remem_jax.data import sources
    from remem_jax.train import common, runs
    from remem_jax.train import stages as stages_lib

    table = stages_lib.table() if stage_table is None else stage_table
    config_validation.validate(config, table)
    workdir_lib.prepare(workdir, create=common.is_chief())
    record = workdir_lib.check_resume(workdir, config.to_dict(), table, allow_change=allow_config_change,
                                      log=logging.warning)
    results_path = os.path.join(workdir, runs.RESULTS_JSON)
    previous = files.read_json(results_path, default={})
    stages_lib.check_needs(config, table, finished=finished_stages(workdir, table, previous))
    data_report = sources.check_ready(config.data, config.dataset)
    if common.is_chief():
        for path in files.remove_stale_temporaries(workdir):
            logging.warning("Removed %s, left by an interrupted write.", path)
        record.write()
    logging.info("JAX process %d/%d, %d local devices (%s).", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.devices()[0].platform)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    ctx = common.RunContext(config=config, workdir=workdir, writer=writer)
    ctx.results = previous
    ctx.results["config"] = config.to_dict()
    ctx.results["data"] = data_report
    for name in config.stages:
        logging.info("=== stage %s ===", name)
        stage = table[name]
        if common.is_chief():
            record.stage_started(name)
        output = stage.run(ctx)
        results = dict(output.results)
        if "skipped_bad_images" in data_report:
            results["skipped_bad_images"] = data_report["skipped_bad_images"]
        ctx.results[name] = results
        runs.write_stage_results(workdir, name, stage.folder, results, output.table)
        runs.write_run_table(workdir, [(n, table[n].folder) for n in record.data["started_stages"] if n in table])
        common.write_json(results_path, ctx.results)
        # Later stages read what this one wrote (process 0): every host waits for it.
        multihost_utils.sync_global_devices(f"stage {name} done")
    writer.close()
    return ctx.results


def finished_stages(workdir: str, table, previous_results: dict) -> list[str]:
    """Stages that finished in earlier runs of `workdir` (their results file, or their results.json entry)."""
    from remem_jax import files
    from remem_jax.train import runs
    return [name for name, stage in table.items()
            if name in previous_results or files.exists(runs.stage_results_paths(workdir, stage.folder)[0])]


def _user_error_types():
    from remem_jax import errors
    from remem_jax.data import registry, sources
    return (errors.UserError, registry.UnknownDatasetError, sources.DataNotFoundError)


def _exit_with_user_error(e: Exception):
    message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    print(f"remem_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from remem_jax import cli
    logging.get_absl_handler().addFilter(cli.QuietLibraries())
    try:
        run(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    except _user_error_types() as e:
        _exit_with_user_error(e)


def _make_config_siblings_importable(argv):
    """Config files import `configs.common`: put the folder holding `configs/` on sys.path."""
    for arg in argv:
        if arg.startswith("--config="):
            path = os.path.abspath(arg.split("=", 1)[1].split(":", 1)[0])
            sys.path.insert(0, os.path.dirname(os.path.dirname(path)))


def _check_flags_or_exit(argv):
    """Flag errors (unknown config field, bad override, bad config argument) -> one line, exit 2, no traceback."""
    _make_config_siblings_importable(argv)
    try:
        rest = flags.FLAGS(argv)
    except _user_error_types() as e:  # raised by the config file, e.g. configs/remem.py:<unknown dataset>
        _exit_with_user_error(e)
    except Exception as e:  # config_flags raises several types for a bad file or override
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, (AttributeError, KeyError)):
            detail = f"unknown config field {detail} (every field is listed in configs/common.py)"
        print(f"remem_jax: error: {detail}", file=sys.stderr)
        sys.exit(2)
    for name in ("config", "workdir"):
        if flags.FLAGS[name].value is None:
            print(f"remem_jax: error: --{name} is required.", file=sys.stderr)
            sys.exit(2)
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=_check_flags_or_exit)
