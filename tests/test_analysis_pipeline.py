"""configs/analysis_digits.py end to end at reduced size: teachers trained, then every analysis tool."""
import json
import os

from configs import analysis_digits
from remem_jax import analyze, main

PLOTS = ("information_plane.png", "mi_per_layer.png", "expertness.png", "criticality.png", "rollout.png")


def reduced_config():
    c = analysis_digits.get_config()
    c.data.image_size = 16  # Ti_8 patches: a 2x2 grid
    c.pretrain.update(dict(num_layers=2, steps=60, batch_size=32, lr=3e-3, warmup_steps=5, checkpoint_every=60,
                           log_every=30))
    c.finetune.update(dict(steps=8, keep_steps=(4, 8), batch_size=32, warmup_steps=1, eval_every=0,
                           checkpoint_every=8, log_every=4))
    c.analysis.update(dict(num_images=64, num_train_images=64, batch_size=32, decoder_channels=(8,),
                           decoder_steps=10, decoder_batch_size=32, criticality_images=8, criticality_max_neurons=16,
                           criticality_chunk=8, prune_max_blocks=1, prune_finetune_steps=2, rollout_images=2))
    return c


def test_analysis_digits_end_to_end(tmp_path):
    results = main.run(analyze.analysis_config(reduced_config()), str(tmp_path))
    out = tmp_path / "analysis"
    summary = results["analyze"]
    labels = [c["label"] for c in summary["checkpoints"]]
    assert labels == ["remem_step4", "remem_step8", "vanilla_step4", "vanilla_step8"]
    for name in PLOTS:
        assert os.path.getsize(out / name) > 0, name
    for tool in ("mi", "expertness", "criticality", "pruning", "rollout"):
        assert set(json.load(open(out / f"{tool}.json"))) <= set(labels), tool
    full = json.load(open(out / "analysis.json"))["results"]
    by_label = {r["label"]: r for r in full}
    # mi_layers='all': each of the 2 blocks, then the encoded tokens.
    assert [m["layer"] for m in by_label["remem_step8"]["mi"]] == [0, 1, "encoded"]
    assert [e["block"] for e in by_label["remem_step8"]["expertness"]] == [0, 1]
    # Pruning only on the last teacher of each setting; k = 0 is the unpruned teacher.
    assert "pruning" not in by_label["remem_step4"] and "pruning" in by_label["remem_step8"]
    rows = by_label["vanilla_step8"]["pruning"]
    assert [(r["branch"], r["k"]) for r in rows] == [("attn", 0), ("attn", 1), ("mlp", 0), ("mlp", 1)]
    assert rows[0]["top1"] == by_label["vanilla_step8"]["eval"]["top1"]
    assert rows[1]["finetuned"] and not rows[0]["finetuned"]
    md = open(out / "analysis.md").read()
    assert "| remem_step8 | encoded |" in md and "Compare only rows of equal feature shape" in md

    # A second run reuses every checkpoint's results.
    again = main.run(analyze.analysis_config(reduced_config()), str(tmp_path))
    assert again["analyze"]["checkpoints"] == summary["checkpoints"]
