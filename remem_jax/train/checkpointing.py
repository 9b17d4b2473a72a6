"""Orbax checkpoints of a train state, with resume from the latest finished save.

Orbax writes each step into a temporary directory and renames it only once the
save is complete, so an interrupted save is never listed by `latest_step()` and
resume cannot read it.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from remem_jax import devices, errors


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
        """Writes `state` (host numpy arrays, or device arrays fetched here) at `step`."""
        self._manager.save(step, args=ocp.args.StandardSave(devices.to_host(state)), force=True)
        self._manager.wait_until_finished()

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
