"""Training-step throughput on synthetic data: `python -m remem_jax.benchmark --model=B_16 ...`.

Times the library's own train steps (`train.step.make_train_step` with the fine-tuning loss of
`train.teacher` or the distillation loss of `train.distill`), pmapped over every local device
exactly as the stages run them, on one fixed synthetic batch (uniform images in [-1, 1], random
labels) that stays on the devices: it measures compute, not the input pipeline (see
`remem_jax.data.benchmark` for that). Parameters are randomly initialised; no checkpoint is read.

Modes:
  finetune_plain       full fine-tuning, one gradient pass (SAM rho 0).
  finetune_sam         full fine-tuning with SAM (rho 0.5, two gradient passes).
  finetune_lora        LoRA (query/value, rank 32) with SAM rho 0.5: the ReMem LoRA setting.
  finetune_lora_plain  the same LoRA with rho 0.
  distill              frozen ViT teacher (inference, inside the step) + CNN student with BatchNorm,
                       KD loss; also times a teacher-only forward on the same batch.
  fewshot_distill      WeCoLoRA: frozen ViT teacher + its weight-copied student (every d-th block,
                       `--wecolora_d`) with LoRA on every linear layer (`--wecolora_rank`), L1 on the
                       last block's tokens; also times the teacher-only forward.
  fewshot_full         the same student and loss with every weight trained (WeCo+KD): the full
                       fine-tuning step of that student, for the LoRA/full ratio.
  relation_distill     TinyMIM: frozen ViT teacher (`--model`, up to its relation block's q/k/v)
                       + ViT student (`--tinymim_student`, last block with the teacher's heads),
                       Q-K and V-V relation loss, AdamW; also times the teacher's part alone.

For each mode it reports images/s, step time (mean, std), compile and first-step time, FLOPs per
step from XLA's cost analysis of the compiled step, achieved TFLOP/s (and MFU given
`--peak_tflops`), memory, the SAM/plain and LoRA/full step-time ratios of modes measured in the
same run, and `data_over_step`: the images/s of the JPEG input pipeline
(`remem_jax.data.benchmark`, at `--image_size` and the global batch, timed once before the
modes) over the step's images/s (> 1: the pipeline keeps up; `--data_batches=0` skips it).

  python -m remem_jax.benchmark --model=Ti_16 --batch_size=32 --modes=finetune_plain,finetune_sam \\
      --output=/tmp/bench.json

The README's accelerator table is one command (ViT-B/16 at 224, global batch 256 halved per mode
until it fits, bfloat16, every mode; writes `benchmark_gpu.md` and `benchmark_gpu.json`):

  python -m remem_jax.benchmark --preset=gpu_table --peak_tflops=<one device's dense bf16 TFLOP/s>

Flags given explicitly override the preset's values (e.g. `--remat` for activation
rematerialisation per block, `--batch_size=512`).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from remem_jax import devices as device_lib, dtypes, tree
from remem_jax.dtypes import DTYPES
from remem_jax.models import students, vit
from remem_jax.train import distill, state as state_lib, step as step_lib, vit_finetune, wecolora

AXIS = "batch"
MODES = ("finetune_plain", "finetune_sam", "finetune_lora", "finetune_lora_plain", "distill", "fewshot_distill",
         "fewshot_full", "relation_distill")
TEACHER_MODES = ("distill", "fewshot_distill", "fewshot_full", "relation_distill")  # the report also times their teacher alone
# name -> (numerator mode, denominator mode), both timed in the same process.
RATIOS = {
    "sam_over_plain": ("finetune_sam", "finetune_plain"),
    "lora_sam_over_lora_plain": ("finetune_lora", "finetune_lora_plain"),
    "lora_sam_over_full_sam": ("finetune_lora", "finetune_sam"),
    "fewshot_lora_over_full": ("fewshot_distill", "fewshot_full"),
    "lora_plain_over_full_plain": ("finetune_lora_plain", "finetune_plain"),
}
# --preset=gpu_table: the README's accelerator table (explicit flags win).
PRESETS: dict[str, dict[str, Any]] = {
    "gpu_table": dict(model="B_16", num_layers=0, student="resnet18", image_size=224, batch_size=256,
                      dtype="bfloat16", steps=10, warmup=3, modes=MODES, fit_batch=True,
                      output="benchmark_gpu.json", markdown="benchmark_gpu.md"),
}
# The issue-12 targets the markdown table is checked against (accelerator runs).
TARGETS = (("finetune_sam", "mfu", ">=", 0.45), ("distill", "mfu", ">=", 0.40),
           ("sam_over_plain", "ratio", "<=", 2.05), ("lora_plain_over_full_plain", "ratio", "<=", 0.7))
FLOPS_SOURCE = ("XLA cost_analysis()['flops'] of the compiled per-device step (the pmapped "
                "executable that is timed) x number of devices")


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
    """What to benchmark; the fields mirror the command-line flags."""
    model: str = "B_16"
    num_layers: int = 0
    student: str = "resnet18"
    image_size: int = 224
    batch_size: int = 32
    dtype: str = "auto"
    steps: int = 5
    warmup: int = 2
    modes: tuple[str, ...] = MODES
    peak_tflops: Optional[float] = None
    num_classes: int = 100
    sam_rho: float = 0.5
    lora_rank: int = 32
    wecolora_d: int = 2
    wecolora_rank: int = 128
    tinymim_student: str = "S_16"
    tinymim_student_layers: int = 0
    seed: int = 0
    output: Optional[str] = None
    remat: bool = False
    data_batches: int = 5
    fit_batch: bool = False
    markdown: Optional[str] = None
    preset: Optional[str] = None

    def validate(self, num_devices: int) -> None:
        """Raises ValueError naming the first bad field."""
        vit.variant_config(self.model)  # raises on an unknown variant
        vit.variant_config(self.tinymim_student)
        if self.student not in students.STUDENTS:
            raise ValueError(f"--student must be one of {sorted(students.STUDENTS)}, got {self.student!r}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise ValueError(f"--modes must be a non-empty comma list of {MODES}, got {list(self.modes)}.")
        for name in ("image_size", "batch_size", "steps", "warmup", "num_classes", "lora_rank", "wecolora_d",
                     "wecolora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)!r}.")
        if self.data_batches < 0:
            raise ValueError(f"--data_batches must be >= 0 (0 = skip the input pipeline), got {self.data_batches!r}.")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {self.preset!r}.")
        if self.num_layers < 0:
            raise ValueError(f"--num_layers must be >= 0 (0 = the variant's depth), got {self.num_layers!r}.")
        if self.batch_size % num_devices:
            raise ValueError(f"--batch_size={self.batch_size} must be divisible by the number of local "
                             f"devices ({num_devices}).")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"--peak_tflops must be > 0, got {self.peak_tflops!r}.")
        if not self.sam_rho > 0:
            raise ValueError(f"--sam_rho must be > 0 (the SAM modes' radius), got {self.sam_rho!r}.")


# ----------------------------------------------------------------------------- flags

def define_flags(flag_values: flags.FlagValues) -> None:
    """Defines the benchmark's absl flags on `flag_values` (kept off the global FLAGS on purpose:
    `remem_jax.data.benchmark` defines flags of the same names)."""
    d = BenchmarkOptions()
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("model", d.model, "ViT variant of the fine-tuned model and of the teacher.", **fv)
    flags.DEFINE_integer("num_layers", d.num_layers, "ViT depth override; 0 = the variant's depth.", **fv)
    flags.DEFINE_string("student", d.student, f"Student CNN of 'distill': {sorted(students.STUDENTS)}.", **fv)
    flags.DEFINE_integer("image_size", d.image_size, "Square input side in pixels.", **fv)
    flags.DEFINE_integer("batch_size", d.batch_size, "Global batch size (split over the local devices).", **fv)
    flags.DEFINE_enum("dtype", d.dtype, sorted(DTYPES),
                      "Compute dtype (params stay float32); auto: bfloat16 on GPU/TPU, float32 on CPU.", **fv)
    flags.DEFINE_integer("steps", d.steps, "Timed steps per mode.", **fv)
    flags.DEFINE_integer("warmup", d.warmup, "Untimed steps per mode, the compiling first step included.", **fv)
    flags.DEFINE_list("modes", list(d.modes), f"Comma list of modes among {MODES}.", **fv)
    flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device, for MFU (optional).", **fv)
    flags.DEFINE_integer("num_classes", d.num_classes, "Classes of the heads.", **fv)
    flags.DEFINE_float("sam_rho", d.sam_rho, "SAM radius of finetune_sam and finetune_lora.", **fv)
    flags.DEFINE_integer("lora_rank", d.lora_rank, "LoRA rank (query/value targets, alpha 32).", **fv)
    flags.DEFINE_integer("wecolora_d", d.wecolora_d, "Weight-copy factor of the fewshot modes.", **fv)
    flags.DEFINE_integer("wecolora_rank", d.wecolora_rank, "LoRA rank of fewshot_distill (every linear layer).", **fv)
    flags.DEFINE_string("tinymim_student", d.tinymim_student, "ViT student variant of 'relation_distill'.", **fv)
    flags.DEFINE_integer("tinymim_student_layers", d.tinymim_student_layers,
                         "Depth of the 'relation_distill' student; 0 = the variant's.", **fv)
    flags.DEFINE_integer("seed", d.seed, "Seed of the parameters and the synthetic batch.", **fv)
    flags.DEFINE_string("output", None, "Optional path of the JSON results.", **fv)
    flags.DEFINE_bool("remat", d.remat, "Rematerialise every ViT block in the backward pass (nn.remat).", **fv)
    flags.DEFINE_integer("data_batches", d.data_batches,
                         "Timed batches of the JPEG input pipeline for data_over_step; 0 skips it.", **fv)
    flags.DEFINE_bool("fit_batch", d.fit_batch, "On out-of-memory, halve a mode's batch until it fits.", **fv)
    flags.DEFINE_string("markdown", None, "Optional path of a README-ready markdown table.", **fv)
    flags.DEFINE_string("preset", None, f"Named settings among {sorted(PRESETS)}; explicit flags win.", **fv)


def options_from_flags(flag_values: flags.FlagValues) -> BenchmarkOptions:
    """The parsed flags as `BenchmarkOptions` (a `--preset`'s values for flags not given)."""
    fields = {f.name for f in dataclasses.fields(BenchmarkOptions)}
    values = {name: flag_values[name].value for name in fields}
    values["modes"] = tuple(m.strip() for m in values["modes"] if m.strip())
    preset = values["preset"]
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}.")
        for name, value in PRESETS[preset].items():
            if not flag_values[name].present:
                values[name] = tuple(value) if name == "modes" else value
    return BenchmarkOptions(**values)


