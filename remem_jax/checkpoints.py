"""AugReg npz checkpoints: read, validate, adapt (head, position embeddings), write.

The raw npz files store a flat mapping from `/`-joined parameter paths to float32
arrays, with pre-Linen module names (`MultiHeadDotProductAttention_1`, ...);
`remem_jax.models.vit.VisionTransformer` uses exactly those names, so loading is
`recover_tree` plus checks. Trees in Linen numbering (vit_jax after
`convert_pre_linen`: `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
`MlpBlock_0`) are accepted and renamed. Paths may be local or `gs://` (through
`tf.io.gfile`).

Remote checkpoints can be fetched once into a local cache (`fetch`, or
`cache_dir=` of `load_npz` / `load_augreg`): a streaming copy to a temporary
file renamed into place, checked against the remote size, and reused while
the remote file keeps its size and modification time. Storage that cannot be
reached, files that are a Git LFS pointer or an HTML page instead of the
checkpoint, and NaN / inf parameters are reported by name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import zipfile
from typing import Any, Mapping, Optional

import jax
import numpy as np
import scipy.ndimage
from absl import logging

from remem_jax import errors, files, tree
from remem_jax.models import vit
from remem_jax.surgery.base import is_adapter

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

# Scalars beside the parameters of a saved ViT npz: the numeric options of its model (`save_augreg`).
OPTIONS_PREFIX = "model_options/"

_LINEN_TO_RAW = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}


class CheckpointError(errors.UserError, ValueError):
    """A checkpoint that cannot be used as asked; the message says why and what to do."""


class RemoteUnavailableError(CheckpointError):
    """The storage of a remote checkpoint cannot be reached, needs credentials, or is unknown to TF."""


def resolve_checkpoint(path_or_name: str) -> str:
    """Maps a known AugReg name (`B_16`, `B_16-i1k`, ...) to its gs:// path; other strings pass.

    Raises:
      CheckpointError: the string is neither a known name nor looks like a path.
    """
    if path_or_name in KNOWN_CHECKPOINTS:
        return KNOWN_CHECKPOINTS[path_or_name]
    from remem_jax import hub_checkpoints
    if hub_checkpoints.is_hub_checkpoint(path_or_name):
        return path_or_name
    looks_like_path = "/" in path_or_name or path_or_name.endswith(".npz") or os.path.exists(path_or_name)
    if not looks_like_path:
        raise CheckpointError(
            f"Unknown checkpoint name {path_or_name!r}. Known names: "
            f"{', '.join(sorted(KNOWN_CHECKPOINTS))}; or pass a local or gs:// path to an .npz file, a timm / "
            "Hugging Face .safetensors / .bin / .pth file or its folder, or hf-hub:<org>/<repo>.")
    return path_or_name


# ----------------------------------------------------------------------------- remote files and the cache

def default_cache_dir() -> str:
    """Where remote checkpoints are cached by default: `$XDG_CACHE_HOME/remem_jax/checkpoints`.

    (`~/.cache/remem_jax/checkpoints` when XDG_CACHE_HOME is unset.) A per-user,
    per-machine cache rather than one per workdir: every run and sweep of the
    same teacher shares one copy, every host of a multi-host run keeps its own
    local copy, and it works when the workdir itself is on gs://.
    """
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "remem_jax", "checkpoints")


def cached_path(path: str, cache_dir: str) -> str:
    """The cache file of a remote path: `gs://bucket/a/b.npz` -> `<cache_dir>/gs/bucket/a/b.npz`."""
    scheme, rest = path.split("://", 1)
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return os.path.join(cache_dir, scheme, *parts)


def _unreachable_message(path: str, cause: str) -> str:
    how = f"`gsutil cp {path} .`" if path.startswith("gs://") else "with your storage's command-line tool"
    return (f"Cannot read checkpoint {path}: {cause}. Download it, e.g. {how}, and pass the local path "
            "as config.teacher.checkpoint.")


@contextlib.contextmanager
def _remote_access(path: str):
    """Turns the tf.io.gfile errors of unreachable storage into one RemoteUnavailableError."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - anything else is re-raised unchanged
        cause = files.remote_failure(path, e)
        if cause is None:
            raise
        raise RemoteUnavailableError(_unreachable_message(path, cause)) from e


def _remote_stat(path: str):
    import tensorflow as tf
    with _remote_access(path):
        try:
            return files.gfile().stat(path)
        except tf.errors.NotFoundError:
            raise CheckpointError(f"Checkpoint file {path!r} does not exist.") from None


