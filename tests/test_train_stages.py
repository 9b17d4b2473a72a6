"""The training loop and teacher stages on the offline digits data: resume, NaN guard, export."""
import json
import os

import jax
import numpy as np
import pytest

from configs import digits
from remem_jax import checkpoints, errors
from remem_jax.models import vit
from remem_jax.train import common, handoff, runs, state as state_lib, teacher, tinymim, vit_finetune, wecolora

IMAGE_SIZE = 16


def tiny_config(**finetune):
    c = digits.get_config()
    c.data.image_size = IMAGE_SIZE
    c.finetune.update(dict(steps=6, keep_steps=(3, 6), batch_size=16, lr=0.01, warmup_steps=1, eval_every=0,
                           checkpoint_every=3, log_every=3, settings=("remem",), sam_rho=0.5, mlp_alpha=0.8))
    c.finetune.update(finetune)
    return c


@pytest.fixture(scope="module")
def teacher_npz(tmp_path_factory):
    """A random 2-block ViT-Ti/8 saved as an AugReg npz (the real loading path)."""
    model = vit.create_vit("Ti_8", 10, num_layers=2)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))["params"]
    # A non-zero head so the fine-tune starts from a model that depends on every block.
    params["head"]["kernel"] = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (192, 10))) * 0.05
    path = str(tmp_path_factory.mktemp("teacher") / "ti8.npz")
    checkpoints.save_augreg(path, params)
    return path


def context(config, workdir, teacher_path):
    config.teacher.checkpoint = teacher_path
    return common.RunContext(config=config, workdir=str(workdir))


class Interrupt(Exception):
    pass


def interrupting(factory, after_batches):
    """Wraps a train-iterator factory so the run dies after `after_batches` batches."""
    def make(start_step):
        iterator = factory(start_step)

        def gen():
            for i, batch in enumerate(iterator):
                if i == after_batches:
                    raise Interrupt()
                yield batch
        return gen()
    return make


def final_params(workdir, setting="remem", step=6):
    with np.load(os.path.join(workdir, "finetune", setting, "teachers", f"step_{step}.npz")) as npz:
        return dict(npz)


def test_resume_after_interruption_is_bit_identical(teacher_npz, tmp_path, monkeypatch):
    uninterrupted = tmp_path / "a"
    teacher.finetune_teacher(context(tiny_config(), uninterrupted, teacher_npz))

    resumed = tmp_path / "b"
    real_factory = common.train_iterator_factory
    # Dies while fetching the 5th batch: steps 1-4 ran, the last checkpoint is step 3.
    monkeypatch.setattr(common, "train_iterator_factory",
                        lambda *a, **k: interrupting(real_factory(*a, **k), after_batches=4))
    with pytest.raises(Interrupt):
        teacher.finetune_teacher(context(tiny_config(), resumed, teacher_npz))
    assert sorted(os.listdir(resumed / "finetune" / "remem" / "checkpoints")) == ["3"]
    monkeypatch.setattr(common, "train_iterator_factory", real_factory)
    summary = teacher.finetune_teacher(context(tiny_config(), resumed, teacher_npz)).results["remem"]

    want, got = final_params(uninterrupted), final_params(resumed)
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert [k["step"] for k in summary["kept"]] == [3, 6]


def relation_distill_config():
    c = tiny_config()
    c.tinymim.update(dict(student="Ti_8", num_layers=1, steps=6, batch_size=16, lr=3e-3, warmup_steps=0,
                          eval_batches=1, checkpoint_every=3, log_every=3))
    return c, tinymim.relation_distill, os.path.join(handoff.TINYMIM_DIR, "relation_block1")


def fewshot_distill_config():
    c = tiny_config()
    c.data.few_shot_per_class = 4  # 40 images: 2 steps per epoch at batch 16, 6 in all
    c.wecolora.update(dict(variants=("wecolora",), lora_rank=2, epochs=3, warmup_epochs=1, batch_size=16,
                           checkpoint_every=3, log_every=3))
    return c, wecolora.fewshot_distill, os.path.join(handoff.FEWSHOT_DIR, "wecolora")


@pytest.mark.parametrize("make_config", [relation_distill_config, fewshot_distill_config],
                         ids=["relation_distill", "fewshot_distill"])
