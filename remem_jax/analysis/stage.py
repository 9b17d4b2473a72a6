"""The `analyze` stage: every analysis tool on every chosen teacher checkpoint, as JSON, markdown and PNG.

Checkpoints are `config.analysis.checkpoints` (comma-separated AugReg npz paths or names), or,
when that is empty, the teachers the `finetune_teacher` stage kept in this workdir
(`DIR/finetune/<setting>/kept.json`, every kept step or the last of each setting). Each one is
loaded with `checkpoints.load_augreg` for the run's dataset and image size, evaluated exactly on
the eval split (its error is the x axis of the information plane) and given the tools of
`config.analysis.tools`:

* `mi`: `mutual_information.estimate_mi` from each layer of `analysis.mi_layers`
  (patch tokens, class token dropped), decoder trained on `num_train_images` train images
  (eval preprocessing), scored on `num_images` eval images;
* `expertness`: `expertness.expertness` of the MLP hidden activations of `expertness_blocks`
  on the eval images, k = number of classes;
* `criticality`: `criticality.criticality` of the MLP neurons of `criticality_blocks`;
* `pruning`: `pruning.sweep` over `prune_branches` and k = 0..`prune_max_blocks`, each level
  optionally fine-tuned for `prune_finetune_steps` (the `finetune_teacher` stage's
  `train_classifier` with `config.finetune`'s optimizer settings, full fine-tuning, no SAM, no
  reweighting), then its accuracy and MI from the encoded tokens;
* `rollout`: attention rollout maps of the first `rollout_images` eval images.

Outputs in `DIR/analysis/`: `<tool>.json` for each tool, `analysis.json` (everything),
`analysis.md` (the tables), and PNGs: `information_plane.png`, `mi_per_layer.png`,
`expertness.png`, `criticality.png`, `rollout.png`. Each checkpoint's results are also kept in
`checkpoints/<label>.json`: a re-run with the same analysis settings reuses them.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from remem_jax import checkpoints, config_validation as cv, errors, files, metrics
from remem_jax.analysis import criticality as criticality_lib
from remem_jax.analysis import expertness as expertness_lib
from remem_jax.analysis import features, plots
from remem_jax.analysis import mutual_information as mi_lib
from remem_jax.analysis import pruning as pruning_lib
from remem_jax.analysis import rollout as rollout_lib
from remem_jax.train import common, evaluate, handoff, runs, stages, vit_finetune

TOOLS = ("mi", "expertness", "criticality", "pruning", "rollout")
KEPT_SELECTIONS = ("all", "last")
PRUNE_SELECTIONS = ("all", "last")
HEADLINE_MI = "gaussian_bound_nats"


def parse_list(value: str) -> list[str]:
    return [p.strip() for p in str(value or "").split(",") if p.strip()]


def parse_tools(value: str) -> list[str]:
    tools = parse_list(value)
    bad = [t for t in tools if t not in TOOLS]
    if bad or not tools:
        raise errors.UserError(f"config.analysis.tools must be a comma list of {', '.join(TOOLS)}, got {value!r}.")
    return tools


def _label_of(path: str) -> str:
    """A checkpoint's name in the tables: the file name without its extension; a hub file's folder name
    when the file has the generic name (`.../vit-b16/model.safetensors` -> `vit-b16`)."""
    from remem_jax import hub_checkpoints
    path = path.rstrip("/")
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    if ext.lower() in (".npz",) + hub_checkpoints.EXTENSIONS:
        base = stem
    if base in {os.path.splitext(n)[0] for n in hub_checkpoints.WEIGHT_FILES} and os.path.dirname(path):
        return os.path.basename(os.path.dirname(path))
    return base


def analysis_checkpoints(ctx: common.RunContext) -> list[dict]:
    """[{'label', 'checkpoint', 'group'}] from config.analysis.checkpoints or the kept teachers."""
    a = ctx.config.analysis
    given = parse_list(a.checkpoints)
    out = []
    if given:
        seen: dict = {}
        for path in given:
            label = _label_of(path)
            seen[label] = seen.get(label, 0) + 1
            out.append({"label": label if seen[label] == 1 else f"{label}_{seen[label]}", "checkpoint": path,
                        "group": "checkpoints"})
        return out
    out = [{"label": f"{e['setting']}_step{e['step']}", "checkpoint": e["checkpoint"], "group": e["setting"],
            "step": e["step"]} for e in handoff.kept_teachers(ctx, a.kept_steps)]
    if not out:
        raise errors.UserError(f"config.analysis.checkpoints is empty and no kept teachers were found in "
                               f"{ctx.path('finetune')}/<setting>/kept.json; pass "
                               "--config.analysis.checkpoints=a.npz,b.npz or run 'finetune_teacher' before "
                               "'analyze' in config.stages.")
    return out


def decoder_config(a) -> mi_lib.DecoderConfig:
    return mi_lib.DecoderConfig(channels=tuple(a.decoder_channels), steps=a.decoder_steps,
                                batch_size=a.decoder_batch_size, lr=a.decoder_lr, weight_decay=a.decoder_weight_decay)


class _Analyzer:
    """Data and settings shared by every checkpoint of one stage run."""

    def __init__(self, ctx: common.RunContext):
        self.ctx = ctx
        self.a = ctx.config.analysis
        self.tools = parse_tools(self.a.tools)
        n_dev = jax.device_count()
        self.batch = -(-self.a.batch_size // n_dev) * n_dev
        cfg, ds = ctx.config.data, ctx.config.dataset
        self.test_images, self.test_labels = features.split_images(cfg, ds, "eval", self.a.num_images, self.batch)
        self.train_images = None
        if "mi" in self.tools or "pruning" in self.tools:
            self.train_images, _ = features.split_images(cfg, ds, "train", self.a.num_train_images, self.batch)
        self._eval_data = None
        self._eval_steps: dict = {}  # model -> its compiled eval step

    def accuracy(self, model, params) -> dict:
        from flax import jax_utils
        if self._eval_data is None:
            self._eval_data = common.eval_data(self.ctx, self.batch)
        if model not in self._eval_steps:
            self._eval_steps[model] = evaluate.make_eval_step(lambda v, x: model.apply({"params": v}, x),
                                                              self.ctx.num_classes)
        step = self._eval_steps[model]
        result = evaluate.evaluate(step, jax_utils.replicate(params), self._eval_data)
        metric = self.ctx.metric
        return {"metric": metric, metric: result[metric], f"{metric}_se": result[f"{metric}_se"],
                "error": 1.0 - result[metric], "num_examples": int(result.get("num_examples", 0))}

    def mi(self, label: str, model, params, layers) -> list[dict]:
        train = features.layer_tokens(model, params, self.train_images, layers, batch_size=self.batch)
        test = features.layer_tokens(model, params, self.test_images, layers, batch_size=self.batch)
        rows = []
        for layer in layers:
            r = mi_lib.estimate_mi(features.patch_grid(train[layer]), self.train_images,
                                   features.patch_grid(test[layer]), self.test_images, decoder_config(self.a),
                                   self.ctx.rng("analysis", "mi", label, str(layer)))
            rows.append({"layer": layer, **r})
            logging.info("analyze/%s: MI from %s: BCE %.4f, Gaussian bound %.1f nats", label, layer, r["bce"],
                         r[HEADLINE_MI])
        return rows

    def expertness(self, model, params) -> list[dict]:
        _, values = features.intermediates(model, params, self.test_images, ["mlp_hidden"], batch_size=self.batch)
        blocks = features.parse_blocks(self.a.expertness_blocks, model.num_layers, "config.analysis.expertness_blocks")
        return expertness_lib.block_expertness(values["mlp_hidden"], self.ctx.num_classes, blocks,
                                               seed=self.ctx.config.seed)

    def criticality(self, model, params) -> list[dict]:
        a = self.a
        blocks = features.parse_blocks(a.criticality_blocks, model.num_layers, "config.analysis.criticality_blocks")
        neurons = None if a.criticality_max_neurons is None else np.arange(min(a.criticality_max_neurons,
                                                                               model.mlp_dim))
        images = self.test_images[:a.criticality_images]
        rows = []
        for b in blocks:
            values = criticality_lib.criticality(model, params, images, b, neurons, chunk_size=a.criticality_chunk,
                                                 image_batch=self.batch)
            rows.append({"block": b, "values": values.tolist(), "num_images": int(len(images)),
                         **criticality_lib.summarize(values, neurons, top_k=a.criticality_top_k)})
        return rows

    def pruning(self, label: str, model, params) -> list[dict]:
        a, ctx = self.a, self.ctx
        branches = parse_list(a.prune_branches)

        def measure(name, m, p):
            row = self.accuracy(m, p)
            mi = self.mi(f"{label}/{name}", m, p, [features.ENCODED])[0]
            row.update({k: mi[k] for k in ("bce", "mse", "gaussian_bound_nats", "bernoulli_bound_nats")})
            return row

        finetune = None
        if a.prune_finetune_steps:
            def finetune(name, m, p):
                # Not a committed sub-run: the checkpoint's cached analysis (checkpoints/<label>.json) is.
                sub = runs.SubRun(ctx, f"analysis/prune/{label}/{name}",
                                  ctx.path(handoff.ANALYSIS_DIR, "pruning", label, name))
                section = ml_collections.ConfigDict(ctx.config.finetune.to_dict())
                section.update(dict(steps=a.prune_finetune_steps, eval_every=0, checkpoint_every=0))
                setup = vit_finetune.setup_finetune(m, p, "full", ctx.rng("analysis", "prune", label, name),
                                                    image_size=ctx.config.data.image_size)
                final, _ = vit_finetune.train_classifier(
                    sub, setup, section, steps=a.prune_finetune_steps, sam_rho=0.0, sync_perturbations=False,
                    accum_steps=1, seed_name=f"analysis-prune-{label}-{name}")
                return jax.tree.map(np.asarray, setup.combine(final.params, final.frozen))
        return pruning_lib.sweep(model, params, branches, a.prune_max_blocks, measure=measure, finetune=finetune)

    def rollout(self, model, params) -> dict:
        images = self.test_images[:self.a.rollout_images]
        _, values = features.intermediates(model, params, images, ["attention"], batch_size=self.batch)
        r = rollout_lib.rollout(values["attention"])
        maps = rollout_lib.class_token_maps(r)
        return {"maps": maps.tolist(), "max_row_sum_error": float(np.max(np.abs(r.sum(-1) - 1.0))),
                "labels": self.test_labels[:len(images)].tolist()}

    def checkpoint(self, entry: dict) -> dict:
        ctx, a = self.ctx, self.a
        label = entry["label"]
        model, params = checkpoints.load_augreg(entry["checkpoint"], num_classes=ctx.num_classes,
                                                image_size=ctx.config.data.image_size,
                                                cache_dir=handoff.teacher_cache_dir(ctx))
        out = dict(entry, num_layers=model.num_layers, hidden_size=model.hidden_size, mlp_dim=model.mlp_dim,
                   eval=self.accuracy(model, params))
        logging.info("analyze/%s: %s %.4f", label, ctx.metric, out["eval"][ctx.metric])
        if "mi" in self.tools:
            out["mi"] = self.mi(label, model, params, features.parse_layers(a.mi_layers, model.num_layers))
        if "expertness" in self.tools:
            out["expertness"] = self.expertness(model, params)
        if "criticality" in self.tools:
            out["criticality"] = self.criticality(model, params)
        if "pruning" in self.tools and entry.get("prune", True):
            out["pruning"] = self.pruning(label, model, params)
        if "rollout" in self.tools:
            out["rollout"] = self.rollout(model, params)
        return out


def _request(ctx: common.RunContext, entry: dict) -> dict:
    """What a checkpoint's cached results depend on."""
    return {"analysis": ctx.config.analysis.to_dict(), "checkpoint": entry["checkpoint"],
            "prune": entry.get("prune", True), "dataset": ctx.config.dataset, "data": ctx.config.data.to_dict(),
            "seed": ctx.config.seed,
            "finetune": ctx.config.finetune.to_dict() if ctx.config.analysis.prune_finetune_steps else None}


