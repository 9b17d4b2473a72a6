"""The analysis tools against hand computations and planted structure (small shapes, CPU)."""
import math

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from remem_jax import surgery, tree
from remem_jax.analysis import criticality, expertness, features, plots, pruning, rollout
from remem_jax.analysis import mutual_information as mi
from remem_jax.models import vit


# ------------------------------------------------------------------------------ mutual information

def test_gaussian_and_bernoulli_bounds_by_hand():
    x = np.array([[0.0, 0.5], [1.0, 0.5], [0.5, 1.0]])  # 3 held-out images of 2 pixel values
    r = np.array([[0.1, 0.5], [0.8, 0.6], [0.5, 0.9]])
    q = (1 / 255) ** 2 / 12
    expected = 0.0
    for d in range(2):
        col = x[:, d]
        var = sum((v - col.mean()) ** 2 for v in col) / 3
        mse = sum((a - b) ** 2 for a, b in zip(col, r[:, d])) / 3
        expected += max(0.0, 0.5 * math.log((var + q) / (mse + q)))
    assert mi.gaussian_mi_bound(x, r) == pytest.approx(expected, rel=1e-12)

    def bce(t, p):
        p = min(max(p, 1e-7), 1 - 1e-7)
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))
    expected = sum(sum(bce(x[i, d], x[:, d].mean()) - bce(x[i, d], r[i, d]) for i in range(3)) / 3 for d in range(2))
    assert mi.bernoulli_mi_bound(x, r) == pytest.approx(expected, rel=1e-12)
    # A reconstruction no better than the mean gives 0 (Gaussian, clipped) and a perfect one the largest value.
    assert mi.gaussian_mi_bound(x, np.broadcast_to(x.mean(0), x.shape)) == 0.0
    assert mi.gaussian_mi_bound(x, x) > mi.gaussian_mi_bound(x, r)


def _space_to_depth(images, p):
    n, s, _, c = images.shape
    g = s // p
    return images.reshape(n, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, g, g, p * p * c)


def test_decoder_ranks_invertible_features_above_noise_and_half_zeroed():
    digits = load_digits()
    images = ((digits.images / 16.0)[..., None].repeat(3, -1) * 2 - 1).astype(np.float32)  # 8x8x3 in [-1, 1]
    grid = _space_to_depth(images[..., :1], 2)                                               # [N, 4, 4, 4]
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    invertible = (grid @ rotation).astype(np.float32)
    half = invertible.copy()
    half[..., 2:] = 0.0
    noise = rng.normal(size=grid.shape).astype(np.float32)
    config = mi.DecoderConfig(channels=(32,), steps=250, batch_size=64)
    scores = {}
    for name, f in (("invertible", invertible), ("half", half), ("noise", noise)):
        scores[name] = mi.estimate_mi(f[:1000], images[:1000], f[1400:], images[1400:], config,
                                      jax.random.PRNGKey(0))
    assert scores["invertible"]["bce"] < scores["half"]["bce"] < scores["noise"]["bce"], scores
    assert (scores["invertible"]["gaussian_bound_nats"] > scores["half"]["gaussian_bound_nats"]
            > scores["noise"]["gaussian_bound_nats"])
    assert scores["noise"]["gaussian_bound_nats"] < 0.05 * scores["invertible"]["gaussian_bound_nats"]
    assert scores["invertible"]["num_pixel_values"] == 8 * 8 * 3


# ------------------------------------------------------------------------------------- expertness

