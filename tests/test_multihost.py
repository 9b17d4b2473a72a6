"""Multi-host for real, as a user starts it: `python -m remem_jax.main` as two processes on this machine.

Every run is the command itself on tests/multihost_config.py (the digits pipeline
pretrain_teacher -> finetune_teacher -> distill_student with mixup, shrunk to seconds):

  * the reference: one process with 2 CPU devices (--xla_force_host_platform_device_count=2);
  * a real two-host run: 2 processes with 1 CPU device each, joined through the command's
    --coordinator_address=127.0.0.1:P --num_processes=2 --process_id=I (gloo CPU collectives),
    sharing ONE workdir as the hosts of a pod share a file system. Process 0 commits each file of
    that workdir half a second late (a slow shared file system), so that a host reading a file
    before process 0 has written it fails every time;
  * a killed two-host run: the same, with process 0 killed (kill -9) once the pretraining has
    written its first checkpoint; then both processes are started again.

Checks:
  1. The two-host run reproduces the one-host run bit for bit: results.json (every accuracy,
     loss and eval count), what process 1 computed (its logged eval and loss lines equal process
     0's: metrics are summed across hosts, not per host), every exported npz (pretrained teacher,
     kept teachers, student, best student) compared array by array, bytes included, and every
     orbax train-state checkpoint (compared by what it restores to: tensorstore names its chunk
     files at random). The pipeline makes this possible: each device sees the same examples
     whatever the number of hosts, mixup pairs examples across the hosts' parts of a batch
     (remem_jax/data/pipeline.py), and a psum/pmean over two devices adds the same two numbers
     whichever process holds them. All runs use the same XLA flags (LLVM optimisation level 0, to
     halve compile time), so no tolerance is needed.
  2. Only process 0 wrote: each two-host process runs under `strace -f`, which records at the
     system-call level every file-mutating call (open for writing, creat, rename, mkdir, unlink,
     rmdir, link, symlink, truncate) of the process and all its threads and children, whichever
     code makes it: Python (npz files), TensorFlow's C++ gfile (JSON files, TensorBoard events) or
     tensorstore's C++ (orbax arrays). Process 1 must not have attempted a single one on a path in
     the workdir, and, so that this cannot pass because the tracer missed something, every file
     in the workdir must appear in process 0's trace as created by a successful call.
     Where strace is missing or cannot trace, check 2 is skipped and says why.
  3. When process 0 is killed (once the pretraining has written its step-2 checkpoint), process 1
     ends within KILL_BOUND_S, not a hang: with the one-line error of a lost peer (exit 3) when
     the loss shows in a collective, or, anywhere else, ended by JAX's runtime when process 0's
     heartbeats stop (--heartbeat_timeout_s); never with a Python traceback. Started again, both
     resume from the checkpoint (the log says so) to the reference's results and files, bit for bit.

The runs share a persistent XLA compilation cache (tests/conftest.py): the killed and resumed
runs compile the very programs of the clean two-host run, so they cost little more than running.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "tests/multihost_config.py"
TIMEOUT_S = 540  # the three runs together; about 2 minutes on 2 idle cores
HEARTBEAT_S = 20  # --heartbeat_timeout_s of the killed run (a loaded CI machine must not miss one by chance)
KILL_BOUND_S = 60  # a survivor must end this soon after its peer is killed (heartbeat timeout, with room)
KILL_POINT = "pretrain/checkpoints/2/commit_success.txt"  # early: the killed run's work is redone
XLA_SPEED = "--xla_backend_optimization_level=0"

# File-mutating system calls; '?' lets strace skip names this architecture lacks (open, mkdir...).
MUTATING = ("open", "openat", "openat2", "creat", "rename", "renameat", "renameat2", "mkdir", "mkdirat",
            "unlink", "unlinkat", "rmdir", "link", "linkat", "symlink", "symlinkat", "truncate", "ftruncate")
WRITE_FLAGS = re.compile(r"\bO_(WRONLY|RDWR|CREAT|TRUNC|APPEND)\b")
EXPECTED_NPZ = {"pretrain/teacher.npz", "finetune/remem/teachers/step_2.npz", "finetune/remem/teachers/step_4.npz",
                "distill/remem_step4/student.npz", "best_student/student.npz"}
SLOW_COMMITS_S = 0.5  # process 0 commits late, so that a host reading too early fails reliably


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _strace_command():
    """The strace command (add `-o LOG`) that records mutating file calls, or (None, why not)."""
    exe = shutil.which("strace")
    if exe is None:
        return None, "strace is not installed"
    base = [exe, "-f", "-qq", "-y", "-s", "4096", "-e", "trace=" + ",".join("?" + n for n in MUTATING)]
    why = ""
    for extra in (["--seccomp-bpf"], []):  # seccomp-bpf: stop only on traced calls (fast)
        probe = subprocess.run(base + extra + ["-o", os.devnull, "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return base + extra, ""
        why = probe.stderr.strip()[-300:]
    return None, f"strace cannot trace here: {why}"


def _child_env(device_count: int, **extra) -> dict:
    """The environment of a run: only this checkout on the path, CPU devices, the shared compilation cache."""
    keep = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_")) or k in keep}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count} {XLA_SPEED}", **extra)
    return env


def _command(workdir, process_id=None, port=None, *extra):
    """`python -m remem_jax.main` on the test config; with `port`, as process `process_id` of two."""
    cmd = [sys.executable, "-m", "remem_jax.main", f"--config={CONFIG}", f"--workdir={workdir}", *extra]
    if port is not None:
        cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={process_id}"]
    return cmd


def _run_all(jobs: dict, timeout_s: float) -> dict:
    """Starts every job at once; kills them all if one fails or time runs out."""
    procs = {}
    for name, (cmd, env, out) in jobs.items():
        with open(f"{out}.stdout", "w") as stdout, open(f"{out}.stderr", "w") as stderr:
            procs[name] = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr,
                                           start_new_session=True)

    def report(why):
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the session of a process this test started
        for p in procs.values():
            p.wait()
        tails = [f"--- {n} (exit {procs[n].returncode}) stderr tail:\n" + open(f"{jobs[n][2]}.stderr").read()[-4000:]
                 for n in procs]
        pytest.fail(why + "\n" + "\n".join(tails))

    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs.values()):
        failed = [n for n, p in procs.items() if p.returncode not in (None, 0)]
        if failed:
            report(f"{failed} failed")
        if time.monotonic() > deadline:
            report(f"timed out after {timeout_s} s")
        time.sleep(0.5)
    failed = [n for n, p in procs.items() if p.returncode != 0]
    if failed:
        report(f"{failed} failed")
    return {n: open(f"{jobs[n][2]}.stderr").read() for n in jobs}


def _log_lines(log: str, pattern: str) -> list[str]:
    """The messages (absl prefix dropped) of the log lines matching `pattern`."""
    return [m.group(1) for m in re.finditer(r"^I\d{4} [\d:.]+ +\d+ [\w.]+:\d+\] (.*)$", log, re.M)
            if re.search(pattern, m.group(1))]


def _computed(log: str) -> list[str]:
    """What a process computed, as it logs it: eval lines and train losses (not speeds)."""
    return [re.sub(r", [\d.]+ img/s.*", "", line) for line in _log_lines(log, r" step \d+(/\d+: loss| eval:)")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multihost")
    single, multi = base / "single", base / "multi"
    port = _free_port()
    traces = {i: base / f"strace_process{i}.txt" for i in range(2)}
    strace, untraced = _strace_command()
    jobs = {"single": (_command(single), _child_env(2), base / "single")}
    for i in range(2):
        prefix = strace + ["-o", str(traces[i])] if strace else []
        slow = dict(REMEM_TEST_SLOW_COMMITS=str(SLOW_COMMITS_S), REMEM_TEST_WORKDIR=str(multi)) if i == 0 else {}
        jobs[f"process{i}"] = (prefix + _command(multi, i, port), _child_env(1, **slow), base / f"process{i}")
    start = time.monotonic()
    logs = _run_all(jobs, TIMEOUT_S)
    print(f"three runs took {time.monotonic() - start:.0f} s (traced: {strace is not None})")
    return dict(single=single, multi=multi, logs=logs, traces=traces, untraced=untraced)


def _normalised(value, workdir):
    """Paths inside a workdir, written relative to it, so that two workdirs compare."""
    return json.loads(json.dumps(value).replace(str(workdir), "<workdir>"))


def _load_npz(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _same_results_and_files(single, multi):
    """results.json, every npz (bytes) and every orbax checkpoint (restored) of `multi` equal `single`'s."""
    want = _normalised(json.load(open(single / "results.json")), single)
    got = _normalised(json.load(open(multi / "results.json")), multi)
    assert got == want
    # The run did what the config asks (so the comparison covers every stage).
    assert [k["step"] for k in want["finetune_teacher"]["remem"]["kept"]] == [2, 4]
    assert [r["name"] for r in want["distill_student"]["rows"]] == ["remem_step4"]
    assert all(r["student_eval"]["num_examples"] == 70 for r in want["distill_student"]["rows"])

    npz = {str(p.relative_to(single)) for p in single.rglob("*.npz")}
    assert npz == {str(p.relative_to(multi)) for p in multi.rglob("*.npz")}
    assert npz >= EXPECTED_NPZ, sorted(npz)
    for name in sorted(npz):
        a, b = _load_npz(single / name), _load_npz(multi / name)
        assert sorted(a) == sorted(b), name
        for key in a:
            assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), (name, key)
            assert a[key].tobytes() == b[key].tobytes(), f"{name}:{key} differs"

    # The orbax train-state checkpoints (params, optimizer state, BatchNorm statistics, PRNG key)
    # too. Their tensorstore chunk files are named at random, so compare what they restore to.
    import orbax.checkpoint as ocp

    steps = sorted(str(p.parent.relative_to(single)) for p in single.rglob("_CHECKPOINT_METADATA"))
    assert steps == sorted(str(p.parent.relative_to(multi)) for p in multi.rglob("_CHECKPOINT_METADATA"))
    assert len(steps) == 5, steps  # pretrain 4, finetune 2 and 4, distill 3, best student
    checkpointer = ocp.PyTreeCheckpointer()
    for step in steps:
        a, b = (jax.tree.flatten_with_path(checkpointer.restore(d / step / "default"))[0] for d in (single, multi))
        assert [k for k, _ in a] == [k for k, _ in b], step
        for (key, x), (_, y) in zip(a, b):
            x, y = np.asarray(x), np.asarray(y)
            assert (x.dtype, x.shape, x.tobytes()) == (y.dtype, y.shape, y.tobytes()), (step, key)


