"""How a process joins a multi-process run (remem_jax/distributed.py), and the command's start-up errors.

The runs themselves (two processes, a killed one) are in tests/test_multihost.py; here: the
decision from flags and environment (pure), and what a user sees from the command when the
cluster is half-configured, the coordinator never answers, or the hosts do not share the workdir:
one line and exit 2, in bounded time, never a hang.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from remem_jax import distributed, errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_off_when_nothing_says_otherwise():
    p = distributed.plan(env={})
    assert (p.mode, p.coordinator_address) == ("off", None)
    assert "no coordinator given" in p.why
    # A SLURM allocation of one task, or a one-rank mpirun, is one process too.
    assert distributed.plan(env={"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}).mode == "off"
    assert distributed.plan(env={"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}).mode == "off"


@pytest.mark.parametrize("env,tpu_chips,why", [
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-4]", "SLURM_NTASKS": "4"}, 0, "SLURM step of 4 tasks"),
    ({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "2"}, 0, "Open MPI job of 2 ranks"),
    ({}, 4, "Cloud TPU VM with 4 chips"),
])
def test_plan_automatic_on_a_detected_cluster(env, tpu_chips, why):
    p = distributed.plan(env=env, tpu_chips=tpu_chips)
    assert (p.mode, p.why, p.coordinator_address, p.num_processes, p.process_id) == ("automatic", why, None, None, None)
    assert distributed.plan("off", env=env, tpu_chips=tpu_chips).mode == "off"


def test_one_task_per_node_drives_every_gpu_of_its_node():
    """JAX gives each SLURM / Open MPI task one GPU (its local id); with one task per node, all of them."""
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "2",
             "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    p = distributed.plan(env=slurm)
    assert p.local_device_ids == (0, 1, 2, 3) and p.why == "SLURM step of 2 tasks, one task per node driving its 4 GPUs"
    assert distributed.plan(env={**slurm, "SLURM_NTASKS": "8"}).local_device_ids is None  # a task per GPU: JAX's way
    assert distributed.plan(env={k: v for k, v in slurm.items() if k != "CUDA_VISIBLE_DEVICES"}).local_device_ids is None
    ompi = {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
            "CUDA_VISIBLE_DEVICES": "0,1"}
    assert distributed.plan(env=ompi).local_device_ids == (0, 1)


def test_plan_explicit_from_flags_or_environment():
    p = distributed.plan("auto", "10.0.0.1:1234", 2, 1, env={})
    assert (p.mode, p.why, p.coordinator_address, p.num_processes, p.process_id) == (
        "explicit", "flags", "10.0.0.1:1234", 2, 1)
    env = {"JAX_COORDINATOR_ADDRESS": "h0:99", "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": "2"}
    p = distributed.plan(env=env)
    assert (p.why, p.coordinator_address, p.num_processes, p.process_id) == ("environment", "h0:99", 3, 2)
    # A flag wins over its environment variable; explicit wins over a detected cluster.
    p = distributed.plan(process_id=0, env={**env, "SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n", "SLURM_NTASKS": "3"})
    assert (p.mode, p.why, p.process_id) == ("explicit", "environment and flags", 0)
    # off ignores the environment.
    assert distributed.plan("off", env=env).mode == "off"


@pytest.mark.parametrize("args,env,message", [
    (dict(num_processes=2), {}, "--num_processes=2 is set but --coordinator_address (or JAX_COORDINATOR_ADDRESS) and "
     "--process_id (or JAX_PROCESS_ID) are not."),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "--process_id (or JAX_PROCESS_ID) is not."),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), {}, "process id must be in [0, 2)"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), {}, "must be HOST:PORT"),
    ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two' is not an integer."),
    (dict(mode="off", coordinator_address="h:1"), {}, "--distributed=off, but --coordinator_address"),
    (dict(mode="on"), {}, "--distributed must be one of auto, off"),
])
def test_plan_refuses_a_half_configured_cluster(args, env, message):
    with pytest.raises(errors.UserError) as e:
        distributed.plan(**args, env=env)
    assert message in str(e.value)


def test_peer_loss_is_told_from_other_errors():
    lost = RuntimeError("UNKNOWN: Gloo all-reduce failed: [pair.cc:538] Read error [127.0.0.1]:3: Connection reset by "
                        "peer")
    assert "lost contact with the other processes" in distributed.peer_loss_message(lost)
    assert distributed.peer_loss_message(ValueError("shapes (3,) and (4,) do not match")) is None


def _cli(*args, cwd=REPO, **env):
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))},
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    return subprocess.Popen([sys.executable, "-m", "remem_jax.main", "--config=tests/multihost_config.py", *args],
                            cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_error_line(proc, timeout_s):
    start = time.monotonic()
    out, err = proc.communicate(timeout=timeout_s)
    lines = [line for line in err.splitlines() if line.startswith("remem_jax: error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, (proc.returncode, err[-3000:])
    return lines[0], time.monotonic() - start


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_command_half_configured_or_unreachable_coordinator_is_one_line(tmp_path):
    line, _ = _one_error_line(_cli(f"--workdir={tmp_path}", JAX_NUM_PROCESSES="2"), 60)
    assert "JAX_NUM_PROCESSES=2 is set but --coordinator_address (or JAX_COORDINATOR_ADDRESS) and" in line
    # Process 1 of a run whose process 0 never starts: an error after --distributed_timeout_s, not a hang.
    line, seconds = _one_error_line(_cli(f"--workdir={tmp_path}", f"--coordinator_address=127.0.0.1:{_free_port()}",
                                         "--num_processes=2", "--process_id=1", "--distributed_timeout_s=2"), 120)
    assert "did not answer within 2 s" in line and "start process 0" in line


def test_command_start_up_failures_stop_every_process(tmp_path):
    """Two hosts whose --workdir is not one directory (here: two paths; on a cluster, a local disk
    each), and, at the same time, two hosts whose shared workdir is in use (its lock is held by this
    test's process): process 0 alone fails to take the lock, and process 1 stops too, saying so."""
    in_use = tmp_path / "in_use"
    in_use.mkdir()
    (in_use / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "x"}))
    one_device = dict(XLA_FLAGS="--xla_force_host_platform_device_count=1")
    ports = [_free_port(), _free_port()]
    unshared = [_cli(f"--workdir={tmp_path / f'host{i}'}", f"--coordinator_address=127.0.0.1:{ports[0]}",
                     "--num_processes=2", f"--process_id={i}", **one_device) for i in range(2)]
    locked = [_cli(f"--workdir={in_use}", f"--coordinator_address=127.0.0.1:{ports[1]}", "--num_processes=2",
                   f"--process_id={i}", **one_device) for i in range(2)]
    for i, proc in enumerate(unshared):
        line, _ = _one_error_line(proc, 300)
        assert f"--workdir {tmp_path / f'host{i}'} is not the same directory on every process: process 1 does not " \
               "see the lock process 0 holds there" in line
    assert not (tmp_path / "host1").exists()  # process 1 wrote nothing
    line, _ = _one_error_line(locked[0], 300)
    assert f"--workdir {in_use} is in use by process {os.getpid()}" in line
    line, _ = _one_error_line(locked[1], 300)
    assert line == "remem_jax: error: process 0 stopped at start-up (its log says why); every process of the run stops."
