"""The embedded default end to end at a reduced step count: pretrain -> ReMem/vanilla -> students."""
import json
import math
import os

from configs import digits
from remem_jax import main
from tests import helpers

CHANCE = 0.1


def reduced_config():
    c = digits.get_config()
    c.data.image_size = 16
    c.pretrain.update(dict(num_layers=2, steps=150, batch_size=32, lr=3e-3, warmup_steps=10,
                           checkpoint_every=150, log_every=50))
    c.finetune.update(dict(steps=20, keep_steps=(10, 20), batch_size=32, warmup_steps=2, eval_every=0,
                           checkpoint_every=20, log_every=10))
    c.distill.update(dict(steps=40, batch_size=16, warmup_steps=2, checkpoint_every=40, log_every=20,
                          lr=0.05, teachers="last", export_formats=("stablehlo",)))  # tests/test_export.py: all
    return c


def test_digits_pipeline_end_to_end(tmp_path):
    results = helpers.run_in_fresh_process("tests.test_pipeline_digits:reduced_config", tmp_path)  # two devices: 3x faster

    pretrain_acc = results["pretrain_teacher"]["eval"]["top1"]
    assert pretrain_acc > 3 * CHANCE, "a ViT trained on digits must beat chance well above noise"
    for setting in ("remem", "vanilla"):
        kept = results["finetune_teacher"][setting]["kept"]
        assert [k["step"] for k in kept] == [10, 20]
        assert all(os.path.exists(k["checkpoint"]) for k in kept)
        assert kept[-1]["top1"] > 3 * CHANCE, (setting, kept[-1])  # the fine-tuned teacher
    assert results["finetune_teacher"]["remem"]["sam_rho"] == 0.5
    assert results["finetune_teacher"]["vanilla"]["sam_rho"] == 0.0

    rows = results["distill_student"]["rows"]
    assert [r["name"] for r in rows] == ["remem_step20", "vanilla_step20", "scratch"]
    for row in rows:
        assert row["student_eval"]["num_examples"] == 450  # every eval example, exactly once
        assert row["student_eval"]["top1"] > 3 * CHANCE, row
    table = open(tmp_path / "results.md").read()
    assert "| remem | 20 |" in table and "Best student:" in table and "selected on the eval (test) split" in table
    # Every accuracy of every stage's table carries its binomial standard error (by hand: sqrt(p (1 - p) / n)).
    scratch = rows[-1]["student_eval"]
    se = math.sqrt(scratch["top1"] * (1 - scratch["top1"]) / 450)
    assert f"| scratch | - | - | resnet18 | scratch | {100 * scratch['top1']:.2f} ± {100 * se:.2f} |" in table
    teacher = results["finetune_teacher"]["remem"]["kept"][-1]
    assert f"{100 * teacher['top1']:.2f} ± {100 * math.sqrt(teacher['top1'] * (1 - teacher['top1']) / 450):.2f}" in table
    assert table.count("Data: digits, 10 classes; trained on the whole train split (1,347 images); "
                       "evaluated on test (450 images).") == 3  # pretrain, finetune, distill
    assert os.path.exists(tmp_path / "best_student" / "student.npz")
    assert json.load(open(tmp_path / "best_student" / "verification.json"))["formats"]["stablehlo"]["passed"]
    on_disk = json.load(open(tmp_path / "results.json"))
    assert set(on_disk) >= {"config", "pretrain_teacher", "finetune_teacher", "distill_student"}

    # A second run finds everything done and repeats nothing.
    again = main.run(reduced_config(), str(tmp_path))
    assert again["distill_student"]["rows"] == rows