def test_two_processes_reproduce_one_process_bit_for_bit(runs):
    logs = runs["logs"]
    assert _log_lines(logs["single"], "^Distributed runtime: off ")
    assert _log_lines(logs["single"], r"^JAX process 0/1, 2 local devices \(cpu\)")
    for i in range(2):
        assert _log_lines(logs[f"process{i}"], rf"^Distributed runtime: explicit \(flags\): process {i} of 2, "
                          r"1 local of 2 devices\.$"), logs[f"process{i}"][-3000:]
        assert _log_lines(logs[f"process{i}"], r"^Host-count invariant: yes ")
    _same_results_and_files(runs["single"], runs["multi"])
    # Process 1 computed what process 0 and the one-host run did (it writes nothing, it logs).
    computed = _computed(logs["single"])
    assert len(computed) >= 8 and any("distill/remem_step4 step 3 eval" in line for line in computed), computed
    assert _computed(logs["process0"]) == _computed(logs["process1"]) == computed


def _events(trace_path):
    """(pid, syscall, [resolved paths], call text, succeeded) of each call in an strace -f -y log."""
    pending, events = {}, []
    for line in open(trace_path):
        line = line.rstrip("\n")
        m = re.match(r"(\d+)\s+(.*)", line)
        if not m:
            continue
        pid, text = m.groups()
        if text.endswith("<unfinished ...>"):
            pending[pid] = text[: -len("<unfinished ...>")]
            continue
        resumed = re.match(r"<\.\.\. \w+ resumed>(.*)", text)
        if resumed:
            text = pending.pop(pid, "") + resumed.group(1)
        call = re.match(r"(\w+)\((.*)\)\s+=\s+(-?\d+|\?)", text)  # '?': interrupted
        if not call:
            continue
        name, args, ret = call.groups()
        paths, directory = [], REPO
        for tok in re.finditer(r'<([^<>]*)>|"((?:[^"\\]|\\.)*)"', args):
            if tok.group(1) is not None:
                directory = tok.group(1)
                if name == "ftruncate" and not paths:
                    paths.append(directory)
            else:
                paths.append(os.path.normpath(os.path.join(directory, tok.group(2))))
        events.append((pid, name, paths, args, ret != "?" and int(ret) >= 0))
    return events


