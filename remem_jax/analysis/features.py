"""What every analysis reads from a frozen ViT: images of a split, and sown intermediates in batches.

The ViT records its intermediates with `Module.sow` (`remem_jax.models.vit`); `intermediates`
makes only the asked-for collections mutable and returns `vit.collect_intermediates` of them, as
NumPy arrays concatenated over batches. Layers are named as the MI tool's config does:
`'encoded'` (all tokens after `encoder_norm`) or a block index `i` (the output of block i, before
the final norm; negative indices count from the top).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence, Union

import jax
import numpy as np

Layer = Union[int, str]
ENCODED = "encoded"


def split_images(data_config, dataset: str, role: str, num_images: int, batch_size: int = 64
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_images` images of a split, eval-preprocessed (no augmentation).

    Args:
      data_config, dataset: the run's `config.data` and `config.dataset`.
      role: a `sources.ROLES` entry: 'train' (the train split less any validation hold-out), 'few_shot' or 'eval'.
      num_images: how many (at most the split's size).
      batch_size: images per tf.data batch (rounded up to a multiple of the device count).

    Returns:
      (images float32 [N, S, S, 3] in [-1, 1], labels int32 [N]).
    """
    from remem_jax.data import pipeline, sources
    n_dev = jax.device_count()
    batch_size = -(-batch_size // n_dev) * n_dev
    source = sources.build_source(data_config, dataset, role)
    data = pipeline.EvalData(data_config, dataset, global_batch_size=batch_size, source=source)
    images, labels = [], []
    count = 0
    for batch in data.as_dataset().as_numpy_iterator():
        mask = batch["mask"].reshape(-1) > 0
        images.append(batch["image"].reshape((-1,) + batch["image"].shape[2:])[mask])
        labels.append(batch["label"].reshape(-1)[mask])
        count += int(mask.sum())
        if count >= num_images:
            break
    return np.concatenate(images)[:num_images], np.concatenate(labels)[:num_images].astype(np.int32)


@functools.lru_cache(maxsize=32)
def _apply_fn(model, collections: tuple[str, ...]):
    def fn(params, images):
        logits, state = model.apply({"params": params}, images, mutable=list(collections))
        return logits, vit_collect(state)
    return jax.jit(fn)


def vit_collect(state):
    from remem_jax.models import vit
    return vit.collect_intermediates(state)


def intermediates(model, params: Any, images: np.ndarray, collections: Sequence[str], *,
                  batch_size: int = 64) -> tuple[np.ndarray, dict]:
    """Runs the frozen model (inference mode) over `images` in batches.

    Returns:
      (logits [N, C], the `vit.collect_intermediates` dict of the requested collections, every
      array as NumPy and concatenated over batches along the example axis).
    """
    fn = _apply_fn(model, tuple(sorted(collections)))
    logits, parts = [], []
    for start in range(0, len(images), batch_size):
        out_logits, values = fn(params, images[start:start + batch_size])
        logits.append(np.asarray(out_logits))
        parts.append(jax.tree.map(np.asarray, values))
    merged = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *parts)
    return np.concatenate(logits), merged


def resolve_block(index: int, num_layers: int, field: str = "block") -> int:
    """A block index (negative counts from the top) checked against the model's depth."""
    from remem_jax import errors
    resolved = index + num_layers if index < 0 else index
    if not 0 <= resolved < num_layers:
        raise errors.UserError(f"{field}: block {index} does not exist in a {num_layers}-block ViT "
                               f"(use 0..{num_layers - 1}, or negative indices from the top).")
    return resolved


def layer_tokens(model, params: Any, images: np.ndarray, layers: Sequence[Layer], *,
                 batch_size: int = 64) -> dict[Layer, np.ndarray]:
    """Tokens `[N, T, D]` (class token first) of each requested layer; see the module docstring."""
    _, values = intermediates(model, params, images, ["tokens"], batch_size=batch_size)
    out = {}
    for layer in layers:
        if layer == ENCODED:
            out[layer] = values["encoded"]
        else:
            out[layer] = values["tokens"][resolve_block(int(layer), model.num_layers, "config.analysis.mi_layers")]
    return out


def patch_grid(tokens: np.ndarray) -> np.ndarray:
    """`[N, 1 + g*g, D]` tokens -> `[N, g, g, D]`: the class token dropped, patches in raster order."""
    n, t, d = tokens.shape
    g = int(round(np.sqrt(t - 1)))
    if g * g != t - 1:
        raise ValueError(f"{t} tokens are not a class token plus a square patch grid.")
    return tokens[:, 1:].reshape(n, g, g, d)


def parse_layers(spec: str, num_layers: int) -> list[Layer]:
    """'encoded' | 'all' (every block, then encoded) | comma list such as '0,2,encoded'."""
    from remem_jax import errors
    spec = (spec or "").strip()
    if spec == "all":
        return list(range(num_layers)) + [ENCODED]
    layers: list[Layer] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part == ENCODED:
            layers.append(ENCODED)
            continue
        try:
            layers.append(resolve_block(int(part), num_layers, "config.analysis.mi_layers"))
        except ValueError:
            raise errors.UserError(f"config.analysis.mi_layers must be 'encoded', 'all' or a comma list of block "
                                   f"indices and 'encoded', got {spec!r}.") from None
    if not layers:
        raise errors.UserError(f"config.analysis.mi_layers names no layer: {spec!r}.")
    return layers


def parse_blocks(spec: str, num_layers: int, field: str) -> list[int]:
    """'all' | comma list of block indices (negative from the top), e.g. '-1' or '0,3'."""
    from remem_jax import errors
    spec = (spec or "").strip()
    if spec == "all":
        return list(range(num_layers))
    try:
        blocks = [resolve_block(int(p), num_layers, field) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise errors.UserError(f"{field} must be 'all' or a comma list of block indices, got {spec!r}.") from None
    if not blocks:
        raise errors.UserError(f"{field} names no block: {spec!r}.")
    return blocks