def test_coclustering_recovers_planted_blocks_and_random_scores_near_baseline():
    rng = np.random.default_rng(0)
    k, per_rows, per_cols = 4, 20, 10
    rows, cols = np.repeat(np.arange(k), per_rows), np.repeat(np.arange(k), per_cols)
    a = np.where(rows[:, None] == cols[None, :], rng.uniform(1.0, 2.0, (k * per_rows, k * per_cols)),
                 rng.uniform(0.0, 0.1, (k * per_rows, k * per_cols)))
    perm_r, perm_c = rng.permutation(len(rows)), rng.permutation(len(cols))
    a, rows, cols = a[perm_r][:, perm_c], rows[perm_r], cols[perm_c]
    # Activations [inputs, tokens=1, neurons] with random signs: the edge weight is the norm, i.e. |a|.
    signs = rng.choice([-1.0, 1.0], size=a.shape)
    result = expertness.expertness((a * signs)[:, None, :], k, seed=0)
    planted = float(sum((a[rows == c][:, cols == c] ** 2).sum() for c in range(k)) / (a ** 2).sum())
    assert result["score"] == pytest.approx(planted, abs=1e-9)
    assert planted > 0.95
    assert result["baseline"] == pytest.approx(0.25, abs=0.05)  # 1/k for equal co-cluster sizes

    dense = rng.uniform(0.0, 1.0, (400, 200))  # large enough that fitting noise gains little
    random_result = expertness.expertness(dense, k, seed=0)
    assert abs(random_result["score"] - random_result["baseline"]) < 0.05, random_result


def test_edge_weights_are_token_norms_and_zero_columns_are_left_out():
    h = np.array([[[3.0, 0.0, -1.0], [-4.0, 0.0, 1.0]]])          # 1 input, 2 tokens, 3 neurons
    np.testing.assert_allclose(expertness.edge_weights(h), [[5.0, 0.0, math.sqrt(2)]])
    a = np.abs(np.random.default_rng(1).normal(size=(12, 6)))
    a[:, 2] = 0.0
    r = expertness.expertness(a, 2, seed=0)
    assert r["zero_columns"] == 1 and r["column_labels"][2] == -1
    assert 0.0 <= r["score"] <= 1.0


# ------------------------------------------------------------------------------------ criticality

def _tiny_vit(num_classes=3, seed=0):
    model = vit.create_vit("Ti_8", num_classes, num_layers=2, hidden_size=16, mlp_dim=12, num_heads=2)
    images = np.random.default_rng(seed).uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
    params = jax.tree.map(np.asarray, jax.jit(model.init)(jax.random.PRNGKey(seed), images)["params"])
    noise = np.random.default_rng(seed + 1)
    params = jax.tree.map(lambda p: (p + 0.05 * noise.normal(size=p.shape)).astype(np.float32), params)
    return model, params, images


def test_criticality_zero_for_dead_neuron_and_matches_a_direct_loop():
    model, params, images = _tiny_vit()
    flat = dict(tree.flatten_params(params))
    key = "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"
    flat[key] = flat[key].copy()
    flat[key][5] = 0.0                                        # neuron 5 of block 1 has no outgoing weights
    params = tree.unflatten_params(flat)
    values = criticality.criticality(model, params, images, 1, chunk_size=5, image_batch=4)

    assert values[5] == 0.0
    pre_logits = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["pre_logits"])[1]
                         ["pre_logits"]["representation"][0])
    z = np.asarray(pre_logits(params, images), np.float64)
    for j in range(model.mlp_dim):
        z_off = np.asarray(pre_logits(surgery.zero_mlp_neurons(params, 1, [j]), images), np.float64)
        expected = np.max(np.linalg.norm(z - z_off, axis=-1) / np.linalg.norm(z, axis=-1))
        assert values[j] == pytest.approx(expected, rel=1e-4, abs=1e-6), j
    summary = criticality.summarize(values, top_k=3)
    assert summary["top"][0]["criticality"] == pytest.approx(values.max())
    assert sum(summary["histogram"]["counts"]) == model.mlp_dim


# ---------------------------------------------------------------------------------------- pruning