def fetch(path: str, cache_dir: str) -> str:
    """The local copy of the remote checkpoint `path` in `cache_dir`, fetched at most once.

    The copy is streamed to a temporary file, checked against the remote size
    (`tf.io.gfile.stat`) and renamed into place, so the cache never holds a
    partial file under the real name; a `<file>.json` beside it records the
    remote size and modification time. A cached copy is reused while both
    match (only a metadata call reaches the storage); a copy of another size
    (truncated, replaced by hand) or of a changed remote file is fetched again.
    When the storage cannot be reached, a complete cached copy is used.

    Raises:
      CheckpointError: the remote file does not exist, or the fetch came back
        short or could not be written to `cache_dir`.
      RemoteUnavailableError: the storage cannot be reached and nothing usable
        is cached.
    """
    if files.is_remote(cache_dir):
        raise CheckpointError(f"The checkpoint cache must be a local folder, got {cache_dir!r} "
                              "(config.teacher.cache_dir).")
    local = cached_path(path, cache_dir)
    meta_path = local + ".json"
    try:
        meta = files.read_json(meta_path, default=None)
    except ValueError:  # an unreadable record: treat the copy as unverified
        meta = None
    local_size = os.path.getsize(local) if os.path.isfile(local) else None
    try:
        stat = _remote_stat(path)
    except RemoteUnavailableError:
        if meta and meta.get("source") == path and local_size is not None and meta.get("size") == local_size:
            logging.warning("Cannot reach %s; using the complete cached copy %s (%d bytes).", path, local, local_size)
            return local
        raise
    record = {"source": path, "size": int(stat.length), "mtime_nsec": int(stat.mtime_nsec)}
    if meta == record and local_size == record["size"]:
        logging.info("Using the cached copy %s of %s.", local, path)
        return local
    if local_size is not None:
        logging.warning("Cached copy %s has %d bytes, %s has %d (or changed): fetching it again.",
                        local, local_size, path, record["size"])
    if os.path.exists(meta_path):
        os.remove(meta_path)
    logging.info("Fetching %s (%.1f MiB) into %s.", path, record["size"] / 2**20, local)
    import tensorflow as tf
    with _remote_access(path):
        try:
            files.copy_file(path, local, expected_size=record["size"])
        except tf.errors.NotFoundError as e:
            raise CheckpointError(f"Checkpoint {path!r} disappeared while it was being fetched (it existed, "
                                  f"{record['size']} bytes, a moment before); nothing was cached. Check that it "
                                  "is still there and run again.") from e
        except files.IncompleteCopyError as e:
            raise CheckpointError(f"Fetching checkpoint {path!r} stopped early ({e}); nothing was cached. "
                                  "Run again to retry.") from e
        except OSError as e:
            raise CheckpointError(f"Cannot cache checkpoint {path!r} in {cache_dir!r} ({type(e).__name__}: {e}); "
                                  "free space there or set config.teacher.cache_dir.") from e
    files.write_json(meta_path, record)
    return local


def _check_is_npz(path: str, head: bytes, nbytes: int) -> None:
    """Names the two files most often mistaken for a checkpoint (a Git LFS pointer, an HTML page) and any
    other file that is not a zip archive (an npz is one) or a single .npy array."""
    if head.startswith(b"version https://git-lfs.github.com/spec/v1"):
        raise CheckpointError(
            f"Checkpoint {path!r} is a Git LFS pointer ({nbytes} bytes), not the checkpoint: fetch the real "
            "file with `git lfs pull` in the repository it came from.")
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<!doctype html") or text.startswith(b"<html"):
        raise CheckpointError(
            f"Checkpoint {path!r} is an HTML page ({nbytes} bytes), not an npz: download the file itself "
            "(e.g. `gsutil cp gs://vit_models/augreg/<name>.npz .`), not the web page that lists it.")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")):
        raise CheckpointError(
            f"{path!r} ({nbytes} bytes) is not an npz file: it does not start with the zip header every npz "
            f"archive has (its first bytes are {head[:8]!r}).")


