"""scripts/accelerator_check.py's CPU path (--dry_run), end to end, so that it has not rotted when
an accelerator is lent: the environment probe, the test selection (collected: a renamed or removed
test fails it), the digits pipeline by the config's name (its first stage) and the benchmark's
gpu_table preset (one tiny mode), and the report."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import accelerator_check  # noqa: E402


def test_peak_lookup():
    assert accelerator_check.peak_tflops("NVIDIA H200") == 989.0
    assert accelerator_check.peak_tflops("TPU v5 lite") == 197.0
    assert accelerator_check.peak_tflops("cpu") is None


def test_dry_run_on_cpu_writes_the_report(tmp_path):
    report = tmp_path / "report.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "accelerator_check.py"), "--dry_run",
                             f"--report={report}", f"--out_dir={tmp_path / 'out'}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    text = report.read_text()
    assert result.returncode == 0, text + result.stdout[-2000:] + result.stderr[-2000:]
    for step in ("environment", "tests", "digits", "benchmark"):
        assert f"| {step} | ok |" in text, text
    assert "# Accelerator check (dry run on CPU)" in text and "Result: every step passed." in text
    assert "| pretrain_teacher |" not in text and "### pretrain_teacher" in text  # the run's own table, nested
    assert "`python -m remem_jax.benchmark --preset=gpu_table --peak_tflops=1`" in text
    collected = int(re.search(r"^\| tests \| ok \| \d+ \| (\d+) tests collected, exit 0 \|$", text, re.M).group(1))
    assert collected >= len(accelerator_check.TESTS)
