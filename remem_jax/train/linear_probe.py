"""The `linear_probe` stage: frozen-feature linear probing (MAE / MoCo v3 recipe) of WeCoLoRA's students.

For each model (the teacher, the untrained weight copy, a randomly initialised ViT of the students' shape
as the floor every student must clear, and every `fewshot_distill` student) the
CLS token after `encoder_norm` is extracted once for the probe's train split and the eval split
(resize only, no augmentation, as the reference) and kept on the host; a head (non-affine
BatchNorm, then Dense with trunc-normal std 0.01) is then trained on that cache with LARS
(momentum 0.9, trust 0.001, no decay or trust scaling on 1-D leaves, wd 0 by default),
lr = blr * batch / 256, warmup then cosine, evaluated after every epoch.

Reported per model: the metric at the final epoch, and the maximum over epochs, which is the
reference code's protocol (`max_accuracy`, selected on the test split: optimistic by construction).
`DIR/results.md` and `DIR/linear_probe/results.json` hold the WeCoLoRA table.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from remem_jax import checkpoints, config_validation as cv, devices, errors, losses, metrics, optim, surgery
from remem_jax.data import pipeline, sizes, sources
from remem_jax.dtypes import DTYPES
from remem_jax.models import vit
from remem_jax.models.probe_head import ProbeHead
from remem_jax.train import common, evaluate, handoff, loop, runs, seeds, stages, state as state_lib, step as step_lib

STAGE = "linear_probe"
TEACHER_ROW, COPY_ROW, RANDOM_ROW = "teacher", "weight_copy", "random_init"


# ----------------------------------------------------------------------------- features

def extract_features(model: vit.VisionTransformer, params: Any, data: pipeline.EvalData
                     ) -> tuple[np.ndarray, np.ndarray]:
    """CLS after encoder_norm for every real example of `data` (this host's), in data order.

    Returns:
      `(features float32 [n, D], labels int32 [n])`.
    """
    def cls(p, images):
        return vit.encoder_tokens(model, p, images.astype(model.dtype), after_norm=True)[:, 0].astype(jnp.float32)
    pfeatures = jax.pmap(cls, axis_name="batch")
    replicated = devices.replicate(params)
    feats, labels = [], []
    for batch in data:
        f = np.asarray(jax.device_get(pfeatures(replicated, batch["image"])))
        keep = batch["mask"].reshape(-1) > 0
        feats.append(f.reshape(-1, f.shape[-1])[keep])
        labels.append(batch["label"].reshape(-1)[keep])
    return np.concatenate(feats), np.concatenate(labels).astype(np.int32)


def probe_data_config(data_config, train_fraction: Optional[float]) -> ml_collections.ConfigDict:
    """`config.data` with the probe's own training subset (None: the whole train split)."""
    cfg = ml_collections.ConfigDict(data_config.to_dict())
    cfg.few_shot_fraction = train_fraction
    cfg.few_shot_per_class = None
    return cfg


# ----------------------------------------------------------------------------- batches from the cache

def _device_layout(global_batch_size: int) -> tuple[int, int]:
    local = global_batch_size // jax.process_count()
    ld = jax.local_device_count()
    return ld, local // ld


def cached_train_iterator(features: np.ndarray, labels: np.ndarray, *, global_batch_size: int,
                          steps_per_epoch: int, seed: int, start_step: int = 0) -> Iterator[dict]:
    """Batches of steps `start_step + 1, ...`: a fresh permutation per epoch, the remainder dropped.

    Deterministic in (seed, step), so a resumed run sees exactly the batches an uninterrupted one
    would. Yields `{'feature': [ld, pd, D], 'label': [ld, pd]}`.
    """
    ld, pd = _device_layout(global_batch_size)
    local = ld * pd
    step = start_step
    while True:
        epoch, within = divmod(step, steps_per_epoch)
        order = np.random.default_rng((seed, epoch)).permutation(len(features))
        take = order[np.arange(within * local, (within + 1) * local) % len(features)]
        step += 1
        yield {"feature": features[take].reshape(ld, pd, -1), "label": labels[take].reshape(ld, pd)}


def cached_eval_batches(features: np.ndarray, labels: np.ndarray, global_batch_size: int) -> list[dict]:
    """Padded batches for `evaluate.evaluate` (the features travel in the 'image' slot)."""
    ld, pd = _device_layout(global_batch_size)
    local = ld * pd
    n = len(features)
    padded = max(1, math.ceil(n / local)) * local
    f = np.zeros((padded, features.shape[1]), np.float32)
    y = np.zeros((padded,), np.int32)
    mask = np.zeros((padded,), np.float32)
    f[:n], y[:n], mask[:n] = features, labels, 1.0
    return [{"image": f[i:i + local].reshape(ld, pd, -1), "label": y[i:i + local].reshape(ld, pd),
             "mask": mask[i:i + local].reshape(ld, pd)} for i in range(0, padded, local)]


# ----------------------------------------------------------------------------- the head

def probe_loss(head: ProbeHead):
    """Softmax cross-entropy of the head on a batch of cached features (BatchNorm in train mode)."""
    def loss_fn(params, frozen, batch_stats, batch, rng):
        logits, new_state = head.apply({"params": params, "batch_stats": batch_stats}, batch["feature"],
                                       train=True, mutable=["batch_stats"])
        one_hot = jax.nn.one_hot(batch["label"], head.num_classes)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return losses.softmax_cross_entropy(logits, one_hot), {"batch_stats": new_state["batch_stats"],
                                                               "metrics": {"accuracy": accuracy}}
    return loss_fn


def make_probe_tx(p, total_steps: int, warmup_steps: int):
    """LARS with lr = blr * batch / 256, linear warmup then cosine."""
    peak = p.blr * p.batch_size / 256
    return optim.make_lars(learning_rate=optim.warmup_cosine_schedule(peak, total_steps, warmup_steps),
                           momentum=p.momentum, weight_decay=p.weight_decay,
                           trust_coefficient=p.trust_coefficient)


def train_probe(sub: runs.SubRun, p, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], *,
                num_classes: int, rng: jax.Array, seed: int, total_train_examples: Optional[int] = None) -> dict:
    """Trains the probe head on cached features; evaluates on the cached test features every epoch.

    Args:
      sub: the sub-run (its folder holds the checkpoints and the per-epoch evaluations: resumable).
      p: the `config.linear_probe` section.
      train, test: `(features, labels)` of this host.
      num_classes: classes of the head.
      rng: init key. seed: data-order seed.
      total_train_examples: over all hosts (default: this host's).

    Returns:
      `{'final': metrics at the last epoch, 'max_over_epochs': {metric: max}, 'history': [...]}`.
    """
    features, labels = train
    total = total_train_examples or len(features)
    steps_per_epoch, steps, warmup = optim.epoch_schedule_steps(total, p.batch_size, p.epochs, p.warmup_epochs,
                                                                section="linear_probe")
    head = ProbeHead(num_classes, axis_name="batch")
    variables = jax.jit(lambda k: head.init(k, jnp.zeros((2, features.shape[1]), jnp.float32)))(rng)
    tx = make_probe_tx(p, steps, warmup)
    state = state_lib.create_train_state(variables["params"], tx, rng=rng, batch_stats=variables["batch_stats"])
    step_fn = step_lib.pmap_train_step(step_lib.make_train_step(probe_loss(head), tx))
    eval_step = evaluate.make_eval_step(lambda v, x: head.apply(v, x, train=False), num_classes)
    eval_batches = cached_eval_batches(*test, p.batch_size)

    def evaluator(replicated):
        return evaluate.evaluate(eval_step, {"params": replicated.params, "batch_stats": replicated.batch_stats},
                                 eval_batches)

    def make_iter(start_step):
        return cached_train_iterator(features, labels, global_batch_size=p.batch_size,
                                     steps_per_epoch=steps_per_epoch, seed=seed, start_step=start_step)

    _, history = sub.train(
        state, step_fn, make_train_iterator=make_iter, evaluate=evaluator,
        loop_config=loop.LoopConfig(name=sub.name, num_steps=steps, global_batch_size=p.batch_size,
                                    log_every=p.log_every, eval_every=steps_per_epoch,
                                    checkpoint_every=p.checkpoint_every))
    metrics = [k for k in ("top1", "mean_per_class") if k in history[-1]]
    return {"final": history[-1], "max_over_epochs": {k: max(h[k] for h in history) for k in metrics},
            "epochs": p.epochs, "steps": steps, "history": history}


