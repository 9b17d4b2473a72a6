"""ViT checkpoints from PyTorch hubs (timm, Hugging Face) into the AugReg tree, and timm files out.

In: a `.safetensors` / `.bin` / `.pth` file, a folder holding one (and its `config.json`), or a
name `hf-hub:<org>/<repo>` found in the local Hugging Face cache. Three layouts are read:

* **timm** `VisionTransformer`: `patch_embed.proj`, `cls_token`, `pos_embed`,
  `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`, `head`;
* **Hugging Face, as stored on the hub** (`ViTModel` / `ViTForImageClassification`, what
  `save_pretrained` writes): `vit.embeddings...`, `vit.encoder.layer.N.attention.attention.query`,
  `...attention.output.dense`, `...intermediate.dense`, `...output.dense`, `vit.layernorm`,
  `classifier`, `pooler.dense` (ViTModel);
* **Hugging Face, in memory** (transformers 5's `model.state_dict()`): `vit.layers.N.attention.
  {q,k,v,o}_proj`, `vit.layers.N.mlp.{fc1,fc2}`.

The weights become the raw AugReg names (`checkpoints.infer_vit_config` then reads the
architecture from their shapes), so everything downstream is unchanged. Only the standard
pre-norm ViT with a class token, learned position embeddings and a GELU MLP fits; any key of
another design (layer scale, register tokens, a distillation token, relative position bias, a
pre-norm before the encoder, a norm after pooling) is refused by name. The numeric options
follow the source (`vit.NUMERIC_OPTIONS`): exact (erf) GELU unless the config asks for the tanh
form, LayerNorm epsilon 1e-6 for timm and the config's `layer_norm_eps` (1e-12 by default) for
Hugging Face. Input normalisation other than AugReg's (x / 127.5 - 1, i.e. mean = std = 0.5)
given by the config (timm `pretrained_cfg` mean/std, Hugging Face `preprocessor_config.json`)
is folded into the patch embedding, so the converted model reads the project's [-1, 1] images.

Reading needs no PyTorch: safetensors read straight into NumPy. `.bin` / `.pth` need torch and
are read only with its weights-only unpickler, so a checkpoint can never run code.

The other direction, the AugReg tree out as a timm folder, is `remem_jax.timm_export`.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional

import numpy as np
from absl import logging

from remem_jax import checkpoints, files
from remem_jax.models import vit

HF_HUB_PREFIX = "hf-hub:"
EXTENSIONS = (".safetensors", ".bin", ".pth", ".pt")
# Weight files a folder may hold, in the order they are looked for.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "model.pth")
CONFIG_JSON = "config.json"
PREPROCESSOR_JSON = "preprocessor_config.json"
AUGREG_MEAN_STD = (0.5, 0.5)  # x / 127.5 - 1 = (x / 255 - 0.5) / 0.5
# The key of our own entry in an exported timm config.json (what timm's model args cannot say).
REMEM_KEY = "remem_jax"
TIMM_DEFAULT_EPSILON = 1e-6

# Source names of each piece, per layout (Hugging Face keys after dropping a leading `vit.`).
_TOP = {
    "timm": dict(patch="patch_embed.proj", cls="cls_token", pos="pos_embed", norm="norm", head="head"),
    "hf": dict(patch="embeddings.patch_embeddings.projection", cls="embeddings.cls_token",
               pos="embeddings.position_embeddings", norm="layernorm", head="classifier", pooler="pooler.dense"),
}
_TOP["hf-new"] = _TOP["hf"]
_BLOCK = {
    "timm": dict(prefix="blocks.{i}.", ln1="norm1", qkv="attn.qkv", out="attn.proj", ln2="norm2",
                 fc1="mlp.fc1", fc2="mlp.fc2"),
    "hf": dict(prefix="encoder.layer.{i}.", ln1="layernorm_before", q="attention.attention.query",
               k="attention.attention.key", v="attention.attention.value", out="attention.output.dense",
               ln2="layernorm_after", fc1="intermediate.dense", fc2="output.dense"),
    "hf-new": dict(prefix="layers.{i}.", ln1="layernorm_before", q="attention.q_proj", k="attention.k_proj",
                   v="attention.v_proj", out="attention.o_proj", ln2="layernorm_after", fc1="mlp.fc1",
                   fc2="mlp.fc2"),
}
_LAYOUT_NAMES = {"timm": "timm VisionTransformer", "hf": "Hugging Face ViT (hub layout)",
                 "hf-new": "Hugging Face ViT (transformers 5 state_dict layout)"}
# Parts of other ViT designs, by a piece of their key: what the key means.
_REFUSED = (
    ("reg_token", "register tokens"), ("register_tokens", "register tokens"),
    ("dist_token", "a distillation token (DeiT)"), ("distillation_token", "a distillation token (DeiT)"),
    ("head_dist", "a distillation head (DeiT)"), ("distillation_classifier", "a distillation head (DeiT)"),
    (".ls1.", "layer scale"), (".ls2.", "layer scale"), ("gamma_1", "layer scale"), ("gamma_2", "layer scale"),
    ("layer_scale", "layer scale"), ("lambda1", "layer scale"),
    ("relative_position", "relative position bias"), ("rel_pos", "relative position bias"),
    ("norm_pre", "a pre-norm before the encoder"), ("pre_layrnorm", "a pre-norm before the encoder"),
    ("fc_norm", "a norm after pooling (global average pooling)"), ("q_norm", "QK normalisation"),
    ("k_norm", "QK normalisation"), ("mask_token", "a mask token (a masked-image-model encoder)"),
    ("attn_pool", "attention pooling"),
)


def is_hub_checkpoint(path_or_name: str) -> bool:
    """Whether `path_or_name` names a PyTorch-hub ViT (hf-hub: name, .safetensors/.bin/.pth file, or a
    local folder holding one of `WEIGHT_FILES`) rather than an AugReg npz."""
    if path_or_name.startswith(HF_HUB_PREFIX) or path_or_name.lower().endswith(EXTENSIONS):
        return True
    return os.path.isdir(path_or_name) and any(
        os.path.isfile(os.path.join(path_or_name, name)) for name in WEIGHT_FILES)


# ----------------------------------------------------------------------------- finding the files

def hf_cache_dir() -> str:
    """The local Hugging Face hub cache (`$HF_HUB_CACHE`, `$HF_HOME/hub`, or ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(home, "hub")


def resolve_hf_hub(name: str) -> str:
    """The local snapshot folder of `hf-hub:<org>/<repo>[@revision]` in the Hugging Face cache.

    Nothing is downloaded; a repository that is not cached is one line with the command that
    fetches it.
    """
    repo = name[len(HF_HUB_PREFIX):]
    repo, _, revision = repo.partition("@")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise checkpoints.CheckpointError(f"{name!r} is not a Hugging Face hub name: expected hf-hub:<org>/<repo>.")
    root = os.path.join(hf_cache_dir(), "models--" + repo.replace("/", "--"))
    revision = revision or "main"
    ref = os.path.join(root, "refs", revision)
    commit = revision
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
    snapshot = os.path.join(root, "snapshots", commit)
    if not os.path.isdir(snapshot):
        raise checkpoints.CheckpointError(
            f"{name} is not in the local Hugging Face cache ({hf_cache_dir()}); download it with "
            f"`hf download {repo}` (pip install huggingface_hub) and run again, or pass the file's path.")
    return snapshot


def locate(path_or_name: str) -> tuple[str, Optional[str]]:
    """The weight file and the `config.json` beside it (None when there is none) of a hub checkpoint."""
    path = resolve_hf_hub(path_or_name) if path_or_name.startswith(HF_HUB_PREFIX) else path_or_name
    if files.is_remote(path):
        raise checkpoints.CheckpointError(
            f"{path!r}: timm / Hugging Face checkpoints are read from local files; copy it here first "
            "(e.g. `gsutil cp`), with its config.json.")
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise checkpoints.CheckpointError(
                f"Folder {path!r} holds none of {', '.join(WEIGHT_FILES)} (sharded checkpoints are not read).")
        weights = found[0]
    elif not os.path.exists(path):
        raise checkpoints.CheckpointError(f"Checkpoint file {path!r} does not exist.")
    else:
        weights = path
    config = os.path.join(os.path.dirname(weights), CONFIG_JSON)
    return weights, (config if os.path.isfile(config) else None)


def _read_json(path: Optional[str]) -> dict:
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise checkpoints.CheckpointError(f"{path} is not readable JSON ({type(e).__name__}: {e}).") from e
    if not isinstance(value, dict):
        raise checkpoints.CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object.")
    return value


# ----------------------------------------------------------------------------- reading tensors

def read_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a `.safetensors` (NumPy, no torch) or `.bin` / `.pth` (torch, weights only) file.

    Raises:
      CheckpointError: truncated or corrupt file (named), torch missing for a pickle file, or a
        pickle that holds anything but tensors.
    """
    if path.lower().endswith(".safetensors"):
        import safetensors.numpy
        try:
            return dict(safetensors.numpy.load_file(path))
        except KeyError:  # a dtype safetensors' NumPy reader lacks (BF16): the file itself was valid
            return _read_safetensors_via_ml_dtypes(path)
        except Exception as e:  # safetensors' SafetensorError is a plain Exception subclass
            raise checkpoints.CheckpointError(
                f"Checkpoint {path!r} ({os.path.getsize(path)} bytes) is not a readable safetensors file; it "
                f"may be truncated or corrupt: {e}") from e
    return _read_torch_pickle(path)


# safetensors dtype names -> NumPy dtypes (bfloat16 from ml_dtypes, which JAX depends on).
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _read_safetensors_via_ml_dtypes(path: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (format: u64 header size, JSON header, data) with bfloat16 ones
    as float32; for the files `safetensors.numpy` cannot read (it has no bfloat16)."""
    import ml_dtypes
    with open(path, "rb") as f:
        data = f.read()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        if spec["dtype"] not in _SAFETENSORS_DTYPES:
            raise checkpoints.CheckpointError(
                f"{path!r}: tensor {name!r} has dtype {spec['dtype']}, which is not read.")
        dtype = ml_dtypes.bfloat16 if spec["dtype"] == "BF16" else np.dtype(_SAFETENSORS_DTYPES[spec["dtype"]])
        start, end = spec["data_offsets"]
        value = np.frombuffer(data[8 + size + start:8 + size + end], dtype).reshape(spec["shape"])
        out[name] = value.astype(np.float32) if spec["dtype"] == "BF16" else value
    return out


def _read_torch_pickle(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise checkpoints.CheckpointError(
            f"Reading {path!r} needs PyTorch (`pip install torch`): .bin / .pth files are torch pickles. "
            "A .safetensors copy of the same weights reads without it.") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # noqa: BLE001 - torch raises many kinds; all mean the same here
        raise checkpoints.CheckpointError(
            f"Checkpoint {path!r} cannot be read with torch's weights-only loader (truncated, corrupt, or it "
            f"holds objects other than tensors): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if isinstance(obj, dict) and len(obj) >= 1 and not any(torch.is_tensor(v) for v in obj.values()):
        for key in ("model", "state_dict", "module"):  # DeiT / DINO / MAE training checkpoints wrap it
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise checkpoints.CheckpointError(f"{path!r} does not hold a state dict of tensors.")
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items()}


# ----------------------------------------------------------------------------- into the AugReg tree

def detect_layout(tensors: Mapping[str, Any], source: str) -> str:
    """'timm', 'hf' or 'hf-new' from the keys (Hugging Face keys without their leading `vit.`)."""
    if "patch_embed.proj.weight" in tensors:
        return "timm"
    if "embeddings.patch_embeddings.projection.weight" in tensors:
        return "hf-new" if any(k.startswith("layers.") for k in tensors) else "hf"
    raise checkpoints.CheckpointError(
        f"{source}: neither a timm VisionTransformer (no 'patch_embed.proj.weight') nor a Hugging Face ViT (no "
        f"'vit.embeddings.patch_embeddings.projection.weight'); it has {len(tensors)} keys, e.g. "
        f"{sorted(tensors)[:4]}.")


def _strip_vit_prefix(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in tensors.items()}


def _refuse_other_designs(tensors: Mapping[str, Any], source: str) -> None:
    for key in sorted(tensors):
        for piece, meaning in _REFUSED:
            if piece in key:
                raise checkpoints.CheckpointError(
                    f"{source}: key {key!r} is {meaning}, which the standard pre-norm ViT with a class token "
                    "does not have; this checkpoint cannot be loaded.")


class _Taker:
    """Pops source tensors by name, with one error naming the file and key for a missing one or a bad shape."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str, layout: str):
        self.left = dict(tensors)
        self.source, self.layout = source, layout

    def __call__(self, key: str, shape: Optional[tuple] = None) -> np.ndarray:
        if key not in self.left:
            raise checkpoints.CheckpointError(
                f"{self.source}: {_LAYOUT_NAMES[self.layout]} without key {key!r} (a standard pre-norm ViT with "
                "a class token and biases on every linear layer has it).")
        value = np.asarray(self.left.pop(key), np.float32)
        if shape is not None and value.shape != tuple(shape):
            raise checkpoints.CheckpointError(
                f"{self.source}: {key!r} has shape {value.shape}; expected {tuple(shape)}.")
        return value

    def optional(self, key: str) -> bool:
        return key in self.left

    def check_all_used(self) -> None:
        if self.left:
            key = sorted(self.left)[0]
            raise checkpoints.CheckpointError(
                f"{self.source}: key {key!r} does not fit a standard pre-norm ViT with a class token "
                f"({len(self.left)} such keys: {sorted(self.left)[:6]}).")


def block_count(tensors: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix).replace(r"\{i\}", r"(\d+)"))
    found = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
    if found and sorted(found) != list(range(len(found))):
        raise checkpoints.CheckpointError(f"Block indices must be 0..{len(found) - 1}, got {sorted(found)}.")
    return len(found)


def to_augreg(tensors: Mapping[str, np.ndarray], *, num_heads: int, source: str) -> dict[str, np.ndarray]:
    """A timm or Hugging Face ViT state dict as a flat raw-named AugReg tree (float32 NumPy).

    Args:
      tensors: the state dict (any of the three layouts of the module docstring).
      num_heads: attention heads (not in the weights' shapes; from the config).
      source: the file, for errors.

    Raises:
      CheckpointError: a key of another ViT design, a missing key, a wrong shape, or a key left over.
    """
    tensors = _strip_vit_prefix(tensors)
    layout = detect_layout(tensors, source)
    _refuse_other_designs(tensors, source)
    top, blk = _TOP[layout], _BLOCK[layout]
    take = _Taker(tensors, source, layout)
    patch = take(top["patch"] + ".weight")
    if patch.ndim != 4 or patch.shape[1] != 3 or patch.shape[2] != patch.shape[3]:
        raise checkpoints.CheckpointError(f"{source}: {top['patch']}.weight has shape {patch.shape}; expected "
                                          "(D, 3, patch, patch).")
    width = patch.shape[0]
    if width % num_heads:
        raise checkpoints.CheckpointError(f"{source}: hidden size {width} does not split over {num_heads} heads.")
    head_dim = width // num_heads
    pos = take(top["pos"])
    grid = int(round(np.sqrt(max(pos.shape[1] - 1, 0)))) if pos.ndim == 3 else -1
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != width or grid * grid != pos.shape[1] - 1:
        raise checkpoints.CheckpointError(
            f"{source}: {top['pos']!r} has shape {pos.shape}; expected (1, 1 + grid*grid, {width}): learned position "
            "embeddings with a class-token row (a grid without one is timm's no_embed_class layout, refused).")
    flat = {
        "embedding/kernel": patch.transpose(2, 3, 1, 0),
        "embedding/bias": take(top["patch"] + ".bias", (width,)),
        "cls": take(top["cls"], (1, 1, width)),
        "Transformer/posembed_input/pos_embedding": pos,
        "Transformer/encoder_norm/scale": take(top["norm"] + ".weight", (width,)),
        "Transformer/encoder_norm/bias": take(top["norm"] + ".bias", (width,)),
    }
    num_layers = block_count(tensors, blk["prefix"])
    if not num_layers:
        raise checkpoints.CheckpointError(f"{source}: no encoder blocks ({blk['prefix'].format(i='N')}...).")
    for i in range(num_layers):
        b = blk["prefix"].format(i=i)
        out = f"Transformer/encoderblock_{i}/"
        attn = out + "MultiHeadDotProductAttention_1/"
        if "qkv" in blk:  # timm: rows [q; k; v], each head-major (reshape(B, N, 3, heads, head_dim))
            qkv_w = take(b + blk["qkv"] + ".weight", (3 * width, width))
            qkv_b = take(b + blk["qkv"] + ".bias", (3 * width,))
            qkv = dict(zip("qkv", zip(np.split(qkv_w, 3), np.split(qkv_b, 3))))
        else:
            qkv = {n: (take(b + blk[n] + ".weight", (width, width)), take(b + blk[n] + ".bias", (width,)))
                   for n in "qkv"}
        for n, name in (("q", "query"), ("k", "key"), ("v", "value")):
            w, bias = qkv[n]
            flat[attn + name + "/kernel"] = w.T.reshape(width, num_heads, head_dim)
            flat[attn + name + "/bias"] = bias.reshape(num_heads, head_dim)
        flat[attn + "out/kernel"] = take(b + blk["out"] + ".weight", (width, width)).T.reshape(
            num_heads, head_dim, width)
        flat[attn + "out/bias"] = take(b + blk["out"] + ".bias", (width,))
        for ln, name in (("ln1", "LayerNorm_0"), ("ln2", "LayerNorm_2")):
            flat[out + name + "/scale"] = take(b + blk[ln] + ".weight", (width,))
            flat[out + name + "/bias"] = take(b + blk[ln] + ".bias", (width,))
        fc1 = take(b + blk["fc1"] + ".weight")
        if fc1.ndim != 2 or fc1.shape[1] != width:
            raise checkpoints.CheckpointError(f"{source}: {b + blk['fc1']}.weight has shape {fc1.shape}; "
                                              f"expected (mlp_dim, {width}).")
        mlp_dim = fc1.shape[0]
        flat[out + "MlpBlock_3/Dense_0/kernel"] = fc1.T
        flat[out + "MlpBlock_3/Dense_0/bias"] = take(b + blk["fc1"] + ".bias", (mlp_dim,))
        flat[out + "MlpBlock_3/Dense_1/kernel"] = take(b + blk["fc2"] + ".weight", (width, mlp_dim)).T
        flat[out + "MlpBlock_3/Dense_1/bias"] = take(b + blk["fc2"] + ".bias", (width,))
    pooler = top.get("pooler")
    if pooler and take.optional(pooler + ".weight"):  # ViTModel's pooler: Dense + tanh on the normed CLS
        flat["pre_logits/kernel"] = take(pooler + ".weight", (width, width)).T
        flat["pre_logits/bias"] = take(pooler + ".bias", (width,))
    if take.optional(top["head"] + ".weight"):
        head = take(top["head"] + ".weight")
        if head.ndim != 2 or head.shape[1] != width:
            raise checkpoints.CheckpointError(f"{source}: {top['head']}.weight has shape {head.shape}; expected "
                                              f"(classes, {width}).")
        flat["head/kernel"] = head.T
        flat["head/bias"] = take(top["head"] + ".bias", (head.shape[0],))
    take.check_all_used()
    return {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}


def fold_normalization(flat: dict[str, np.ndarray], mean, std) -> dict[str, np.ndarray]:
    """The patch embedding rewritten to read [-1, 1] images for a model trained on `(x01 - mean) / std`.

    With x01 = (x + 1) / 2, `(x01 - mean) / std = x / (2 std) + (0.5 - mean) / std`; the patch
    embedding is linear with no padding, so its kernel is scaled per input channel by
    1 / (2 std) and its bias gains the kernel's sum times (0.5 - mean) / std. Exact.
    """
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    kernel = flat["embedding/kernel"].astype(np.float64)  # (p, p, 3, D)
    shift = np.einsum("hwcd,c->d", kernel, (0.5 - mean) / std)
    out = dict(flat)
    out["embedding/kernel"] = (kernel / (2.0 * std)[None, None, :, None]).astype(np.float32)
    out["embedding/bias"] = (flat["embedding/bias"].astype(np.float64) + shift).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- what the config says

def _refuse_config(config: Mapping[str, Any], source: str) -> None:
    args = config.get("model_args") or {}
    checks = (
        ("model_args.global_pool", args.get("global_pool", config.get("global_pool", "token")), ("token",)),
        ("model_args.class_token", args.get("class_token", True), (True,)),
        ("model_args.no_embed_class", args.get("no_embed_class", False), (False,)),
        ("model_args.reg_tokens", args.get("reg_tokens", 0), (0, None)),
        ("model_args.init_values", args.get("init_values"), (None,)),
        ("model_args.pre_norm", args.get("pre_norm", False), (False,)),
        ("model_args.final_norm", args.get("final_norm", True), (True,)),
        ("model_args.qk_norm", args.get("qk_norm", False), (False,)),
        ("num_channels", config.get("num_channels", 3), (3,)),
        ("model_args.in_chans", args.get("in_chans", 3), (3,)),
    )
    for name, value, allowed in checks:
        if value not in allowed:
            raise checkpoints.CheckpointError(
                f"{source}: {name} = {value!r} does not fit a standard pre-norm ViT with a class token "
                f"(it must be {' or '.join(map(repr, allowed))}).")
    model_type = config.get("model_type")
    if model_type not in (None, "vit"):
        raise checkpoints.CheckpointError(f"{source}: model_type = {model_type!r}; only Hugging Face 'vit' models "
                                          "(ViTModel / ViTForImageClassification) are read.")


_EXACT_GELU = ("gelu", "nn.GELU", "gelu_erf")
_TANH_GELU = ("gelu_tanh", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _gelu_option(name: Optional[str], key: str, source: str) -> bool:
    """`approximate_gelu` for an activation name (None: exact GELU, the default of both libraries)."""
    if name is None or name in _EXACT_GELU:
        return False
    if name in _TANH_GELU:
        return True
    raise checkpoints.CheckpointError(f"{source}: {key} = {name!r} is not GELU; only GELU MLPs are read.")


def numeric_options(layout: str, config: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`approximate_gelu` and `layernorm_epsilon` of the source model, from its config (or the library's
    defaults: exact GELU; eps 1e-6 for timm, 1e-12 for Hugging Face)."""
    own = config.get(REMEM_KEY) or {}  # a file this project exported
    if layout == "timm":
        args = config.get("model_args") or {}
        options = {"approximate_gelu": _gelu_option(args.get("act_layer"), "model_args.act_layer", source),
                   "layernorm_epsilon": TIMM_DEFAULT_EPSILON}
    else:
        options = {"approximate_gelu": _gelu_option(config.get("hidden_act"), "hidden_act", source),
                   "layernorm_epsilon": float(config.get("layer_norm_eps", 1e-12))}
    options.update({k: v for k, v in own.items() if k in vit.NUMERIC_OPTIONS})
    return options


def _num_heads(layout: str, config: Mapping[str, Any], width: int, source: str) -> int:
    heads = (config.get("model_args") or {}).get("num_heads") if layout == "timm" else config.get(
        "num_attention_heads")
    if heads is None and layout == "timm":
        heads = _TIMM_HEADS.get(_timm_size(config.get("architecture", "")))
    if heads is None:
        if width % 64:
            raise checkpoints.CheckpointError(
                f"{source}: the head count is not in the weights and there is no config.json saying it; put the "
                "model's config.json beside the file.")
        heads = width // 64
        logging.warning("%s: no config.json gives the head count; using %d heads of 64 channels (every timm / "
                        "Hugging Face ViT-Ti/S/B/L). Put the model's config.json beside the file to be sure.",
                        source, heads)
    return int(heads)


_TIMM_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16, "giant": 16, "gigantic": 16}


def _timm_size(architecture: str) -> Optional[str]:
    match = re.match(r"(?:deit_|vit_)(tiny|small|base|large|huge|giant|gigantic)_", architecture)
    return match.group(1) if match else None


def _mean_std(layout: str, config: Mapping[str, Any], folder: str) -> Optional[tuple]:
    """The source's input normalisation (mean, std per channel), or None when unknown."""
    if layout == "timm":
        cfg = config.get("pretrained_cfg") or config
        mean, std = cfg.get("mean"), cfg.get("std")
    else:
        pre = _read_json(os.path.join(folder, PREPROCESSOR_JSON))
        mean, std = pre.get("image_mean"), pre.get("image_std")
    if mean is None or std is None:
        return None
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def read(path_or_name: str) -> tuple[str, dict[str, np.ndarray], dict[str, Any]]:
    """Reads a timm / Hugging Face ViT checkpoint as the AugReg tree.

    Returns:
      `(weights_path, flat, options)`: the weight file read; the raw-named float32 arrays (input
      normalisation folded into the patch embedding); `vit.NUMERIC_OPTIONS` values of the source.

    Raises:
      CheckpointError: see `locate`, `read_tensors`, `to_augreg`, and a config that describes
        another design.
    """
    weights, config_path = locate(path_or_name)
    config = _read_json(config_path)
    source = repr(weights)
    _refuse_config(config, source)
    tensors = _strip_vit_prefix(read_tensors(weights))
    checkpoints.check_finite(weights, {k: v for k, v in tensors.items() if isinstance(v, np.ndarray)})
    layout = detect_layout(tensors, source)
    width = np.shape(tensors[_TOP[layout]["patch"] + ".weight"])[0]
    flat = to_augreg(tensors, num_heads=_num_heads(layout, config, width, source), source=source)
    options = numeric_options(layout, config, source)
    mean_std = _mean_std(layout, config, os.path.dirname(weights))
    if mean_std is not None and not np.allclose(mean_std, [[AUGREG_MEAN_STD[0]] * 3, [AUGREG_MEAN_STD[1]] * 3]):
        logging.info("%s: input normalisation mean %s std %s folded into the patch embedding (images in [-1, 1]).",
                     weights, *mean_std)
        flat = fold_normalization(flat, *mean_std)
    logging.info("%s: %s, %d blocks, numeric options %s.", weights, _LAYOUT_NAMES[layout],
                 block_count(flat, "Transformer/encoderblock_{i}/"), options)
    return weights, flat, options