def analyze(ctx: common.RunContext) -> stages.StageOutput:
    """The `analyze` stage (see the module docstring); returns the summary written to analysis.json."""
    import json
    a = ctx.config.analysis
    out_dir = ctx.path(handoff.ANALYSIS_DIR)
    entries = analysis_checkpoints(ctx)
    if a.prune_checkpoints == "last":
        last_of_group = {e["group"]: e["label"] for e in entries}
        for e in entries:
            e["prune"] = e["label"] in last_of_group.values()
    analyzer = None
    results = []
    for entry in entries:
        cache = os.path.join(out_dir, "checkpoints", f"{entry['label']}.json")
        request = json.loads(json.dumps(_request(ctx, entry)))
        cached = files.read_json(cache, default=None)
        if cached and cached.get("request") == request:
            logging.info("analyze/%s: done in %s, reusing.", entry["label"], cache)
            results.append(cached["result"])
            continue
        analyzer = analyzer or _Analyzer(ctx)
        result = json.loads(json.dumps(analyzer.checkpoint(entry)))
        common.write_json(cache, {"request": request, "result": result})
        results.append(result)
    summary = write_outputs(ctx, results)
    if common.is_chief():
        print(summary["markdown"])
    return stages.StageOutput({k: v for k, v in summary.items() if k != "markdown"}, summary["markdown"])


