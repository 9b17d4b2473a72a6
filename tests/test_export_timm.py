"""`python -m remem_jax.export --formats=timm`: any ViT npz the project writes, out as a timm folder,
verified on the spot (no torch needed; tests/test_hub_checkpoints.py loads the file in PyTorch)."""
import json

import jax
import numpy as np
import pytest

from remem_jax import checkpoints, export, timm_export, tree
from remem_jax.models import vit


def vit_npz(path, **options):
    """A 2-block ViT (width 32, patch 8, 16 px, 3 classes) with a random head, saved with `options`."""
    model = vit.VisionTransformer(num_classes=3, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                                  mlp_dim=64, **options)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3)))["params"]
    flat = {k: np.asarray(v) for k, v in tree.flatten_params(params).items()}
    rng = np.random.default_rng(0)
    flat["head/kernel"] = rng.normal(size=flat["head/kernel"].shape).astype(np.float32)
    flat["head/bias"] = rng.normal(size=flat["head/bias"].shape).astype(np.float32)
    checkpoints.save_augreg(str(path), tree.unflatten_params(flat), vit.numeric_options(model))
    return str(path), flat


def test_vit_npz_exports_to_timm_with_its_options(tmp_path):
    """A student with exact GELU and eps 1e-2 (from a Hugging Face teacher): the timm folder, model.json and
    the file read back all keep both; the parameters come back bit-identical."""
    npz, flat = vit_npz(tmp_path / "student.npz", approximate_gelu=False, layernorm_epsilon=1e-2)
    record = export.export_student(npz, str(tmp_path / "out"), formats=["timm"])
    entry = record["formats"]["timm"]
    assert entry["passed"] and entry["max_abs_diff"] <= 1e-5 and entry["features_max_abs_diff"] <= 1e-5
    info = export.read_model_info(str(tmp_path / "out"))
    assert info.architecture == export.VIT and info.formats == {"timm": "timm"}
    assert export.read_model_info(str(tmp_path / "out")).kwargs["num_heads"] == 2
    assert (info.kwargs["approximate_gelu"], info.kwargs["layernorm_epsilon"]) == (False, 1e-2)
    model = export.build_student(info)
    assert (model.approximate_gelu, model.layernorm_epsilon) == (False, 1e-2)
    config = json.load(open(tmp_path / "out" / "timm" / "config.json"))
    assert "act_layer" not in config["model_args"] and config["remem_jax"]["layernorm_epsilon"] == 1e-2
    back = checkpoints.read_vit(str(tmp_path / "out" / "timm"))
    assert (back.architecture["approximate_gelu"], back.architecture["layernorm_epsilon"]) == (False, 1e-2)
    for key, value in flat.items():
        assert back.flat[key].tobytes() == value.tobytes(), key


def test_tanh_gelu_vit_exports_with_gelu_tanh(tmp_path):
    npz, _ = vit_npz(tmp_path / "augreg.npz")
    record = export.export_student(npz, str(tmp_path / "out"), formats=["timm"])
    assert record["formats"]["timm"]["passed"]
    config = json.load(open(tmp_path / "out" / "timm" / "config.json"))
    assert config["model_args"]["act_layer"] == "gelu_tanh" and config["remem_jax"]["approximate_gelu"] is True
    kwargs = export.read_model_info(str(tmp_path / "out")).kwargs  # written out, defaults included
    assert (kwargs["approximate_gelu"], kwargs["layernorm_epsilon"]) == (True, 1e-6)


def test_a_wrong_timm_file_fails_verification(tmp_path, monkeypatch):
    """The on-the-spot check catches a converter that swaps query and key: nothing is published."""
    real = timm_export.augreg_to_timm

    def swapped(flat):
        sd = real(flat)
        for i in range(2):
            q, k, v = np.split(sd[f"blocks.{i}.attn.qkv.weight"], 3)
            sd[f"blocks.{i}.attn.qkv.weight"] = np.concatenate([k, q, v])
        return sd

    monkeypatch.setattr(timm_export, "augreg_to_timm", swapped)
    npz, _ = vit_npz(tmp_path / "student.npz")
    with pytest.raises(export.VerificationError, match="timm logits differ"):
        export.export_student(npz, str(tmp_path / "out"), formats=["timm"])
    assert not (tmp_path / "out" / "timm").exists()


def test_timm_format_is_for_vits_only():
    with pytest.raises(export.ExportError, match="'timm' in --formats is for ViTs only"):
        export.check_formats(["timm"], "--formats", known=export.FORMATS)


# ----------------------------------------------------------------------------- the options in the stages

def test_stage_models_and_saved_vits_keep_the_file_options(tmp_path):
    """A teacher file with exact GELU and eps 1e-2: the finetune_teacher model, the WeCoLoRA student built
    from it and the kept teacher the stage saves (with config.vit_export_formats=('timm',), verified on the
    digits eval images) all keep both options."""
    from configs import digits
    from remem_jax.train import common, teacher, wecolora
    npz, _ = vit_npz(tmp_path / "hf_teacher.npz", approximate_gelu=False, layernorm_epsilon=1e-2)
    config = digits.get_config()
    config.data.image_size = 16
    config.vit_export_formats = ("timm",)
    ckpt = checkpoints.read_vit(npz)
    model = teacher.finetune_model(config.finetune, ckpt, 10, teacher.setting_hyperparameters(config.finetune, "remem"))
    assert (model.approximate_gelu, model.layernorm_epsilon, model.mlp_alpha) == (False, 1e-2,
                                                                                   config.finetune.mlp_alpha)
    params = checkpoints.load_into(model, ckpt)
    student = wecolora.build_student("wecolora", model.clone(mlp_alpha=1.0), params, d=2, lora_rank=2,
                                     image_size=16, rng=jax.random.PRNGKey(0))
    assert (student.model.approximate_gelu, student.model.layernorm_epsilon) == (False, 1e-2)
    path = str(tmp_path / "teachers" / "step_5.npz")
    teacher.export_teacher(common.RunContext(config, str(tmp_path)), params, model, path)
    saved = checkpoints.read_vit(path)
    assert (saved.architecture["approximate_gelu"], saved.architecture["layernorm_epsilon"]) == (False, 1e-2)
    record = json.load(open(tmp_path / "teachers" / "step_5_export" / export.VERIFICATION_JSON))
    assert record["formats"]["timm"]["passed"] and "digits" in record["image_source"]
    assert checkpoints.read_vit(str(tmp_path / "teachers" / "step_5_export" / "timm")).architecture == \
        saved.architecture


def test_hub_files_get_readable_labels_in_the_analysis_tables():
    from remem_jax.analysis.stage import _label_of
    assert [_label_of(p) for p in ("w/finetune/remem/teachers/step_5.npz", "/ckpt/vit-b16/model.safetensors",
                                   "/ckpt/deit_small.pth", "/ckpt/dino_vits16/")] == [
        "step_5", "vit-b16", "deit_small", "dino_vits16"]
