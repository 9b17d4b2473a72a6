"""Runs the stages of a config: `python -m remem_jax.main --config=configs/digits.py --workdir=DIR`.

Each stage reads what earlier stages wrote to the workdir and writes its own
outputs there; a re-run resumes from the checkpoints and skips finished work.
Each stage writes its results to `DIR/<its folder>/results.json` and its table to
`DIR/<its folder>/results.md`; `DIR/results.json` holds every stage's results and
`DIR/results.md` every stage's table in run order; TensorBoard summaries go to `DIR`.
With `config.seeds` > 1 the stages run once per seed in `DIR/seeds/seed_<s>/` (each a complete run
directory) and `DIR`'s tables give each compared number's mean and spread (`train/seeds.py`).
The stages are those of the stage table (`remem_jax.train.stages`). `--config` is a
config file, or a config shipped with the package by name: `--config=digits`,
`--config=remem:cifar100` (`remem_jax.configs`).

Multi-host: every host runs the same command. Before any JAX call it joins JAX's
distributed runtime, explicitly (--coordinator_address, --num_processes, --process_id or
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), automatically on a Cloud TPU VM,
a SLURM step or an Open MPI job, or not at all, and logs which (`remem_jax.distributed`;
recipes in docs/cluster.md). The workdir must be one directory every process sees.

Mistakes in the input (an unknown config field or value, a missing checkpoint or
dataset, a half-configured cluster) end the program with a one-line message and exit
status 2; in a multi-host run every process stops, and a process whose peer died stops
with one line and exit status 3. Start-up checks come first, in this order, before any
checkpoint is fetched: the distributed set-up, the config, the workdir (and, with several
processes, that they all see it), the config the workdir was started with
(`<workdir>/config.json`; see `remem_jax.workdir`), and the dataset on disk.
"""
from __future__ import annotations

import contextlib
import os

from absl import flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "An ml_collections config file (PATH[:ARG]), or a "
                                          "config shipped with remem_jax by name (NAME[:ARG], e.g. remem:cifar100).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, summaries and results.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Continue a workdir although fields that alter results of its started stages changed (finished "
    "work is not redone); the change is recorded in <workdir>/config.json.")
# Multi-process runs (remem_jax/distributed.py; docs/cluster.md has the launch commands).
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "off"],
    "auto: join the other processes of the run if a coordinator is given (flags below or JAX_COORDINATOR_ADDRESS, "
    "JAX_NUM_PROCESSES, JAX_PROCESS_ID) or a TPU pod, SLURM step or Open MPI job is detected; else one process. "
    "off: one process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
_JOIN_TIMEOUT = flags.DEFINE_integer("distributed_timeout_s", 300,
                                     "Seconds to wait for every process to join before stopping with an error.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s", 100, "A process silent this long is declared lost; the others then stop (multi-process).")


def run(config, workdir: str, *, allow_config_change: bool = False, stage_table=None) -> dict:
    """Checks `config`, `workdir` and the data, then runs the stages; returns every stage's results.

    Args:
      config: the run's config.
      workdir: where the stages write (see `remem_jax.train.handoff` for the layout).
      allow_config_change: continue a workdir whose started stages read changed fields.
      stage_table: name -> `Stage`; None: `remem_jax.train.stages.table()`, every stage of the library.
    """
    import jax

    from remem_jax import config_validation, distributed, errors
    from remem_jax import workdir as workdir_lib
    from remem_jax.train import common
    from remem_jax.train import stages as stages_lib

    table = stages_lib.table() if stage_table is None else stage_table
    config_validation.validate(config, table)
    config_validation.global_batches(config, table, jax.device_count())
    # One run at a time in a workdir: process 0 holds its lock until the run ends, however it ends.
    # Taking it may fail on process 0 alone: every process learns of it (none waits for a stopped one).
    with contextlib.ExitStack() as stack:
        error, lock_path = None, None
        try:
            workdir_lib.prepare(workdir, create=common.is_chief())
            if common.is_chief():
                lock_path = stack.enter_context(workdir_lib.lock(workdir))
        except errors.UserError as e:
            error = e
        distributed.agree(error)
        workdir_lib.check_shared(workdir, lock_path)
        if config.seeds == 1:
            return _run_stages(config, workdir, table, allow_config_change)
        return _run_seeds(config, workdir, table, allow_config_change)


def _run_seeds(config, workdir: str, table, allow_config_change: bool) -> dict:
    """`config.seeds` runs, one per seed in its own workdir; then each stage's compared numbers over them."""
    from remem_jax import workdir as workdir_lib
    from remem_jax.train import common, runs, seeds

    per_seed, data = {}, {}  # the data is the same for every seed: checked and counted once
    values = seeds.seed_values(config)
    for seed in values:
        logging.info("=== seed %d of %s ===", seed, values)
        seed_dir = seeds.seed_workdir(workdir, seed)
        workdir_lib.prepare(seed_dir, create=common.is_chief())
        per_seed[seed] = _run_stages(seeds.seed_config(config, seed), seed_dir, table, allow_config_change, data)
    results = {"config": config.to_dict(), "seeds": {str(s): r for s, r in per_seed.items()}}
    compared = [n for n in config.stages if table[n].compared is not None]
    for name in compared:
        rows = seeds.aggregate([table[name].compared(r[name]) for r in per_seed.values()])
        results[name] = {"over_seeds": rows}
        runs.write_stage_results(workdir, name, table[name].folder, results[name],
                                 seeds.markdown(name, rows, list(per_seed)))
    runs.write_run_table(workdir, [(n, table[n].folder) for n in compared])
    common.write_json(os.path.join(workdir, runs.RESULTS_JSON), results)
    return results


