"""configs/analysis_digits.py end to end at reduced size: teachers trained, then every analysis tool."""
import json
import os
import subprocess
import sys

import pytest

from configs import analysis_digits
from remem_jax import analyze, main

PLOTS = ("information_plane.png", "mi_per_layer.png", "expertness.png", "criticality.png", "rollout.png")


def reduced_config():
    """Every stage and tool at its smallest: a 1-block ViT, two kept steps per setting, a few updates."""
    c = analysis_digits.get_config()
    c.data.image_size = 16  # Ti_8 patches: a 2x2 grid
    c.pretrain.update(dict(num_layers=1, steps=20, batch_size=32, lr=3e-3, warmup_steps=2, checkpoint_every=20,
                           log_every=10))
    c.finetune.update(dict(steps=2, keep_steps=(1, 2), batch_size=16, warmup_steps=0, eval_every=0,
                           checkpoint_every=2, log_every=1))
    c.analysis.update(dict(num_images=48, num_train_images=48, batch_size=16, decoder_channels=(8,),
                           decoder_steps=5, decoder_batch_size=16, criticality_images=8, criticality_max_neurons=16,
                           criticality_chunk=16, prune_branches="mlp", prune_max_blocks=1, prune_finetune_steps=1,
                           rollout_images=2))
    return c


def test_analysis_digits_end_to_end(tmp_path):
    results = main.run(analyze.analysis_config(reduced_config()), str(tmp_path))
    out = tmp_path / "analysis"
    summary = results["analyze"]
    labels = [c["label"] for c in summary["checkpoints"]]
    assert labels == ["remem_step1", "remem_step2", "vanilla_step1", "vanilla_step2"]
    for name in PLOTS:
        assert os.path.getsize(out / name) > 0, name
    for tool in ("mi", "expertness", "criticality", "pruning", "rollout"):
        assert set(json.load(open(out / f"{tool}.json"))) <= set(labels), tool
    full = json.load(open(out / "analysis.json"))["results"]
    by_label = {r["label"]: r for r in full}
    # mi_layers='all': the block, then the encoded tokens.
    assert [m["layer"] for m in by_label["remem_step2"]["mi"]] == [0, "encoded"]
    assert [e["block"] for e in by_label["remem_step2"]["expertness"]] == [0]
    assert by_label["remem_step2"]["criticality"][0]["num_neurons"] == 16
    # Pruning only on the last teacher of each setting; k = 0 is the unpruned teacher.
    assert "pruning" not in by_label["remem_step1"] and "pruning" in by_label["remem_step2"]
    rows = by_label["vanilla_step2"]["pruning"]
    assert [(r["branch"], r["k"]) for r in rows] == [("mlp", 0), ("mlp", 1)]
    assert rows[0]["top1"] == by_label["vanilla_step2"]["eval"]["top1"]
    assert rows[1]["finetuned"] and not rows[0]["finetuned"]
    assert by_label["vanilla_step2"]["rollout"]["max_row_sum_error"] < 1e-9
    md = open(out / "analysis.md").read()
    assert "| remem_step2 | encoded |" in md and "Compare only rows of equal feature shape" in md

    # A second run reuses every checkpoint's results.
    again = main.run(analyze.analysis_config(reduced_config()), str(tmp_path))
    assert again["analyze"]["checkpoints"] == summary["checkpoints"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("overrides,message", [
    (["--config.analysis.tools=mi,nope"], "config.analysis.tools must be a comma list of mi, expertness, criticality, "
     "pruning, rollout, got 'mi,nope'"),
    # A non-pipeline config runs `analyze` alone: without kept teachers or checkpoints it says what to pass.
    (["--config.stages=('distill_student',)"], "'analyze' needs the kept teachers (or npz files in "
     "config.analysis.checkpoints) from the 'finetune_teacher' stage, which has not run in this workdir: add"),
    (["--config.stages=('distill_student',)", "--config.analysis.checkpoints=/no/such.npz"],
     "Checkpoint file '/no/such.npz' does not exist"),
])
def test_command_line_mistakes_end_with_one_line(tmp_path, overrides, message):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "remem_jax.analyze", "--config=configs/analysis_digits.py",
           f"--workdir={tmp_path}", *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("remem_jax: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
