#!/usr/bin/env python3
"""The accelerator check: what differs on a GPU or TPU, in one command of at most ten minutes.

  python scripts/accelerator_check.py                 # on a machine with a GPU or a TPU
  python scripts/accelerator_check.py --dry_run       # on CPU: every step at the smallest size
  timeout 660 python scripts/accelerator_check.py --report=$OUT/accelerator_check.md   # a lent machine

Run from a checkout (it runs the repository's tests). In order, each step within what is left
of `--budget_s` (600 s):

  1. environment: remem_jax's dependencies (`pip install -e .[test]` if they are missing) and the
     accelerator build of jax (`jax[cuda12]` / `jax[tpu]` at the installed jax version, from the
     package registry) if jax does not see the accelerator; no other network. --dry_run installs
     nothing.
  2. the tests that differ on accelerators (TESTS: fused vs written-out attention, bfloat16
     defaults, rematerialisation, donation of the train state, the exported StableHLO executed on
     the default device); --dry_run only collects them (they run on CPU in CI anyway).
  3. the digits pipeline once (`python -m remem_jax.main --config=digits --distributed=off`); its
     table and the best student against DIGITS_TARGET. --dry_run: its first stage, two steps.
  4. `python -m remem_jax.benchmark --preset=gpu_table --peak_tflops=<the device's peak>` (PEAK_TFLOPS,
     or --peak_tflops); its table and targets. --dry_run: one mode of a one-block ViT-Ti at 32 px.

It writes one markdown report (--report; default accelerator_check.md): device, versions, every
step's status, time and figures, each target met or not. The exit status is 1 if any step failed
(a test, a run, the budget); a performance target not met is reported, not a failure.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = (
    "tests/test_fast_paths.py",  # fused (cuDNN) vs written-out attention, 'auto' attention, remat, factored LoRA
    "tests/test_vit.py::test_bfloat16_compute_keeps_float32_params_and_logits",
    "tests/test_students.py::test_bfloat16_compute_keeps_float32_params_and_logits",
    "tests/test_configs.py::test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu",
    "tests/test_benchmark.py::test_remat_gives_the_same_losses",
    "tests/test_sam_step.py::test_pmapped_step_donates_the_state",
    "tests/test_export.py::test_raw_apis_match_flax_at_another_batch_size",  # StableHLO run by raw JAX
)
# Dense bfloat16 TFLOP/s of one device, by a substring of jax's device_kind (vendor data sheets).
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
               ("A10", 125.0), ("V100", 125.0), ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5", 197.0),
               ("TPU v4", 275.0))
DIGITS_TARGET = 0.90  # best student top-1 (the README's 2-core CPU run: 0.9533)
DIGITS_DRY = ("--config.stages=('pretrain_teacher',)", "--config.data.image_size=16",
              "--config.data.digits_source_size=16", "--config.data.validation_percent=5",
              "--config.pretrain.num_layers=1", "--config.pretrain.steps=2", "--config.pretrain.batch_size=8",
              "--config.pretrain.warmup_steps=1")
BENCHMARK_DRY = ("--model=Ti_16", "--num_layers=1", "--image_size=32", "--batch_size=2", "--steps=1",
                 "--warmup=1", "--modes=finetune_plain", "--data_batches=0", "--fit_batch=false")
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "libtpu", "flax", "optax", "orbax-checkpoint", "tensorflow",
            "tensorflow-cpu", "numpy")


@dataclasses.dataclass
class Step:
    """One step of the check: its outcome and what the report shows of it."""
    name: str
    ok: bool
    seconds: float
    summary: str
    detail: str = ""


def _run(cmd, timeout_s: float, env=None, cwd=REPO) -> tuple[int, str, float]:
    """(exit status, stdout + stderr, seconds); exit status 124 when `timeout_s` ran out."""
    start = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=max(1.0, timeout_s))
        return out.returncode, out.stdout + out.stderr, time.monotonic() - start
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return 124, text + f"\n(timed out after {timeout_s:.0f} s)", time.monotonic() - start


def _tail(text: str, lines: int = 25) -> str:
    return "```\n" + "\n".join(text.rstrip().splitlines()[-lines:]) + "\n```"


def accelerator_hardware() -> Optional[str]:
    """'gpu' (an NVIDIA GPU answers nvidia-smi), 'tpu' (TPU device files) or None, without JAX."""
    if shutil.which("nvidia-smi"):
        try:
            if "GPU" in subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout:
                return "gpu"
        except (OSError, subprocess.SubprocessError):
            pass
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return "tpu"
    return None


_PROBE = ("import json, jax; d = jax.devices(); print('DEVICES ' + json.dumps(dict(platform=d[0].platform, "
          "kind=d[0].device_kind, count=len(d), jax=jax.__version__)))")


def probe_devices(env) -> dict:
    """What jax sees in a fresh process: platform, device kind, count, version (or 'error')."""
    rc, out, _ = _run([sys.executable, "-c", _PROBE], 300, env)
    match = re.search(r"^DEVICES (.*)$", out, re.M)
    return json.loads(match.group(1)) if rc == 0 and match else {"error": _tail(out, 10)}


def versions() -> dict:
    """Installed versions of the packages that matter here."""
    from importlib import metadata
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def peak_tflops(kind: str) -> Optional[float]:
    """The dense bfloat16 peak of one device of `kind` (PEAK_TFLOPS), or None if unknown."""
    for key, value in PEAK_TFLOPS:
        if key.lower() in kind.lower():
            return value
    return None


def environment_step(dry_run: bool, hardware: Optional[str], env, timeout_s: float) -> Step:
    """Installs what is missing (not in a dry run) and checks that jax sees the accelerator."""
    start, log = time.monotonic(), []
    if not dry_run and hardware is None:
        return Step("environment", False, 0.0, "no GPU (nvidia-smi) or TPU (/dev/accel*, /dev/vfio) found; on a "
                    "machine without one, run with --dry_run")
    if not dry_run:
        rc, out, _ = _run([sys.executable, "-c", "import remem_jax, flax, optax, tensorflow, pytest"], 300, env)
        if rc != 0:
            rc, out, _ = _run([sys.executable, "-m", "pip", "install", "-q", "-e", ".[test]"], timeout_s, env)
            log.append(f"pip install -e .[test]: exit {rc}")
            if rc != 0:
                return Step("environment", False, time.monotonic() - start, "installing remem_jax failed", _tail(out))
    seen = probe_devices(env)
    if not dry_run and hardware and seen.get("platform") not in (hardware, "cuda"):
        import importlib.metadata as metadata
        jax_version = metadata.version("jax")
        extra = "cuda12" if hardware == "gpu" else "tpu"
        remaining = timeout_s - (time.monotonic() - start)
        rc, out, _ = _run([sys.executable, "-m", "pip", "install", "-q", f"jax[{extra}]=={jax_version}"], remaining, env)
        log.append(f"pip install jax[{extra}]=={jax_version}: exit {rc}")
        if rc != 0:
            return Step("environment", False, time.monotonic() - start, f"installing jax[{extra}] failed", _tail(out))
        seen = probe_devices(env)
    if "error" in seen:
        return Step("environment", False, time.monotonic() - start, "jax does not start", seen["error"])
    want = "cpu" if dry_run else hardware
    ok = seen["platform"] == want or (want == "gpu" and seen["platform"] == "cuda")
    summary = (f"{seen['count']} x {seen['kind']} ({seen['platform']}), jax {seen['jax']}"
               + (f"; {'; '.join(log)}" if log else "") + ("" if ok else f"; expected {want}"))
    return Step("environment", ok, time.monotonic() - start, summary)


def tests_step(dry_run: bool, env, timeout_s: float, out_dir: str) -> Step:
    """Runs TESTS (a dry run collects them) and tabulates each test's outcome and time."""
    junit = os.path.join(out_dir, "tests.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *TESTS]
    if dry_run:
        cmd.insert(4, "--collect-only")
    rc, out, seconds = _run(cmd, timeout_s, env)
    rows = []
    if os.path.exists(junit):
        for case in ElementTree.parse(junit).getroot().iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            outcome = "FAILED" if failed else "skipped" if skipped else "collected" if dry_run else "passed"
            rows.append(f"| `{case.get('classname')}.{case.get('name')}` | {outcome} | {float(case.get('time', 0)):.1f} |")
    collected = len(rows) if not dry_run else len(re.findall(r"^tests/\S+::\S+", out, re.M))
    ok = rc == 0 and collected > 0
    table = "| test | outcome | s |\n|---|---|---|\n" + "\n".join(rows) if rows else ""
    summary = (f"{collected} tests {'collected' if dry_run else 'run'}, exit {rc}")
    return Step("tests", ok, seconds, summary, table + ("" if ok else "\n\n" + _tail(out, 40)))


def digits_step(dry_run: bool, env, timeout_s: float, out_dir: str) -> Step:
    """The digits pipeline once, by the config's name; its table, and the best student against DIGITS_TARGET."""
    workdir = os.path.join(out_dir, "digits")
    cmd = [sys.executable, "-m", "remem_jax.main", "--config=digits", f"--workdir={workdir}", "--distributed=off",
           *(DIGITS_DRY if dry_run else ())]
    rc, out, seconds = _run(cmd, timeout_s, env)
    if rc != 0:
        return Step("digits", False, seconds, f"`{' '.join(cmd[1:4])}` exit {rc}", _tail(out, 40))
    results = json.load(open(os.path.join(workdir, "results.json")))
    table = re.sub(r"^#", "##", open(os.path.join(workdir, "results.md")).read().replace(workdir, "DIR"), flags=re.M)
    best = results.get("distill_student", {}).get("best")
    rows = {r["name"]: r for r in results.get("distill_student", {}).get("rows", [])}
    if best in rows:
        top1 = rows[best]["student_eval"]["top1"]
        target = f"best student {best}: top1 {top1:.4f} >= {DIGITS_TARGET}: {'met' if top1 >= DIGITS_TARGET else 'NOT met'}"
    else:
        top1 = results.get("pretrain_teacher", {}).get("eval", {}).get("top1")
        target = f"no student in this run (pretrain teacher top1 {top1}); target best student >= {DIGITS_TARGET}: not measured"
    return Step("digits", True, seconds, f"{seconds:.0f} s; {target}", table)


def benchmark_step(dry_run: bool, env, timeout_s: float, out_dir: str, peak: Optional[float]) -> Step:
    """`remem_jax.benchmark --preset=gpu_table` with the device's peak; its markdown table and targets."""
    md, js = os.path.join(out_dir, "benchmark_gpu.md"), os.path.join(out_dir, "benchmark_gpu.json")
    cmd = [sys.executable, "-m", "remem_jax.benchmark", "--preset=gpu_table", f"--output={js}", f"--markdown={md}",
           *([f"--peak_tflops={peak:g}"] if peak else []), *(BENCHMARK_DRY if dry_run else ())]
    rc, out, seconds = _run(cmd, timeout_s, env)
    if rc != 0 or not os.path.exists(md):
        return Step("benchmark", False, seconds, f"exit {rc}", _tail(out, 40))
    table = open(md).read()
    targets = re.findall(r"^- target .*$", table, re.M)
    met = sum(t.endswith("-> met") for t in targets)
    return Step("benchmark", True, seconds, f"{met} of {len(targets)} targets met (peak {peak or 'unknown'} TFLOP/s)",
                table)


def report(steps: list[Step], info: dict) -> str:
    """The markdown report."""
    lines = [f"# Accelerator check ({'dry run on CPU' if info['dry_run'] else 'accelerator'})", "",
             f"- when: {info['when']}, host {info['host']}, {info['seconds']:.0f} s of a {info['budget_s']:.0f} s budget",
             f"- device: {info['device']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
             f"- command: `{info['command']}`", "",
             "| step | status | s | summary |", "|---|---|---|---|"]
    lines += [f"| {s.name} | {'ok' if s.ok else 'FAILED'} | {s.seconds:.0f} | {s.summary} |" for s in steps]
    for s in steps:
        if s.detail:
            lines += ["", f"## {s.name}", "", s.detail.strip()]
    verdict = "every step passed" if all(s.ok for s in steps) else \
        "FAILED: " + ", ".join(s.name for s in steps if not s.ok)
    return "\n".join(lines + ["", f"Result: {verdict}.", ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry_run", action="store_true", help="CPU, nothing installed, every step at its smallest")
    parser.add_argument("--report", default=os.path.join(REPO, "accelerator_check.md"))
    parser.add_argument("--budget_s", type=float, default=600.0)
    parser.add_argument("--peak_tflops", type=float, default=None, help="overrides the PEAK_TFLOPS lookup")
    parser.add_argument("--out_dir", default=None, help="where the runs write (default: a temporary folder)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="accelerator_check_")
    os.makedirs(out_dir, exist_ok=True)
    hardware = None if args.dry_run else accelerator_hardware()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_PLATFORMS"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    if args.dry_run:
        env["JAX_PLATFORMS"] = "cpu"

    def left() -> float:
        return args.budget_s - (time.monotonic() - start)

    steps = [environment_step(args.dry_run, hardware, env, min(left(), 300))]
    seen = probe_devices(env) if steps[0].ok else {}
    peak = args.peak_tflops or peak_tflops(seen.get("kind", "")) or (1.0 if args.dry_run else None)
    if steps[0].ok:
        for make in (lambda t: tests_step(args.dry_run, env, t, out_dir),
                     lambda t: digits_step(args.dry_run, env, t, out_dir),
                     lambda t: benchmark_step(args.dry_run, env, t, out_dir, peak)):
            if left() <= 5:
                steps.append(Step("budget", False, 0.0, f"{args.budget_s:.0f} s spent before every step ran"))
                break
            steps.append(make(left()))
    info = dict(dry_run=args.dry_run, when=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                host=platform.node(), seconds=time.monotonic() - start, budget_s=args.budget_s,
                device=(f"{seen['count']} x {seen['kind']} ({seen['platform']})" if "kind" in seen else "unknown")
                + ("" if args.dry_run else f"; hardware found: {hardware or 'none'}"),
                versions=versions(), command=" ".join(["python", os.path.relpath(__file__, REPO), *sys.argv[1:]]))
    with open(args.report, "w") as f:
        f.write(report(steps, info))
    print(f"accelerator check: {'ok' if all(s.ok for s in steps) else 'FAILED'}; report {args.report}")
    return 0 if all(s.ok for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
