"""The AugReg tree out as a timm `VisionTransformer` folder, and a NumPy timm forward to check it.

`augreg_to_timm` / `timm_model_args` / `write_timm` give the state dict, its model arguments and a
folder (`model.safetensors` + `config.json`) that `timm.create_model('local-dir:<folder>',
pretrained=True)` loads and `hub_checkpoints` reads back bit for bit. `timm_forward` is a NumPy
forward pass of such a state dict (timm's arithmetic, written from its code) that `export`
verifies the written file with, without torch. The way in is `remem_jax.hub_checkpoints`.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import numpy as np

from remem_jax import checkpoints, files
from remem_jax.hub_checkpoints import (AUGREG_MEAN_STD, CONFIG_JSON, REMEM_KEY, TIMM_DEFAULT_EPSILON,
                                       block_count)
from remem_jax.models import vit

def augreg_to_timm(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A raw-named AugReg tree (no adapters) as a timm `VisionTransformer` state dict (float32 NumPy)."""
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    unsupported = sorted(k for k in flat if "/Adapter_" in k or k.startswith("pre_logits/"))
    if unsupported:
        raise checkpoints.CheckpointError(f"A timm VisionTransformer has no place for {unsupported[0]!r} "
                                          f"({len(unsupported)} such keys); fold or drop them first.")
    sd = {
        "cls_token": flat["cls"],
        "pos_embed": flat["Transformer/posembed_input/pos_embedding"],
        "patch_embed.proj.weight": flat["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": flat["embedding/bias"],
        "norm.weight": flat["Transformer/encoder_norm/scale"],
        "norm.bias": flat["Transformer/encoder_norm/bias"],
    }
    for i in range(block_count(flat, "Transformer/encoderblock_{i}/")):
        src, dst = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attn = src + "MultiHeadDotProductAttention_1/"
        width = flat[attn + "query/kernel"].shape[0]
        sd[dst + "norm1.weight"] = flat[src + "LayerNorm_0/scale"]
        sd[dst + "norm1.bias"] = flat[src + "LayerNorm_0/bias"]
        qkv = ("query", "key", "value")  # timm's rows: [q; k; v], each head-major
        sd[dst + "attn.qkv.weight"] = np.concatenate([flat[attn + n + "/kernel"].reshape(width, -1).T for n in qkv])
        sd[dst + "attn.qkv.bias"] = np.concatenate([flat[attn + n + "/bias"].reshape(-1) for n in qkv])
        sd[dst + "attn.proj.weight"] = flat[attn + "out/kernel"].reshape(-1, width).T
        sd[dst + "attn.proj.bias"] = flat[attn + "out/bias"]
        sd[dst + "norm2.weight"] = flat[src + "LayerNorm_2/scale"]
        sd[dst + "norm2.bias"] = flat[src + "LayerNorm_2/bias"]
        sd[dst + "mlp.fc1.weight"] = flat[src + "MlpBlock_3/Dense_0/kernel"].T
        sd[dst + "mlp.fc1.bias"] = flat[src + "MlpBlock_3/Dense_0/bias"]
        sd[dst + "mlp.fc2.weight"] = flat[src + "MlpBlock_3/Dense_1/kernel"].T
        sd[dst + "mlp.fc2.bias"] = flat[src + "MlpBlock_3/Dense_1/bias"]
    if "head/kernel" in flat:
        sd["head.weight"] = flat["head/kernel"].T
        sd["head.bias"] = flat["head/bias"]
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def timm_model_args(architecture: Mapping[str, Any], image_size: int, num_classes: int) -> dict[str, Any]:
    """The `timm.create_model` arguments of a ViT (a `VitFile.architecture`, options included).

    LayerNorm epsilon is not a timm model argument: when it is not timm's 1e-6 the caller passes
    `norm_layer=functools.partial(torch.nn.LayerNorm, eps=...)` (our config.json records it).
    """
    bad = {k: architecture.get(k) for k in ("representation_size", "adapter_dim", "last_block_heads")
           if architecture.get(k)}
    if bad:
        raise checkpoints.CheckpointError(f"A timm VisionTransformer cannot express {bad}.")
    width = architecture["hidden_size"]
    args = dict(img_size=int(image_size), patch_size=int(architecture["patch_size"]), embed_dim=int(width),
                depth=int(architecture["num_layers"]), num_heads=int(architecture["num_heads"]),
                mlp_ratio=architecture["mlp_dim"] / width, num_classes=int(num_classes), global_pool="token",
                class_token=True, qkv_bias=True)
    if architecture.get("approximate_gelu", vit.NUMERIC_OPTIONS["approximate_gelu"]):
        args["act_layer"] = "gelu_tanh"
    return args


def timm_config(architecture: Mapping[str, Any], image_size: int, num_classes: int,
                label_names: Optional[list] = None) -> dict[str, Any]:
    """The `config.json` timm reads from a local folder or hub repository (`local-dir:` / `hf-hub:`)."""
    args = timm_model_args(architecture, image_size, num_classes)
    options = {k: architecture.get(k, d) for k, d in vit.NUMERIC_OPTIONS.items()}
    config = {
        "architecture": "vit_base_patch16_224",  # an entry point only: model_args set every size
        "num_classes": int(num_classes),
        "num_features": int(architecture["hidden_size"]),
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": {"input_size": [3, int(image_size), int(image_size)], "fixed_input_size": True,
                           "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center",
                           "mean": [AUGREG_MEAN_STD[0]] * 3, "std": [AUGREG_MEAN_STD[1]] * 3,
                           "num_classes": int(num_classes), "first_conv": "patch_embed.proj",
                           "classifier": "head"},
        REMEM_KEY: dict(options, note=(
            "layernorm_epsilon is not a timm model argument; when it is not 1e-6 pass "
            "norm_layer=functools.partial(torch.nn.LayerNorm, eps=layernorm_epsilon) to timm.create_model.")),
    }
    if label_names is not None:
        config["label_names"] = list(label_names)
    return config