# ----------------------------------------------------------------------------- the stage

def probe_models(ctx: common.RunContext) -> list[dict]:
    """The rows to probe: teacher, weight copy and random init (if `reference_rows`), then every distilled student."""
    distilled = handoff.fewshot_results(ctx)
    if not distilled:
        raise errors.UserError(f"linear_probe needs the '{handoff.FEWSHOT_STAGE}' stage's students; put "
                               f"'{handoff.FEWSHOT_STAGE}' before 'linear_probe' in config.stages.")
    rows = []
    if ctx.config.linear_probe.reference_rows:
        rows.append({"name": TEACHER_ROW, "checkpoint": distilled["teacher"], "d": None})
        rows.append({"name": COPY_ROW, "checkpoint": distilled["teacher"], "d": distilled["d"]})
        rows.append({"name": RANDOM_ROW, "checkpoint": distilled["teacher"], "d": distilled["d"]})
    for r in distilled["rows"]:
        rows.append({"name": r["variant"], "checkpoint": r["student_checkpoint"], "d": r["d"], "distill": r})
    return rows


def load_row_model(ctx: common.RunContext, row: dict) -> tuple[vit.VisionTransformer, Any]:
    """The ViT of a row, in `config.teacher.dtype`: the file's, its weight copy for the copy row, or
    for the random row a fresh initialisation of the copy's architecture (the model's own init)."""
    ckpt = checkpoints.read_vit(row["checkpoint"], cache_dir=handoff.teacher_cache_dir(ctx))
    size, dtype = ctx.config.data.image_size, DTYPES[ctx.config.teacher.dtype]
    model = checkpoints.build_vit(ckpt, num_classes=ckpt.num_classes, dtype=dtype)
    if row["name"] not in (COPY_ROW, RANDOM_ROW):
        return model, checkpoints.load_into(model, ckpt, image_size=size)
    student = checkpoints.build_vit(ckpt, num_classes=ckpt.num_classes, dtype=dtype,
                                    num_layers=surgery.student_depth(ckpt.architecture["num_layers"], row["d"]))
    if row["name"] == RANDOM_ROW:  # the architecture only: the teacher's weights are not read
        return student, jax.jit(student.init)(ctx.rng(STAGE, RANDOM_ROW), jnp.zeros((1, size, size, 3), dtype))["params"]
    return student, surgery.copy_every_dth_block(checkpoints.load_into(model, ckpt, image_size=size), row["d"])