def check_finite(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """A CheckpointError listing the arrays of `path` that hold NaN or inf values, if any."""
    bad = []
    for key in sorted(arrays):
        value = arrays[key]
        if value.dtype.kind in "fc" and not np.isfinite(value).all():
            nan = int(np.isnan(value).sum())
            bad.append(f"{key} ({nan} NaN, {int(value.size - nan - np.isfinite(value).sum())} inf "
                       f"of {value.size})")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise CheckpointError(
            f"Checkpoint {path!r} has NaN or inf values in {len(bad)} of {len(arrays)} arrays: {shown}. "
            "It was saved from a diverged run or is corrupt; use another checkpoint.")


def load_npz(path: str, *, cache_dir: Optional[str] = None) -> dict[str, np.ndarray]:
    """Reads a flat `{'a/b/c': array}` npz (local or gs://), with no pickles.

    Args:
      path: a local or remote (gs://, ...) npz.
      cache_dir: for a remote `path`, read it through the local cache there
        (see `fetch`); None reads the remote file directly.

    Raises:
      CheckpointError: missing, truncated or not an npz file (a Git LFS pointer
        and an HTML page are named as such), unreachable storage, or NaN / inf
        values (the keys are listed).
    """
    if files.is_remote(path) and cache_dir:
        source = fetch(path, cache_dir)
        with open(source, "rb") as f:
            head = f.read(512)
        nbytes = os.path.getsize(source)
    elif files.is_remote(path):
        with _remote_access(path):
            if not files.exists(path):
                raise CheckpointError(f"Checkpoint file {path!r} does not exist.")
            data = files.read_bytes(path)
        source, head, nbytes = io.BytesIO(data), data[:512], len(data)
    else:
        if not os.path.exists(path):
            raise CheckpointError(f"Checkpoint file {path!r} does not exist.")
        if os.path.isdir(path):
            raise CheckpointError(f"Checkpoint {path!r} is a directory, not an npz file.")
        with open(path, "rb") as f:
            head = f.read(512)
        source, nbytes = path, os.path.getsize(path)
    _check_is_npz(path, head, nbytes)
    try:
        npz = np.load(source, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path!r} holds a single array, not an npz archive of parameters.")
        with npz:
            arrays = {key: np.asarray(npz[key]) for key in npz.files}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"Checkpoint {path!r} ({nbytes} bytes) is not a readable npz archive; it may be "
            f"truncated or corrupt: {type(e).__name__}: {e}") from e
    check_finite(path, arrays)
    return arrays


