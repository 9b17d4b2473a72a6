"""kill -9 a run at exact points, rerun it in the same workdir, and compare with an uninterrupted run.

The points are events, not timed guesses; each is counted in run order within one process:

  checkpoint_saved   right after an orbax train-state checkpoint is written
  atomic_rename      inside `files.atomic_write`: the temporary file is complete, not yet renamed
                     (summary.json, eval_history.json, kept.json, every npz export, results files)
  commit             between a sub-run's last checkpoint and export and its summary (`SubRun.commit`)

  python -m tests.kill_points count  MODULE:FACTORY WORKDIR EVENTS.json   # uninterrupted; lists events
  python -m tests.kill_points kill   MODULE:FACTORY WORKDIR EVENT:N       # dies by SIGKILL at that event
  python -m tests.kill_points kill   MODULE:FACTORY WORKDIR EVENT@PATH[#K] # ... at the K-th one whose path has PATH
  python -m tests.kill_points run    MODULE:FACTORY WORKDIR               # a plain (re)run
  python -m tests.kill_points sweep  MODULE:FACTORY ROOT POINTS           # the whole experiment, a report

`compare(reference, workdir)` is what "identical" means: every npz array by array, results.json,
every results.md and every sub-run's summary.json, with the workdir's path taken out.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

EVENTS = ("checkpoint_saved", "atomic_rename", "commit")
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}$")


def _install(kill_at, log, workdir: str):
    """Wraps the event sites; `kill_at` = (event, n) kills at that event, `log` collects every event.

    A path-based point matches the event's path relative to `workdir`.
    """
    from remem_jax import files
    from remem_jax.train import checkpointing, runs
    counts = dict.fromkeys(EVENTS, 0)

    matches = [0]

    def event(name, path):
        counts[name] += 1
        log.append({"event": name, "n": counts[name], "path": path})
        if kill_at is None or kill_at[0] != name:
            return
        if isinstance(kill_at[1], int):
            hit = kill_at[1] == counts[name]
        else:  # (substring of the path within the workdir, k): the k-th such event
            inside = os.path.relpath(path, workdir)
            matches[0] += kill_at[1][0] in inside
            hit = kill_at[1][0] in inside and matches[0] == kill_at[1][1]
        if hit:
            print(f"kill_points: SIGKILL at {name} {path}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    save = checkpointing.StateCheckpointer.save

    def saved(self, step, state):
        save(self, step, state)
        event("checkpoint_saved", f"{self.directory}/{step}")
    checkpointing.StateCheckpointer.save = saved

    commit = runs.SubRun.commit

    def committing(self, summary, **kwargs):
        event("commit", self.summary_path)
        return commit(self, summary, **kwargs)
    runs.SubRun.commit = committing

    real_replace = os.replace

    class _Os:  # files.atomic_write's `os`, with its rename of a finished temporary file watched
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if _TEMPORARY.search(str(src)):
                event("atomic_rename", str(dst))
            return real_replace(src, dst)
    files.os = _Os()


def parse_point(point: str):
    """'EVENT:N' -> (event, N); 'EVENT@PATH#K' -> (event, (PATH, K)), K defaulting to 1."""
    if "@" in point:
        event, rest = point.split("@", 1)
        path, _, k = rest.partition("#")
        kill_at = (event, (path, int(k or 1)))
    else:
        event, n = point.split(":")
        kill_at = (event, int(n))
    if kill_at[0] not in EVENTS:
        raise ValueError(f"unknown event {kill_at[0]!r}; use one of {EVENTS}")
    return kill_at


def _run(factory: str, workdir: str, kill_at=None, log=None) -> None:
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    module, function = factory.split(":")
    config = getattr(importlib.import_module(module), function)()
    _install(kill_at, log if log is not None else [], os.path.abspath(workdir))
    from remem_jax import main
    main.run(config, workdir)


def child(args, kill_point=None, devices: int = 2, timeout_s: float = 1800) -> subprocess.CompletedProcess:
    """Runs this module as a child process with `devices` fake CPU devices."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
    return subprocess.run([sys.executable, "-m", "tests.kill_points", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


# ----------------------------------------------------------------------------- comparison

def _npz_files(root: str) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), root): os.path.join(d, f)
            for d, _, names in os.walk(root) for f in names if f.endswith(".npz")}


def _named(root: str, name: str) -> dict[str, str]:
    return {os.path.relpath(os.path.join(d, f), root): os.path.join(d, f)
            for d, _, names in os.walk(root) for f in names if f == name}


