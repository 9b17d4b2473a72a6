"""kill -9 at exact points of a run with every stage kind; the rerun's results equal an uninterrupted run's.

One workdir is killed four times in a row, each rerun resuming from what the previous kill left:
right after a kept teacher's checkpoint, between a distilled student's last checkpoint and its
summary (the kill that once made a wrong student 'best'), inside the write of the best student's
serving export, and inside the atomic write of a probe's evaluation history. tests/kill_points.py
runs the same experiment at 20 points (`sweep`).
"""
import signal

from tests import kill_points

FACTORY = "tests.every_stage:quick_config"
POINTS = (
    "checkpoint_saved@finetune/remem/checkpoints/3",
    "commit@distill/remem_step6/summary.json",
    "atomic_rename@best_student/student.stablehlo.bin",
    "atomic_rename@linear_probe/wecolora/eval_history.json",
)


def test_kill_minus_nine_at_exact_points_then_rerun_gives_the_uninterrupted_results(tmp_path):
    reference, workdir = str(tmp_path / "reference"), str(tmp_path / "killed")
    done = kill_points.child(["run", FACTORY, reference])
    assert done.returncode == 0, done.stderr[-3000:]
    for point in POINTS:
        killed = kill_points.child(["kill", FACTORY, workdir, point])
        assert killed.returncode == -signal.SIGKILL, f"{point}: rc {killed.returncode}\n{killed.stderr[-3000:]}"
        event, path = point.split("@")
        assert f"kill_points: SIGKILL at {event} {workdir}/{path}" in killed.stderr, killed.stderr[-3000:]
    rerun = kill_points.child(["run", FACTORY, workdir])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert kill_points.compare(reference, workdir) == []