def probe_row(ctx: common.RunContext, row: dict, probe_config) -> dict:
    p = ctx.config.linear_probe

    def body(sub: runs.SubRun) -> dict:
        model, params = load_row_model(ctx, row)
        train_source = sources.build_source(probe_config, ctx.config.dataset, "few_shot")
        train_data = pipeline.EvalData(probe_config, ctx.config.dataset, global_batch_size=p.batch_size,
                                       source=train_source)
        train = extract_features(model, params, train_data)
        test = extract_features(model, params, common.eval_data(ctx, p.batch_size))
        logging.info("%s/%s: features %s (train) and %s (eval) extracted.", STAGE, row["name"], train[0].shape,
                     test[0].shape)
        result = train_probe(sub, p, train, test, num_classes=ctx.num_classes, rng=ctx.rng(STAGE, row["name"]),
                             seed=ctx.config.seed, total_train_examples=train_source.total_examples)
        distill = row.get("distill") or {}
        return sub.commit({
            "name": row["name"], "checkpoint": row["checkpoint"], "d": row["d"], "blocks": model.num_layers,
            "feature_dim": int(train[0].shape[1]), "probe_train_examples": train_source.total_examples,
            "lora_rank": distill.get("lora_rank"), "few_shot_examples": distill.get("few_shot_examples"),
            "trainable_params": distill.get("trainable_params"), "l1_initial": distill.get("l1_initial"),
            "l1_final": distill.get("l1_final"), **result}, metrics=("final",))

    return runs.resumable(ctx, f"{STAGE}/{row['name']}", ctx.path(handoff.PROBE_DIR, row["name"]), body)


def _fmt(value, spec: str, scale: Optional[float] = None) -> str:
    if value is None:
        return "-"
    return format(value if scale is None else scale * value, spec)