def _run_stages(config, workdir: str, table, allow_config_change: bool, data=None) -> dict:
    """The stages of `config` in `workdir`. `data`: a dict that holds the data checks' results once
    made (shared by the runs of several seeds, whose data is the same); None: check here."""
    import jax
    from clu import metric_writers
    from jax.experimental import multihost_utils

    from remem_jax import files
    from remem_jax import workdir as workdir_lib
    from remem_jax.data import sizes, sources
    from remem_jax.train import common, runs
    from remem_jax.train import stages as stages_lib

    record = workdir_lib.check_resume(workdir, config.to_dict(), table, allow_change=allow_config_change,
                                      log=logging.warning)
    results_path = os.path.join(workdir, runs.RESULTS_JSON)
    previous = files.read_json(results_path, default={})
    stages_lib.check_needs(config, table, finished=finished_stages(workdir, table, previous))
    data = {} if data is None else data
    if not data:
        data.update(report=sources.check_ready(config.data, config.dataset), records=_data_records(config, table))
    data_report, data_records = data["report"], data["records"]
    if common.is_chief():
        for path in files.remove_stale_temporaries(workdir):
            logging.warning("Removed %s, left by an interrupted write.", path)
        record.write()
    logging.info("JAX process %d/%d, %d local devices (%s).", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.devices()[0].platform)
    invariant, why = sources.host_count_invariance(config.data, config.dataset)
    logging.info("Host-count invariant: %s (%s).", "yes" if invariant else "no", why)
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
        results, stage_table = dict(output.results), output.table
        if stage.train_data is not None:
            results["data"] = data_records[stage.train_data]
            stage_table = f"{stage_table.rstrip()}\n\n{sizes.describe(results['data'])}"
        if "skipped_bad_images" in data_report:
            results["skipped_bad_images"] = data_report["skipped_bad_images"]
        ctx.results[name] = results
        runs.write_stage_results(workdir, name, stage.folder, results, stage_table)
        runs.write_run_table(workdir, [(n, table[n].folder) for n in record.data["started_stages"] if n in table])
        common.write_json(results_path, ctx.results)
        # Later stages read what this one wrote (process 0): every host waits for it.
        multihost_utils.sync_global_devices(f"stage {name} done")
    writer.close()
    return ctx.results


def _data_records(config, table) -> dict:
    """`data.sizes.split_sizes` for each kind of training data the configured stages read, logged."""
    from remem_jax.data import sizes

    records = {}
    for kind in sorted({table[name].train_data for name in config.stages} - {None}):
        records[kind] = sizes.split_sizes(config.data, config.dataset, few_shot=kind == "few_shot")
        readers = ", ".join(n for n in config.stages if table[n].train_data == kind)
        logging.info("%s (%s)", sizes.describe(records[kind]), readers)
    return records


def finished_stages(workdir: str, table, previous_results: dict) -> list[str]:
    """Stages that finished in earlier runs of `workdir` (their results file, or their results.json entry)."""
    from remem_jax import files
    from remem_jax.train import runs
    return [name for name, stage in table.items()
            if name in previous_results or files.exists(runs.stage_results_paths(workdir, stage.folder)[0])]


def _flags() -> dict:
    return {"config": _CONFIG, "workdir": _WORKDIR, "allow_config_change": _ALLOW_CONFIG_CHANGE,
            "distributed": _DISTRIBUTED, "coordinator_address": _COORDINATOR, "num_processes": _NUM_PROCESSES,
            "process_id": _PROCESS_ID, "distributed_timeout_s": _JOIN_TIMEOUT, "heartbeat_timeout_s": _HEARTBEAT_TIMEOUT}


def join_processes(flag_values) -> str:
    """Joins JAX's distributed runtime as the flags and the environment say (before any JAX call);
    returns the line saying what it did (see `remem_jax.distributed`)."""
    from remem_jax import distributed
    the_plan = distributed.plan(flag_values["distributed"].value, flag_values["coordinator_address"].value,
                                flag_values["num_processes"].value, flag_values["process_id"].value,
                                env=os.environ, tpu_chips=distributed.tpu_chip_count())
    return distributed.initialize(the_plan, timeout_s=flag_values["distributed_timeout_s"].value,
                                  heartbeat_timeout_s=flag_values["heartbeat_timeout_s"].value)


def make_main(prepare_config=lambda config: config):
    """The command: `run(prepare_config(--config), --workdir)`, for `cli.run` (`remem_jax.analyze` shares it)."""
    def main_(argv, flag_values) -> None:
        del argv
        from remem_jax import errors
        for name in ("config", "workdir"):
            if flag_values[name].value is None:
                raise errors.UserError(f"--{name} is required.")
        logging.info(join_processes(flag_values))
        run(prepare_config(flag_values["config"].value), flag_values["workdir"].value,
            allow_config_change=flag_values["allow_config_change"].value)
    return main_


main = make_main()


if __name__ == "__main__":
    from remem_jax import cli
    cli.run(main, _flags, progress=True)