def safetensors_bytes(state_dict: Mapping[str, np.ndarray]) -> bytes:
    """A safetensors file of `state_dict` (metadata format 'pt', as torch's `save_file` writes)."""
    import safetensors.numpy
    return safetensors.numpy.save(dict(state_dict), metadata={"format": "pt"})


def write_timm(directory: str, flat: Mapping[str, np.ndarray], architecture: Mapping[str, Any], image_size: int,
               num_classes: int, label_names: Optional[list] = None) -> None:
    """Writes `model.safetensors` and `config.json` of a timm ViT to `directory` (each atomically)."""
    files.makedirs(directory)
    files.atomic_write(os.path.join(directory, "model.safetensors"), safetensors_bytes(augreg_to_timm(flat)))
    files.write_json(os.path.join(directory, CONFIG_JSON),
                     timm_config(architecture, image_size, num_classes, label_names))


def read_timm(directory: str) -> tuple[dict[str, np.ndarray], dict[str, Any], float]:
    """`(state dict, model_args, LayerNorm epsilon)` of a timm folder `write_timm` wrote (local or remote)."""
    import json

    import safetensors.numpy
    state = safetensors.numpy.load(files.read_bytes(os.path.join(directory, "model.safetensors")))
    config = json.loads(files.read_bytes(os.path.join(directory, CONFIG_JSON)))
    eps = (config.get(REMEM_KEY) or {}).get("layernorm_epsilon", TIMM_DEFAULT_EPSILON)
    return state, config["model_args"], float(eps)


def timm_forward(state_dict: Mapping[str, np.ndarray], model_args: Mapping[str, Any], images_nchw: np.ndarray,
                 layernorm_epsilon: float = TIMM_DEFAULT_EPSILON) -> np.ndarray:
    """Logits of timm's `VisionTransformer` (class token, token pooling) on NCHW images, in NumPy float64.

    Written from timm's `VisionTransformer.forward` / `Block` / `Attention` / `Mlp`: patch conv,
    `cat(cls, x) + pos_embed`, per block `x + proj(attn(norm1(x)))` with `qkv.reshape(B, N, 3,
    heads, head_dim).permute(2, 0, 3, 1, 4)`, `x + fc2(act(fc1(norm2(x))))`, `norm`, `head(x[:, 0])`.
    """
    from scipy.special import erf
    sd = {k: np.asarray(v, np.float64) for k, v in state_dict.items()}
    p, heads = model_args["patch_size"], model_args["num_heads"]
    tanh = model_args.get("act_layer") == "gelu_tanh"

    def gelu(x):
        if tanh:
            return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
        return 0.5 * x * (1 + erf(x / np.sqrt(2)))

    def norm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + layernorm_epsilon) * sd[name + ".weight"] + sd[name + ".bias"]

    def linear(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    x = np.asarray(images_nchw, np.float64)
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    x = patches @ sd["patch_embed.proj.weight"].reshape(len(sd["patch_embed.proj.bias"]), -1).T
    x = x + sd["patch_embed.proj.bias"]
    x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, x.shape[-1])), x], axis=1) + sd["pos_embed"]
    n, d = x.shape[1], x.shape[2]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        blk = f"blocks.{i}."
        qkv = linear(norm(x, blk + "norm1"), blk + "attn.qkv").reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        logits = q @ k.transpose(0, 1, 3, 2) * (d // heads) ** -0.5
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
        x = x + linear(attn, blk + "attn.proj")
        x = x + linear(gelu(linear(norm(x, blk + "norm2"), blk + "mlp.fc1")), blk + "mlp.fc2")
        i += 1
    x = norm(x, "norm")[:, 0]
    return linear(x, "head") if "head.weight" in sd else x
