"""Joining JAX's distributed runtime before any JAX call: which way, from flags and the environment.

`python -m remem_jax.main` (and `remem_jax.analyze`) run the same command on every host. Before
anything touches JAX they decide, with `plan`, how this process joins the others:

  * explicit: a coordinator address, a process count and a process id, from the flags
    `--coordinator_address`, `--num_processes`, `--process_id` or, for any not given, the
    environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`
    (a plain launch on machines of your own). All three are needed; a part of them is an error.
  * automatic: `jax.distributed.initialize()` with no arguments, where JAX detects the cluster:
    a Cloud TPU VM (one host of a pod slice, or a single host), a SLURM step of several tasks
    (`srun`), an Open MPI job of several ranks (`mpirun`).
  * off: one process (nothing of the above), or `--distributed=off`.

`initialize` carries the plan out and returns the line the run logs. A process that loses its
peers (killed, crashed, preempted) stops within `--heartbeat_timeout_s` seconds: the runtime's
heartbeats detect it, and a collective with a dead peer fails at once; see `peer_loss_message`.
"""
from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
from typing import Mapping, Optional

from remem_jax import errors

MODES = ("auto", "off")
ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"
# Exit status of a process that stopped because another process of its run was lost.
PEER_LOST_EXIT = 3

# Words of the errors XLA, gloo, NCCL and the coordination service raise when a peer is gone.
_PEER_LOSS = re.compile(r"gloo|nccl|coordination service|heartbeat|connection (closed|reset|refused)|"
                        r"unavailable|barrier|deadline_exceeded|socket closed|failed to connect", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins the run.

    Attributes:
      mode: 'explicit', 'automatic' or 'off'.
      why: what decided it (e.g. 'SLURM step of 4 tasks', 'flags', '--distributed=off').
      coordinator_address, num_processes, process_id: the explicit mode's arguments, else None.
      local_device_ids: the GPUs this process drives (automatic mode with one task per node: all
        the node's visible GPUs, where JAX would give a SLURM or Open MPI task one); None: JAX's choice.
    """
    mode: str
    why: str
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[tuple[int, ...]] = None


def _int(value, source: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise errors.UserError(f"{source}={value!r} is not an integer.") from None


def detect_cluster(env: Mapping[str, str], tpu_chips: int) -> Optional[str]:
    """The cluster that `jax.distributed.initialize()` would detect here with several processes, or None.

    Args:
      env: the environment (os.environ).
      tpu_chips: TPU chips attached to this machine (`tpu_chip_count()`).
    """
    def count(name):
        try:
            return int(env.get(name, "1"))
        except ValueError:
            return 1
    if tpu_chips > 0:
        return f"Cloud TPU VM with {tpu_chips} chips"
    if "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env and count("SLURM_NTASKS") > 1:
        return f"SLURM step of {count('SLURM_NTASKS')} tasks"
    if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
        return f"Open MPI job of {count('OMPI_COMM_WORLD_SIZE')} ranks"
    return None


def node_gpus(env: Mapping[str, str]) -> Optional[tuple[int, ...]]:
    """For a SLURM step or Open MPI job with one task per node: every GPU the task sees
    (CUDA_VISIBLE_DEVICES, as the process numbers them); else None (JAX's default, one GPU per task)."""
    def number(name):
        try:
            return int(env[name])
        except (KeyError, ValueError):
            return None
    if "SLURM_JOB_ID" in env:
        tasks, nodes = number("SLURM_NTASKS"), number("SLURM_STEP_NUM_NODES") or number("SLURM_NNODES")
        one_per_node = tasks is not None and tasks == nodes
    else:
        one_per_node = number("OMPI_COMM_WORLD_LOCAL_SIZE") == 1
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return tuple(range(len(visible))) if one_per_node and visible else None


def plan(mode: str = "auto", coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
         process_id: Optional[int] = None, *, env: Mapping[str, str], tpu_chips: int = 0) -> Plan:
    """Decides how this process joins the run (pure: reads only its arguments).

    Args:
      mode: 'auto' (explicit if any of the three values is given, else automatic on a detected
        cluster, else off) or 'off' (one process, whatever the environment says).
      coordinator_address, num_processes, process_id: from the flags (None: not given); each one
        not given is read from `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`.
      env: the environment.
      tpu_chips: TPU chips on this machine.

    Raises:
      UserError: an unknown mode, values that are not integers or out of range, or a half-given
        explicit set (e.g. a process count without a coordinator): without this a process would
        wait for peers that never come.
    """
    if mode not in MODES:
        raise errors.UserError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}.")
    given = {}
    for name, value, env_name in (("coordinator_address", coordinator_address, ENV_ADDRESS),
                                  ("num_processes", num_processes, ENV_COUNT), ("process_id", process_id, ENV_ID)):
        if value not in (None, ""):
            given[name] = (value, f"--{name}")
        elif env.get(env_name, "") != "":
            given[name] = (env[env_name], env_name)
    if mode == "off":
        flagged = [source for _, source in given.values() if source.startswith("--")]
        if flagged:  # (the environment variables are ignored: off overrides them)
            named = ", ".join(flagged)
            raise errors.UserError(f"--distributed=off, but {named} asks for a multi-process run; drop one or the "
                                   "other.")
        return Plan("off", "--distributed=off")
    if not given:
        cluster = detect_cluster(env, tpu_chips)
        if cluster:
            gpus = None if tpu_chips else node_gpus(env)
            return Plan("automatic", cluster + (f", one task per node driving its {len(gpus)} GPUs" if gpus else ""),
                        local_device_ids=gpus)
        return Plan("off", "one process: no coordinator given and no TPU pod, SLURM step or Open MPI job detected")
    missing = [f"--{name} (or {env_name})" for name, env_name in (
        ("coordinator_address", ENV_ADDRESS), ("num_processes", ENV_COUNT), ("process_id", ENV_ID))
        if name not in given]
    if missing:
        have = ", ".join(f"{source}={value}" for value, source in given.values())
        raise errors.UserError(f"A multi-process run needs a coordinator address, a process count and a process id: "
                               f"{have} {'is' if len(given) == 1 else 'are'} set but {' and '.join(missing)} "
                               f"{'is' if len(missing) == 1 else 'are'} not. Give all three on every process "
                               "(or none, on a TPU pod, a SLURM step or an Open MPI job).")
    (address, _), (count, count_source), (pid, pid_source) = (
        given[name] for name in ("coordinator_address", "num_processes", "process_id"))
    count, pid = _int(count, count_source), _int(pid, pid_source)
    if not re.fullmatch(r"\S+:\d+", str(address)):
        raise errors.UserError(f"The coordinator address must be HOST:PORT (process 0's host, a free port), got "
                               f"{address!r}.")
    if count < 1:
        raise errors.UserError(f"The process count must be at least 1, got {count}.")
    if not 0 <= pid < count:
        raise errors.UserError(f"The process id must be in [0, {count}) for {count} processes, got {pid}.")
    sources = sorted({source.startswith("--") and "flags" or "environment" for _, source in given.values()})
    return Plan("explicit", " and ".join(sources), str(address), count, pid)


def tpu_chip_count() -> int:
    """TPU chips attached to this machine (from its PCI devices; no JAX backend is started)."""
    try:
        from jax._src import hardware_utils
        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except Exception:  # noqa: BLE001 - a JAX without this helper: count accelerator device files
        return len([d for d in os.listdir("/dev") if re.fullmatch(r"accel\d+", d)]) if os.path.isdir("/dev") else 0


def initialize(the_plan: Plan, *, timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> str:
    """Carries out `the_plan` (before any other JAX call); returns the line to log.

    Args:
      the_plan: from `plan`.
      timeout_s: how long to wait for every process to join (then an error, not a hang).
      heartbeat_timeout_s: a process whose heartbeats stop this long is declared dead, and the
        others stop.

    Raises:
      UserError: process i > 0 found no coordinator within `timeout_s`, or JAX refused to start.
        (Process 0, whose peers do not all arrive within `timeout_s`, is ended by jaxlib itself
        with a fatal 'DEADLINE_EXCEEDED' error: bounded, but not an exception.)
    """
    import jax

    if the_plan.mode == "off":
        return f"Distributed runtime: off ({the_plan.why})."
    # Collectives between the CPU devices of different processes go over TCP with gloo (jax 0.10's
    # default, explicit here); the setting does not touch GPU or TPU collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=int(timeout_s), heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    if the_plan.local_device_ids is not None:
        kwargs.update(local_device_ids=list(the_plan.local_device_ids))
    if the_plan.mode == "explicit":
        kwargs.update(coordinator_address=the_plan.coordinator_address, num_processes=the_plan.num_processes,
                      process_id=the_plan.process_id)
    if the_plan.mode == "explicit" and the_plan.process_id != 0:
        # An unreachable coordinator ends jaxlib's connect with a fatal C++ error, not an exception.
        wait_for_coordinator(the_plan.coordinator_address, timeout_s)
    from absl import logging
    logging.info("Joining the distributed run (%s%s); waiting up to %d s for every process.", the_plan.mode,
                 f": coordinator {the_plan.coordinator_address}, process {the_plan.process_id} of "
                 f"{the_plan.num_processes}" if the_plan.mode == "explicit" else f": {the_plan.why}", timeout_s)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - XLA raises its own types for a coordinator that never answers
        where = (f"coordinator {the_plan.coordinator_address}, process {the_plan.process_id} of "
                 f"{the_plan.num_processes}" if the_plan.mode == "explicit" else the_plan.why)
        raise errors.UserError(f"Could not join the distributed run ({where}) within {timeout_s} s: "
                               f"{' '.join(str(e).split())[:300]}. Start the same command on every process; "
                               "process 0 must be reachable at the coordinator address.") from e
    if jax.process_count() > 1:
        # The first cross-process collective sets up the CPU collectives' communicator, whose
        # rendezvous gives up when the processes arrive more than 30 s apart (jaxlib 0.10.2): do
        # it now, while they are in step, not after minutes of start-up checks on a loaded host.
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("remem_jax: distributed runtime up")
    return (f"Distributed runtime: {the_plan.mode} ({the_plan.why}): process {jax.process_index()} of "
            f"{jax.process_count()}, {jax.local_device_count()} local of {jax.device_count()} devices.")


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Waits until something listens at `address` (HOST:PORT), at most `timeout_s` seconds.

    Raises:
      UserError: nothing answered in time (process 0 not started, a wrong address, a firewall).
    """
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                raise errors.UserError(
                    f"The coordinator {address} did not answer within {timeout_s} s ({e.strerror or e}): start "
                    "process 0 with the same --coordinator_address, check the host and port (process 0's host, "
                    "reachable from this one), or raise --distributed_timeout_s.") from None
            time.sleep(0.5)


def is_multiprocess() -> bool:
    """Whether this process is one of several joined by the distributed runtime (no backend is started)."""
    import jax
    return jax.distributed.is_initialized() and jax.process_count() > 1


def peer_loss_message(error: BaseException) -> Optional[str]:
    """The one-line message for `error` if it says that another process of the run was lost, else None."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    if not _PEER_LOSS.search(text):
        return None
    import jax
    return (f"process {jax.process_index()} of {jax.process_count()} lost contact with the other processes of this "
            f"run (another one was killed, crashed or was preempted; its log says why): {text[:300]}. The workdir "
            "is resumable: start every process again with the same command.")


def agree(error: Optional[BaseException]) -> None:
    """Makes a step that may fail on some processes only (e.g. taking the workdir's lock) fail on all.

    Every process calls it with its own outcome (None: success). If any failed, every process
    raises: its own error, or a `UserError` naming the processes that failed; so no process goes
    on to wait at a collective for one that has stopped. One process: raises `error` if given.
    """
    if not is_multiprocess():
        if error is not None:
            raise error
        return
    import numpy as np
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.array([error is not None], np.int32))).ravel()
    if error is not None:
        raise error
    if failed.any():
        raise errors.UserError(f"process {', '.join(str(i) for i in np.flatnonzero(failed))} stopped at start-up "
                               "(its log says why); every process of the run stops.")
