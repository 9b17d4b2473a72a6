"""timm and Hugging Face ViT checkpoints in, timm files out; the reference is the PyTorch forward.

Random-weight Hugging Face `ViTForImageClassification` models (transformers, CPU torch) are saved in
the three layouts `hub_checkpoints` reads:
  * the hub layout: `save_pretrained` (transformers 5 converts back to the stored names on save:
    `vit.encoder.layer.N.attention.attention.query`, ...);
  * transformers 5's in-memory layout: `safetensors.torch.save_file(model.state_dict())`
    (`vit.layers.N.attention.q_proj`, ...);
  * timm's `VisionTransformer` layout: timm itself does not import beside the CPU torch build
    (it needs torchvision), so `hf_to_timm` below renames the state dict as timm's module names
    document (`blocks.N.attn.qkv` = rows [query; key; value], `norm1`, `mlp.fc1`, ...).
Loaded here, the JAX logits must equal the PyTorch forward's within `TOLERANCE` in float32.
"""
import json
import os

import jax
import numpy as np
import pytest

from remem_jax import checkpoints, timm_export, tree
from remem_jax.checkpoints import CheckpointError
from remem_jax.models import vit
from tests import augreg_format as fmt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOLERANCE = 1e-5


# ----------------------------------------------------------------------------- the PyTorch side

def hf_model(*, width=64, depth=2, heads=4, mlp=96, patch=16, image=32, classes=5, seed=0, **config):
    """A ViTForImageClassification with every parameter random (LayerNorms and biases too)."""
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                 intermediate_size=mlp, patch_size=patch, image_size=image, num_labels=classes,
                                 **config)
    model = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():  # random values everywhere (LayerNorm scales, biases, tokens), at a trained scale
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("weight"):  # Linear (out, in) and the patch conv (D, 3, p, p): variance 1 / fan_in
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
            else:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(model, images_nhwc):
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
        return model(pixel_values=x).logits.numpy()


