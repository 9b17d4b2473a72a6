"""Mutual information between the input and a layer, estimated by a reconstruction decoder.

Following ReMem App. A.5 (after Wang et al.): a CNN decoder (`models.decoder`) is trained to
reconstruct the input image, pixels in [0, 1], from a frozen model's features; the better it
reconstructs held-out images, the more information about X the features keep. The decoder is
trained with pixel-mean binary cross-entropy and AdamW (`optim.make_optimizer(optimizer='adam')`,
betas (0.9, 0.999), eps 1e-8, decoupled weight decay on kernels) for a fixed number of updates on
minibatches drawn with replacement (seeded). Feature channels are standardised with the
training features' mean and standard deviation (a channel that is constant stays 0).

Reported on held-out images: `bce` (pixel-mean), `mse` (pixel-mean), and two lower bounds on
I(X; Z) in nats (sums over the d = S*S*3 pixel values; `gaussian_bound_nats` is the headline):

* Gaussian (rate-distortion) bound, `gaussian_mi_bound`:
      I(X; Z) >= I(X; g(Z)) >= sum_d max(0, 1/2 * log((var_d + q) / (mse_d + q)))
  where var_d is the held-out variance of pixel value d, mse_d the decoder's held-out squared error
  on it, and q = (1/255)^2 / 12 the variance of 8-bit quantisation noise. The first step is the
  data-processing inequality; the second holds when (a) the pixel values are independent across
  d and (b) each is Gaussian: then I(X; Xhat) >= sum_d I(X_d; Xhat_d) >= sum_d R_d(mse_d) with the
  Gaussian rate-distortion function R(D) = max(0, log(sigma^2 / D) / 2). Adding q to both is the
  bound for X + U (U uniform quantisation noise, independent of everything), which DPI puts
  below I(X; Z); it keeps a perfect reconstruction of a constant or exactly recovered pixel
  finite. (c) Held-out averages stand in for expectations. Natural images violate (a) and (b), so
  on them the number is an estimate in nats, comparable between models, not a certified bound.
* Bernoulli (Barber-Agakov) bound, `bernoulli_mi_bound`:
      I(X; Z) >= H(X) - E[-log q(X | Z)] = sum_d [BCE(x_d, mean_d) - BCE(x_d, p_d(z))]  (held-out means)
  with p(z) the decoder's output probabilities. It is exact as a bound for independent binary
  pixels (then H(X) = sum_d H_b(mean_d), the cross-entropy of the best input-free predictor); for
  grey pixels it is the decoder's BCE gain over predicting each pixel's mean.

Compare estimates only between features of equal size (tokens x width): a wider or longer
feature can be easier to decode without holding more information in the sense that matters.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from remem_jax import optim
from remem_jax.models import decoder as decoder_lib

QUANTISATION_VARIANCE = (1.0 / 255.0) ** 2 / 12.0
PROB_EPS = 1e-7  # BCE of a probability is evaluated on [eps, 1 - eps]


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """How the reconstruction decoder is built and trained (config.analysis.decoder_*)."""
    channels: Sequence[int] = (256, 128, 64)
    steps: int = 5000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """Model-range images in [-1, 1] -> reconstruction targets in [0, 1]."""
    return np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _bce(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), PROB_EPS, 1.0 - PROB_EPS)
    x = np.asarray(x, np.float64)
    return -(x * np.log(p) + (1.0 - x) * np.log1p(-p))


def gaussian_mi_bound(targets: np.ndarray, reconstructions: np.ndarray,
                      quantisation_variance: float = QUANTISATION_VARIANCE) -> float:
    """sum_d max(0, log((var_d + q) / (mse_d + q)) / 2) in nats; see the module docstring.

    Args:
      targets: held-out images `[N, ...]` in [0, 1].
      reconstructions: the decoder's outputs for them, same shape.
      quantisation_variance: q.
    """
    x = np.asarray(targets, np.float64).reshape(len(targets), -1)
    r = np.asarray(reconstructions, np.float64).reshape(len(targets), -1)
    var = x.var(axis=0)
    mse = ((x - r) ** 2).mean(axis=0)
    q = quantisation_variance
    return float(np.sum(np.maximum(0.0, 0.5 * np.log((var + q) / (mse + q)))))


def bernoulli_mi_bound(targets: np.ndarray, probabilities: np.ndarray) -> float:
    """sum_d mean_i [BCE(x_id, mean_d) - BCE(x_id, p_id)] in nats; see the module docstring."""
    x = np.asarray(targets, np.float64).reshape(len(targets), -1)
    p = np.asarray(probabilities, np.float64).reshape(len(targets), -1)
    mean = np.broadcast_to(x.mean(axis=0), x.shape)
    return float(np.sum(_bce(x, mean).mean(axis=0) - _bce(x, p).mean(axis=0)))


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    axes = tuple(range(train.ndim - 1))
    mean = train.mean(axis=axes, dtype=np.float64)
    std = train.std(axis=axes, dtype=np.float64)
    scale = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)
    return [((f - mean) * scale).astype(np.float32) for f in (train, *others)]


@functools.lru_cache(maxsize=16)
def _decoder_functions(model: decoder_lib.ReconstructionDecoder, lr: float, weight_decay: float):
    """(optimizer, jitted train step), built once per decoder and optimizer setting."""
    tx = optim.make_optimizer(learning_rate=lr, weight_decay=weight_decay, grad_clip_norm=None, optimizer="adam")

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, new_state = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                            return_logits=True, mutable=["batch_stats"])
            return optax.sigmoid_binary_cross_entropy(logits, y).mean(), new_state["batch_stats"]
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return tx, step


@functools.lru_cache(maxsize=16)
def _predict_function(model: decoder_lib.ReconstructionDecoder):
    return jax.jit(lambda v, x: model.apply(v, x, train=False))


def train_decoder(features: np.ndarray, targets: np.ndarray, config: DecoderConfig, rng: jax.Array
                  ) -> tuple[decoder_lib.ReconstructionDecoder, Any, list[float]]:
    """Fits the decoder `features [N, g, g, D] -> targets [N, S, S, 3]` (in [0, 1]).

    Returns:
      (decoder, its variables {'params', 'batch_stats'}, the training BCE every ~10% of steps).
    """
    size = targets.shape[1]
    model = decoder_lib.ReconstructionDecoder(output_size=size, channels=tuple(config.channels))
    init_rng, data_rng = jax.random.split(rng)
    variables = model.init(init_rng, jnp.zeros((1,) + features.shape[1:], jnp.float32))
    tx, step = _decoder_functions(model, config.lr, config.weight_decay)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    sampler = np.random.default_rng(np.asarray(jax.random.key_data(data_rng)).ravel().tolist())
    history, every = [], max(1, config.steps // 10)
    batch = min(config.batch_size, len(features))
    for i in range(config.steps):
        idx = sampler.integers(0, len(features), size=batch)
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state, features[idx], targets[idx])
        if (i + 1) % every == 0:
            history.append(float(loss))
    return model, {"params": params, "batch_stats": batch_stats}, history


def reconstruct(model: decoder_lib.ReconstructionDecoder, variables: Any, features: np.ndarray,
                batch_size: int = 64) -> np.ndarray:
    """The decoder's output probabilities `[N, S, S, 3]` (inference mode, running BN statistics)."""
    fn = _predict_function(model)
    return np.concatenate([np.asarray(fn(variables, features[i:i + batch_size]))
                           for i in range(0, len(features), batch_size)])