# ------------------------------------------------------------------------------------ outputs

def _fmt(x, digits=4):
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def markdown(results: list[dict], metric: str, plot_files: list[str]) -> str:
    lines = ["# Analysis", "", "## Checkpoints", "", f"| checkpoint | path | {metric} | error |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['label']} | {r['checkpoint']} | {metrics.format_accuracy(r['eval'], metric)} | "
                     f"{100 * r['eval']['error']:.2f} |")
    lines += ["", metrics.STANDARD_ERROR_NOTE]
    if any("mi" in r for r in results):
        lines += ["", "## Mutual information (reconstruction decoder, held-out images)", "",
                  "Lower BCE / larger bound = more information about the input. Compare only rows of equal "
                  "feature shape (tokens x width); the bounds assume independent Gaussian (resp. Bernoulli) "
                  "pixel values, see remem_jax/analysis/mutual_information.py.", "",
                  "| checkpoint | layer | feature shape | BCE | MSE | Gaussian bound (nats) | Bernoulli bound (nats) |",
                  "|---|---|---|---|---|---|---|"]
        shapes = set()
        for r in results:
            for m in r.get("mi", []):
                shapes.add(tuple(m["feature_shape"]))
                lines.append(f"| {r['label']} | {m['layer']} | {'x'.join(map(str, m['feature_shape']))} | "
                             f"{m['bce']:.4f} | {m['mse']:.4f} | {m['gaussian_bound_nats']:.1f} | "
                             f"{m['bernoulli_bound_nats']:.1f} |")
        if len(shapes) > 1:
            lines += ["", f"Warning: feature shapes differ ({sorted(shapes)}); estimates across them are not comparable."]
    if any("expertness" in r for r in results):
        lines += ["", "## Expertness (spectral co-clustering, k = classes)", "",
                  "| checkpoint | block | expertness | random-partition baseline |", "|---|---|---|---|"]
        for r in results:
            for e in r.get("expertness", []):
                lines.append(f"| {r['label']} | {e['block']} | {e['score']:.4f} | {e['baseline']:.4f} |")
    if any("criticality" in r for r in results):
        lines += ["", "## Neuron criticality (pre-logit embedding)", "",
                  "| checkpoint | block | neurons | max | mean | top neurons (c_j) |", "|---|---|---|---|---|---|"]
        for r in results:
            for c in r.get("criticality", []):
                top = ", ".join(f"{t['neuron']} ({t['criticality']:.3f})" for t in c["top"][:5])
                lines.append(f"| {r['label']} | {c['block']} | {c['num_neurons']} | {c['max']:.4f} | "
                             f"{c['mean']:.4f} | {top} |")
    if any("pruning" in r for r in results):
        lines += ["", "## Block pruning (top k branches)", "",
                  f"| checkpoint | branch | k | fine-tuned | {metric} | BCE | Gaussian bound (nats) |",
                  "|---|---|---|---|---|---|---|"]
        for r in results:
            for p in r.get("pruning", []):
                lines.append(f"| {r['label']} | {p['branch']} | {p['k']} | {'yes' if p['finetuned'] else 'no'} | "
                             f"{metrics.format_accuracy(p, metric)} | {p['bce']:.4f} | {p['gaussian_bound_nats']:.1f} |")
    if plot_files:
        lines += ["", "## Plots", ""] + [f"- {os.path.basename(p)}" for p in plot_files]
    return "\n".join(lines) + "\n"