def test_pruning_level_zero_is_the_unpruned_model_and_pruning_removes_the_branch():
    model, params, images = _tiny_vit()
    logits = np.asarray(model.apply({"params": params}, images))
    seen = {}

    def measure(name, m, p):
        seen[name] = (m, p)
        return {"logits": np.asarray(m.apply({"params": p}, images))}
    rows = pruning.sweep(model, params, ["attn", "mlp"], 2, measure=measure)
    assert [(r["branch"], r["k"]) for r in rows] == [("attn", 0), ("attn", 1), ("attn", 2),
                                                      ("mlp", 0), ("mlp", 1), ("mlp", 2)]
    np.testing.assert_array_equal(rows[0]["logits"], logits)
    np.testing.assert_array_equal(rows[3]["logits"], logits)
    m, p = seen["mlp_k1"]
    assert m.prune_mlp == (1,) and m.prune_attn == ()
    flat = tree.flatten_params(p)
    assert not any(k.startswith("Transformer/encoderblock_1/MlpBlock_3/") for k in flat)
    assert any(k.startswith("Transformer/encoderblock_0/MlpBlock_3/") for k in flat)
    assert rows[2]["blocks"] == [0, 1] and not np.allclose(rows[2]["logits"], logits)
    # Pruning both branches of a block equals dropping it (surgery.drop_blocks).
    m2, p2 = pruning.prune_branches(*pruning.prune_branches(model, params, "attn", [1]), "mlp", [1])
    dropped = surgery.drop_blocks(params, [1])
    shallow = model.clone(num_layers=1)
    np.testing.assert_allclose(np.asarray(m2.apply({"params": p2}, images)),
                               np.asarray(shallow.apply({"params": dropped}, images)), atol=1e-6)


# ---------------------------------------------------------------------------------------- rollout

def test_rollout_rows_sum_to_one_and_match_a_hand_product():
    rng = np.random.default_rng(0)
    attention = []
    for _ in range(3):
        logits = rng.normal(size=(2, 2, 5, 5))
        attention.append(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
    r = rollout.rollout(attention)
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-12)
    expected = np.eye(5)
    for probs in attention:
        a = 0.5 * probs[0].mean(0) + 0.5 * np.eye(5)
        expected = a @ expected
    np.testing.assert_allclose(r[0], expected, atol=1e-12)
    maps = rollout.class_token_maps(r)
    assert maps.shape == (2, 2, 2)
    np.testing.assert_allclose(maps.sum((1, 2)), 1.0, atol=1e-12)


def test_rollout_of_a_vit_rows_sum_to_one():
    model, params, images = _tiny_vit()
    _, values = features.intermediates(model, params, images, ["attention"])
    assert len(values["attention"]) == 2
    r = rollout.rollout(values["attention"])
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-9)


# ---------------------------------------------------------------------------------------- features

def test_layer_parsing_and_patch_grid():
    assert features.parse_layers("all", 3) == [0, 1, 2, "encoded"]
    assert features.parse_layers("-1,encoded", 3) == [2, "encoded"]
    assert features.parse_blocks("0,-1", 4, "f") == [0, 3]
    with pytest.raises(Exception, match="block 5 does not exist"):
        features.parse_blocks("5", 4, "config.analysis.criticality_blocks")
    tokens = np.arange(2 * 5 * 3).reshape(2, 5, 3)
    grid = features.patch_grid(tokens)
    assert grid.shape == (2, 2, 2, 3)
    np.testing.assert_array_equal(grid[:, 0, 1], tokens[:, 2])


# ------------------------------------------------------------------------------------------ plots

def test_every_plot_is_written_and_non_empty(tmp_path):
    rng = np.random.default_rng(0)
    paths = [
        plots.information_plane([{"label": "a", "group": "vanilla", "error": 0.1, "gaussian_bound_nats": 5.0},
                                 {"label": "b", "group": "vanilla", "error": 0.2, "gaussian_bound_nats": 7.0},
                                 {"label": "c", "group": "remem", "error": 0.15, "gaussian_bound_nats": 9.0}],
                                str(tmp_path / "plane.png")),
        plots.mi_curve({"a": [(0, 1.0), (1, 2.0), ("encoded", 1.5)]}, str(tmp_path / "curve.png")),
        plots.expertness_bars({"a": [{"block": 0, "score": 0.4, "baseline": 0.1},
                                     {"block": 1, "score": 0.6, "baseline": 0.1}]}, str(tmp_path / "bars.png")),
        plots.criticality_histogram({"a": rng.uniform(size=50)}, str(tmp_path / "hist.png")),
        plots.rollout_maps(rng.uniform(-1, 1, (2, 16, 16, 3)), {"a": rng.uniform(size=(2, 2, 2))},
                           str(tmp_path / "rollout.png")),
    ]
    for path in paths:
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n", path