def estimate_mi(train_features: np.ndarray, train_images: np.ndarray, test_features: np.ndarray,
                test_images: np.ndarray, config: DecoderConfig, rng: jax.Array) -> dict:
    """Trains a decoder on (train features, images) and scores it on the held-out pair.

    Args:
      train_features, test_features: `[N, g, g, D]` feature grids (e.g. `features.patch_grid`).
      train_images, test_images: the matching images in model range [-1, 1], `[N, S, S, 3]`.
      config: the decoder's geometry and training.
      rng: seeds the decoder's init and minibatch order.

    Returns:
      {'bce', 'mse' (held-out, pixel means), 'gaussian_bound_nats', 'bernoulli_bound_nats',
       'num_pixel_values', 'feature_shape', 'train_bce_history', 'num_train', 'num_test'}.
    """
    train_f, test_f = _standardise(np.asarray(train_features, np.float32), np.asarray(test_features, np.float32))
    train_y, test_y = to_unit_range(train_images), to_unit_range(test_images)
    model, variables, history = train_decoder(train_f, train_y, config, rng)
    probs = reconstruct(model, variables, test_f)
    return {"bce": float(_bce(test_y, probs).mean()),
            "mse": float(np.mean((test_y.astype(np.float64) - probs) ** 2)),
            "gaussian_bound_nats": gaussian_mi_bound(test_y, probs),
            "bernoulli_bound_nats": bernoulli_mi_bound(test_y, probs),
            "num_pixel_values": int(np.prod(test_y.shape[1:])),
            "feature_shape": [int(s) for s in test_features.shape[1:]],
            "train_bce_history": history, "num_train": int(len(train_f)), "num_test": int(len(test_f))}
