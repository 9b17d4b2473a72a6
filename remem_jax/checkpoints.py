"""AugReg npz checkpoints: read, validate, adapt (head, position embeddings), write.

The raw npz files store a flat mapping from `/`-joined parameter paths to float32
arrays, with pre-Linen module names (`MultiHeadDotProductAttention_1`, ...);
`remem_jax.models.vit.VisionTransformer` uses exactly those names, so loading is
`recover_tree` plus checks. Trees in Linen numbering (vit_jax after
`convert_pre_linen`: `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
`MlpBlock_0`) are accepted and renamed. Paths may be local or `gs://` (through
`tf.io.gfile`).
"""
from __future__ import annotations

import io
import os
import re
import uuid
import zipfile
from typing import Any, Mapping, Optional

import jax
import numpy as np
import scipy.ndimage

from remem_jax import errors
from remem_jax.models import vit

AUGREG_BUCKET = "gs://vit_models/augreg"
# Recommended AugReg checkpoints of "How to train your ViT" (vit_jax README,
# big_vision VANITY_NAMES `howto-i21k-*`), and their ImageNet-1k fine-tunes.
_I21K = {
    "Ti_16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "S_32": "S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0",
    "S_16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "B_32": "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
    "B_16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "B_8": "B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",
    "L_16": "L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0",
}
_I1K_LR = {"Ti_16": "0.03", "S_16": "0.03", "B_16": "0.03", "L_16": "0.01"}
KNOWN_CHECKPOINTS: dict[str, str] = {
    **{name: f"{AUGREG_BUCKET}/{stem}.npz" for name, stem in _I21K.items()},
    **{f"{name}-i1k": f"{AUGREG_BUCKET}/{_I21K[name]}--imagenet2012-steps_20k-lr_{lr}-res_384.npz"
       for name, lr in _I1K_LR.items()},
}

_LINEN_TO_RAW = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}
_BLOCK_RE = re.compile(r"encoderblock_(\d+)")


class CheckpointError(errors.UserError, ValueError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


def resolve_checkpoint(path_or_name: str) -> str:
    """Maps a known AugReg name (`B_16`, `B_16-i1k`, ...) to its gs:// path; other strings pass.

    Raises:
      CheckpointError: the string is neither a known name nor looks like a path.
    """
    if path_or_name in KNOWN_CHECKPOINTS:
        return KNOWN_CHECKPOINTS[path_or_name]
    looks_like_path = "/" in path_or_name or path_or_name.endswith(".npz") or os.path.exists(path_or_name)
    if not looks_like_path:
        raise CheckpointError(
            f"Unknown checkpoint name {path_or_name!r}. Known names: "
            f"{', '.join(sorted(KNOWN_CHECKPOINTS))}; or pass a local or gs:// path to an .npz file.")
    return path_or_name


def gfile():
    """`tf.io.gfile`, imported lazily: local npz files need no TensorFlow start-up."""
    import tensorflow as tf
    return tf.io.gfile


def _is_remote(path: str) -> bool:
    """gs://, and any other scheme TensorFlow's filesystems know (ram:// in tests)."""
    return "://" in path


def _exists(path: str) -> bool:
    return gfile().exists(path) if _is_remote(path) else os.path.exists(path)


def _read_bytes(path: str) -> bytes:
    if _is_remote(path):
        with gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def load_npz(path: str) -> dict[str, np.ndarray]:
    """Reads a flat `{'a/b/c': array}` npz (local or gs://), with no pickles.

    Raises:
      CheckpointError: missing, truncated or not an npz file.
    """
    if not _exists(path):
        raise CheckpointError(f"Checkpoint file {path!r} does not exist.")
    data = _read_bytes(path)
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path!r} holds a single array, not an npz archive of parameters.")
        with npz:
            return {key: np.asarray(npz[key]) for key in npz.files}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint {path!r} ({len(data)} bytes) is not a readable npz archive; it may be "
            f"truncated or corrupt: {type(e).__name__}: {e}") from e


def flatten_params(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Nested dict -> flat dict keyed by `sep`-joined paths (empty dicts dropped)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            for sub, leaf in flatten_params(value, sep).items():
                flat[f"{key}{sep}{sub}"] = leaf
        else:
            flat[key] = value
    return flat


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Flat `sep`-joined dict -> nested dict (vit_jax `recover_tree`)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"Key {key!r} nests under a leaf at {part!r}.")
        node[leaf] = value
    return tree