def _headline_mi(result: dict):
    rows = result.get("mi", [])
    encoded = [m for m in rows if m["layer"] == features.ENCODED]
    return (encoded or rows[-1:] or [None])[0]


def write_outputs(ctx: common.RunContext, results: list[dict]) -> dict:
    """Writes the per-tool JSON, analysis.json, analysis.md and the PNGs; returns the summary."""
    out_dir = ctx.path(handoff.ANALYSIS_DIR)
    metric = ctx.metric
    chief = common.is_chief()
    plot_files = []
    points = []
    for r in results:
        m = _headline_mi(r)
        if m is not None:
            points.append({"label": r["label"], "group": r["group"], "error": r["eval"]["error"], **m})
        for p in r.get("pruning", []):
            if p["k"] > 0:
                points.append({"label": f"{r['label']} {p['name']}", "group": f"{r['label']} prune {p['branch']}",
                               "error": p["error"], HEADLINE_MI: p[HEADLINE_MI]})
    if chief and points:
        plot_files.append(plots.information_plane(points, os.path.join(out_dir, "information_plane.png")))
    curves = {r["label"]: [(m["layer"], m[HEADLINE_MI]) for m in r["mi"]] for r in results if r.get("mi")}
    if chief and curves:
        plot_files.append(plots.mi_curve(curves, os.path.join(out_dir, "mi_per_layer.png")))
    scores = {r["label"]: r["expertness"] for r in results if r.get("expertness")}
    if chief and scores:
        plot_files.append(plots.expertness_bars(scores, os.path.join(out_dir, "expertness.png")))
    crit = {f"{r['label']} block {c['block']}": np.asarray(c["values"]) for r in results
            for c in r.get("criticality", [])}
    if chief and crit:
        plot_files.append(plots.criticality_histogram(crit, os.path.join(out_dir, "criticality.png")))
    maps = {r["label"]: np.asarray(r["rollout"]["maps"]) for r in results if r.get("rollout")}
    if chief and maps:
        analyzer_images = features.split_images(ctx.config.data, ctx.config.dataset, "eval",
                                                ctx.config.analysis.rollout_images)[0]
        plot_files.append(plots.rollout_maps(analyzer_images, maps, os.path.join(out_dir, "rollout.png")))
    for tool in TOOLS:
        per = {r["label"]: r[tool] for r in results if tool in r}
        if per:
            common.write_json(os.path.join(out_dir, f"{tool}.json"), per)
    text = markdown(results, metric, plot_files)
    common.write_text(os.path.join(out_dir, "analysis.md"), text)
    summary = {"complete": True, "metric": metric, "checkpoints": [
        {"label": r["label"], "checkpoint": r["checkpoint"], metric: r["eval"][metric],
         "mi": (_headline_mi(r) or {}).get(HEADLINE_MI)} for r in results],
        "plots": plot_files, "outputs": out_dir}
    common.write_json(os.path.join(out_dir, "analysis.json"), dict(summary, results=results))
    return dict(summary, markdown=text)