# ----------------------------------------------------------------------------- ViT checkpoints

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
            index = tree.block_part_index(part)
            if index is not None:
                blocks.add(index)
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
      `adapter_dim`, and `last_block_heads` only when the last block's head
      count differs from the first's) and `image_size` (the square resolution the position
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
    blocks = tree.block_indices(flat)
    if not blocks:
        raise CheckpointError("Checkpoint has no Transformer/encoderblock_* keys.")
    first = "Transformer/encoderblock_0"
    query = need(f"{first}/MultiHeadDotProductAttention_1/query/kernel")
    mlp = need(f"{first}/MlpBlock_3/Dense_0/kernel")
    pos = need("Transformer/posembed_input/pos_embedding")
    grid = int(round(np.sqrt(pos[1] - 1)))
    if grid * grid != pos[1] - 1:
        raise CheckpointError(f"pos_embedding has {pos[1]} rows, not a square grid plus a class token.")
    if len(query) != 3 or query[0] != hidden or query[1] * query[2] != hidden:
        raise CheckpointError(f"{first}/MultiHeadDotProductAttention_1/query/kernel has shape {query}; expected "
                              f"(hidden, heads, hidden / heads) with hidden = {hidden} (embedding/kernel): the hidden "
                              "size must split evenly over the heads.")
    adapter = flat.get(f"{first}/Adapter_mlp/down/kernel")
    last_query = need(f"Transformer/encoderblock_{max(blocks)}/MultiHeadDotProductAttention_1/query/kernel")
    # A TinyMIM student's last block may have another head count; otherwise the field is absent.
    last_heads = {"last_block_heads": int(last_query[1])} if last_query[1] != query[1] else {}
    return dict(
        patch_size=int(patch), hidden_size=int(hidden), num_layers=len(blocks),
        num_heads=int(query[1]), mlp_dim=int(mlp[1]),
        representation_size=int(flat["pre_logits/kernel"].shape[1]) if "pre_logits/kernel" in flat else None,
        num_classes=int(flat["head/kernel"].shape[1]) if "head/kernel" in flat else None,
        adapter_dim=int(adapter.shape[1]) if adapter is not None else None,
        image_size=int(grid * patch),
        **last_heads,
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


@dataclasses.dataclass(frozen=True)
class VitFile:
    """A ViT checkpoint read from disk: its raw-named arrays and the architecture they describe.

    Attributes:
      path: the resolved path.
      flat: raw (AugReg) names -> float32 arrays.
      architecture: the `VisionTransformer` fields the file fixes: those its shapes fix (`patch_size`,
        `hidden_size`, `num_layers`, `num_heads`, `mlp_dim`, `representation_size`, `adapter_dim`, and
        `last_block_heads` when the last block's head count differs) and the numeric options it
        carries (`approximate_gelu`, `layernorm_epsilon`; present only when they differ from
        AugReg's, see `vit.NUMERIC_OPTIONS`).
      image_size: the square resolution its position embeddings were trained for.
      num_classes: its head's class count (0 for a timm / Hugging Face file without a head).
    """
    path: str
    flat: Mapping[str, np.ndarray]
    architecture: Mapping[str, Any]
    image_size: int
    num_classes: int


def read_vit(path_or_name: str, *, cache_dir: Optional[str] = None) -> VitFile:
    """Reads a ViT checkpoint and the architecture it fixes.

    `path_or_name` is an AugReg / ViT npz (a known name, a local or gs:// path), or a timm /
    Hugging Face file, folder or `hf-hub:` name (`hub_checkpoints`, converted to the AugReg tree).
    The numeric options a file carries (`split_options`; a hub file's from its config) go into
    `architecture`, so every model built from it with `build_vit` computes as its source did.

    Raises:
      CheckpointError: unknown name, a missing or unreadable file, or not a ViT (an npz also needs a head).
    """
    path = resolve_checkpoint(path_or_name)
    from remem_jax import hub_checkpoints
    if hub_checkpoints.is_hub_checkpoint(path):
        path, flat, options = hub_checkpoints.read(path)
        options = {k: v for k, v in options.items() if v != vit.NUMERIC_OPTIONS[k]}
    else:
        flat, options = split_options(to_raw_names(load_npz(path, cache_dir=cache_dir)), path)
    found = infer_vit_config(flat)
    image_size, num_classes = found.pop("image_size"), found.pop("num_classes")
    if num_classes is None and not hub_checkpoints.is_hub_checkpoint(path_or_name):
        raise CheckpointError(f"Checkpoint {path!r} has no head/kernel.")
    return VitFile(path, flat, {**found, **options}, image_size, num_classes or 0)


def load_into(model: vit.VisionTransformer, ckpt: VitFile, *, image_size: Optional[int] = None) -> dict[str, Any]:
    """The parameters of `ckpt` for `model`, a ViT built from the run's config (big_vision's `load`).

    The model decides the parts a run may change: the head (`model.num_classes`: the file's head is
    kept only when it has that class count and still reads the representation it was trained on,
    i.e. `pre_logits` is kept; otherwise a zero head as vit_jax; None drops it), `pre_logits`
    (dropped when `model.representation_size` is None), and the resolution (position embeddings
    resized to `image_size` with vit_jax's algorithm). Adapter leaves the model has and the file
    lacks are left out (`surgery.init_adapters` adds them). Everything else must match.

    Args:
      model: the ViT to load into.
      ckpt: the file, from `read_vit`.
      image_size: square input resolution; None: the file's.

    Returns:
      A nested dict of float32 numpy arrays with exactly the model's parameter tree (adapters aside).

    Raises:
      CheckpointError: parameters that do not fit the model (every missing / unexpected key and
        shape mismatch is listed), or an image size the patches do not divide.
    """
    flat = dict(ckpt.flat)
    image_size = image_size or ckpt.image_size
    dropped_pre_logits = model.representation_size is None and "pre_logits/kernel" in flat
    if model.representation_size is None:
        flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}
    if not model.num_classes:
        flat = {k: v for k, v in flat.items() if not k.startswith("head/")}
    elif model.num_classes != ckpt.num_classes or dropped_pre_logits:
        if dropped_pre_logits and model.num_classes == ckpt.num_classes:
            logging.info("%s: pre_logits dropped, so the head (trained on pre_logits) is reset to zeros.", ckpt.path)
        width = model.representation_size or model.hidden_size
        flat["head/kernel"] = np.zeros((width, model.num_classes), np.float32)
        flat["head/bias"] = np.zeros((model.num_classes,), np.float32)
    if image_size % model.patch_size or image_size < model.patch_size:
        raise CheckpointError(f"image_size {image_size} (config.data.image_size) is not a multiple of the patch size "
                              f"{model.patch_size} of {ckpt.path!r}.")
    if image_size != ckpt.image_size:
        key = "Transformer/posembed_input/pos_embedding"
        flat[key] = resize_posemb(flat[key], (image_size // model.patch_size) ** 2 + 1)

    params = tree.unflatten_params({k: np.asarray(v, np.float32) for k, v in flat.items()})
    expected = tree.flatten_params(vit.param_shapes(model, image_size))
    if not any(is_adapter(k) for k in flat):
        expected = {k: v for k, v in expected.items() if not is_adapter(k)}
    tree.check_params_match(params, tree.unflatten_params(expected), repr(ckpt.path), error=CheckpointError)
    return params


def load_augreg(path_or_name: str, *, num_classes: Optional[int] = None,
                image_size: Optional[int] = None, cache_dir: Optional[str] = None,
                **model_overrides) -> tuple[vit.VisionTransformer, dict[str, Any]]:
    """Reads an AugReg / ViT npz, builds its model and loads it: `read_vit`, then `load_into`.

    The one-call convenience. The model is the file's architecture with `model_overrides`
    (dtype, dropout, mlp_alpha, ...; `representation_size=None` drops a checkpoint's
    `pre_logits` as vit_jax does, which also resets its head) and `num_classes` (None: the
    file's). The head rule and the position-embedding resize are `load_into`'s.

    Args:
      path_or_name: local path, gs:// path, or a known name (`B_16`, `B_16-i1k`, ...).
      num_classes: classes of the returned model; None keeps the checkpoint's.
      image_size: square input resolution; when it differs from the checkpoint's, the position
        embeddings are resized (vit_jax algorithm).
      cache_dir: read a remote checkpoint through a local cache there (fetched once; see
        `fetch`); None reads it directly.
      **model_overrides: other `VisionTransformer` fields.

    Returns:
      `(model, params)`: the model and a nested dict of float32 numpy arrays with exactly the
      model's parameter tree.

    Raises:
      CheckpointError: unknown name, missing or unreadable file, a bad override, or parameters
        that do not fit the model (every missing / unexpected key and shape mismatch is listed).
    """
    ckpt = read_vit(path_or_name, cache_dir=cache_dir)
    model = build_vit(ckpt, num_classes=ckpt.num_classes if num_classes is None else num_classes,
                      **model_overrides)
    return model, load_into(model, ckpt, image_size=image_size)


def build_vit(ckpt: VitFile, **fields) -> vit.VisionTransformer:
    """The file's architecture with `fields` (the run's options, a class count) on top.

    Raises:
      CheckpointError: a field `VisionTransformer` does not have.
    """
    try:
        return vit.VisionTransformer(**{**ckpt.architecture, **fields})
    except TypeError as e:
        raise CheckpointError(f"Bad model override for {ckpt.path!r}: {e}") from e


def split_options(flat: Mapping[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(parameters, numeric options)` of a flat npz tree: the `model_options/<name>` scalars
    `save_augreg` writes are taken out and checked against `vit.NUMERIC_OPTIONS`."""
    params, options = {}, {}
    for key, value in flat.items():
        if not key.startswith(OPTIONS_PREFIX):
            params[key] = value
            continue
        name = key[len(OPTIONS_PREFIX):]
        if name not in vit.NUMERIC_OPTIONS or np.ndim(value) != 0:
            raise CheckpointError(f"Checkpoint {path!r}: {key!r} is not a model option this version knows "
                                  f"(known: {', '.join(OPTIONS_PREFIX + n for n in vit.NUMERIC_OPTIONS)}, scalars).")
        options[name] = type(vit.NUMERIC_OPTIONS[name])(np.asarray(value).item())
    return params, options


def save_augreg(path: str, params: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None) -> None:
    """Writes params as a flat AugReg npz, atomically (temporary file, then rename).

    `options` (e.g. `vit.numeric_options(model)`) that differ from AugReg's defaults are stored as
    scalars `model_options/<name>` beside the parameters, so the file keeps the arithmetic of the
    model it came from (`read_vit` reads them back; AugReg loaders such as vit_jax's and timm's
    read only the parameter keys). With the defaults the file is exactly the plain AugReg npz.
    A crash mid-write never leaves a partial file at `path`. Works for local and gs:// paths.
    """
    flat = {k: np.asarray(jax.device_get(v)) for k, v in tree.flatten_params(params).items()}
    for name, value in (options or {}).items():
        if name not in vit.NUMERIC_OPTIONS:
            raise ValueError(f"Unknown model option {name!r}; known: {', '.join(vit.NUMERIC_OPTIONS)}.")
        if value != vit.NUMERIC_OPTIONS[name]:
            flat[OPTIONS_PREFIX + name] = np.asarray(value)
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    files.atomic_write(path, buffer.getvalue())
