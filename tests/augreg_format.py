"""The AugReg npz format as documented, and an independent NumPy float64 ViT.

Written from ../shared/notes/jax-references.md (section 1.2) and the ViT
equations, never from `remem_jax.models.vit`, so that tests compare the library
against an outside reference.
"""
from __future__ import annotations

import numpy as np
import scipy.special

# (hidden D, mlp_dim, heads, layers) of the published variants.
VARIANT_DIMS = {
    "Ti": (192, 768, 3, 12),
    "S": (384, 1536, 6, 12),
    "B": (768, 3072, 12, 12),
    "L": (1024, 4096, 16, 24),
}

BLOCK_LINEN_NAMES = {  # raw npz name -> name after flax convert_pre_linen
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}


def documented_layout(variant: str, patch: int, image_size: int, num_classes: int,
                      representation_size: int | None = None, num_layers: int | None = None
                      ) -> dict[str, tuple[int, ...]]:
    """Raw npz key -> shape for an AugReg/ViT checkpoint, from the format description."""
    d, m, h, layers = VARIANT_DIMS[variant]
    layers = num_layers or layers
    hd = d // h
    tokens = (image_size // patch) ** 2 + 1
    shapes = {
        "cls": (1, 1, d),
        "embedding/kernel": (patch, patch, 3, d),
        "embedding/bias": (d,),
        "Transformer/posembed_input/pos_embedding": (1, tokens, d),
        "Transformer/encoder_norm/scale": (d,),
        "Transformer/encoder_norm/bias": (d,),
        "head/kernel": (representation_size or d, num_classes),
        "head/bias": (num_classes,),
    }
    if representation_size:
        shapes["pre_logits/kernel"] = (d, representation_size)
        shapes["pre_logits/bias"] = (representation_size,)
    for i in range(layers):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            shapes[b + ln + "/scale"] = (d,)
            shapes[b + ln + "/bias"] = (d,)
        for proj in ("query", "key", "value"):
            shapes[b + f"MultiHeadDotProductAttention_1/{proj}/kernel"] = (d, h, hd)
            shapes[b + f"MultiHeadDotProductAttention_1/{proj}/bias"] = (h, hd)
        shapes[b + "MultiHeadDotProductAttention_1/out/kernel"] = (h, hd, d)
        shapes[b + "MultiHeadDotProductAttention_1/out/bias"] = (d,)
        shapes[b + "MlpBlock_3/Dense_0/kernel"] = (d, m)
        shapes[b + "MlpBlock_3/Dense_0/bias"] = (m,)
        shapes[b + "MlpBlock_3/Dense_1/kernel"] = (m, d)
        shapes[b + "MlpBlock_3/Dense_1/bias"] = (d,)
    return shapes


def random_checkpoint(layout: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights at realistic scales for a layout (no zeros, LN scales near 1)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for key, shape in layout.items():
        leaf = key.rsplit("/", 1)[-1]
        if key.endswith("LayerNorm_0/scale") or key.endswith("LayerNorm_2/scale") or key.endswith("encoder_norm/scale"):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif leaf == "kernel":
            is_qkv = any(f"/{proj}/" in key for proj in ("query", "key", "value"))
            fan_in = shape[0] if is_qkv else int(np.prod(shape[:-1]))
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        elif leaf in ("pos_embedding", "cls"):
            value = 0.1 * rng.standard_normal(shape)
        else:  # biases
            value = 0.05 * rng.standard_normal(shape)
        flat[key] = value.astype(np.float32)
    return flat


def to_linen_names(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames block modules as flax `convert_pre_linen` would."""
    out = {}
    for key, value in flat.items():
        parts = key.split("/")
        if len(parts) > 2 and parts[1].startswith("encoderblock_"):
            parts[2] = BLOCK_LINEN_NAMES[parts[2]]
        out["/".join(parts)] = value
    return out


# ----------------------------------------------------------------------------- reference model

def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def gelu_exact(x):
    return 0.5 * x * (1.0 + scipy.special.erf(x / np.sqrt(2.0)))


def layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def reference_forward(flat, images, *, patch, gelu=gelu_tanh, mlp_alpha=None, attn_beta=None,
                      residual=lambda w: 2.0 - w, prune_attn=(), prune_mlp=(), return_tokens=False):
    """ViT logits in float64 from a raw flat checkpoint dict.

    Pre-LN blocks: h' = r(b) h + b Attn(LN0 h); h_out = r(a) h' + a MLP(LN2 h'),
    class token after encoder_norm, optional tanh pre_logits, linear head.
    """
    p = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    x = np.asarray(images, np.float64)
    n, hgt, wid, _ = x.shape
    gh, gw = hgt // patch, wid // patch
    patches = x.reshape(n, gh, patch, gw, patch, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, gh * gw, patch * patch * 3)
    kernel = p["embedding/kernel"]
    d = kernel.shape[-1]
    tok = patches @ kernel.reshape(-1, d) + p["embedding/bias"]
    tok = np.concatenate([np.broadcast_to(p["cls"], (n, 1, d)), tok], axis=1)
    tok = tok + p["Transformer/posembed_input/pos_embedding"]
    layers = len({k.split("/")[1] for k in p if k.startswith("Transformer/encoderblock_")})
    block_outputs = []
    for i in range(layers):
        b = f"Transformer/encoderblock_{i}/"
        beta = 1.0 if attn_beta is None else attn_beta[i]
        alpha = 1.0 if mlp_alpha is None else mlp_alpha[i]
        if i not in prune_attn:
            y = layer_norm(tok, p[b + "LayerNorm_0/scale"], p[b + "LayerNorm_0/bias"])
            a = b + "MultiHeadDotProductAttention_1/"
            q = np.einsum("bnd,dhk->bnhk", y, p[a + "query/kernel"]) + p[a + "query/bias"]
            k = np.einsum("bnd,dhk->bnhk", y, p[a + "key/kernel"]) + p[a + "key/bias"]
            v = np.einsum("bnd,dhk->bnhk", y, p[a + "value/kernel"]) + p[a + "value/bias"]
            att = softmax(np.einsum("bqhk,bmhk->bhqm", q, k) / np.sqrt(q.shape[-1]))
            o = np.einsum("bhqm,bmhk->bqhk", att, v)
            y = np.einsum("bqhk,hkd->bqd", o, p[a + "out/kernel"]) + p[a + "out/bias"]
            tok = residual(beta) * tok + beta * y
        if i not in prune_mlp:
            y = layer_norm(tok, p[b + "LayerNorm_2/scale"], p[b + "LayerNorm_2/bias"])
            m = b + "MlpBlock_3/"
            y = gelu(y @ p[m + "Dense_0/kernel"] + p[m + "Dense_0/bias"])
            y = y @ p[m + "Dense_1/kernel"] + p[m + "Dense_1/bias"]
            tok = residual(alpha) * tok + alpha * y
        block_outputs.append(tok)
    enc = layer_norm(tok, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
    rep = enc[:, 0]
    if "pre_logits/kernel" in p:
        rep = np.tanh(rep @ p["pre_logits/kernel"] + p["pre_logits/bias"])
    logits = rep @ p["head/kernel"] + p["head/bias"]
    return (logits, block_outputs) if return_tokens else logits