def _mutates(name, args):
    return not name.startswith("open") or WRITE_FLAGS.search(args) is not None


def _inside(path, root):
    return any(path == r or path.startswith(r + os.sep) for r in {root, os.path.realpath(root)})


def test_only_process_0_writes_the_shared_workdir(runs):
    if runs["untraced"]:
        pytest.skip(runs["untraced"])
    root = str(runs["multi"])
    by_process = [[e for e in _events(runs["traces"][i]) if _mutates(e[1], e[3])
                   and any(_inside(p, root) for p in e[2])] for i in range(2)]
    assert not by_process[1], f"process 1 made {len(by_process[1])} file-mutating calls in the workdir:\n" + "\n".join(
        f"{name}({args})" for _, name, _, args, _ in by_process[1][:20])
    # The tracer saw the writes: replaying process 0's calls accounts for every file that is there
    # (orbax writes a step into a temporary directory and renames the directory).
    live = set()
    for _, name, paths, _, ok in by_process[0]:
        if not ok:
            continue
        if name.startswith(("open", "creat", "link", "symlink")):
            live.add(paths[-1])
        elif name.startswith("rename"):
            src, dst = paths[-2], paths[-1]
            moved = {p for p in live if _inside(p, src)}
            live = (live - moved) | {dst + p[len(src):] for p in moved}
        elif name.startswith("unlink"):
            live.discard(paths[-1])
    files = sorted(str(p) for p in runs["multi"].rglob("*") if p.is_file())
    assert len(files) > 20 and any("/checkpoints/" in f for f in files)
    missing = [f for f in files if f not in live]
    assert not missing, f"files in the workdir that process 0's trace does not show created: {missing[:10]}"


