"""The workdir of a run: a usable directory, and the config it was started with.

`<workdir>/config.json` holds the config of the latest start, the stages that have started
there and every config change made between starts:

  {"config": {...}, "started_stages": ["finetune_teacher", ...],
   "changes": [{"time": ..., "fields": {"finetune.lr": [0.01, 0.02]}, "override": true}]}

A later start compares its config with the stored one. A change to a field that alters what
a stage already started there computes is refused (the run would mix two configs) unless
`--allow_config_change` is given; then it is recorded. Changes that cannot alter results
(`RESULT_NEUTRAL_FIELDS`), a changed `config.stages` (a pipeline extended or narrowed), and
changes to the fields of stages that have not started yet are allowed and recorded. Which stages
read a field is the stage table's to say (`Stage.section` and `Stage.reads`).
"""
from __future__ import annotations

import datetime
import fnmatch
import json
from typing import Any, Mapping, Optional

from remem_jax import errors, files
from remem_jax.train import stages as stage_table

CONFIG_FILE = "config.json"

# Fields that only change logging, evaluation frequency, checkpoint frequency or where data and
# caches are read from: never what a stage computes. The one allow-list; fnmatch patterns.
RESULT_NEUTRAL_FIELDS = (
    "*.log_every",           # progress lines and summaries
    "*.eval_every",          # extra evaluations (kept and final steps are always evaluated)
    "*.checkpoint_every",    # resume checkpoints (kept steps are always saved)
    "data.prefetch",         # tf.data buffering; batches are deterministic
    "data.num_parallel_calls",  # tf.data parallelism; every random op is keyed per example
    "data.data_dir",         # where the same prepared TFDS data lives
    "data.manual_dir",       # where the same manual downloads live
    "teacher.cache_dir",     # where the same remote checkpoint is cached
)

_ABSENT = "<absent>"


def prepare(workdir: str, *, create: bool = True) -> None:
    """Checks `workdir` and creates it if needed (`create`: process 0 only; other hosts only check).

    Raises:
      UserError: it is an existing file, cannot be created, or is on unreachable storage.
    """
    try:
        if files.exists(workdir) and not files.is_dir(workdir):
            raise errors.UserError(f"--workdir {workdir!r} is an existing file, not a directory; pass a "
                                   "directory (new or from an earlier run).")
        if create:
            files.makedirs(workdir)
    except errors.UserError:
        raise
    except Exception as e:  # noqa: BLE001 - OS and tf.io.gfile errors
        cause = files.remote_failure(workdir, e)
        if cause is None and not isinstance(e, OSError):
            raise
        detail = cause or f"{type(e).__name__}: {e.strerror or e}"
        raise errors.UserError(f"Cannot create --workdir {workdir!r}: {detail}.") from e


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, values as JSON gives them back (tuples become lists)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def is_result_neutral(field: str) -> bool:
    return any(fnmatch.fnmatchcase(field, pattern) for pattern in RESULT_NEUTRAL_FIELDS)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list]:
    """{field: [old, new]} for every field that differs (a field only one side has: '<absent>')."""
    old_flat, new_flat = flatten(old), flatten(json.loads(json.dumps(new)))
    return {k: [old_flat.get(k, _ABSENT), new_flat.get(k, _ABSENT)]
            for k in sorted(set(old_flat) | set(new_flat)) if old_flat.get(k, _ABSENT) != new_flat.get(k, _ABSENT)}


def _show(value: Any) -> str:
    return value if value == _ABSENT else json.dumps(value)


class Record:
    """The stored record of a workdir (see module docstring); `write` is called by process 0."""

    def __init__(self, workdir: str, data: Mapping[str, Any]):
        self.path = f"{workdir.rstrip('/')}/{CONFIG_FILE}"
        self.data = dict(data)

    def write(self) -> None:
        files.write_json(self.path, self.data)

    def stage_started(self, name: str) -> None:
        started = self.data.setdefault("started_stages", [])
        if name not in started:
            started.append(name)
            self.write()


def check_resume(workdir: str, config_dict: Mapping[str, Any], stages: Mapping[str, Any], *,
                 allow_change: bool = False, log=None) -> Record:
    """Compares `config_dict` with the config `workdir` was started with.

    `stages` is the stage table (`remem_jax.train.stages.table()`): it says which stages read a field.

    Returns:
      The record to store once the run's other start-up checks pass (`Record.write`).

    Raises:
      UserError: a field changed that alters what a stage already started there computes,
        and `allow_change` is False. The message lists every such field, old -> new.
    """
    path = f"{workdir.rstrip('/')}/{CONFIG_FILE}"
    try:
        stored: Optional[dict] = files.read_json(path, default=None)
    except ValueError as e:
        raise errors.UserError(f"{path} is not valid JSON ({e}); restore it or move it away to start the "
                               "workdir afresh.") from e
    new_config = json.loads(json.dumps(config_dict))
    if stored is None:
        return Record(workdir, {"config": new_config, "started_stages": [], "changes": []})
    started = list(stored.get("started_stages", []))
    changes = config_changes(stored.get("config", {}), new_config)
    refused = {}
    for field, (old, new) in changes.items():
        if field == "stages" or is_result_neutral(field) or _ABSENT in (old, new):
            continue  # (a field only one side has comes from a library upgrade; recorded, not refused)
        readers = [s for s in stage_table.stages_reading(field, stages) if s in started]
        if readers:
            refused[field] = readers
    if refused and not allow_change:
        stages = sorted({s for readers in refused.values() for s in readers})
        listed = "; ".join(f"{f}: {_show(changes[f][0])} -> {_show(changes[f][1])}" for f in sorted(refused))
        raise errors.UserError(
            f"--workdir {workdir} was started with another config, and these changes alter results of "
            f"stages already started there ({', '.join(stages)}): {listed}. Use a new --workdir, undo the "
            f"changes, or pass --allow_config_change to continue anyway (the change is recorded in {path}).")
    history = list(stored.get("changes", []))
    if changes:
        history.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "fields": changes, "override": bool(refused)})
        if log is not None:
            log("Config changes since the last start of %s%s: %s", workdir,
                " (allowed by --allow_config_change)" if refused else "",
                "; ".join(f"{f}: {_show(o)} -> {_show(n)}" for f, (o, n) in changes.items()))
    return Record(workdir, {"config": new_config, "started_stages": started, "changes": history})
