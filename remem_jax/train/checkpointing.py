"""Orbax checkpoints of a train state, with resume from the latest finished save.

Orbax writes each step into a temporary directory and renames it only once the
save is complete, so an interrupted save is never listed by `latest_step()` and
resume cannot read it.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from remem_jax import devices, errors


def _out_of_space(error: Any) -> bool:
    text = str(error)
    return "No space left on device" in text or "os_error_code='28'" in text or (
        isinstance(error, OSError) and error.errno == errno.ENOSPC)


class _HeldLibraryErrors(logging.Filter):
    """Holds back the errors orbax's writer threads log while a save runs (each with a traceback)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname:
            self.records.append(record)
            return False
        return True


class StateCheckpointer:
    """Saves and restores a pytree state in `directory/<step>`.

    Keeps every step in `keep_steps` (the paper keeps several teacher
    checkpoints) plus the `keep_latest` most recent saves for resume.
    """

    def __init__(self, directory: str, *, keep_steps: Sequence[int] = (), keep_latest: int = 1):
        policies = [checkpoint_managers.LatestN(n=keep_latest)]
        if keep_steps:
            policies.append(checkpoint_managers.CustomSteps(steps=list(keep_steps)))
        options = ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies))
        self.directory = directory
        self._manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any) -> None:
        """Writes `state` (host numpy arrays, or device arrays fetched here) at `step`.

        Raises:
          StorageFullError: the device ran out of space; the partial save is an orbax temporary
            directory, never listed, and removed at the next start.
        """
        host_state = devices.to_host(state)
        self._check_space(step, host_state)
        held = _HeldLibraryErrors()
        logging.getLogger("absl").addFilter(held)
        try:
            self._manager.save(step, args=ocp.args.StandardSave(host_state), force=True)
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax wraps the OS error in several types
            if _out_of_space(e) or any(_out_of_space(r.getMessage()) for r in held.records):
                held.records.clear()  # the one-line error below says it all
                raise errors.storage_full(f"{self.directory}/{step}", e) from e
            raise
        finally:
            logging.getLogger("absl").removeFilter(held)
            for record in held.records:  # anything else orbax logged is shown as it was
                logging.getLogger("absl").handle(record)

    def _check_space(self, step: int, host_state: Any) -> None:
        """Refuses a local save that cannot fit: orbax's writer threads fail noisily on a full disk."""
        if "://" in self.directory:
            return
        need = sum(np.asarray(x).nbytes for x in jax.tree.leaves(host_state))
        folder = self.directory
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if shutil.disk_usage(folder).free < need + (4 << 20):  # + room for metadata
            raise errors.storage_full(f"{self.directory}/{step}", OSError(errno.ENOSPC, f"{need} bytes needed"))

    def restore(self, step: int, like: Any) -> Any:
        """Restores the state saved at `step` with the structure and dtypes of `like`."""
        target = devices.to_host(like)
        try:
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # orbax raises several types for structure mismatches
            raise errors.UserError(
                f"Cannot resume from {self.directory}/{step}: its state does not match this run's "
                f"configuration ({type(e).__name__}: {str(e).splitlines()[0][:300]}). Use a new "
                "--workdir or delete that directory.") from e
        return jax.tree.map(np.asarray, restored)

    def close(self) -> None:
        self._manager.close()