def hub_state_dict(model):
    """The hub layout: what `save_pretrained` writes (read back from the file it wrote)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return safetensors_torch.load_file(os.path.join(d, "model.safetensors"))


# (Hugging Face hub name, timm name): the documented correspondence of the two libraries' modules.
TOP_NAMES = [("vit.embeddings.cls_token", "cls_token"), ("vit.embeddings.position_embeddings", "pos_embed")] + [
    (f"{h}.{part}", f"{t}.{part}") for h, t in (("vit.embeddings.patch_embeddings.projection", "patch_embed.proj"),
                                                ("vit.layernorm", "norm"), ("classifier", "head"))
    for part in ("weight", "bias")]
BLOCK_NAMES = [("attention.output.dense", "attn.proj"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
               ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2")]
QKV = ("query", "key", "value")  # timm's attn.qkv: rows [query; key; value]


def hf_to_timm(sd):
    """Hub-layout Hugging Face ViT state dict -> timm VisionTransformer names."""
    out = {t: sd[h] for h, t in TOP_NAMES}
    for i in range(len({k.split(".")[3] for k in sd if k.startswith("vit.encoder.layer.")})):
        h, t = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[f"{t}attn.qkv.{part}"] = torch.cat([sd[f"{h}attention.attention.{n}.{part}"] for n in QKV])
            out.update({f"{t}{tn}.{part}": sd[f"{h}{hn}.{part}"] for hn, tn in BLOCK_NAMES})
    return out


def timm_to_hf(sd):
    """The inverse renaming (timm names -> hub-layout Hugging Face names), for loading our timm export."""
    sd = {k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}
    out = {h: sd[t] for h, t in TOP_NAMES}
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        h, t = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            chunks = torch.chunk(sd[f"{t}attn.qkv.{part}"], 3)
            out.update(zip([f"{h}attention.attention.{n}.{part}" for n in QKV], chunks))
            out.update({f"{h}{hn}.{part}": sd[f"{t}{tn}.{part}"] for hn, tn in BLOCK_NAMES})
    return out


def save_layout(model, folder, layout):
    """`model` saved in `layout` ('hf', 'hf-new', 'timm') as folder/model.safetensors + config.json."""
    os.makedirs(folder, exist_ok=True)
    if layout == "hf":
        model.save_pretrained(folder)
        return str(folder)
    if layout == "hf-new":
        safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    os.path.join(folder, "model.safetensors"))
        model.config.to_json_file(os.path.join(folder, "config.json"))
        return str(folder)
    c = model.config
    safetensors_torch.save_file({k: v.contiguous() for k, v in hf_to_timm(hub_state_dict(model)).items()},
                                os.path.join(folder, "model.safetensors"))
    args = dict(img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.hidden_size, depth=c.num_hidden_layers,
                num_heads=c.num_attention_heads, mlp_ratio=c.intermediate_size / c.hidden_size,
                num_classes=c.num_labels)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architecture": "vit_base_patch16_224", "num_classes": c.num_labels, "model_args": args,
                   "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}, f)
    return str(folder)


def images(n, size, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def jax_logits(path, x, **kwargs):
    model, params = checkpoints.load_augreg(path, **kwargs)
    return model, np.asarray(jax.jit(model.apply)({"params": params}, x))


# ----------------------------------------------------------------------------- loading: logits vs PyTorch

# (width, depth, heads, mlp, patch, image, classes, HF config): several widths and patch sizes, 224 and 384
# px; one with a large LayerNorm epsilon and one with tanh GELU so that ignoring either fails the tolerance.
CASES = {
    "w64_p16_32px": dict(width=64, depth=2, heads=4, mlp=96, patch=16, image=32, classes=5),
    "w48_p8_48px_eps1e-2": dict(width=48, depth=2, heads=3, mlp=64, patch=8, image=48, classes=7,
                                layer_norm_eps=1e-2),
    "w32_p16_224px_gelu_new": dict(width=32, depth=1, heads=2, mlp=64, patch=16, image=224, classes=3,
                                   hidden_act="gelu_new"),
    "w40_p32_384px": dict(width=40, depth=2, heads=5, mlp=80, patch=32, image=384, classes=4),
}


# Every case in the hub layout; the other two layouts on the cases whose options they can carry (timm's
# model args have no epsilon, and its GELU is exact unless act_layer says otherwise).
LAYOUT_CASES = [(case, "hf") for case in sorted(CASES)] + [
    ("w48_p8_48px_eps1e-2", "hf-new"), ("w40_p32_384px", "hf-new"), ("w64_p16_32px", "timm"),
    ("w40_p32_384px", "timm")]


@pytest.mark.parametrize("case,layout", LAYOUT_CASES)
def test_logits_match_pytorch(tmp_path, case, layout):
    spec = dict(CASES[case])
    torch_model = hf_model(**spec)
    path = save_layout(torch_model, tmp_path / layout, layout)
    if layout == "timm":
        torch_model = _with_eps(torch_model, 1e-6)
    x = images(2, spec["image"])
    model, got = jax_logits(path, x)
    assert model.approximate_gelu == (spec.get("hidden_act") == "gelu_new")
    assert model.layernorm_epsilon == spec.get("layer_norm_eps", 1e-6 if layout == "timm" else 1e-12)
    want = hf_logits(torch_model, x)
    assert np.abs(got - want).max() <= TOLERANCE, np.abs(got - want).max()


def _with_eps(model, eps):
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = eps
    return model


def test_b16_at_224_matches_pytorch(tmp_path):
    """The one full-size case: ViT-B/16 at 224 px, 1000 classes, Hugging Face hub layout."""
    torch_model = hf_model(width=768, depth=12, heads=12, mlp=3072, patch=16, image=224, classes=1000)
    path = save_layout(torch_model, tmp_path / "b16", "hf")
    x = images(1, 224)
    model, got = jax_logits(path, x)
    assert (model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim) == (768, 12, 12, 3072)
    want = hf_logits(torch_model, x)
    assert np.abs(got - want).max() <= TOLERANCE, np.abs(got - want).max()


def test_resized_position_embeddings_match_pytorch(tmp_path):
    """Loaded at 48 px from a 32 px file: equal to the PyTorch model whose position embeddings are
    resized the same way (vit_jax's algorithm, `resize_posemb`), so the resize meets the converted grid
    in the same row order as the source's."""
    torch_model = hf_model(width=64, depth=2, heads=4, mlp=96, patch=16, image=32, classes=5)
    path = save_layout(torch_model, tmp_path / "hf", "hf")
    x = images(2, 48)
    _, got = jax_logits(path, x, image_size=48)
    resized = transformers.ViTForImageClassification(transformers.ViTConfig(
        **{**torch_model.config.to_dict(), "image_size": 48})).eval()
    state = torch_model.state_dict()
    key = "vit.embeddings.position_embeddings"
    state[key] = torch.from_numpy(checkpoints.resize_posemb(state[key].numpy(), 1 + 9))
    resized.load_state_dict(state)
    want = hf_logits(resized, x)
    assert np.abs(got - want).max() <= TOLERANCE, np.abs(got - want).max()


def test_input_normalisation_is_folded_into_the_patch_embedding(tmp_path):
    """A model trained on ImageNet mean/std inputs reads the project's [-1, 1] images after the fold."""
    torch_model = hf_model()
    path = save_layout(torch_model, tmp_path / "hf", "hf")
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": mean, "image_std": std}, f)
    x = images(2, 32)
    _, got = jax_logits(path, x)
    want = hf_logits(torch_model, ((x + 1) / 2 - np.float32(mean)) / np.float32(std))
    assert np.abs(got - want).max() <= TOLERANCE, np.abs(got - want).max()


def test_vitmodel_without_head_loads_its_pooler(tmp_path):
    """A `ViTModel` (no classifier, a Dense+tanh pooler): the pooler becomes pre_logits; outputs equal."""
    torch_model = hf_model(classes=2)
    base = transformers.ViTModel(torch_model.config, add_pooling_layer=True).eval()
    base.load_state_dict(torch_model.vit.state_dict(), strict=False)
    base.save_pretrained(tmp_path / "base")
    ckpt = checkpoints.read_vit(str(tmp_path / "base"))
    assert ckpt.num_classes == 0 and ckpt.architecture["representation_size"] == 64
    model = checkpoints.build_vit(ckpt, num_classes=0)
    params = checkpoints.load_into(model, ckpt)
    x = images(2, 32)
    got = np.asarray(model.apply({"params": params}, x))
    with torch.no_grad():
        want = base(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).pooler_output.numpy()
    assert np.abs(got - want).max() <= TOLERANCE


def test_bin_file_reads_with_torch_weights_only(tmp_path):
    torch_model = hf_model()
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(hub_state_dict(torch_model), folder / "pytorch_model.bin")
    torch_model.config.to_json_file(str(folder / "config.json"))
    x = images(2, 32)
    _, got = jax_logits(str(folder), x)
    assert np.abs(got - hf_logits(torch_model, x)).max() <= TOLERANCE


def test_bfloat16_safetensors_read_without_torch(tmp_path):
    """A bfloat16 file (safetensors' NumPy reader has no bfloat16): read exactly, as float32."""
    torch_model = hf_model().to(torch.bfloat16)
    folder = save_layout(torch_model, tmp_path / "bf16", "hf")
    ckpt = checkpoints.read_vit(folder)
    want = torch_model.vit.embeddings.patch_embeddings.projection.weight.detach().float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(ckpt.flat["embedding/kernel"], want)
    x = images(2, 32)
    model = checkpoints.build_vit(ckpt, num_classes=ckpt.num_classes)
    got = np.asarray(model.apply({"params": checkpoints.load_into(model, ckpt)}, x))
    assert np.abs(got - hf_logits(torch_model.float(), x)).max() <= TOLERANCE


class _Payload:  # a pickle that would run code under a plain torch.load
    def __reduce__(self):
        return (os.system, ("echo never",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"patch_embed.proj.weight": _Payload()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        checkpoints.read_vit(str(path))


# ----------------------------------------------------------------------------- numeric options travel

def test_options_survive_an_npz_save(tmp_path):
    """A Hugging Face teacher saved by a stage (save_augreg with its options) reads back with them; an
    AugReg model's npz has no option keys at all (the plain format, bit for bit)."""
    torch_model = hf_model(layer_norm_eps=1e-2)
    ckpt = checkpoints.read_vit(save_layout(torch_model, tmp_path / "hf", "hf"))
    model = checkpoints.build_vit(ckpt, num_classes=5, mlp_alpha=0.9)
    assert (model.approximate_gelu, model.layernorm_epsilon) == (False, 1e-2)
    params = checkpoints.load_into(model, ckpt)
    checkpoints.save_augreg(str(tmp_path / "t.npz"), params, vit.numeric_options(model))
    again = checkpoints.read_vit(str(tmp_path / "t.npz"))
    assert {k: again.architecture[k] for k in vit.NUMERIC_OPTIONS} == {"approximate_gelu": False,
                                                                      "layernorm_epsilon": 1e-2}
    plain = str(tmp_path / "plain.npz")
    checkpoints.save_augreg(plain, params, vit.numeric_options(model.clone(approximate_gelu=True,
                                                                            layernorm_epsilon=1e-6)))
    assert sorted(np.load(plain).files) == sorted(tree.flatten_params(params))
    assert not set(vit.NUMERIC_OPTIONS) & set(checkpoints.read_vit(plain).architecture)


# ----------------------------------------------------------------------------- out: timm files

def test_npz_to_timm_to_npz_is_bit_identical(tmp_path):
    path = str(tmp_path / "s.npz")
    np.savez(path, **fmt.random_checkpoint(fmt.documented_layout("Ti", 8, 16, 10, num_layers=2)))
    ckpt = checkpoints.read_vit(path)
    timm_export.write_timm(str(tmp_path / "timm"), ckpt.flat, ckpt.architecture, ckpt.image_size,
                               ckpt.num_classes)
    back = checkpoints.read_vit(str(tmp_path / "timm"))
    assert back.architecture == ckpt.architecture and back.image_size == ckpt.image_size
    assert sorted(back.flat) == sorted(ckpt.flat)
    for key, value in ckpt.flat.items():
        assert back.flat[key].dtype == value.dtype and back.flat[key].tobytes() == value.tobytes(), key


def test_timm_export_loads_in_pytorch_with_equal_logits(tmp_path):
    """Our timm file, renamed as timm's names document into a Hugging Face model (exact GELU, eps as
    recorded), gives the Flax logits; `timm_forward` (the export's on-the-spot check) does too."""
    torch_model = hf_model()
    ckpt = checkpoints.read_vit(save_layout(torch_model, tmp_path / "hf", "hf"))
    model = checkpoints.build_vit(ckpt, num_classes=ckpt.num_classes)
    params = checkpoints.load_into(model, ckpt)
    out = tmp_path / "timm"
    timm_export.write_timm(str(out), ckpt.flat, ckpt.architecture, ckpt.image_size, ckpt.num_classes)
    sd = safetensors_torch.load_file(str(out / "model.safetensors"))
    config = json.load(open(out / "config.json"))
    assert config["model_args"]["num_heads"] == 4 and "act_layer" not in config["model_args"]
    assert config["remem_jax"]["layernorm_epsilon"] == 1e-12
    hub = tmp_path / "as_hf"  # loaded the way transformers loads hub files (from_pretrained)
    hub.mkdir()
    safetensors_torch.save_file({k: v.contiguous() for k, v in timm_to_hf(sd).items()},
                                str(hub / "model.safetensors"), metadata={"format": "pt"})
    torch_model.config.to_json_file(str(hub / "config.json"))
    fresh = transformers.ViTForImageClassification.from_pretrained(str(hub)).eval()
    x = images(3, 32)
    flax = np.asarray(model.apply({"params": params}, x))
    assert np.abs(hf_logits(fresh, x) - flax).max() <= TOLERANCE
    numpy_timm = timm_export.timm_forward({k: v.numpy() for k, v in sd.items()}, config["model_args"],
                                              x.transpose(0, 3, 1, 2), config["remem_jax"]["layernorm_epsilon"])
    assert np.abs(numpy_timm - flax).max() <= TOLERANCE


def test_timm_forward_follows_the_tanh_gelu_option():
    """timm_forward of a converted AugReg model equals the independent NumPy ViT (tests/augreg_format.py):
    with act_layer='gelu_tanh' for a tanh-GELU model, and not with timm's exact GELU."""
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 8, 16, 3, num_layers=2))
    architecture = {**checkpoints.infer_vit_config(flat), "approximate_gelu": True}
    args = timm_export.timm_model_args(architecture, 16, 3)
    assert args["act_layer"] == "gelu_tanh"
    x = images(2, 16)
    sd = timm_export.augreg_to_timm(flat)
    for gelu, model_args in ((fmt.gelu_tanh, args), (fmt.gelu_exact, {k: v for k, v in args.items() if k != "act_layer"})):
        want = fmt.reference_forward(flat, x, patch=8, gelu=gelu)
        assert np.abs(timm_export.timm_forward(sd, model_args, x.transpose(0, 3, 1, 2)) - want).max() <= 1e-9
    assert np.abs(timm_export.timm_forward(sd, {k: v for k, v in args.items() if k != "act_layer"},
                                               x.transpose(0, 3, 1, 2))
                  - fmt.reference_forward(flat, x, patch=8)).max() > TOLERANCE


# ----------------------------------------------------------------------------- refused layouts, bad files

def _timm_folder(tmp_path, extra=None, drop=(), config_args=None):
    torch_model = hf_model(width=32, depth=1, heads=2, mlp=64, classes=2)
    folder = save_layout(torch_model, tmp_path / "timm", "timm")
    sd = safetensors_torch.load_file(os.path.join(folder, "model.safetensors"))
    sd.update(extra or {})
    for key in drop:
        del sd[key]
    safetensors_torch.save_file(sd, os.path.join(folder, "model.safetensors"))
    if config_args:
        config = json.load(open(os.path.join(folder, "config.json")))
        config["model_args"].update(config_args)
        json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    return folder


@pytest.mark.parametrize("key,meaning", [
    ("blocks.0.ls1.gamma", "layer scale"),
    ("reg_token", "register tokens"),
    ("dist_token", "distillation token"),
    ("blocks.0.attn.relative_position_bias_table", "relative position bias"),
    ("norm_pre.weight", "pre-norm before the encoder"),
    ("fc_norm.weight", "norm after pooling"),
])
def test_other_vit_designs_are_refused_by_key(tmp_path, key, meaning):
    folder = _timm_folder(tmp_path, extra={key: torch.zeros(32)})
    with pytest.raises(CheckpointError) as e:
        checkpoints.read_vit(folder)
    message = str(e.value)
    assert key in message and meaning in message and "model.safetensors" in message and "\n" not in message


@pytest.mark.parametrize("args,name", [({"global_pool": "avg"}, "model_args.global_pool"),
                                       ({"no_embed_class": True}, "model_args.no_embed_class"),
                                       ({"init_values": 1e-5}, "model_args.init_values")])
def test_other_designs_in_the_config_are_refused(tmp_path, args, name):
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        checkpoints.read_vit(_timm_folder(tmp_path, config_args=args))


def test_missing_key_and_wrong_shape_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"without key 'blocks\.0\.attn\.qkv\.bias'"):
        checkpoints.read_vit(_timm_folder(tmp_path, drop=["blocks.0.attn.qkv.bias"]))
    with pytest.raises(CheckpointError, match=r"'blocks\.0\.mlp\.fc2\.bias' has shape \(7,\); expected \(32,\)"):
        checkpoints.read_vit(_timm_folder(tmp_path, extra={"blocks.0.mlp.fc2.bias": torch.zeros(7)}))