def to_raw_names(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Renames Linen-numbered block modules to the raw AugReg names; raw trees pass unchanged.

    Block indices are taken numerically (natural sort), so `encoderblock_10`
    stays block 10; they must run 0..L-1 without gaps.
    """
    linen = any("/MultiHeadDotProductAttention_0/" in key for key in flat)
    out: dict[str, Any] = {}
    blocks = set()
    for key, value in flat.items():
        parts = key.split("/")
        for i, part in enumerate(parts[:-1]):
            m = _BLOCK_RE.fullmatch(part)
            if m:
                blocks.add(int(m.group(1)))
                if linen:
                    parts[i + 1] = _LINEN_TO_RAW.get(parts[i + 1], parts[i + 1])
        out["/".join(parts)] = value
    if blocks and sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"Encoder block indices must be 0..{len(blocks) - 1}, got {sorted(blocks)}.")
    return out


def infer_vit_config(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Architecture of a raw-named flat tree, read from the parameter shapes.

    Returns:
      `VisionTransformer` fields (`patch_size`, `hidden_size`, `num_layers`,
      `num_heads`, `mlp_dim`, `representation_size`, `num_classes`,
      `adapter_dim`) and `image_size` (the square resolution the position
      embeddings were trained for).
    """
    def need(key):
        if key not in flat:
            raise CheckpointError(f"Checkpoint has no {key!r}; is it a ViT (AugReg) checkpoint? "
                                  f"It has {len(flat)} keys, e.g. {sorted(flat)[:5]}.")
        return flat[key].shape

    kernel = need("embedding/kernel")
    if len(kernel) != 4 or kernel[0] != kernel[1] or kernel[2] != 3:
        raise CheckpointError(f"embedding/kernel has shape {kernel}; expected (patch, patch, 3, D).")
    patch, hidden = kernel[0], kernel[3]
    blocks = sorted({int(m.group(1)) for k in flat for m in [_BLOCK_RE.search(k)] if m})
    if not blocks:
        raise CheckpointError("Checkpoint has no Transformer/encoderblock_* keys.")
    first = "Transformer/encoderblock_0"
    query = need(f"{first}/MultiHeadDotProductAttention_1/query/kernel")
    mlp = need(f"{first}/MlpBlock_3/Dense_0/kernel")
    pos = need("Transformer/posembed_input/pos_embedding")
    grid = int(round(np.sqrt(pos[1] - 1)))
    if grid * grid != pos[1] - 1:
        raise CheckpointError(f"pos_embedding has {pos[1]} rows, not a square grid plus a class token.")
    adapter = flat.get(f"{first}/Adapter_mlp/down/kernel")
    return dict(
        patch_size=int(patch), hidden_size=int(hidden), num_layers=len(blocks),
        num_heads=int(query[1]), mlp_dim=int(mlp[1]),
        representation_size=int(flat["pre_logits/kernel"].shape[1]) if "pre_logits/kernel" in flat else None,
        num_classes=int(flat["head/kernel"].shape[1]) if "head/kernel" in flat else None,
        adapter_dim=int(adapter.shape[1]) if adapter is not None else None,
        image_size=int(grid * patch),
    )


def resize_posemb(posemb: np.ndarray, num_tokens: int, has_class_token: bool = True) -> np.ndarray:
    """Resizes `(1, tokens, D)` position embeddings to `num_tokens` (vit_jax algorithm).

    The grid is linearly interpolated with `scipy.ndimage.zoom(order=1)`; the
    class-token row 0 is kept unchanged.
    """
    posemb = np.asarray(posemb)
    if posemb.shape[1] == num_tokens:
        return posemb
    token, grid = (posemb[:, :1], posemb[0, 1:]) if has_class_token else (posemb[:, :0], posemb[0])
    old = int(round(np.sqrt(len(grid))))
    new = int(round(np.sqrt(num_tokens - token.shape[1])))
    if old * old != len(grid) or new * new != num_tokens - token.shape[1]:
        raise CheckpointError(f"Only square grids can be resized: {len(grid)} -> {num_tokens - token.shape[1]} tokens.")
    grid = grid.reshape(old, old, -1)
    grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
    return np.concatenate([token, grid.reshape(1, new * new, -1)], axis=1).astype(posemb.dtype)


def check_params_match(params: Mapping[str, Any], expected: Mapping[str, Any], source: str) -> None:
    """Raises one error listing every missing key, unexpected key and shape mismatch."""
    got, want = flatten_params(params), flatten_params(expected)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [f"{k}: expected {tuple(want[k].shape)}, got {tuple(np.shape(got[k]))}"
              for k in sorted(set(got) & set(want)) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if missing or extra or shapes:
        lines = [f"Parameters from {source} do not match the model:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if extra:
            lines.append(f"  unexpected keys ({len(extra)}): {', '.join(extra)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes))
        raise CheckpointError("\n".join(lines))


def expected_param_shapes(model: vit.VisionTransformer, image_size: int) -> dict[str, Any]:
    """The model's parameter tree as ShapeDtypeStructs, without allocating it."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), np.float32)
    return jax.eval_shape(lambda im: model.init(jax.random.PRNGKey(0), im), x)["params"]


def load_augreg(path_or_name: str, *, num_classes: Optional[int] = None,
                image_size: Optional[int] = None, **model_overrides
                ) -> tuple[vit.VisionTransformer, dict[str, Any]]:
    """Loads an AugReg / ViT npz as a model and its parameter tree.

    Args:
      path_or_name: local path, gs:// path, or a known name (`B_16`, `B_16-i1k`, ...).
      num_classes: classes of the returned model; when it differs from the
        checkpoint's head, the head is replaced by a zero head (vit_jax).
      image_size: square input resolution; when it differs from the
        checkpoint's, the position embeddings are resized (vit_jax algorithm).
      **model_overrides: other `VisionTransformer` fields (dtype, dropout,
        mlp_alpha, ...). `representation_size=None` drops a checkpoint's
        `pre_logits` as vit_jax does.

    Returns:
      `(model, params)`: the model and a nested dict of float32 numpy arrays
      with exactly the model's parameter tree.

    Raises:
      CheckpointError: unknown name, missing or unreadable file, or parameters
        that do not fit the model (every missing / unexpected key and shape
        mismatch is listed).
    """
    path = resolve_checkpoint(path_or_name)
    flat = to_raw_names(load_npz(path))
    found = infer_vit_config(flat)
    ckpt_image_size, ckpt_classes = found.pop("image_size"), found.pop("num_classes")
    if ckpt_classes is None:
        raise CheckpointError(f"Checkpoint {path!r} has no head/kernel.")
    config = {**found, **model_overrides}
    config["num_classes"] = num_classes if num_classes is not None else ckpt_classes
    image_size = image_size or ckpt_image_size
    try:
        model = vit.VisionTransformer(**config)
    except TypeError as e:
        raise CheckpointError(f"Bad model override for {path!r}: {e}") from e

    if config.get("representation_size") is None:
        flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}
    if config["num_classes"] != ckpt_classes:
        width = config.get("representation_size") or config["hidden_size"]
        flat["head/kernel"] = np.zeros((width, config["num_classes"]), np.float32)
        flat["head/bias"] = np.zeros((config["num_classes"],), np.float32)
    if image_size != ckpt_image_size:
        if image_size % config["patch_size"]:
            raise CheckpointError(f"image_size {image_size} is not divisible by the patch size {config['patch_size']}.")
        key = "Transformer/posembed_input/pos_embedding"
        flat[key] = resize_posemb(flat[key], (image_size // config["patch_size"]) ** 2 + 1)

    params = unflatten_params({k: np.asarray(v, np.float32) for k, v in flat.items()})
    check_params_match(params, expected_param_shapes(model, image_size), repr(path))
    return model, params


def save_augreg(path: str, params: Mapping[str, Any]) -> None:
    """Writes params as a flat AugReg npz, atomically (temporary file, then rename).

    A crash mid-write never leaves a partial file at `path`. Works for local
    and gs:// paths.
    """
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten_params(params).items()}
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    if _is_remote(path):
        fs = gfile()
        try:
            with fs.GFile(tmp, "wb") as f:
                f.write(buffer.getvalue())
            fs.rename(tmp, path, overwrite=True)
        finally:
            if fs.exists(tmp):
                fs.remove(tmp)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