@pytest.fixture(scope="module")
def killed(runs, tmp_path_factory):
    """A two-host run whose process 0 is killed mid fine-tuning, then both processes started again.

    Runs after `runs` (whose clean two-host run filled the compilation cache with these programs).
    """
    base = tmp_path_factory.mktemp("killed")
    workdir = base / "workdir"
    port = _free_port()
    procs, outs = [], []
    for i in range(2):
        out = open(base / f"process{i}.stderr", "w")
        procs.append(subprocess.Popen(_command(workdir, i, port, f"--heartbeat_timeout_s={HEARTBEAT_S}"), cwd=REPO,
                                      env=_child_env(1), stdout=subprocess.DEVNULL, stderr=out, start_new_session=True))
        outs.append(out)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (workdir / KILL_POINT).exists():
            assert all(p.poll() is None for p in procs), "a process ended before the kill point"
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.1)
        os.killpg(procs[0].pid, signal.SIGKILL)  # the session of a process this test started
        killed_at = time.monotonic()
        try:
            procs[1].wait(timeout=KILL_BOUND_S)
        except subprocess.TimeoutExpired:
            pass
        survivor_s = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        for out in outs:
            out.close()
    survivor = dict(returncode=procs[1].returncode, seconds=survivor_s,
                    stderr=open(base / "process1.stderr").read())
    finished_before_restart = (workdir / "distill" / "results.json").exists()
    port = _free_port()
    jobs = {f"restart{i}": (_command(workdir, i, port), _child_env(1), base / f"restart{i}") for i in range(2)}
    logs = _run_all(jobs, TIMEOUT_S)
    print(f"survivor ended {survivor_s:.1f} s after the kill (exit {survivor['returncode']})")
    return dict(workdir=workdir, survivor=survivor, logs=logs, finished_before_restart=finished_before_restart)


def test_a_killed_process_stops_the_other_and_a_restart_resumes(killed, runs):
    survivor = killed["survivor"]
    assert survivor["returncode"] is not None, f"process 1 still ran {KILL_BOUND_S} s after process 0 was killed"
    assert survivor["seconds"] < KILL_BOUND_S
    errors = [line for line in survivor["stderr"].splitlines() if line.startswith("remem_jax: error:")]
    assert "Traceback (most recent call last)" not in survivor["stderr"], survivor["stderr"][-3000:]
    # In a collective (a train step, a barrier) the loss shows at once and the command says so in one line;
    # anywhere else the runtime's heartbeats catch it and JAX ends the process with its own message.
    if survivor["returncode"] == 3:
        assert len(errors) == 1 and "process 1 of 2 lost contact with the other processes" in errors[0], errors
        assert "start every process again with the same command" in errors[0]
    else:
        assert "Terminating process because the JAX distributed service detected fatal errors" in survivor["stderr"], (
            survivor["returncode"], survivor["stderr"][-3000:])
    print(f"survivor: exit {survivor['returncode']} after {survivor['seconds']:.1f} s")
    # Started again, both processes resume from the checkpoints (pretraining's, or, if it finished before
    # the kill landed, what came after it) ...
    assert not killed["finished_before_restart"]
    for i in range(2):
        log = killed["logs"][f"restart{i}"]
        assert _log_lines(log, r"^(pretrain: resuming from step [24] in |pretrain: complete in )"), log[-3000:]
    # ... to exactly the uninterrupted results and files.
    _same_results_and_files(runs["single"], killed["workdir"])