# ----------------------------------------------------------------------------- helpers

def shard_batch(batch: Any, devices: Sequence[jax.Device]) -> Any:
    """Puts `[num_devices, per_device, ...]` host arrays on the devices, laid out as pmap's inputs
    (the same sharding `devices.replicate` uses), so no step re-transfers the batch."""
    sharding = NamedSharding(Mesh(np.array(list(devices)), (AXIS,)), PartitionSpec(AXIS))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def synthetic_batch(seed: int, batch_size: int, image_size: int, num_classes: int,
                    num_devices: int) -> dict[str, np.ndarray]:
    """Uniform images in [-1, 1], uniform labels and their one-hot `soft_label`, shaped
    `[num_devices, batch_size // num_devices, ...]` (host NumPy, float32 / int32)."""
    rng = np.random.default_rng(seed)
    per_device = batch_size // num_devices
    images = rng.uniform(-1.0, 1.0, (num_devices, per_device, image_size, image_size, 3)).astype(np.float32)
    labels = rng.integers(0, num_classes, (num_devices, per_device)).astype(np.int32)
    return {"image": images, "label": labels, "soft_label": np.eye(num_classes, dtype=np.float32)[labels]}


def vit_forward_flops(model: vit.VisionTransformer, image_size: int) -> float:
    """Analytic forward FLOPs of one image (2 per multiply-add; matmuls and convolutions only).

    Patch embedding `T * p^2 * 3 * D`; per block `N * (4 D^2 + 2 D M)` for q, k, v, out and the
    MLP, plus `2 N^2 D` for the attention logits and the weighted sum; the head `D * C`. Here
    `T = (S / p)^2` patches, `N = T + 1` tokens. LayerNorm, softmax, GELU are left out.

    Args:
      model: the ViT (its patch size, width, depth, MLP width, classes).
      image_size: the square input side S.

    Returns:
      FLOPs per image.
    """
    patches = (image_size // model.patch_size) ** 2
    tokens, width, mlp = patches + 1, model.hidden_size, model.mlp_dim
    macs = patches * model.patch_size ** 2 * 3 * width
    macs += model.num_layers * (tokens * (4 * width ** 2 + 2 * width * mlp) + 2 * tokens ** 2 * width)
    macs += width * (model.num_classes or 0)
    return 2.0 * macs


def _flops(compiled: Any) -> Optional[float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returned one dict per module
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def _xla_memory(compiled: Any) -> Optional[dict]:
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not implemented on every backend
        return None
    if stats is None:
        return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes")
    out = {name: int(getattr(stats, name)) for name in names if hasattr(stats, name)}
    if len(out) == len(names):
        out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                              - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def memory_snapshot() -> dict:
    """Device allocator peak when the backend reports one, else None; and the host's peak RSS.

    Both are high-water marks since the process started (neither can be reset), so for the second
    and later modes of a run they are upper bounds over the modes so far.
    """
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:
        stats = None
    device_peak = stats.get("peak_bytes_in_use") if stats else None
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"device_peak_bytes_in_use": int(device_peak) if device_peak is not None else None,
            "host_peak_rss_bytes": int(rss_kib) * 1024}


def _block(value: Any) -> Any:
    return jax.block_until_ready(value)


def time_compiled(fn: Callable, args: tuple, *, steps: int, warmup: int, carry_state: bool) -> dict:
    """Lowers and compiles `fn(*args)`, runs `warmup` untimed calls (the first one included) and
    `steps` timed calls, blocking on the outputs after each.

    Args:
      fn: a pmapped function.
      args: its arguments; with `carry_state`, `args = (state, batch)` and each call's first
        output is the next call's state (the state argument is donated).
      steps: timed calls.
      warmup: untimed calls, counting the first.
      carry_state: thread the state through the calls.

    Returns:
      Timings in seconds (`compile_s`, `first_step_s`, `times_s`), `flops_per_device`, the XLA
      memory analysis and the last outputs (`outputs`).
    """
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    info = {"flops_per_device": _flops(compiled), "xla_memory": _xla_memory(compiled)}

    def call(args):
        out = _block(compiled(*args))
        return ((out[0],) + tuple(args[1:]) if carry_state else args), out

    start = time.perf_counter()
    args, out = call(args)
    first_step_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        args, out = call(args)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        args, out = call(args)
        times.append(time.perf_counter() - start)
    return dict(info, compile_s=compile_s, first_step_s=first_step_s, times_s=times, outputs=out)


# ----------------------------------------------------------------------------- modes

@dataclasses.dataclass
class ModeSetup:
    """One mode's un-mapped step, its host state and what the report says about it."""
    step: step_lib.StepFn
    state: state_lib.TrainState
    description: str
    sam_rho: float
    teacher: Optional[vit.VisionTransformer] = None
    teacher_forward: Optional[Callable] = None  # pmapped (teacher_params, batch) -> ...; None: the full forward


def stage_config(options: BenchmarkOptions) -> ml_collections.ConfigDict:
    """configs/common.py's defaults (what a run uses) with the benchmark's batch, steps, dtype and remat."""
    try:
        from configs import common
    except ImportError as e:
        raise ValueError("the benchmark builds its steps from configs/common.py: run it from the repository root "
                         f"(the folder holding configs/) ({e}).") from None
    config = common.get_config()
    total = options.warmup + options.steps
    for name in ("finetune", "distill", "wecolora", "tinymim"):
        config[name].batch_size = options.batch_size
    config.finetune.update(dict(steps=total, lora_rank=options.lora_rank, lora_targets="qv", remat=options.remat,
                                dtype=options.dtype))
    config.distill.update(dict(steps=total, student=options.student, dtype=options.dtype, method="kd"))
    config.wecolora.update(dict(d=options.wecolora_d, lora_rank=options.wecolora_rank, dtype=options.dtype,
                                remat=options.remat))
    config.tinymim.update(dict(steps=total, student=options.tinymim_student, dtype=options.dtype,
                               num_layers=options.tinymim_student_layers or None, remat=options.remat))
    return config


def _create_vit(options: BenchmarkOptions) -> vit.VisionTransformer:
    overrides = {"num_layers": options.num_layers} if options.num_layers else {}
    return vit.create_vit(options.model, options.num_classes, dtype=DTYPES[options.dtype],
                          remat_blocks=options.remat, **overrides)


def _init_vit(model: vit.VisionTransformer, rng: jax.Array, image_size: int) -> Any:
    return jax.jit(model.init)(rng, jnp.zeros((1, image_size, image_size, 3)))["params"]


def build_finetune(options: BenchmarkOptions, mode: str) -> ModeSetup:
    """The teacher fine-tuning step of `mode` (full or LoRA, plain or SAM): `vit_finetune.classifier_step`
    with `config.finetune`."""
    lora = mode in ("finetune_lora", "finetune_lora_plain")
    rho = options.sam_rho if mode in ("finetune_sam", "finetune_lora") else 0.0
    f = stage_config(options).finetune
    key = jax.random.PRNGKey(options.seed)
    model = _create_vit(options)
    params = _init_vit(model, jax.random.fold_in(key, 0), options.image_size)
    setup = vit_finetune.setup_finetune(model, params, "lora" if lora else "full", jax.random.fold_in(key, 1),
                                        image_size=options.image_size, lora_rank=f.lora_rank,
                                        lora_alpha=f.lora_alpha, lora_targets=f.lora_targets)
    state, step = vit_finetune.classifier_step(f, setup, steps=f.steps, sam_rho=rho, rng=jax.random.fold_in(key, 2))
    what = f"LoRA {f.lora_targets} rank {f.lora_rank} (base frozen)" if lora else "full fine-tuning"
    return ModeSetup(step, state, f"ViT-{options.model} {what}, SAM rho {rho}", rho)


def build_distill(options: BenchmarkOptions) -> ModeSetup:
    """The KD step (`distill.distillation_step` with `config.distill`): frozen ViT teacher inside the step,
    CNN student with cross-device BatchNorm."""
    d = stage_config(options).distill
    key = jax.random.PRNGKey(options.seed)
    teacher_model = _create_vit(options)
    teacher_params = _init_vit(teacher_model, jax.random.fold_in(key, 0), options.image_size)
    student = distill.student_model(d, options.num_classes)
    params, batch_stats = students.init_student(student, jax.random.fold_in(key, 3), options.image_size)
    tx = distill.student_tx(d)
    state = state_lib.create_train_state(params, tx, rng=jax.random.fold_in(key, 2),
                                         frozen={"teacher": teacher_params}, batch_stats=batch_stats)
    step = distill.distillation_step(d, student, teacher_model, d.method, tx)
    return ModeSetup(step, state, f"{d.method.upper()}: frozen ViT-{options.model} teacher + {options.student} "
                     "student (BatchNorm), SAM rho 0", 0.0, teacher=teacher_model)


def build_fewshot(options: BenchmarkOptions, mode: str) -> ModeSetup:
    """WeCoLoRA's step (LoRA on every linear layer) or WeCo+KD's (every weight), teacher inside:
    `wecolora.variant_step` with `config.wecolora`."""
    w = stage_config(options).wecolora
    key = jax.random.PRNGKey(options.seed)
    teacher_model = _create_vit(options)
    teacher_params = _init_vit(teacher_model, jax.random.fold_in(key, 0), options.image_size)
    variant = "wecolora" if mode == "fewshot_distill" else "weco_kd"
    setup = wecolora.build_student(variant, teacher_model, teacher_params, d=w.d, lora_rank=w.lora_rank,
                                   image_size=options.image_size, rng=jax.random.fold_in(key, 1),
                                   dtype=DTYPES[w.dtype], remat=w.remat)
    total = options.warmup + options.steps
    state, step = wecolora.variant_step(w, variant, setup, teacher_model, teacher_params, steps=total,
                                        warmup_steps=min(2, total - 1), rng=jax.random.fold_in(key, 2))
    spec = wecolora.VARIANTS[variant]
    what = (f"LoRA rank {w.lora_rank} on every linear layer" if spec.lora_targets else "every weight")
    return ModeSetup(step, state, f"few-shot feature distillation: frozen ViT-{options.model} teacher -> "
                     f"{setup.model.num_layers}-block weight copy (d={w.d}), {what}", 0.0,
                     teacher=teacher_model)


def build_relation_distill(options: BenchmarkOptions) -> ModeSetup:
    """TinyMIM's relation step (`tinymim.build_objective` and `tinymim.distill_step` with `config.tinymim`)."""
    from remem_jax.train import tinymim
    t = stage_config(options).tinymim
    key = jax.random.PRNGKey(options.seed)
    size = options.image_size
    teacher_model = vit.create_vit(options.model, options.num_classes, dtype=DTYPES[options.dtype],
                                   **({"num_layers": options.num_layers} if options.num_layers else {}))
    teacher_params = _init_vit(teacher_model, jax.random.fold_in(key, 0), size)
    student = tinymim.student_model(t, teacher_model.num_heads)
    block = tinymim.default_teacher_block(teacher_model.num_layers, student.num_layers)
    objective = tinymim.build_objective(t, teacher_model, student, tinymim.RunSpec("relation", block))
    state, step, _ = tinymim.distill_step(t, objective, _init_vit(student, jax.random.fold_in(key, 3), size),
                                          teacher_params, image_size=size, rng=jax.random.fold_in(key, 2),
                                          projection_rng=jax.random.fold_in(key, 4))
    forward = jax.pmap(lambda p, batch: objective.teacher_targets(p, batch["image"]), axis_name=AXIS)
    return ModeSetup(step, state, f"TinyMIM relations: frozen ViT-{options.model} teacher block {block} of "
                     f"{teacher_model.num_layers} + ViT-{options.tinymim_student} student ({student.num_layers} "
                     f"blocks, last with {teacher_model.num_heads} heads), AdamW", 0.0, teacher=teacher_model,
                     teacher_forward=forward)


def _teacher_forward(model: vit.VisionTransformer) -> Callable:
    # Exactly the teacher call inside distillation_loss.
    def forward(teacher_params, batch):
        return model.apply({"params": teacher_params}, batch["image"].astype(model.dtype), train=False)
    return jax.pmap(forward, axis_name=AXIS)


def _ms(times_s: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(times_s)
    std = statistics.stdev(times_s) if len(times_s) > 1 else 0.0
    return 1e3 * mean, 1e3 * std


def benchmark_mode(options: BenchmarkOptions, mode: str, batch: Any, devices: Sequence[jax.Device]) -> dict:
    """Times one mode; returns its JSON record."""
    if mode == "distill":
        setup = build_distill(options)
    elif mode in ("fewshot_distill", "fewshot_full"):
        setup = build_fewshot(options, mode)
    elif mode == "relation_distill":
        setup = build_relation_distill(options)
    else:
        setup = build_finetune(options, mode)
    n = len(devices)
    state = device_lib.replicate(setup.state, AXIS, devices)
    record: dict[str, Any] = {
        "mode": mode, "description": setup.description, "sam_rho": setup.sam_rho,
        "trainable_params": tree.param_count(setup.state.params),
        "frozen_params": tree.param_count(setup.state.frozen),
        "global_batch_size": options.batch_size, "per_device_batch_size": options.batch_size // n,
        "num_devices": n}
    setup.state = None  # the host copy; the replicated one is what runs
    timing = time_compiled(step_lib.pmap_train_step(setup.step, axis_name=AXIS), (state, batch),
                           steps=options.steps, warmup=options.warmup, carry_state=True)
    state, metrics = timing.pop("outputs")
    step_ms, step_std = _ms(timing["times_s"])
    loss = float(np.asarray(jax.device_get(metrics["loss"]))[0])
    record.update(
        compile_s=timing["compile_s"], first_step_s=timing["first_step_s"],
        compile_plus_first_step_s=timing["compile_s"] + timing["first_step_s"],
        step_ms_mean=step_ms, step_ms_std=step_std, step_ms_median=1e3 * statistics.median(timing["times_s"]),
        step_ms_min=1e3 * min(timing["times_s"]), step_ms_all=[1e3 * t for t in timing["times_s"]],
        images_per_s=options.batch_size / (step_ms / 1e3), final_loss=loss, loss_finite=bool(np.isfinite(loss)))
    flops = timing["flops_per_device"]
    record["flops_per_step"] = flops * n if flops is not None else None
    record["flops_source"] = FLOPS_SOURCE if flops is not None else "unavailable"
    tflops = record["flops_per_step"] / (step_ms / 1e3) / 1e12 if flops is not None else None
    record["achieved_tflops"] = tflops
    record["mfu"] = (tflops / (options.peak_tflops * n) if tflops is not None and options.peak_tflops
                     else None)
    model = setup.teacher if setup.teacher is not None else _create_vit(options)
    record["vit_forward_flops_per_image_analytic"] = vit_forward_flops(model, options.image_size)
    record["xla_memory_per_device"] = timing["xla_memory"]
    if setup.teacher is not None:
        fwd = time_compiled(setup.teacher_forward or _teacher_forward(setup.teacher), (state.frozen["teacher"], batch),
                            steps=options.steps, warmup=options.warmup, carry_state=False)
        fwd.pop("outputs")
        teacher_ms, teacher_std = _ms(fwd["times_s"])
        record.update(
            teacher_forward_ms_mean=teacher_ms, teacher_forward_ms_std=teacher_std,
            teacher_forward_ms_min=1e3 * min(fwd["times_s"]),
            teacher_share_min=1e3 * min(fwd["times_s"]) / record["step_ms_min"],
            teacher_forward_flops=(fwd["flops_per_device"] * n if fwd["flops_per_device"] else None),
            teacher_share=teacher_ms / step_ms)
    del state, metrics
    gc.collect()
    record["memory"] = memory_snapshot()
    jax.clear_caches()
    return record


# ----------------------------------------------------------------------------- report

def environment() -> dict:
    """Versions, devices and host load: the context every figure must be read in."""
    device = jax.local_devices()[0]
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus_usable = os.cpu_count()
    return {"jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version(),
            "backend": jax.default_backend(), "device_kind": device.device_kind,
            "num_local_devices": jax.local_device_count(), "host_cpus": os.cpu_count(),
            "host_cpus_usable": cpus_usable, "load_average_1m_at_start": os.getloadavg()[0],
            "hostname": platform.node(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def ratios(results: dict, statistic: str = "mean") -> dict:
    """Step-time ratios of mode pairs measured in this run (see `RATIOS`).

    Args:
      results: mode -> record.
      statistic: 'mean', 'median' or 'min' of the timed steps. On a shared host the min is the
        least disturbed by other processes.

    Returns:
      name -> ratio, for the pairs whose modes both ran.
    """
    key = f"step_ms_{statistic}"
    # Pairs at different batch sizes (`--fit_batch` halved one) are not comparable.
    return {name: results[a][key] / results[b][key]
            for name, (a, b) in RATIOS.items() if a in results and b in results
            and results[a]["global_batch_size"] == results[b]["global_batch_size"]}


def header(env: dict, options: BenchmarkOptions) -> str:
    lines = [f"remem_jax.benchmark: jax {env['jax']}, flax {env['flax']}, {env['num_local_devices']} x "
             f"{env['device_kind']} ({env['backend']}), host CPUs {env['host_cpus_usable']}/{env['host_cpus']}, "
             f"load average {env['load_average_1m_at_start']:.2f}",
             f"ViT {options.model}" + (f" ({options.num_layers} layers)" if options.num_layers else "")
             + f", image {options.image_size}, global batch {options.batch_size}, {options.dtype}"
             + (f" (= {dtypes.resolved_name(options.dtype)})" if options.dtype == dtypes.AUTO else "")
             + (", remat" if options.remat else "") + ", "
             f"{options.warmup} warm-up + {options.steps} timed steps, synthetic on-device batch"]
    if env["backend"] == "cpu":
        lines.append("NOTE: CPU run. Absolute numbers are not representative of accelerators and depend "
                     "on other load on this host; use only the ratios between modes of the same run.")
    return "\n".join(lines)


def _fmt(value: Optional[float], spec: str) -> str:
    width = spec.split(".")[0]
    return format("-", f">{width}") if value is None else format(value, spec)


def table(results: dict) -> str:
    """One row per mode."""
    rows = [f"{'mode':<20} {'img/s':>8} {'step ms':>9} {'+-std':>7} {'min ms':>9} {'compile+1st s':>13} "
            f"{'GFLOP/step':>10} {'TFLOP/s':>8} {'MFU':>6} {'data/step':>9}  memory (see JSON)"]
    for mode, r in results.items():
        mem = r["memory"]
        if mem["device_peak_bytes_in_use"] is not None:
            mem_s = f"device peak {mem['device_peak_bytes_in_use'] / 2**30:.2f} GiB"
        else:
            mem_s = f"host peak RSS {mem['host_peak_rss_bytes'] / 2**30:.2f} GiB"
        gflops = r["flops_per_step"] / 1e9 if r["flops_per_step"] is not None else None
        rows.append(f"{mode:<20} {r['images_per_s']:>8.2f} {r['step_ms_mean']:>9.1f} {r['step_ms_std']:>7.1f} "
                    f"{r['step_ms_min']:>9.1f} {r['compile_plus_first_step_s']:>13.1f} {_fmt(gflops, '10.1f')} "
                    f"{_fmt(r['achieved_tflops'], '8.3f')} {_fmt(r['mfu'], '6.3f')} "
                    f"{_fmt(r.get('data_over_step'), '9.2f')}  {mem_s}"
                    + (f"  (batch {r['global_batch_size']})" if r.get("batch_halved") else ""))
    return "\n".join(rows)


def run_benchmark(options: BenchmarkOptions) -> dict:
    """Runs every requested mode in order; prints the report; returns (and optionally writes) the JSON.

    Args:
      options: what to run.

    Returns:
      `{'environment', 'options', 'flops_source', 'results': {mode: record}, 'ratios'}`.
    """
    devices = jax.local_devices()
    options.validate(len(devices))
    env = environment()
    print(header(env, options), flush=True)
    pipeline = input_pipeline(options)
    if pipeline is not None:
        print(f"input pipeline: {pipeline['images_per_s']:.1f} images/s ({pipeline['source']})", flush=True)
    batches: dict[int, Any] = {}
    results = {}
    for mode in dict.fromkeys(options.modes):
        print(f"... {mode}", flush=True)
        size = options.batch_size
        while True:
            if size not in batches:
                batches[size] = shard_batch(synthetic_batch(options.seed, size, options.image_size,
                                                            options.num_classes, len(devices)), devices)
            try:
                results[mode] = benchmark_mode(dataclasses.replace(options, batch_size=size), mode,
                                               batches[size], devices)
                break
            except Exception as e:  # XlaRuntimeError's type moves between JAX versions
                half = size // 2
                if not (options.fit_batch and _out_of_memory(e) and half >= len(devices)
                        and half % len(devices) == 0):
                    raise
                print(f"... {mode}: out of memory at global batch {size}; retrying at {half}", flush=True)
                batches.clear()
                gc.collect()
                jax.clear_caches()
                size = half
        results[mode]["batch_halved"] = size != options.batch_size
        if pipeline is not None:
            results[mode]["data_over_step"] = pipeline["images_per_s"] / results[mode]["images_per_s"]
    report = {"environment": dict(env, load_average_1m_at_end=os.getloadavg()[0]),
              "options": dataclasses.asdict(options), "dtype_resolved": dtypes.resolved_name(options.dtype),
              "input_pipeline": pipeline, "flops_source": FLOPS_SOURCE,
              "memory_notes": ("device_peak_bytes_in_use: allocator high-water mark since process start "
                               "(None on CPU); host_peak_rss_bytes: ru_maxrss of this process since start; "
                               "both cumulative over the modes run so far. xla_memory_per_device: XLA's "
                               "static buffer analysis of the compiled step, per mode."),
              "results": results, "ratios": ratios(results), "ratios_of_min": ratios(results, "min")}
    print(table(results))
    for name, value in report["ratios"].items():
        print(f"{name}: {value:.3f} of mean step times, {report['ratios_of_min'][name]:.3f} of min (same run)")
    for mode in (m for m in TEACHER_MODES if m in results):
        r = results[mode]
        print(f"{mode} teacher forward: {r['teacher_forward_ms_mean']:.1f} ms of a {r['step_ms_mean']:.1f} ms "
              f"step = {100 * r['teacher_share']:.1f}% (min: {100 * r['teacher_share_min']:.1f}%; "
              "teacher-only pmapped forward, same batch)")
    if pipeline is not None:
        print(f"data_over_step: input pipeline images/s over each mode's step images/s (> 1: the "
              f"pipeline keeps up; measured alone, {pipeline['images_per_s']:.1f} images/s)")
    for path, text in ((options.output, lambda: json.dumps(report, indent=2)),
                       (options.markdown, lambda: markdown_table(report))):
        if path:
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            with open(path, "w") as f:
                f.write(text())
            print(f"wrote {path}")
    return report


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def input_pipeline(options: BenchmarkOptions) -> Optional[dict]:
    """Images/s of the JPEG train pipeline at the benchmarked size and global batch; None if skipped.

    Timed alone, before any step runs (on a CPU host the pipeline and a CPU step share the cores,
    so in a real CPU run both are slower than measured here).
    """
    if not options.data_batches:
        return None
    from remem_jax.data import benchmark as data_benchmark
    num_images = max(64, min(300, 2 * options.batch_size))
    rate = data_benchmark.jpeg_pipeline_images_per_s(options.image_size, options.batch_size,
                                                     options.data_batches, num_images=num_images)
    return {"images_per_s": rate, "image_size": options.image_size, "batch_size": options.batch_size,
            "num_batches": options.data_batches, "num_images": num_images,
            "source": f"remem_jax.data.benchmark: {num_images} 500x375 JPEGs -> {options.image_size}px "
                      "image_folder train pipeline (read, decode-crop, resize, flip, normalise, batch)"}


def _check_target(report: dict, name: str, kind: str, op: str, bound: float) -> Optional[tuple[float, bool]]:
    if kind == "mfu":
        value = report["results"].get(name, {}).get("mfu")
    else:
        value = report["ratios"].get(name)
    if value is None:
        return None
    return value, (value >= bound if op == ">=" else value <= bound)


def markdown_table(report: dict) -> str:
    """The README's benchmark table of a report: one row per mode, then ratios and targets."""
    env, o = report["environment"], report["options"]
    lines = [f"ViT-{o['model']} at {o['image_size']} px, {report['dtype_resolved']}"
             + (", remat per block" if o["remat"] else "")
             + f", {env['num_local_devices']} x {env['device_kind']} ({env['backend']}), jax {env['jax']}, "
             f"{o['warmup']} warm-up + {o['steps']} timed steps, {env['time']}. "
             f"`python -m remem_jax.benchmark" + (f" --preset={o['preset']}" if o.get("preset") else "")
             + (f" --peak_tflops={o['peak_tflops']:g}" if o.get("peak_tflops") else "") + "`", "",
             "| mode | what | global batch | images/s | step ms | MFU | peak memory | data/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode, r in report["results"].items():
        mem = r["memory"]["device_peak_bytes_in_use"]
        mem_s = f"{mem / 2**30:.1f} GiB" if mem is not None else \
            f"host RSS {r['memory']['host_peak_rss_bytes'] / 2**30:.1f} GiB"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        data = f"{r['data_over_step']:.2f}" if r.get("data_over_step") is not None else "-"
        lines.append(f"| {mode} | {r['description']} | {r['global_batch_size']} | {r['images_per_s']:.1f} | "
                     f"{r['step_ms_mean']:.1f} | {mfu} | {mem_s} | {data} |")
    lines.append("")
    for name, value in report["ratios"].items():
        lines.append(f"- {name}: {value:.3f} (mean step times, same run)")
    for name, kind, op, bound in TARGETS:
        checked = _check_target(report, name, kind, op, bound)
        if checked is not None:
            value, ok = checked
            shown = f"{100 * value:.1f}%" if kind == "mfu" else f"{value:.3f}"
            lines.append(f"- target {name} {kind} {op} {bound:g}: {shown} -> {'met' if ok else 'NOT met'}")
    if report.get("input_pipeline"):
        lines.append(f"- input pipeline alone: {report['input_pipeline']['images_per_s']:.1f} images/s "
                     "(data/step > 1: the pipeline keeps up with the step)")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> dict:
    """Parses absl flags from `argv` (argv[0] is the program name) and runs the benchmark.

    Args:
      argv: e.g. `sys.argv`.

    Returns:
      The JSON report (see `run_benchmark`).

    Raises:
      absl.flags.Error: unknown or malformed flags; ValueError: inconsistent options.
    """
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    if any(a in ("-h", "--help", "--helpfull", "-?") for a in argv[1:]):
        print(__doc__)
        print(flag_values.get_help())
        return {}
    rest = flag_values(list(argv))
    if len(rest) > 1:
        raise flags.Error(f"Unexpected positional arguments: {rest[1:]}.")
    return run_benchmark(options_from_flags(flag_values))


if __name__ == "__main__":
    try:
        main(sys.argv)
    except (flags.Error, ValueError) as e:
        print(f"remem_jax.benchmark: error: {e}", file=sys.stderr)
        sys.exit(2)