def results_table(rows: list[dict], metric: str, few_shot_fraction) -> str:
    """The WeCoLoRA table in markdown: one row per model."""
    fraction = "-" if few_shot_fraction is None else f"{100 * few_shot_fraction:g}%"
    lines = [f"| model | d | blocks | LoRA rank | few-shot | trainable params | distill L1 start -> end (test images) "
             f"| probe {metric} (final epoch) | max over epochs* |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        distilled = r.get("l1_final") is not None
        shots = f"{fraction} ({r['few_shot_examples']} images)" if distilled else "-"
        l1 = f"{r['l1_initial']:.4f} -> {r['l1_final']:.4f}" if distilled else "-"
        lines.append(f"| {r['name']} | {_fmt(r['d'], 'd')} | {r['blocks']} | {_fmt(r['lora_rank'], 'd')} | {shots} "
                     f"| {_fmt(r['trainable_params'], ',d')} | {l1} | {metrics.format_accuracy(r['final'], metric)} "
                     f"| {_fmt(r['max_over_epochs'].get(metric), '.2f', 100)} |")
    lines += ["", "*max over epochs is the reference code's protocol (`max_accuracy`): the epoch is selected on the "
              "eval split itself, so it is optimistic; the final-epoch column is the honest number. "
              f"{RANDOM_ROW} is a randomly initialised ViT of the students' shape probed the same way: the floor "
              "a student's features must clear to have learnt anything.", "", metrics.STANDARD_ERROR_NOTE]
    return "\n".join(lines)


def linear_probe(ctx: common.RunContext) -> stages.StageOutput:
    """The `linear_probe` stage: probe every model, write the table."""
    p = ctx.config.linear_probe
    probe_config = probe_data_config(ctx.config.data, p.train_fraction)
    rows = [probe_row(ctx, row, probe_config) for row in probe_models(ctx)]
    metric = ctx.metric
    data = sizes.split_sizes(probe_config, ctx.config.dataset, few_shot=p.train_fraction is not None)
    table = f"{results_table(rows, metric, ctx.config.data.few_shot_fraction)}\n\n{sizes.describe(data, 'Probe data')}"
    compact = [{k: v for k, v in r.items() if k != "history"} for r in rows]
    if common.is_chief():
        print(table)
    return stages.StageOutput({"metric": metric, "rows": compact, "data": data}, table)


def validate(config) -> None:
    lp = config.linear_probe
    for name in ("epochs", "batch_size", "log_every"):
        cv.positive_int(config, f"linear_probe.{name}")
    cv.check(cv.is_int(lp.warmup_epochs) and 0 <= lp.warmup_epochs < lp.epochs, "linear_probe.warmup_epochs",
             f"an integer in [0, linear_probe.epochs={lp.epochs})", lp.warmup_epochs)
    cv.check(lp.blr > 0, "linear_probe.blr", "> 0", lp.blr)
    cv.check(0.0 <= lp.momentum < 1.0, "linear_probe.momentum", "in [0, 1)", lp.momentum)
    cv.check(lp.trust_coefficient > 0, "linear_probe.trust_coefficient", "> 0", lp.trust_coefficient)
    cv.check(lp.weight_decay >= 0, "linear_probe.weight_decay", ">= 0", lp.weight_decay)
    cv.check(lp.train_fraction is None or 0.0 < lp.train_fraction <= 1.0, "linear_probe.train_fraction",
             "None (whole train split) or in (0, 1]", lp.train_fraction)
    cv.check(cv.is_int(lp.checkpoint_every) and lp.checkpoint_every >= 0, "linear_probe.checkpoint_every",
             "an integer >= 0 (0: only at the end)", lp.checkpoint_every)


def compared(results: dict) -> list[seeds.Compared]:
    metric = results["metric"]
    return [seeds.Compared(r["name"], f"probe {metric} (final epoch)", r["final"][metric]) for r in results["rows"]]


STAGES = (
    stages.Stage(STAGE, folder=handoff.PROBE_DIR, section="linear_probe", run=linear_probe, validate=validate,
                 global_batches=("linear_probe.batch_size",),
                 reads=("teacher.dtype",), needs=(stages.Need(handoff.FEWSHOT_STAGE, "the distilled students"),),
                 outputs="`<model>/summary.json` (per-epoch probe accuracy)", train_data=None, compared=compared),
)
