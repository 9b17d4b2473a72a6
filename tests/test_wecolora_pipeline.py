"""configs/wecolora_digits.py end to end at a reduced size: pretrain -> fewshot_distill (4 variants) -> linear_probe."""
import json
import os

import numpy as np

from configs import wecolora_digits
from remem_jax import checkpoints, main
from tests import helpers

CHANCE = 0.1
VARIANTS = ["wecolora", "lora_qv", "weco_kd", "scratch_kd"]


def reduced_config():
    c = wecolora_digits.get_config()
    c.data.image_size = 16
    c.pretrain.update(dict(num_layers=2, steps=100, batch_size=32, lr=3e-3, warmup_steps=10, checkpoint_every=0,
                           log_every=50))
    c.wecolora.update(dict(lora_rank=4, epochs=3, warmup_epochs=1, batch_size=32, log_every=6))
    c.linear_probe.update(dict(epochs=5, warmup_epochs=1, batch_size=64, blr=4.0, log_every=100))
    return c


def test_wecolora_digits_end_to_end(tmp_path):
    results = helpers.run_in_fresh_process("tests.test_wecolora_pipeline:reduced_config", tmp_path)  # two devices: 3x faster

    distilled = {r["variant"]: r for r in results["fewshot_distill"]["rows"]}
    assert list(distilled) == VARIANTS
    assert results["fewshot_distill"]["teacher_blocks"] == 2
    for name, row in distilled.items():
        assert row["student_blocks"] == 1, row
        model, _ = checkpoints.load_augreg(row["student_checkpoint"])  # a plain AugReg npz, LoRA merged
        assert model.num_layers == 1
    w = distilled["wecolora"]
    assert w["l1_final"] < w["l1_initial"], w
    assert w["trainable_params"] == 4 * (4 * 2 * 192 + 2 * (192 + 768))  # 1 block, rank 4, Ti width

    rows = {r["name"]: r for r in results["linear_probe"]["rows"]}
    assert list(rows) == ["teacher", "weight_copy", "random_init"] + VARIANTS
    for name, row in rows.items():
        assert row["final"]["num_examples"] == 450, name  # every eval image, once
        assert row["max_over_epochs"]["top1"] >= row["final"]["top1"]
        # Even the random ViT's features are far above chance on digits: why the table needs that row.
        assert row["final"]["top1"] > 2 * CHANCE, (name, row["final"])
    teacher = rows["teacher"]["final"]
    table = open(tmp_path / "results.md").read()
    assert "| wecolora | 2 | 1 | 4 |" in table and "max over epochs" in table
    se = np.sqrt(teacher["top1"] * (1 - teacher["top1"]) / 450)  # binomial, by hand
    assert f"| {100 * teacher['top1']:.2f} ± {100 * se:.2f} |" in table

    # What each stage trained on: the teacher on all 1,347 train digits, the students on the 10% subset.
    assert results["pretrain_teacher"]["data"]["train"]["examples"] == 1347
    assert results["fewshot_distill"]["data"]["train"]["examples"] == w["few_shot_examples"] == 130  # 10% of each class
    assert results["linear_probe"]["data"]["train"]["examples"] == 1347
    assert results["pretrain_teacher"]["data"]["eval"] == {"split": "test", "examples": 450}
    assert "Data: digits, 10 classes; trained on the whole train split (1,347 images)" in table
    on_disk = json.load(open(tmp_path / "linear_probe" / "results.json"))
    assert [r["name"] for r in on_disk["rows"]] == list(rows)

    again = main.run(reduced_config(), str(tmp_path))  # everything complete: nothing is redone
    assert again["linear_probe"]["rows"] == results["linear_probe"]["rows"]
    assert os.path.exists(tmp_path / "fewshot_distill" / "wecolora" / "student.npz")
