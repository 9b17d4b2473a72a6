"""Smoke test of `python -m remem_jax.benchmark` (called in-process) on a one-block ViT-Ti/16 at 32 px.

No assertion is made on timings. The FLOP counts are checked against the analytic ViT formula,
which is written independently of XLA's cost analysis: a forward pass matches it, and SAM's extra
gradient pass costs about three forward passes (backward = 2x forward).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remem_jax import benchmark
from remem_jax.models import vit

TINY = ["--model=Ti_16", "--num_layers=1", "--image_size=32", "--batch_size=8", "--steps=1", "--warmup=1",
        "--student=resnet18", "--num_classes=10", "--data_batches=0"]


def test_main_writes_complete_json(tmp_path):
    out = tmp_path / "bench.json"
    modes = "finetune_plain,finetune_sam,finetune_lora,distill"
    returned = benchmark.main(["benchmark", *TINY, f"--modes={modes}", "--peak_tflops=1.0", f"--output={out}"])
    report = json.loads(out.read_text())
    assert report["results"].keys() == set(modes.split(","))
    assert report["environment"]["num_local_devices"] == jax.local_device_count() == 8
    for mode, r in report["results"].items():
        for key in ("images_per_s", "step_ms_mean", "step_ms_median", "step_ms_min", "compile_s", "first_step_s",
                    "compile_plus_first_step_s",
                    "flops_per_step", "achieved_tflops", "mfu", "vit_forward_flops_per_image_analytic"):
            assert r[key] > 0, (mode, key, r[key])
        assert r["step_ms_std"] >= 0
        assert r["per_device_batch_size"] == 1 and r["global_batch_size"] == 8
        assert r["loss_finite"]
        assert r["memory"]["host_peak_rss_bytes"] > 0
        assert r["xla_memory_per_device"]["total_bytes"] > 0
        assert r["trainable_params"] > 0
    assert report["results"]["finetune_lora"]["frozen_params"] > 0
    lora, full = report["results"]["finetune_lora"], report["results"]["finetune_plain"]
    assert lora["trainable_params"] < full["trainable_params"]
    distill = report["results"]["distill"]
    assert distill["teacher_forward_ms_mean"] > 0 and distill["teacher_share"] > 0 and distill["teacher_share_min"] > 0
    for key in ("ratios", "ratios_of_min"):
        assert set(report[key]) == {"sam_over_plain", "lora_sam_over_full_sam"}
        assert all(v > 0 for v in report[key].values())

    # FLOPs: the per-device count times the devices must be the global step's. With one image per
    # device the optimizer's per-parameter work is not negligible, so only SAM's extra gradient pass
    # (forward + backward, ~3 forwards) and the teacher's forward are pinned down.
    plain, sam = report["results"]["finetune_plain"], report["results"]["finetune_sam"]
    forward = plain["vit_forward_flops_per_image_analytic"] * 8
    assert plain["flops_per_step"] > 2.5 * forward
    assert 2.5 < (sam["flops_per_step"] - plain["flops_per_step"]) / forward < 4.5
    assert distill["teacher_forward_flops"] == pytest.approx(forward, rel=0.1)
    assert returned["results"]["finetune_plain"]["step_ms_mean"] == plain["step_ms_mean"]


def test_vit_forward_flops_matches_xla_cost_analysis():
    model = vit.create_vit("Ti_16", 10, num_layers=2)
    size = 64  # 17 tokens, so the attention term counts
    images = jnp.zeros((1, size, size, 3))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    xla = jax.jit(model.apply).lower(params, images).compile().cost_analysis()["flops"]
    # XLA also counts LayerNorm, softmax and GELU, which the formula leaves out (a few %).
    assert benchmark.vit_forward_flops(model, size) == pytest.approx(xla, rel=0.05)


@pytest.mark.parametrize("flag, message", [("--batch_size=12", "batch_size"), ("--modes=finetune,distill", "modes"),
                                            ("--student=resnet9", "student")])
def test_bad_options_raise(flag, message):
    with pytest.raises(ValueError, match=message):
        benchmark.main(["benchmark", *TINY, flag])


def test_fewshot_modes_report_the_lora_over_full_ratio_and_the_teacher_share():
    args = ["--model=Ti_16", "--num_layers=2", "--image_size=32", "--batch_size=8", "--steps=1", "--warmup=1",
            "--num_classes=10", "--wecolora_rank=4", "--modes=fewshot_distill,fewshot_full", "--data_batches=0"]
    report = benchmark.main(["benchmark", *args])
    lora, full = report["results"]["fewshot_distill"], report["results"]["fewshot_full"]
    assert lora["trainable_params"] == 4 * (4 * 2 * 192 + 2 * (192 + 768))  # one kept block, Ti width
    assert full["trainable_params"] > lora["trainable_params"]
    for r in (lora, full):
        assert r["loss_finite"] and r["teacher_forward_ms_mean"] > 0 and 0 < r["teacher_share"]
    assert report["ratios"]["fewshot_lora_over_full"] > 0


def test_relation_distill_mode_times_the_truncated_teacher_and_trains_no_unused_student_leaf():
    # Teacher Ti/16 with 4 blocks, student Ti/16 with 2: the relation block is floor(0.75 * 4) = 3.
    args = ["--model=Ti_16", "--num_layers=4", "--image_size=32", "--batch_size=8", "--steps=1", "--warmup=1",
            "--tinymim_student=Ti_16", "--tinymim_student_layers=2", "--modes=relation_distill", "--data_batches=0"]
    report = benchmark.main(["benchmark", *args])
    r = report["results"]["relation_distill"]
    assert "block 3 of 4" in r["description"]
    assert r["loss_finite"] and r["final_loss"] > 0 and r["teacher_forward_ms_mean"] > 0 and r["teacher_share"] > 0
    # Only the teacher up to block 3's q/k/v runs. Per token, in units of d^2 multiply-adds: a block is
    # 12 (q/k/v 3, output 1, MLP 8), the 16x16x3 patch embedding 4; so 2 blocks + block 3's q/k/v
    # + embedding = 31 of a full forward's 4 * 12 + 4 = 52 (0.596; block 2's end would be 0.54).
    full_forward = benchmark.vit_forward_flops(vit.create_vit("Ti_16", 10, num_layers=4), 32) * 8
    assert r["teacher_forward_flops"] / full_forward == pytest.approx(31 / 52, rel=0.05)
    # Trained: the student's patch embedding, class token, block 0 and the last block up to its q/k/v;
    # the last block's attention output, MLP and the final norm are frozen (never in the optimizer).
    student = vit.create_vit("Ti_16", None, num_layers=2, posemb="sincos2d")
    total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(vit.param_shapes(student, 32)))
    d, mlp = 192, 768
    unused = (d * d + d) + (2 * d * mlp + mlp + d) + 2 * d + 2 * d  # out projection, MLP, LayerNorm_2, encoder_norm
    assert r["trainable_params"] == total - unused
    assert r["frozen_params"] >= unused


def test_remat_gives_the_same_losses():
    plain = benchmark.main(["benchmark", *TINY, "--modes=finetune_plain,finetune_lora_plain", "--steps=2"])
    remat = benchmark.main(["benchmark", *TINY, "--modes=finetune_plain,finetune_lora_plain", "--steps=2", "--remat"])
    assert remat["options"]["remat"] and not plain["options"]["remat"]
    for mode in ("finetune_plain", "finetune_lora_plain"):
        assert remat["results"][mode]["final_loss"] == pytest.approx(plain["results"][mode]["final_loss"], abs=1e-5)
    assert "lora_plain_over_full_plain" in plain["ratios"]


def test_data_over_step_and_the_markdown_table(tmp_path):
    md = tmp_path / "table.md"
    report = benchmark.main(["benchmark", *TINY, "--modes=finetune_plain,finetune_sam", "--data_batches=1",
                             "--peak_tflops=1.0", f"--markdown={md}"])
    pipeline = report["input_pipeline"]
    assert pipeline["images_per_s"] > 0 and pipeline["image_size"] == 32 and pipeline["batch_size"] == 8
    for r in report["results"].values():
        assert r["data_over_step"] == pytest.approx(pipeline["images_per_s"] / r["images_per_s"])
    text = md.read_text()
    assert "| finetune_sam |" in text and "| finetune_plain |" in text and "sam_over_plain" in text
    assert "target sam_over_plain ratio <= 2.05" in text and "target finetune_sam mfu >= 0.45" in text


def test_gpu_table_preset_fills_unset_flags_only():
    from absl import flags
    fv = flags.FlagValues()
    benchmark.define_flags(fv)
    fv(["benchmark", "--preset=gpu_table", "--batch_size=64", "--remat"])
    options = benchmark.options_from_flags(fv)
    assert (options.model, options.image_size, options.dtype) == ("B_16", 224, "bfloat16")
    assert options.modes == benchmark.MODES and options.fit_batch and options.markdown == "benchmark_gpu.md"
    assert options.batch_size == 64 and options.remat  # explicit flags win
    with pytest.raises(ValueError, match="preset"):
        benchmark.main(["benchmark", *TINY, "--preset=tpu_table"])


def test_fit_batch_halves_a_mode_that_runs_out_of_memory(monkeypatch):
    real = benchmark.benchmark_mode

    def fake(options, mode, batch, devices):
        if mode == "finetune_sam" and options.batch_size > 8:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return real(options, mode, batch, devices)
    monkeypatch.setattr(benchmark, "benchmark_mode", fake)
    args = [a for a in TINY if not a.startswith("--batch_size")] + ["--batch_size=16"]
    report = benchmark.main(["benchmark", *args, "--modes=finetune_plain,finetune_sam", "--fit_batch"])
    assert report["results"]["finetune_sam"]["global_batch_size"] == 8
    assert report["results"]["finetune_sam"]["batch_halved"]
    assert report["results"]["finetune_plain"]["global_batch_size"] == 16
    assert "sam_over_plain" not in report["ratios"]  # different batches are not compared
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        benchmark.main(["benchmark", *args, "--modes=finetune_sam"])