def test_hf_layout_other_models_are_refused(tmp_path):
    torch_model = hf_model(width=32, depth=1, heads=2, mlp=64)
    folder = save_layout(torch_model, tmp_path / "deit", "hf")
    sd = safetensors_torch.load_file(os.path.join(folder, "model.safetensors"))
    sd["vit.embeddings.distillation_token"] = torch.zeros(1, 1, 32)
    safetensors_torch.save_file(sd, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError, match="'embeddings.distillation_token' is a distillation token"):
        checkpoints.read_vit(folder)


def test_truncated_safetensors_is_named(tmp_path):
    folder = _timm_folder(tmp_path)
    path = os.path.join(folder, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt") as e:
        checkpoints.read_vit(path)
    assert "\n" not in str(e.value)


def test_hf_hub_name_reads_the_local_cache_or_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    name = "hf-hub:timm/vit_tiny_test.augreg_in21k"
    with pytest.raises(CheckpointError, match=r"`hf download timm/vit_tiny_test\.augreg_in21k`") as e:
        checkpoints.read_vit(name)
    assert "\n" not in str(e.value)
    snapshot = tmp_path / "hub" / "models--timm--vit_tiny_test.augreg_in21k" / "snapshots" / "abc123"
    folder = _timm_folder(tmp_path)
    snapshot.parent.mkdir(parents=True)
    os.rename(folder, snapshot)
    (tmp_path / "hub" / "models--timm--vit_tiny_test.augreg_in21k" / "refs").mkdir()
    (tmp_path / "hub" / "models--timm--vit_tiny_test.augreg_in21k" / "refs" / "main").write_text("abc123")
    ckpt = checkpoints.read_vit(name)
    assert ckpt.path == str(snapshot / "model.safetensors") and ckpt.architecture["num_heads"] == 2


# ----------------------------------------------------------------------------- timm itself, where it imports

def _timm():
    try:
        import timm
    except ImportError as e:  # timm needs torchvision, which PyPI does not build beside the CPU torch
        pytest.skip(f"timm does not import here ({e}); its layout is checked by renaming above")
    return timm


def test_timm_save_for_hf_loads_with_timm_logits(tmp_path):
    """A random timm ViT (exact GELU, eps 1e-6) saved by timm's own `save_for_hf`: equal logits here."""
    timm = _timm()
    args = dict(img_size=48, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    timm.models.save_for_hf(model, str(tmp_path / "timm"), model_args=args, safe_serialization=True)
    x = images(2, 48)
    _, got = jax_logits(str(tmp_path / "timm"), x)
    with torch.no_grad():
        want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(got - want).max() <= TOLERANCE, np.abs(got - want).max()


@pytest.mark.parametrize("options", [{}, {"approximate_gelu": False}])
def test_exported_timm_folder_loads_in_timm(tmp_path, options):
    """`timm.create_model('local-dir:...')` on our export gives the Flax logits (tanh GELU as gelu_tanh)."""
    timm = _timm()
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 8, 16, 3, num_layers=2))
    architecture = {**checkpoints.infer_vit_config(flat), **options}
    architecture.pop("image_size"), architecture.pop("num_classes")
    timm_export.write_timm(str(tmp_path / "out"), flat, architecture, 16, 3)
    model = vit.VisionTransformer(num_classes=3, **architecture)
    x = images(2, 16)
    flax = np.asarray(jax.jit(model.apply)({"params": tree.unflatten_params(flat)}, x))
    loaded = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    with torch.no_grad():
        got = loaded(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(got - flax).max() <= TOLERANCE, np.abs(got - flax).max()
