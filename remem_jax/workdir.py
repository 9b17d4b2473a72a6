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

import contextlib
import datetime
import errno
import fnmatch
import json
import os
import secrets
import socket
import time
from typing import Any, Iterator, Mapping, Optional

from remem_jax import errors, files
from remem_jax.train import stages as stage_table

CONFIG_FILE = "config.json"
LOCK_FILE = "run.lock"

# Fields that only change logging, evaluation frequency, checkpoint frequency or where data and
# caches are read from: never what a stage computes. The one allow-list; fnmatch patterns.
RESULT_NEUTRAL_FIELDS = (
    "*.log_every",           # progress lines and summaries
    "*.eval_every",          # extra evaluations (kept and final steps are always evaluated)
    "data.eval_examples",    # the subset of those extra evaluations (kept and final steps: the whole split)
    "*.checkpoint_every",    # resume checkpoints (kept steps are always saved)
    "data.prefetch",         # tf.data buffering; batches are deterministic
    "data.num_parallel_calls",  # tf.data parallelism; every random op is keyed per example
    "data.data_dir",         # where the same prepared TFDS data lives
    "data.manual_dir",       # where the same manual downloads live
    "teacher.cache_dir",     # where the same remote checkpoint is cached
    "vit_export_formats",    # extra serving copies of the saved ViTs; the npz files are unchanged
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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _write_error(workdir: str, e: OSError) -> errors.UserError:
    reason = {errno.EACCES: "permission denied (run as a user who may write there, or use another --workdir)",
              errno.EPERM: "permission denied (run as a user who may write there, or use another --workdir)",
              errno.EROFS: "it is on a read-only file system",
              errno.ENOSPC: "no space left on its device"}.get(e.errno, f"{type(e).__name__}: {e.strerror or e}")
    return errors.UserError(f"Cannot write to --workdir {workdir!r}: {reason}.")


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[str]:
    """Holds `<workdir>/run.lock` (host, pid, start time) while the block runs; yields its path.

    One process runs in a workdir at a time: a second start finds the lock and stops, naming the
    holder. A lock left by a process of this host that no longer exists (killed) is stale and is
    taken over. Local files are created atomically (O_EXCL); on remote storage (gs://) creation
    is check-then-write, so two starts in the same instant are not excluded there. Multi-host
    runs: process 0 holds it.

    Raises:
      UserError: the workdir is in use, or cannot be written (read-only, permission, full).
    """
    path = os.path.join(workdir, LOCK_FILE)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now(), "run": secrets.token_hex(8)}
    for attempt in range(2):
        try:
            if files.is_remote(path):
                if files.exists(path):
                    raise FileExistsError(path)
                files.write_json(path, mine)
            else:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "w") as f:
                    json.dump(mine, f)
            break
        except FileExistsError:
            try:
                holder = files.read_json(path, default={}) or {}
            except ValueError:  # a lock file cut short: its writer died while writing it
                holder = {}
            stale = (not holder) or (holder.get("host") == mine["host"] and not _alive(int(holder.get("pid", -1))))
            if not stale or attempt:
                raise errors.UserError(
                    f"--workdir {workdir} is in use by process {holder.get('pid')} on {holder.get('host')} (started "
                    f"{holder.get('started')}; lock file {path}). Wait for it to finish, or, if that process no "
                    f"longer runs, delete {path}.") from None
            (files.gfile().remove if files.is_remote(path) else os.remove)(path)
        except OSError as e:
            raise _write_error(workdir, e) from e
    try:
        yield path
    finally:
        with contextlib.suppress(Exception):
            if (files.read_json(path, default={}) or {}).get("pid") == mine["pid"]:
                (files.gfile().remove if files.is_remote(path) else os.remove)(path)


def check_shared(workdir: str, lock_path: Optional[str]) -> None:
    """Checks that every process of a multi-process run sees the workdir process 0 locked.

    Process 0 (`lock_path`: the lock it holds) sends the lock's run id to every process; each
    other process reads `<workdir>/run.lock` and compares. A process that sees another lock, or
    none, has another directory under that path (a local disk, not shared storage): every process
    then stops with the same error. Call it on every process; one process: nothing to check.

    Raises:
      UserError: some process does not see process 0's workdir.
    """
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return

    def as_ints(run_id: str):  # a run id (hex) as int32s, for the collectives
        return np.array((list(bytes.fromhex(run_id)) + [0] * 16)[:16], np.int32)

    mine = as_ints(files.read_json(lock_path)["run"]) if lock_path else np.zeros(16, np.int32)
    token = np.asarray(multihost_utils.broadcast_one_to_all(mine))
    for attempt in range(5 if lock_path is None else 0):  # shared storage may show a new file late
        try:
            mine = as_ints((files.read_json(os.path.join(workdir, LOCK_FILE), default={}) or {}).get("run", ""))
        except (ValueError, OSError):
            mine = np.full(16, -1, np.int32)
        if (mine == token).all():
            break
        time.sleep(1.0)
    same = np.asarray(multihost_utils.process_allgather(np.array([int((mine == token).all())], np.int32))).ravel()
    if not same.all():
        others = ", ".join(str(i) for i in np.flatnonzero(same == 0))
        raise errors.UserError(
            f"--workdir {workdir} is not the same directory on every process: process {others} does not see the "
            f"lock process 0 holds there ({LOCK_FILE}). Put the workdir on storage every process shares (gs://... "
            "or a shared file system mounted at the same path on every host).")


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