def validate(config) -> None:
    a = config.analysis
    tools = [t.strip() for t in str(a.tools).split(",") if t.strip()]
    cv.check(bool(tools) and all(t in TOOLS for t in tools), "analysis.tools",
             f"a comma list of {', '.join(TOOLS)}", a.tools)
    cv.check(isinstance(a.checkpoints, str), "analysis.checkpoints", "a comma-separated string of npz paths or names "
             "('' = the kept teachers)", a.checkpoints)
    cv.one_of("analysis.kept_steps", a.kept_steps, KEPT_SELECTIONS)
    cv.one_of("analysis.prune_checkpoints", a.prune_checkpoints, PRUNE_SELECTIONS)
    for name in ("num_images", "num_train_images", "batch_size", "decoder_steps", "decoder_batch_size",
                 "criticality_images", "criticality_chunk", "criticality_top_k", "rollout_images"):
        cv.positive_int(config, f"analysis.{name}")
    cv.optional_positive_int(config, "analysis.criticality_max_neurons", "every neuron")
    cv.check(a.decoder_lr > 0, "analysis.decoder_lr", "> 0", a.decoder_lr)
    cv.check(a.decoder_weight_decay >= 0, "analysis.decoder_weight_decay", ">= 0", a.decoder_weight_decay)
    cv.check(len(tuple(a.decoder_channels)) > 0 and all(cv.is_int(c) and c > 0 for c in a.decoder_channels),
             "analysis.decoder_channels", "a non-empty tuple of positive integers", a.decoder_channels)
    branches = [b.strip() for b in str(a.prune_branches).split(",") if b.strip()]
    cv.check(bool(branches) and all(b in pruning_lib.BRANCHES for b in branches), "analysis.prune_branches",
             f"a comma list of {', '.join(pruning_lib.BRANCHES)}", a.prune_branches)
    for name in ("prune_max_blocks", "prune_finetune_steps"):
        value = a[name]
        cv.check(cv.is_int(value) and value >= 0, f"analysis.{name}", "an integer >= 0", value)
    if a.prune_finetune_steps and "pruning" in tools:
        cv.positive_int(config, "finetune.batch_size")
        cv.check(config.finetune.lr > 0, "finetune.lr", "> 0 (the pruning sweep's fine-tune uses it)",
                 config.finetune.lr)


STAGES = (
    # It reads config.finetune: the kept teachers' settings, and the pruning fine-tune's optimizer.
    stages.Stage("analyze", folder=handoff.ANALYSIS_DIR, section="analysis", run=analyze, validate=validate,
                 reads=("finetune.",),
                 needs=(stages.Need("finetune_teacher", "the kept teachers (or npz files in config.analysis.checkpoints)",
                                    lambda config: not parse_list(config.analysis.checkpoints)),),
                 outputs="`<tool>.json`, `analysis.json`, `analysis.md`, PNG plots, `checkpoints/<label>.json`"),
)