def compare(reference: str, workdir: str) -> list[str]:
    """The differences between two workdirs' results (empty: identical)."""
    problems = []
    want, got = _npz_files(reference), _npz_files(workdir)
    if set(want) != set(got):
        problems.append(f"npz files differ: {sorted(set(want) ^ set(got))}")
    for name in sorted(set(want) & set(got)):
        with np.load(want[name]) as a, np.load(got[name]) as b:
            if sorted(a) != sorted(b):
                problems.append(f"{name}: keys differ")
                continue
            problems += [f"{name}: {key} differs" for key in a if not np.array_equal(a[key], b[key])]
    # Every table, and every sub-run's summary (evaluation history included).
    for kind in ("results.md", "summary.json"):
        want, got = _named(reference, kind), _named(workdir, kind)
        if set(want) != set(got):
            problems.append(f"{kind} files differ: {sorted(set(want) ^ set(got))}")
        for name in sorted(set(want) & set(got)):
            if open(want[name]).read().replace(reference, "WD") != open(got[name]).read().replace(workdir, "WD"):
                problems.append(f"{name} differs")
    a = open(os.path.join(reference, "results.json")).read().replace(reference, "WD")
    b = open(os.path.join(workdir, "results.json")).read().replace(workdir, "WD")
    if json.loads(a) != json.loads(b):
        problems.append("results.json differs")
    leftovers = [os.path.join(d, f) for d, _, names in os.walk(workdir) for f in names if _TEMPORARY.search(f)]
    if leftovers:
        problems.append(f"temporary files left: {leftovers}")
    return problems


def choose_points(events: list[dict], count: int) -> list[str]:
    """`count` kill points spread over the run: each event kind in proportion, evenly in run order."""
    by_kind = {e: [x for x in events if x["event"] == e] for e in EVENTS}
    share = {"checkpoint_saved": 0.3, "commit": 0.3, "atomic_rename": 0.4}
    points = []
    for kind, items in by_kind.items():
        k = min(len(items), max(1, round(share[kind] * count)))
        picks = np.linspace(0, len(items) - 1, k).round().astype(int) if k > 1 else [len(items) // 2]
        points += [f"{kind}:{items[i]['n']}" for i in sorted(set(int(i) for i in picks))]
    return points[:count]


def sweep(factory: str, root: str, points, *, report=print) -> list[dict]:
    """The reference run, then for each point: a killed run and a rerun in its workdir, compared."""
    reference = os.path.join(root, "reference")
    events_path = os.path.join(root, "events.json")
    start = time.time()
    done = child(["count", factory, reference, events_path])
    assert done.returncode == 0, done.stderr[-3000:]
    report(f"reference run: {time.time() - start:.0f} s")
    events = json.load(open(events_path))
    if isinstance(points, int):
        points = choose_points(events, points)
    rows = []
    for point in points:
        workdir = os.path.join(root, re.sub(r"[^\w.-]", "_", point))
        start = time.time()
        killed = child(["kill", factory, workdir, point])
        if killed.returncode != -signal.SIGKILL:
            rows.append({"point": point, "killed": False, "problems": [f"rc {killed.returncode}",
                                                                       killed.stderr[-2000:]]})
            report(rows[-1])
            continue
        path = next((e["path"] for e in events if f"{e['event']}:{e['n']}" == point), point.partition("@")[2])
        rerun = child(["run", factory, workdir])
        problems = [f"rerun failed: {rerun.stderr[-2000:]}"] if rerun.returncode else compare(reference, workdir)
        died = [line for line in killed.stderr.splitlines() if line.startswith("kill_points: SIGKILL at")]
        rows.append({"point": point, "at": os.path.relpath(path, reference) if path.startswith(reference) else path,
                     "died_at": died[-1][len("kill_points: SIGKILL at "):].replace(workdir, "WD") if died else None,
                     "killed": True, "problems": problems, "seconds": round(time.time() - start)})
        report(rows[-1])
    return rows


def main(argv):
    command, factory, workdir = argv[1:4]
    if command == "count":
        log = []
        _run(factory, workdir, log=log)
        with open(argv[4], "w") as f:
            json.dump(log, f, indent=1)
    elif command == "kill":
        _run(factory, workdir, kill_at=parse_point(argv[4]))
        sys.exit(f"the run finished without reaching {argv[4]}")
    elif command == "run":
        _run(factory, workdir)
    elif command == "sweep":
        points = int(argv[4]) if argv[4].isdigit() else argv[4].split(",")
        rows = sweep(factory, workdir, points, report=lambda r: print(r, flush=True))
        with open(os.path.join(workdir, "sweep.json"), "w") as f:
            json.dump(rows, f, indent=1)
        bad = [r for r in rows if r["problems"] or not r["killed"]]
        print(f"{len(rows) - len(bad)} passed, {len(bad)} failed")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(sys.argv)
