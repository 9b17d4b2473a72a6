"""What a table stands on: the data each stage trained on (counted), and `config.seeds` repeats.

One in-process run of `pretrain_teacher` with a few-shot subset configured and two seeds:
  * the teacher's train iterator draws from the whole train split (the few-shot subset is
    `fewshot_distill`'s alone), counted on the examples the pipeline actually yields;
  * each seed's results record the data sizes; the aggregated table holds mean and sample sd of
    the seeds' accuracies, checked against NumPy on the per-seed results.
"""
import json

import numpy as np
import pytest

from configs import digits
from remem_jax import main
from remem_jax.data import pipeline
from remem_jax.train import seeds

TRAIN, TEST = 1347, 450  # sklearn's 1,797 digits, a quarter held out


def two_seed_config():
    c = digits.get_config()
    c.stages = ("pretrain_teacher",)
    c.seeds = 2
    c.data.image_size = 16
    c.data.few_shot_per_class = 4  # 40 images: for fewshot_distill only, never for the teacher
    c.pretrain.update(dict(num_layers=1, steps=6, batch_size=32, lr=3e-3, warmup_steps=1, checkpoint_every=0,
                           eval_every=0, log_every=6))
    return c


@pytest.fixture(scope="module")
def two_seed_run(tmp_path_factory):
    seen = []  # (examples in the source, distinct examples yielded) per training iterator
    original = pipeline.TrainData.iterator

    def counting(self, start_step=0):
        labels_seen = []
        for batch in original(self, start_step):
            labels_seen.append(batch["label"].reshape(-1))
            seen.append((self.num_examples, sum(len(x) for x in labels_seen)))
            yield batch

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline.TrainData, "iterator", counting)
    workdir = tmp_path_factory.mktemp("seeds")
    try:
        results = main.run(two_seed_config(), str(workdir))
    finally:
        mp.undo()
    return results, workdir, seen


def test_the_teacher_trains_on_the_whole_train_split_when_a_few_shot_subset_is_set(two_seed_run):
    results, _, seen = two_seed_run
    assert seen, "no training batch was drawn"
    sources = {n for n, _ in seen}
    assert sources == {TRAIN}, sources  # never the 40-image subset
    # 6 steps of 32 per seed: 192 examples drawn, more than the whole subset holds.
    assert max(count for _, count in seen) == 6 * 32
    for seed in ("0", "1"):
        data = results["seeds"][seed]["pretrain_teacher"]["data"]
        assert data == {"dataset": "digits", "num_classes": 10,
                        "train": {"part": "the whole train split", "examples": TRAIN},
                        "eval": {"split": "test", "examples": TEST}}


def test_two_seeds_report_mean_and_spread(two_seed_run):
    results, workdir, _ = two_seed_run
    per_seed = [results["seeds"][s]["pretrain_teacher"]["eval"]["top1"] for s in ("0", "1")]
    assert per_seed[0] != per_seed[1]  # the seeds did change the run
    (row,) = results["pretrain_teacher"]["over_seeds"]
    assert (row["row"], row["column"], row["n"]) == ("teacher", "top1", 2)
    np.testing.assert_allclose(row["mean"], np.mean(per_seed), rtol=1e-12)
    np.testing.assert_allclose(row["std"], np.std(per_seed, ddof=1), rtol=1e-12)
    table = (workdir / "pretrain" / "results.md").read_text()
    assert (f"| teacher | top1 | {100 * np.mean(per_seed):.2f} ± {100 * np.std(per_seed, ddof=1):.2f} | "
            in table), table
    assert json.loads((workdir / "results.json").read_text())["pretrain_teacher"]["over_seeds"] == [row]
    # Each seed is a complete run directory of its own, with its own table and standard errors.
    for seed in (0, 1):
        own = (workdir / "seeds" / f"seed_{seed}" / "pretrain" / "results.md").read_text()
        assert " ± " in own and "Data: digits, 10 classes" in own


def test_aggregate_refuses_seeds_that_compared_different_rows():
    a = [seeds.Compared("x", "top1", 0.5)]
    b = [seeds.Compared("y", "top1", 0.5)]
    with pytest.raises(ValueError, match="compared different rows"):
        seeds.aggregate([a, b])


def test_a_finished_two_seed_run_is_read_back_not_redone(two_seed_run):
    results, workdir, _ = two_seed_run
    again = main.run(two_seed_config(), str(workdir))
    assert again["pretrain_teacher"] == results["pretrain_teacher"]
    assert again["seeds"]["1"]["pretrain_teacher"]["eval"] == results["seeds"]["1"]["pretrain_teacher"]["eval"]
