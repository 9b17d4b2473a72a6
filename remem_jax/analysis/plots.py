"""PNG figures of the analyses (matplotlib, Agg backend: no display needed).

Every function takes plain numbers, writes one PNG to `path` (local or gs://, atomically) and
returns the path.
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

from remem_jax import files


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    files.atomic_write(path, buffer.getvalue())
    return path


def information_plane(points: Sequence[Mapping], path: str, *, mi_key: str = "gaussian_bound_nats",
                      title: str = "Information plane") -> str:
    """MI estimate (y) against teacher error (x), one labelled point per checkpoint / pruning level.

    Args:
      points: dicts with 'label', 'error' (1 - metric), `mi_key` and optionally 'group' (one colour per group,
        points of a group joined in order).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    groups: dict = {}
    for p in points:
        groups.setdefault(p.get("group", ""), []).append(p)
    for group, members in groups.items():
        xs = [100 * p["error"] for p in members]
        ys = [p[mi_key] for p in members]
        ax.plot(xs, ys, marker="o", linestyle="-" if len(members) > 1 else "", label=group or None)
        for p, x, y in zip(members, xs, ys):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("teacher error (%)")
    ax.set_ylabel(f"I(X; Z) estimate ({mi_key}, nats)")
    ax.set_title(title)
    if any(groups):
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def mi_curve(curves: Mapping[str, Sequence[tuple]], path: str, *, ylabel: str = "I(X; Z) estimate (nats)") -> str:
    """Per-layer MI: `curves[label] = [(layer_name, value), ...]` in layer order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names: list = []
    for label, values in curves.items():
        layer_names = [str(l) for l, _ in values]
        names = layer_names if len(layer_names) > len(names) else names
        ax.plot(range(len(values)), [v for _, v in values], marker="o", label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45, fontsize=7)
    ax.set_xlabel("layer (block output; 'encoded' = after encoder_norm)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def expertness_bars(scores: Mapping[str, Sequence[Mapping]], path: str) -> str:
    """Per-block expertness bars per checkpoint, with each block's random-partition baseline as a tick."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = list(scores)
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        rows = scores[label]
        x = np.array([r["block"] for r in rows], np.float64) + (i - (len(labels) - 1) / 2) * width
        ax.bar(x, [r["score"] for r in rows], width=width, label=label)
        ax.scatter(x, [r["baseline"] for r in rows], marker="_", color="black", s=80, zorder=3,
                   label="random partition" if i == 0 else None)
    ax.set_xlabel("block")
    ax.set_ylabel("expertness (co-clustered weight fraction)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return _save(fig, path)


def criticality_histogram(values: Mapping[str, np.ndarray], path: str, bins: int = 30) -> str:
    """Histograms of neuron criticality c_j, one per checkpoint/block (log-count axis)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    all_values = np.concatenate([np.asarray(v, np.float64) for v in values.values()])
    edges = np.histogram_bin_edges(all_values, bins=bins)
    for label, v in values.items():
        ax.hist(np.asarray(v, np.float64), bins=edges, histtype="step", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("criticality c_j = max_i ||z_i - z_i^(j->0)|| / ||z_i||")
    ax.set_ylabel("neurons")
    ax.legend(fontsize=7)
    return _save(fig, path)


def rollout_maps(images: np.ndarray, maps: Mapping[str, np.ndarray], path: str) -> str:
    """A grid: input images (top row, [-1, 1]) and each checkpoint's class-token rollout map over them."""
    plt = _pyplot()
    n = len(images)
    rows = 1 + len(maps)
    fig, axes = plt.subplots(rows, n, figsize=(1.8 * n, 1.8 * rows), squeeze=False)
    size = images.shape[1]
    for j in range(n):
        axes[0, j].imshow(np.clip((images[j] + 1) / 2, 0, 1))
        axes[0, j].set_title(f"image {j}", fontsize=7)
        for i, (label, m) in enumerate(maps.items(), start=1):
            g = m.shape[-1]
            up = np.kron(m[j], np.ones((size // g, size // g))) if size % g == 0 else m[j]
            axes[i, j].imshow(np.clip((images[j] + 1) / 2, 0, 1))
            axes[i, j].imshow(up, cmap="inferno", alpha=0.6,
                              extent=(-0.5, size - 0.5, size - 0.5, -0.5))
            if j == 0:
                axes[i, j].set_ylabel(label, fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)