def test_distillation_stages_resume_bit_identical(teacher_npz, tmp_path, monkeypatch, make_config):
    """TinyMIM's and WeCoLoRA's students after an interrupted and resumed run equal an uninterrupted run's."""
    config, stage, run_dir = make_config()
    stage(context(config, tmp_path / "a", teacher_npz))

    real_factory = common.train_iterator_factory
    monkeypatch.setattr(common, "train_iterator_factory",
                        lambda *a, **k: interrupting(real_factory(*a, **k), after_batches=4))
    with pytest.raises(Interrupt):
        stage(context(make_config()[0], tmp_path / "b", teacher_npz))
    assert sorted(os.listdir(tmp_path / "b" / run_dir / "checkpoints")) == ["3"]
    assert not os.path.exists(tmp_path / "b" / run_dir / "student.npz")
    monkeypatch.setattr(common, "train_iterator_factory", real_factory)
    stage(context(make_config()[0], tmp_path / "b", teacher_npz))

    with np.load(tmp_path / "a" / run_dir / "student.npz") as a, np.load(tmp_path / "b" / run_dir / "student.npz") as b:
        want, got = dict(a), dict(b)
    assert sorted(want) == sorted(got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_nan_loss_stops_the_run_without_saving(teacher_npz, tmp_path, monkeypatch):
    real_factory = common.train_iterator_factory

    def poisoned(*args, **kwargs):
        def make(start_step):
            for step, batch in enumerate(real_factory(*args, **kwargs)(start_step), start_step + 1):
                if step == 5:
                    batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
                yield batch
        return make
    monkeypatch.setattr(common, "train_iterator_factory", poisoned)
    with pytest.raises(errors.NonFiniteLossError,
                       match=r"finetune/remem: the loss became non-finite at step 5 \(loss nan\).*last checkpoint: step 3"):
        teacher.finetune_teacher(context(tiny_config(), tmp_path, teacher_npz))
    assert sorted(os.listdir(tmp_path / "finetune" / "remem" / "checkpoints")) == ["3"]


def test_unfinished_save_is_never_resumed(tmp_path):
    ckpt = common.checkpointer(str(tmp_path / "ckpt"))
    state = {"w": np.arange(4.0), "step": np.asarray(2, np.int32)}
    ckpt.save(2, state)
    # What a save killed mid-write leaves behind: orbax's temporary directory.
    os.makedirs(tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1700000000" / "default")
    fresh = common.checkpointer(str(tmp_path / "ckpt"))
    assert fresh.latest_step() == 2
    np.testing.assert_array_equal(fresh.restore(2, state)["w"], state["w"])


@pytest.mark.parametrize("mode", ["lora", "adapter"])
def test_exported_teacher_is_a_plain_npz_with_the_reweighted_logits(teacher_npz, tmp_path, mode):
    config = tiny_config(mode=mode, steps=2, keep_steps=(2,), lora_rank=4, lora_alpha=4.0, lr=0.05,
                         checkpoint_every=2)
    ctx = context(config, tmp_path, teacher_npz)
    summary = teacher.finetune_teacher(ctx).results["remem"]
    exported = summary["kept"][0]["checkpoint"]
    plain_model, plain = checkpoints.load_augreg(exported)
    assert plain_model.mlp_alpha == 1.0 and "lora" not in plain
    assert ("Adapter_mlp" in plain["Transformer"]["encoderblock_0"]) == (mode == "adapter")

    # Rebuild the reweighted model from the orbax checkpoint and compare logits.
    model, base = checkpoints.load_augreg(teacher_npz, num_classes=10, image_size=IMAGE_SIZE, mlp_alpha=0.8)
    if mode == "adapter":
        model = model.clone(adapter_dim=192 // 16)
    setup = vit_finetune.setup_finetune(model, base, mode, ctx.rng("finetune", "remem", "surgery"),
                                   image_size=IMAGE_SIZE, lora_rank=4, lora_alpha=4.0)
    tx = common.make_tx(config.finetune, 2)
    like = state_lib.create_train_state(setup.trainable, tx, rng=jax.random.PRNGKey(0), frozen={})
    restored = common.checkpointer(str(tmp_path / "finetune" / "remem" / "checkpoints")).restore(2, like)
    reweighted = setup.combine(restored.params, setup.frozen)
    assert not np.array_equal(reweighted["head"]["kernel"], base["head"]["kernel"])
    if mode == "lora":  # B moved away from zero: the effective query kernel changed
        changed = reweighted["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_1"]["query"]["kernel"]
        assert not np.allclose(changed, base["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_1"]["query"]["kernel"])
    else:
        assert np.abs(reweighted["Transformer"]["encoderblock_1"]["Adapter_mlp"]["up"]["kernel"]).max() > 0
    images = np.random.default_rng(0).uniform(-1, 1, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
    want = model.apply({"params": reweighted}, images)
    got = plain_model.apply({"params": plain}, images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_a_run_killed_between_its_last_checkpoint_and_its_summary_redoes_the_final_evaluation(
        teacher_npz, tmp_path, monkeypatch):
    """The summary is the commit point: dying right before it must not record an empty evaluation."""
    want = teacher.finetune_teacher(context(tiny_config(eval_every=2), tmp_path / "a", teacher_npz)).results["remem"]

    real_commit = runs.SubRun.commit

    def dies(self, summary, **kwargs):
        raise Interrupt()
    monkeypatch.setattr(runs.SubRun, "commit", dies)
    with pytest.raises(Interrupt):
        teacher.finetune_teacher(context(tiny_config(eval_every=2), tmp_path / "b", teacher_npz))
    assert sorted(os.listdir(tmp_path / "b" / "finetune" / "remem" / "checkpoints")) == ["3", "6"]  # kept steps
    assert not os.path.exists(tmp_path / "b" / "finetune" / "remem" / "summary.json")
    monkeypatch.setattr(runs.SubRun, "commit", real_commit)
    got = teacher.finetune_teacher(context(tiny_config(eval_every=2), tmp_path / "b", teacher_npz)).results["remem"]
    assert [h["step"] for h in got["eval_history"]] == [2, 3, 4, 6]
    assert got["eval_history"] == want["eval_history"] and got["kept"] == [
        dict(k, checkpoint=k["checkpoint"].replace(str(tmp_path / "a"), str(tmp_path / "b"))) for k in want["kept"]]


def test_the_evaluation_history_survives_a_resume(teacher_npz, tmp_path, monkeypatch):
    want = teacher.finetune_teacher(context(tiny_config(eval_every=2), tmp_path / "a", teacher_npz)).results["remem"]
    real_factory = common.train_iterator_factory
    # Dies fetching the 5th batch: evaluations at 2, 3 (kept) and 4 ran, the last checkpoint is step 3.
    monkeypatch.setattr(common, "train_iterator_factory",
                        lambda *a, **k: interrupting(real_factory(*a, **k), after_batches=4))
    with pytest.raises(Interrupt):
        teacher.finetune_teacher(context(tiny_config(eval_every=2), tmp_path / "b", teacher_npz))
    monkeypatch.setattr(common, "train_iterator_factory", real_factory)
    got = teacher.finetune_teacher(context(tiny_config(eval_every=2), tmp_path / "b", teacher_npz)).results["remem"]
    assert [h["step"] for h in got["eval_history"]] == [2, 3, 4, 6]  # not only those after the restart
    assert got["eval_history"] == want["eval_history"]


def digits_test_examples(config) -> int:
    from remem_jax.data import sources
    return sources.build_source(config.data, config.dataset, "eval", process_index=0, process_count=1).total_examples


def history_counts(run_dir) -> list[tuple]:
    """(step, examples counted, 'eval_examples' marker) of each record of a sub-run's eval_history.json."""
    return [(h["step"], h["num_examples"], h.get("eval_examples"))
            for h in json.load(open(os.path.join(run_dir, runs.HISTORY)))]


def test_eval_examples_subsets_the_evaluations_between_but_never_the_final_one(tmp_path):
    """config.data.eval_examples: evaluations every eval_every steps count the fixed subset (and say so); the
    final evaluation, the one a summary reports, counts the whole test split, also when a resumed run redoes it."""
    def config():
        c = tiny_config()
        c.data.eval_examples = 50
        c.pretrain.update(dict(num_layers=1, steps=6, batch_size=16, warmup_steps=1, eval_every=2,
                               checkpoint_every=3, log_every=3))
        return c
    full = digits_test_examples(config())
    assert full > 50
    run_dir = tmp_path / handoff.PRETRAIN_DIR
    summary = teacher.pretrain_teacher(context(config(), tmp_path, "pretrain")).results
    assert history_counts(run_dir) == [(2, 50, 50), (4, 50, 50), (6, full, None)]
    assert summary["eval"]["num_examples"] == full and "eval_examples" not in summary["eval"]
    # A resumed run whose history lacks the final evaluation (restored at the final checkpoint) redoes it exactly.
    history = json.load(open(run_dir / runs.HISTORY))
    json.dump(history[:-1], open(run_dir / runs.HISTORY, "w"))
    os.remove(run_dir / runs.SUMMARY)
    again = teacher.pretrain_teacher(context(config(), tmp_path, "pretrain")).results
    assert history_counts(run_dir) == [(2, 50, 50), (4, 50, 50), (6, full, None)]
    assert again["eval"] == summary["eval"]


def test_eval_examples_never_subsets_a_kept_step(teacher_npz, tmp_path):
    """Kept teachers are reported with their accuracy (finetune and distill tables): exact at kept steps too."""
    config = tiny_config(eval_every=2)
    config.data.eval_examples = 50
    full = digits_test_examples(config)
    summary = teacher.finetune_teacher(context(config, tmp_path, teacher_npz)).results["remem"]
    assert history_counts(tmp_path / "finetune" / "remem") == [(2, 50, 50), (3, full, None), (4, 50, 50),
                                                               (6, full, None)]
    assert [(k["step"], k["num_examples"]) for k in summary["kept"]] == [(3, full), (6, full)]


@pytest.mark.parametrize("summary, message", [
    ({"eval": {}}, r"the final evaluation 'eval' is empty"),
    ({"eval": {"top1": float("nan")}}, r"summary.eval.top1 is nan"),
    ({"eval": {"top1": 0.5}, "history": [{"loss": float("inf")}]}, r"summary.history\[0\].loss is inf"),
])
def test_a_summary_with_an_empty_or_non_finite_metric_is_never_written(tmp_path, summary, message):
    sub = runs.SubRun(common.RunContext(config=digits.get_config(), workdir=str(tmp_path)), "x/y", str(tmp_path / "y"))
    with pytest.raises(errors.NonFiniteLossError, match=message):
        sub.commit(summary, metrics=("eval",))
    assert not os.path.exists(sub.summary_path) and sub.committed() is None
    assert sub.commit({"eval": {"top1": 0.5}}, metrics=("eval",))["complete"] and sub.committed()["eval"]["top1"] == 0.5


def test_temporary_files_of_interrupted_writes_are_removed_when_a_run_starts(tmp_path):
    from remem_jax import files
    os.makedirs(tmp_path / "distill" / "scratch")
    stale = [tmp_path / "results.json.tmp-0123456789abcdef0123456789abcdef",
             tmp_path / "distill" / "scratch" / "student.npz.tmp-fedcba9876543210fedcba9876543210"]
    kept = [tmp_path / "distill" / "scratch" / "notes.tmp-1", tmp_path / "distill" / "student.npz"]
    for path in stale + kept:
        path.write_text("x")
    assert sorted(files.remove_stale_temporaries(str(tmp_path))) == sorted(map(str, stale))
    assert [p.exists() for p in stale + kept] == [False, False, True, True]


def test_parameters_that_overflow_stop_the_run_though_the_loss_is_finite(teacher_npz, tmp_path):
    # lr = 1e39 is inf in float32: the first update makes the parameters non-finite, the step-1 loss is finite.
    with pytest.raises(errors.NonFiniteLossError,
                       match=r"finetune/remem: a parameter became non-finite at step 1 \(loss [0-9.]+\).*"
                             r"last checkpoint: none"):
        teacher.finetune_teacher(context(tiny_config(lr=1e39, grad_clip_norm=0.0), tmp_path, teacher_npz))
    assert not os.path.exists(tmp_path / "finetune" / "remem" / "checkpoints" / "3")
    assert not os.path.exists(tmp_path / "finetune" / "remem" / "summary.json")


def test_a_non_finite_evaluation_stops_the_run_before_its_checkpoint(teacher_npz, tmp_path, monkeypatch):
    real = common.make_evaluator
    calls = []

    def diverging(*args, **kwargs):
        evaluate = real(*args, **kwargs)

        def run(state):
            calls.append(1)
            return dict(evaluate(state), loss=float("nan")) if len(calls) == 2 else evaluate(state)
        return run
    monkeypatch.setattr(common, "make_evaluator", diverging)
    with pytest.raises(errors.NonFiniteLossError,
                       match=r"finetune/remem: the evaluation at step 6 gave loss = nan: the model diverged; stopped "
                             r"without saving that state \(last checkpoint: step 3\)"):
        teacher.finetune_teacher(context(tiny_config(), tmp_path, teacher_npz))
    assert sorted(os.listdir(tmp_path / "finetune" / "remem" / "checkpoints")) == ["3"]
    assert not os.path.exists(tmp_path / "finetune" / "remem" / "summary.json")
    assert [h["step"] for h in json.load(open(tmp_path / "finetune" / "remem" / "eval_history.json"))] == [3]
