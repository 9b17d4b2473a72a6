"""configs/tinymim_digits.py end to end at a reduced size: pretrain -> every distillation row -> fine-tunes."""
import json

import numpy as np

from configs import tinymim_digits
from remem_jax import checkpoints, main


def reduced_config():
    c = tinymim_digits.get_config()
    c.data.image_size = 16  # 2 x 2 patches of 8 px
    c.pretrain.update(dict(num_layers=2, steps=4, batch_size=16, warmup_steps=1, checkpoint_every=4, log_every=4))
    c.tinymim.update(dict(num_layers=1, steps=6, batch_size=16, lr=3e-3, warmup_steps=0, eval_batches=1,
                          checkpoint_every=6, log_every=6))
    c.student_finetune.update(dict(steps=2, batch_size=16, warmup_steps=0, checkpoint_every=2, log_every=2))
    return c


def test_tinymim_digits_end_to_end(tmp_path):
    results = main.run(reduced_config(), str(tmp_path / "run"))
    runs = results["relation_distill"]["runs"]
    # Teacher 2 blocks, student 1: the default relation block is floor(0.75 * 2) = 1, then the last.
    assert [r["name"] for r in runs] == ["relation_block1", "relation_block2", "cls", "feature"]
    for r in runs:
        assert r["final"]["distill_loss"] < r["initial"]["distill_loss"], r["name"]
        model, _ = checkpoints.load_augreg(r["student_checkpoint"], num_classes=10)
        assert (model.num_layers, model.num_heads, model.last_block_heads) == (1, 3, None)  # the last block: teacher heads
    assert not runs[0]["paper_only"] and runs[2]["paper_only"] and runs[3]["paper_only"]

    rows = results["finetune_student"]["rows"]
    # The pretrained teacher classifies the digits: its own accuracy leads the table.
    assert [r["name"] for r in rows] == ["teacher", "relation_block1", "relation_block2", "cls", "feature", "scratch"]
    pretrain_eval = results["pretrain_teacher"]["eval"]
    np.testing.assert_allclose(rows[0]["finetune"]["top1"], pretrain_eval["top1"], atol=1e-6)  # the same model, evaluated again
    for r in rows:
        assert r["finetune"]["num_examples"] == 450 and np.isfinite(r["finetune"]["top1"])
    table = open(tmp_path / "run" / "results.md").read()
    assert "| relation_block1 | relation | 1 of 2 |" in table and "| scratch |" in table
    assert f"| teacher | - (the frozen teacher itself, not fine-tuned) | - | - | {100 * pretrain_eval['top1']:.2f} ± " in table
    assert results["finetune_student"]["data"]["train"]["examples"] == 1347
    assert "paper's description, not released code" in table
    assert set(json.load(open(tmp_path / "run" / "results.json"))) >= {"relation_distill", "finetune_student"}

    again = main.run(reduced_config(), str(tmp_path / "run"))  # everything is complete: nothing is redone
    assert again["finetune_student"]["rows"] == rows
