"""Exports a distilled student for serving, and checks every export against the Flax model.

  python -m remem_jax.export --student=WORKDIR/best_student            # all formats, in place
  python -m remem_jax.export --student=run/student.npz --out=/tmp/exp --config=configs/digits.py
  python -m remem_jax.predict --model=WORKDIR/best_student --images='photos/*.jpg'

The student is a flat `{params, batch_stats}` npz (`best_student/student.npz` of the
`distill_student` stage); what it is travels in `model.json` beside it (architecture,
its constructor arguments, num_classes, image size, class names, the input contract).
The formats, each a self-contained file with the weights inside:

* `stablehlo` -> `student.stablehlo.bin`: `jax.export` of the eval-mode forward pass,
  `exported.serialize()` bytes, for platforms cpu, cuda and tpu, batch dimension
  symbolic. Load with `jax.export.deserialize(blob).call(images)`.
* `savedmodel` -> `saved_model/`: a TF SavedModel made by `jax2tf` (native
  serialisation, i.e. the same StableHLO inside an `XlaCallModule` op, for cpu, cuda
  and tpu; batch dimension dynamic). Signatures:
    - `serving_default(images: float32 [B, S, S, 3] in [-1, 1])` -> `{'logits', 'probabilities'}`;
    - `serving_uint8(images: uint8 [B, H, W, 3], any H, W)` -> the same, after exactly the
      eval pipeline's preprocessing (bilinear resize to S x S without crop, x / 127.5 - 1;
      `remem_jax.data.augment.eval_preprocess`).
* `tflite` -> `student.tflite`: converted from the SavedModel's `serving_default` with
  TFLite builtin ops only (no Flex/TF ops). TF 2.16+ legalises the StableHLO inside
  `XlaCallModule` to builtin TFLite ops, so no second (non-native) conversion is needed;
  `jax2tf`'s `native_serialization=False` no longer exists in current JAX anyway. The
  input keeps a dynamic batch (`shape_signature` [-1, S, S, 3]).

* `timm` (ViTs only) -> `timm/`: `model.safetensors` (a timm `VisionTransformer` state dict) and
  `config.json` (timm's `architecture`, `model_args`, `pretrained_cfg`, and our numeric options);
  `timm.create_model('local-dir:OUT/timm', pretrained=True)` loads it (`timm_export.write_timm`). It is verified
  with `timm_export.timm_forward`, a NumPy forward pass of timm's VisionTransformer that reads
  the written file (no torch needed).

Any ViT npz the project writes (a kept ReMem teacher, reweighting folded; a WeCoLoRA student, LoRA
merged; a TinyMIM student) is a `--student`: without a model.json beside it, its ModelInfo
(`architecture='vit'`) comes from the file, numeric options (GELU form, LayerNorm epsilon) included.

Verification happens on the spot: every format is loaded back from the bytes that are
written and run on a batch of real eval images (the configured dataset's eval pipeline,
or images passed in) at batch size 1 and at the whole batch; its logits must equal the
float32 Flax model's on the CPU within `TOLERANCE` (max absolute difference). The
numbers go to `verification.json`; a format that fails is not written and the export
raises `VerificationError` naming it and its difference. Mistakes in the input end the
command line with `remem_jax: error: ...` and exit status 2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob as glob_lib
import hashlib
import os
import tempfile
import time
import warnings
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from remem_jax import errors, files

FORMATS = ("stablehlo", "savedmodel", "tflite")
VIT_FORMATS = FORMATS + ("timm",)  # a ViT also exports as a timm folder
VIT = "vit"  # ModelInfo.architecture of a ViT (kwargs: its VisionTransformer fields, numeric options included)
PLATFORMS = ("cpu", "cuda", "tpu")
TOLERANCE = 1e-4
NUM_VERIFY_IMAGES = 8
FILES = {"stablehlo": "student.stablehlo.bin", "savedmodel": "saved_model", "tflite": "student.tflite",
         "timm": "timm"}
STUDENT_NPZ = "student.npz"
MODEL_JSON = "model.json"
VERIFICATION_JSON = "verification.json"
PREPROCESSING = ("decode to RGB uint8; bilinear resize to image_size x image_size (no crop, aspect ratio "
                 "not kept); x / 127.5 - 1 (remem_jax.data.augment.eval_preprocess)")
IMAGE_PATTERNS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")


class ExportError(errors.UserError):
    """An export that cannot be made or loaded: missing metadata, a damaged model file."""


class VerificationError(ExportError):
    """An exported model whose outputs differ from the Flax model's by more than the tolerance."""


# ----------------------------------------------------------------------------------------------
# What a student is: model.json.

@dataclasses.dataclass
class ModelInfo:
    """The contents of `model.json`: everything needed to rebuild, feed and label the student.

    Attributes:
      architecture: a name of `remem_jax.models.students.STUDENTS`, or `VIT`.
      num_classes: classifier outputs.
      image_size: input height = width S.
      class_names: `num_classes` names in label order.
      kwargs: further constructor arguments, JSON values (`width_multiplier` of
        mobilenet_v2, `width` of the ResNets, `stages` of EfficientNetV2 as lists; a ViT's
        `VisionTransformer` fields, `approximate_gelu` and `layernorm_epsilon` included).
      dataset: the registry dataset the student was trained on, if known.
      formats: format -> file name, of the exports verified in this directory.
    """
    architecture: str
    num_classes: int
    image_size: int
    class_names: list
    kwargs: dict = dataclasses.field(default_factory=dict)
    dataset: Optional[str] = None
    formats: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["input"] = {"layout": "NHWC", "dtype": "float32", "range": [-1.0, 1.0],
                      "shape": [None, self.image_size, self.image_size, 3], "preprocessing": PREPROCESSING,
                      "savedmodel_uint8_signature": "serving_uint8: uint8 [B, H, W, 3] in [0, 255], any H, W"}
        d["output"] = {"logits": f"float32 [B, {self.num_classes}]"}
        return d

    @classmethod
    def from_json(cls, d: dict, source: str) -> "ModelInfo":
        fields = [f.name for f in dataclasses.fields(cls)]
        required = ("architecture", "num_classes", "image_size", "class_names")
        missing = [k for k in required if k not in d]
        if missing:
            raise ExportError(f"{source} lacks {', '.join(missing)}; it must name {', '.join(required)}.")
        info = cls(**{k: d[k] for k in fields if k in d})
        if len(info.class_names) != info.num_classes:
            raise ExportError(f"{source}: {len(info.class_names)} class_names for num_classes={info.num_classes}.")
        return info


def model_info_from_config(config, num_classes: int) -> ModelInfo:
    """The ModelInfo of the student that `config.distill` trains on `config.dataset`."""
    from remem_jax.data import class_names
    d = config.distill
    kwargs = {"width_multiplier": float(d.width_multiplier)} if d.student == "mobilenet_v2" else {}
    return ModelInfo(architecture=d.student, num_classes=int(num_classes), image_size=int(config.data.image_size),
                     class_names=class_names.class_names(config.data, config.dataset, num_classes),
                     kwargs=kwargs, dataset=config.dataset)


def read_model_info(directory: str) -> ModelInfo:
    """The ModelInfo in `directory/model.json`."""
    path = os.path.join(directory, MODEL_JSON)
    try:
        d = files.read_json(path)
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON ({e}).") from e
    if d is None:
        raise ExportError(f"{directory!r} has no {MODEL_JSON}, which the distill_student stage and "
                          "`python -m remem_jax.export` write next to a student (for a bare student npz, "
                          "give the export its run config: --config=...).")
    return ModelInfo.from_json(d, path)


def write_model_info(directory: str, info: ModelInfo) -> None:
    files.write_json(os.path.join(directory, MODEL_JSON), info.to_json())


def check_formats(formats: Iterable[str], field_name: str = "formats", known: Sequence[str] = FORMATS
                  ) -> tuple[str, ...]:
    """`formats` as a tuple, or an ExportError naming the unknown ones (`known`: VIT_FORMATS for a ViT)."""
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
    formats = tuple(dict.fromkeys(f.strip() for f in formats))  # in order, once each
    unknown = [f for f in formats if f not in known]
    if unknown:
        vit_only = [f for f in unknown if f in VIT_FORMATS]
        if vit_only and len(vit_only) == len(unknown):
            raise ExportError(f"export format {', '.join(map(repr, vit_only))} in {field_name} is for ViTs only; "
                              f"this model's formats: {', '.join(known)}.")
        raise ExportError(f"unknown export format {', '.join(map(repr, unknown))} in {field_name}; "
                          f"known formats: {', '.join(VIT_FORMATS)} (timm for ViTs only).")
    return formats


def known_formats(info: "ModelInfo") -> tuple[str, ...]:
    return VIT_FORMATS if info.architecture == VIT else FORMATS


# ----------------------------------------------------------------------------------------------
# The Flax student and its serving function.

def build_student(info: ModelInfo):
    """The float32 eval-mode Flax module of `info` (no cross-device BatchNorm)."""
    from remem_jax.models import efficientnet_v2, students, vit
    if info.architecture == VIT:
        try:
            return vit.VisionTransformer(num_classes=info.num_classes or None, **info.kwargs)
        except TypeError as e:
            raise ExportError(f"bad VisionTransformer arguments {info.kwargs}: {e}") from e
    if info.architecture not in students.STUDENTS:
        raise ExportError(f"unknown student architecture {info.architecture!r}; known: {', '.join(students.STUDENTS)}.")
    kwargs = dict(info.kwargs)
    if "stages" in kwargs:  # an EfficientNetV2 stage table, as JSON lists of StageConfig fields
        kwargs["stages"] = tuple(efficientnet_v2.StageConfig(*s) for s in kwargs["stages"])
    try:
        return students.create_student(info.architecture, info.num_classes, **kwargs)
    except TypeError as e:
        raise ExportError(f"bad constructor arguments {info.kwargs} for {info.architecture}: {e}") from e


def load_student(path: str, info: Optional[ModelInfo] = None) -> tuple[ModelInfo, dict, str]:
    """Reads a student npz (or a directory holding `student.npz`) and its model.json.

    Args:
      path: `.../student.npz` or the directory holding it.
      info: the student's ModelInfo; None reads `model.json` beside the npz.

    Returns:
      (info, variables {'params', 'batch_stats'} as NumPy, the npz path).
    """
    import jax

    from remem_jax import checkpoints, tree
    if not files.exists(path):
        raise ExportError(f"{path!r} does not exist; pass a student npz or the folder holding student.npz and "
                          "model.json (e.g. WORKDIR/best_student).")
    npz = os.path.join(path, STUDENT_NPZ) if files.is_dir(path) else path
    if info is None and not files.exists(os.path.join(os.path.dirname(npz), MODEL_JSON)) and is_vit_npz(npz):
        info = vit_model_info(npz)
    if info is None:
        info = read_model_info(os.path.dirname(npz))
    if info.architecture == VIT:
        ckpt = checkpoints.read_vit(npz)
        return info, {"params": checkpoints.load_into(build_student(info), ckpt, image_size=info.image_size)}, npz
    variables = tree.unflatten_params(checkpoints.load_npz(npz))
    model = build_student(info)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, info.image_size, info.image_size, 3), np.float32))
    tree.check_params_match(variables, dict(shapes), f"{npz} (as {info.architecture}, {info.num_classes} classes)",
                            error=ExportError)
    return info, variables, npz


def is_vit_npz(npz: str) -> bool:
    """Whether `npz` holds a ViT in the AugReg layout (its patch embedding, `embedding/kernel`)."""
    import zipfile
    try:
        with zipfile.ZipFile(files.gfile().GFile(npz, "rb") if files.is_remote(npz) else npz) as z:
            return "embedding/kernel.npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def vit_model_info(npz: str, class_names: Optional[list] = None, dataset: Optional[str] = None) -> ModelInfo:
    """The ModelInfo of a ViT npz, read from the file: architecture, head, resolution, and both numeric
    options written out (the AugReg defaults included), so model.json says how the model computes."""
    from remem_jax import checkpoints
    from remem_jax.models import vit
    ckpt = checkpoints.read_vit(npz)
    names = class_names if class_names is not None else [f"class_{i}" for i in range(ckpt.num_classes)]
    return ModelInfo(architecture=VIT, num_classes=ckpt.num_classes, image_size=ckpt.image_size,
                     class_names=list(names), kwargs={**vit.NUMERIC_OPTIONS, **ckpt.architecture}, dataset=dataset)


def _cpu():
    import jax
    return jax.devices("cpu")[0]


def flax_logits(model, variables, images: np.ndarray) -> np.ndarray:
    """The reference: float32 eval-mode logits of the Flax model, computed on the CPU."""
    return _reference_fn(model, variables)(images)


def _reference_fn(model, variables) -> Callable[[np.ndarray], np.ndarray]:
    """`flax_logits` for one model, compiled once per input shape."""
    import jax
    cpu = _cpu()
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    on_cpu = jax.device_put(variables, cpu)
    return lambda images: np.asarray(fn(on_cpu, jax.device_put(np.asarray(images, np.float32), cpu)))


def serving_function(model, variables) -> Callable:
    """`images float32 [B, S, S, 3] in [-1, 1] -> logits float32 [B, C]`, weights as constants."""
    import jax
    variables = jax.tree.map(np.asarray, jax.device_get(variables))
    return lambda images: model.apply(variables, images, train=False)


def export_stablehlo(fn: Callable, image_size: int) -> bytes:
    """`jax.export` of `fn` for `PLATFORMS`, batch symbolic; the serialized bytes."""
    import jax
    batch, = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), np.float32)
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(spec)
    return bytes(exported.serialize())


def _tf():
    import tensorflow as tf
    return tf


def export_savedmodel(fn: Callable, image_size: int, directory: str) -> None:
    """Writes a jax2tf SavedModel of `fn` (native serialisation, dynamic batch) to local `directory`."""
    from jax.experimental import jax2tf

    from remem_jax.data import augment
    tf = _tf()
    tf_fn = jax2tf.convert(fn, polymorphic_shapes=[f"(batch, {image_size}, {image_size}, 3)"], with_gradient=False,
                           native_serialization_platforms=PLATFORMS)

    def outputs(logits):
        return {"logits": logits, "probabilities": tf.nn.softmax(logits, axis=-1)}

    module = tf.Module()

    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="images")])
    def serve(images):
        return outputs(tf_fn(images))

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_uint8(images):  # calls `serve`: one copy of the model in the SavedModel, compiled once per batch size
        return serve(augment.to_model_range(augment.resize(images, image_size)))

    module.serve, module.serve_uint8 = serve, serve_uint8
    with _quiet_tensorflow():
        tf.saved_model.save(module, directory, signatures={"serving_default": serve.get_concrete_function(),
                                                           "serving_uint8": serve_uint8.get_concrete_function()})


@contextlib.contextmanager
def _quiet_tensorflow():
    """Hides TensorFlow's INFO lines ('Assets written to ...') while it saves or converts."""
    import logging
    logger = logging.getLogger("tensorflow")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def export_timm(model, variables, info: ModelInfo, directory: str) -> None:
    """Writes the ViT `model` as a timm folder (`timm_export.write_timm`) to local `directory`."""
    from remem_jax import timm_export, tree
    if info.architecture != VIT:
        raise ExportError(f"the timm format is for ViTs; this student is a {info.architecture}.")
    flat = {k: np.asarray(v) for k, v in tree.flatten_params(variables["params"]).items()}
    architecture = {**info.kwargs, **{k: getattr(model, k) for k in ("approximate_gelu", "layernorm_epsilon")}}
    timm_export.write_timm(directory, flat, architecture, info.image_size, info.num_classes, info.class_names)


def export_tflite(saved_model_dir: str) -> bytes:
    """The TFLite flatbuffer of the SavedModel's `serving_default`, builtin ops only."""
    tf = _tf()
    converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=["serving_default"])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with _quiet_tensorflow():
        return bytes(converter.convert())


# ----------------------------------------------------------------------------------------------
# Loading an exported format back: one runner per format, `images float32 [B, S, S, 3] -> logits`.

def _tflite_interpreter(content: bytes):
    try:
        from ai_edge_litert.interpreter import Interpreter  # tf.lite.Interpreter's successor
    except ImportError:
        Interpreter = _tf().lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        return Interpreter(model_content=content)


def load_runner(fmt: str, directory: str) -> Callable[[np.ndarray], np.ndarray]:
    """The exported `fmt` in `directory` as `images float32 [B, S, S, 3] -> logits [B, C]` (NumPy).

    Raises:
      ExportError: an unknown format, a missing file, or a file that is not what it claims.
    """
    check_formats([fmt], "format", VIT_FORMATS)
    path = os.path.join(directory, FILES[fmt])
    if fmt == "timm":
        return _timm_runner(path)
    if fmt == "savedmodel":
        loaded = load_savedmodel(path)
        serve = loaded.signatures["serving_default"]
        run = lambda images: serve(images=_tf().constant(images, _tf().float32))["logits"].numpy()  # noqa: E731
        run.loaded = loaded
        return run
    if not files.exists(path):
        raise ExportError(f"{directory!r} has no {FILES[fmt]} (no {fmt} export there).")
    content = files.read_bytes(path)
    if fmt == "stablehlo":
        import jax
        try:
            exported = jax.export.deserialize(bytearray(content))
        except Exception as e:
            raise ExportError(f"{path!r} is not a jax.export StableHLO blob ({type(e).__name__}: "
                              f"{_first_line(e)}).") from e
        return lambda images: np.asarray(exported.call(np.asarray(images, np.float32)))
    if content[4:8] != b"TFL3":
        raise ExportError(f"{path!r} is not a TFLite flatbuffer (no TFL3 identifier).")
    try:
        interpreter = _tflite_interpreter(content)
        runner = interpreter.get_signature_runner("serving_default")
    except Exception as e:
        raise ExportError(f"{path!r} is not a valid TFLite model ({type(e).__name__}: {_first_line(e)}).") from e
    return lambda images: np.asarray(runner(images=np.asarray(images, np.float32))["logits"])


def _timm_runner(path: str, drop_head: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """The timm folder at `path` run by `timm_export.timm_forward` (NHWC in, as the other runners);
    `drop_head`: its pre-head features (the normed class token) instead of logits."""
    from remem_jax import timm_export
    try:
        state, model_args, eps = timm_export.read_timm(path)
    except Exception as e:  # noqa: BLE001 - a missing or damaged file, whatever the library raises
        raise ExportError(f"{path!r} is not a readable timm folder ({type(e).__name__}: {_first_line(e)}).") from e
    if drop_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    return lambda images: timm_export.timm_forward(
        state, model_args, np.asarray(images, np.float32).transpose(0, 3, 1, 2), eps).astype(np.float32)


def load_savedmodel(path: str):
    """`tf.saved_model.load(path)`, with an ExportError for a directory that is no SavedModel."""
    if not files.exists(os.path.join(path, "saved_model.pb")):
        raise ExportError(f"{path!r} is not a SavedModel: it has no saved_model.pb.")
    tf = _tf()
    try:
        loaded = tf.saved_model.load(path)
        loaded.signatures["serving_default"]
    except Exception as e:
        raise ExportError(f"{path!r} is not a loadable SavedModel ({type(e).__name__}: {_first_line(e)}).") from e
    return loaded


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------------------
# Images.

def eval_images(data_config, dataset: str, num_images: int = NUM_VERIFY_IMAGES) -> np.ndarray:
    """The first `num_images` images of this host's eval split, from the eval pipeline (float32 [-1, 1])."""
    import jax

    from remem_jax.data import pipeline
    per_device = -(-num_images // jax.local_device_count())
    data = pipeline.make_eval_data(data_config, dataset, global_batch_size=per_device * jax.device_count())
    batch = next(data.as_dataset().take(1).as_numpy_iterator())
    images = batch["image"].reshape((-1,) + batch["image"].shape[2:])[batch["mask"].reshape(-1) > 0]
    return images[:num_images]


def expand_image_paths(pattern: str) -> list[str]:
    """A file, a directory (its image files) or a glob -> sorted paths; an error when none."""
    if files.is_dir(pattern):
        paths = [os.path.join(pattern, f) for f in sorted(os.listdir(pattern)) if f.lower().endswith(IMAGE_PATTERNS)]
    elif os.path.isfile(pattern) or files.is_remote(pattern) and files.exists(pattern):
        paths = [pattern]
    else:
        paths = sorted(_tf().io.gfile.glob(pattern) if files.is_remote(pattern) else glob_lib.glob(pattern))
    if not paths:
        raise ExportError(f"no images at {pattern!r} (a file, a directory of images, or a glob).")
    return paths


def load_images(paths: Sequence[str], image_size: int) -> np.ndarray:
    """Decodes and resizes image files exactly as the eval pipeline does -> float32 [N, S, S, 3] in [-1, 1]."""
    from remem_jax.data import augment
    tf = _tf()
    out = []
    for path in paths:
        try:
            data = files.read_bytes(path)
            out.append(augment.eval_preprocess(tf.constant(data), image_size).numpy())
        except (OSError, tf.errors.OpError) as e:
            raise ExportError(f"cannot decode image {path!r} ({type(e).__name__}: {_first_line(e)}).") from e
    return np.stack(out).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Export + verification.

def _max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def verify_runner(run: Callable, images: np.ndarray, reference: np.ndarray) -> dict:
    """Runs `run` at batch size 1 and len(images); max |logit - reference| for each and overall."""
    per_batch = {}
    for n in sorted({1, len(images)}):
        per_batch[str(n)] = _max_abs(run(images[:n]), reference[:n])
    return {"max_abs_diff": max(per_batch.values()), "max_abs_diff_by_batch_size": per_batch}


def _verify_uint8_signature(loaded, reference_fn: Callable, images: np.ndarray, image_size: int) -> dict:
    """The `serving_uint8` entry on uint8 images, at S and at 2S (resized inside), against Flax.

    The reference preprocesses the same uint8 images with the eval pipeline's own
    functions (`augment.resize`, `augment.to_model_range`) outside the SavedModel.
    """
    from remem_jax.data import augment
    tf = _tf()
    serve = loaded.signatures["serving_uint8"]
    pixels = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    result = {}
    for name, u in (("at_image_size", pixels), ("at_twice_image_size", pixels.repeat(2, 1).repeat(2, 2))):
        reference = reference_fn(augment.to_model_range(augment.resize(u, image_size)).numpy())
        result[name] = _max_abs(serve(images=tf.constant(u))["logits"].numpy(), reference)
    return {"max_abs_diff": max(result.values()), "max_abs_diff_by_input": result}


def _verify_timm_features(model, variables, directory: str, images: np.ndarray) -> float:
    """max |difference| of the written timm folder's pre-head features (normed CLS) and the Flax model's."""
    features = _timm_runner(os.path.join(directory, FILES["timm"]), drop_head=True)(images)
    params = {k: v for k, v in variables["params"].items() if k != "head"}
    return _max_abs(flax_logits(model.clone(num_classes=None), {"params": params}, images), features)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _publish_file(src: str, dst: str) -> None:
    with open(src, "rb") as f:
        files.atomic_write(dst, f.read())


def _remove(path: str) -> None:
    if files.is_dir(path):
        files.remove_tree(path)
    elif files.exists(path):
        files.gfile().remove(path) if files.is_remote(path) else os.remove(path)


def _publish_tree(src_dir: str, dst_dir: str) -> None:
    """Copies a local directory to `dst_dir` (local or remote) file by file, each written atomically."""
    _remove(dst_dir)
    for root, _, names in os.walk(src_dir):
        rel = os.path.relpath(root, src_dir)
        target = dst_dir if rel == "." else os.path.join(dst_dir, rel)
        files.makedirs(target)
        for name in names:
            _publish_file(os.path.join(root, name), os.path.join(target, name))


def export_model(model, variables, info: ModelInfo, out_dir: str, *, images: np.ndarray,
                 formats: Sequence[str] = FORMATS, image_source: str = "images passed in",
                 tolerance: float = TOLERANCE, extra: Optional[dict] = None) -> dict:
    """Exports a Flax student in `formats` to `out_dir`, verifies each, writes model.json and verification.json.

    Args:
      model: the Flax student (eval mode is used).
      variables: its {'params', 'batch_stats'}.
      info: what the student is (written to model.json; `formats` is filled in here).
      out_dir: where the files go (local or gs://); created if needed.
      images: float32 [N, S, S, 3] in [-1, 1], real images to verify on (N >= 1).
      formats: a subset of `FORMATS`.
      image_source: where `images` came from, for verification.json.
      tolerance: the largest allowed max |logit difference|.
      extra: more entries for verification.json (e.g. the npz's hash).

    Returns:
      The verification record (also in `out_dir/verification.json`).

    Raises:
      VerificationError: some format's outputs differ by more than `tolerance` (the other
        formats and both json files are still written).
    """
    formats = check_formats(formats, known=known_formats(info))
    images = np.asarray(images, np.float32)
    s = info.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3) or len(images) == 0:
        raise ExportError(f"verification images must be float32 [N, {s}, {s}, 3] with N >= 1, got {images.shape}.")
    reference_fn = _reference_fn(model, variables)
    reference = reference_fn(images)
    fn = serving_function(model, variables)
    record = {"tolerance": tolerance, "reference": "Flax model, float32, eval mode, on the CPU",
              "image_source": image_source, "num_images": int(len(images)),
              "reference_logits_max_abs": float(np.max(np.abs(reference))), "formats": {}}
    record.update(extra or {})
    verified = {}
    cpu = _cpu()
    import jax
    with tempfile.TemporaryDirectory(prefix="remem_export_") as scratch, jax.default_device(cpu):
        if "savedmodel" in formats or "tflite" in formats:
            t = time.perf_counter()
            export_savedmodel(fn, s, os.path.join(scratch, FILES["savedmodel"]))
            savedmodel_seconds = time.perf_counter() - t
        for fmt in formats:
            t = time.perf_counter()
            if fmt == "stablehlo":
                with open(os.path.join(scratch, FILES[fmt]), "wb") as f:
                    f.write(export_stablehlo(fn, s))
            elif fmt == "tflite":
                with open(os.path.join(scratch, FILES[fmt]), "wb") as f:
                    f.write(export_tflite(os.path.join(scratch, FILES["savedmodel"])))
            elif fmt == "timm":
                export_timm(model, variables, info, os.path.join(scratch, FILES[fmt]))
            seconds = time.perf_counter() - t + (savedmodel_seconds if fmt == "savedmodel" else 0.0)
            t = time.perf_counter()
            run = load_runner(fmt, scratch)
            entry = verify_runner(run, images, reference)
            if fmt == "savedmodel":
                entry["serving_uint8"] = _verify_uint8_signature(run.loaded, reference_fn, images, s)
                entry["max_abs_diff"] = max(entry["max_abs_diff"], entry["serving_uint8"]["max_abs_diff"])
            if fmt == "timm":  # the features too: a zero head (a fresh TinyMIM student's) hides every other weight
                entry["features_max_abs_diff"] = _verify_timm_features(model, variables, scratch, images)
                entry["max_abs_diff"] = max(entry["max_abs_diff"], entry["features_max_abs_diff"])
            entry.update(file=FILES[fmt], passed=bool(entry["max_abs_diff"] <= tolerance),
                         export_seconds=round(seconds, 2), verify_seconds=round(time.perf_counter() - t, 2))
            record["formats"][fmt] = entry
            dst = os.path.join(out_dir, FILES[fmt])
            if entry["passed"]:
                src = os.path.join(scratch, FILES[fmt])
                _publish_tree(src, dst) if fmt in ("savedmodel", "timm") else _publish_file(src, dst)
                verified[fmt] = FILES[fmt]
            else:  # an older export there is not of this student: no stale file may pass for it
                _remove(dst)
    info = dataclasses.replace(info, formats=verified)
    write_model_info(out_dir, info)
    files.write_json(os.path.join(out_dir, VERIFICATION_JSON), record)
    failed = {f: e["max_abs_diff"] for f, e in record["formats"].items() if not e["passed"]}
    if failed:
        raise VerificationError(
            "export verification failed: " + "; ".join(
                f"{f} logits differ from the Flax model's by {d:.3g} > {tolerance:g}" for f, d in failed.items())
            + f" (max |logit difference| on {len(images)} images; see {os.path.join(out_dir, VERIFICATION_JSON)}).")
    return record


def export_student(student: str, out_dir: Optional[str] = None, *, formats: Sequence[str] = FORMATS,
                   images: Optional[np.ndarray] = None, data_config=None, dataset: Optional[str] = None,
                   info: Optional[ModelInfo] = None, num_images: int = NUM_VERIFY_IMAGES,
                   reuse: bool = False) -> dict:
    """Exports a student npz (or its directory) in `formats`; see `export_model`.

    Args:
      student: `.../student.npz` or the directory holding it and model.json.
      out_dir: where the exports go; None = the npz's directory.
      formats: a subset of `FORMATS`.
      images: verification images float32 [N, S, S, 3] in [-1, 1]; None takes the first
        `num_images` of `dataset`'s eval pipeline (`dataset` defaults to model.json's).
      data_config: the config.data section for the eval pipeline (None: the one in the
        run's `config.json`, when the npz is in a workdir's best_student/).
      dataset: registry name of the eval images.
      info: the ModelInfo; None reads model.json beside the npz.
      num_images: how many eval images to verify on.
      reuse: skip the work when the npz's own directory (`out_dir`) already holds a passed
        verification of the same npz bytes for every requested format.

    Returns:
      The verification record.
    """
    info, variables, npz = load_student(student, info)
    formats = check_formats(formats, known=known_formats(info))
    out_dir = out_dir or os.path.dirname(npz)
    sha = _sha256(files.read_bytes(npz))
    if reuse and out_dir == os.path.dirname(npz):
        done = verified_formats(out_dir, npz)
        if all(f in done for f in formats):
            write_model_info(out_dir, dataclasses.replace(info, formats=done))
            return files.read_json(os.path.join(out_dir, VERIFICATION_JSON))
    if images is None:
        if data_config is None:  # a student inside a workdir: the run's own config (WORKDIR/config.json)
            data_config, dataset = _run_config_data(os.path.dirname(npz), dataset)
        dataset = dataset or info.dataset
        if (data_config is None or dataset is None) and info.architecture == VIT:
            images = np.random.default_rng(0).uniform(-1, 1, (num_images, info.image_size, info.image_size, 3))
            source = (f"{num_images} seeded uniform random images in [-1, 1] (a ViT given no --images and no "
                      "--config: the check is of the conversion, which random inputs exercise fully)")
        else:
            if data_config is None or dataset is None:
                raise ExportError(f"verification needs images: pass --images=..., or --config=... (the run's config, "
                                  f"for its eval split); {os.path.dirname(npz)!r} is not in a workdir with a "
                                  "config.json.")
            if data_config.image_size != info.image_size:
                raise ExportError(f"the config's data.image_size {data_config.image_size} is not the student's "
                                  f"image_size {info.image_size} (model.json).")
            images = eval_images(data_config, dataset, num_images)
            source = f"the first {len(images)} images of the {dataset!r} eval pipeline"
    else:
        source = f"{len(images)} images passed in"
    return export_model(build_student(info), variables, info, out_dir, images=images, formats=formats,
                        image_source=source, extra={"student_npz": npz, "student_npz_sha256": sha})


def _run_config_data(student_dir: str, dataset: Optional[str]):
    """(config.data, dataset) of the run whose workdir holds `student_dir` (best_student/), or (None, dataset)."""
    import ml_collections

    from remem_jax import workdir
    parent = (os.path.dirname(student_dir.rstrip("/")) if files.is_remote(student_dir)
              else os.path.dirname(os.path.abspath(student_dir)))
    stored = files.read_json(os.path.join(parent, workdir.CONFIG_FILE), default=None)
    if not stored or "config" not in stored:
        return None, dataset
    config = ml_collections.ConfigDict(stored["config"])
    return config.data, dataset or config.dataset


def export_for_serving(config, best_dir: str, num_classes: int) -> Optional[dict]:
    """The distill_student stage's export: model.json, then `config.distill.export_formats`, verified.

    Verification uses the first images of the configured dataset's eval pipeline. A re-run
    keeps a passed verification of the same student npz. Process 0 only (the others return
    None); with no formats it writes model.json and returns None.
    """
    import jax
    if jax.process_index() != 0:
        return None
    info = model_info_from_config(config, num_classes)
    formats = check_formats(config.distill.get("export_formats", FORMATS), "config.distill.export_formats")
    if formats:
        return export_student(best_dir, formats=formats, data_config=config.data, dataset=config.dataset, info=info,
                              reuse=True)
    write_model_info(best_dir, dataclasses.replace(info, formats=verified_formats(best_dir)))
    return None


def verified_formats(directory: str, npz: Optional[str] = None) -> dict:
    """format -> file of the exports in `directory` that passed verification for the npz there now."""
    record = files.read_json(os.path.join(directory, VERIFICATION_JSON), default={})
    npz = npz or os.path.join(directory, STUDENT_NPZ)
    if not record or not files.exists(npz) or record.get("student_npz_sha256") != _sha256(files.read_bytes(npz)):
        return {}
    return {f: e["file"] for f, e in record.get("formats", {}).items()
            if e.get("passed") and files.exists(os.path.join(directory, e["file"]))}


# ----------------------------------------------------------------------------------------------
# Command line.

def _flags():
    from absl import flags
    from ml_collections import config_flags
    config = config_flags.DEFINE_config_file("config", None, "Optional run config: its dataset's eval images verify "
                                             "the export, and it describes the student when there is no model.json.")
    return {
        "config": config,
        "student": flags.DEFINE_string("student", None, "A student npz, or a directory holding student.npz "
                                       "(and model.json), e.g. WORKDIR/best_student."),
        "out": flags.DEFINE_string("out", None, "Output directory (default: the student's directory)."),
        "formats": flags.DEFINE_list("formats", list(FORMATS), f"Formats to export: any of {', '.join(FORMATS)}; "
                                     "for a ViT also 'timm' (a folder timm.create_model('local-dir:...') loads)."),
        "format": flags.DEFINE_alias("format", "formats"),
        "images": flags.DEFINE_string("images", None, "Image file, directory or glob to verify on (default: "
                                      "the dataset's eval images)."),
        "num_images": flags.DEFINE_integer("num_images", NUM_VERIFY_IMAGES, "Eval images to verify on."),
    }


def main(argv, flag_values) -> None:
    del argv
    student = flag_values["student"].value
    if student is None:
        raise ExportError("--student is required (a student npz or the directory holding student.npz).")
    if not files.exists(student):
        raise ExportError(f"--student {student!r} does not exist; pass a student npz or the folder holding "
                          "student.npz and model.json (e.g. WORKDIR/best_student).")
    formats = check_formats(flag_values["formats"].value, "--formats", known=VIT_FORMATS)
    student_dir = _student_dir(student)
    npz = os.path.join(student, STUDENT_NPZ) if files.is_dir(student) else student
    has_info = files.exists(os.path.join(student_dir, MODEL_JSON))  # model.json, where there is one, wins
    config = flag_values["config"].value
    info, data_config, dataset = None, None, None
    if not has_info and is_vit_npz(npz):
        info = vit_model_info(npz)
    if config is not None:
        from remem_jax.data import class_names, pipeline
        data_config, dataset = config.data, config.dataset
        num_classes = pipeline.get_num_classes(config.data, config.dataset)
        if info is not None and info.num_classes == num_classes:  # a ViT with the config's head: its class names
            info = dataclasses.replace(info, dataset=dataset, class_names=class_names.class_names(
                config.data, config.dataset, num_classes))
        elif not has_info and info is None:
            info = model_info_from_config(config, num_classes)
    images = None
    if flag_values["images"].value:
        paths = expand_image_paths(flag_values["images"].value)
        images = load_images(paths, (info or read_model_info(student_dir)).image_size)
    out = flag_values["out"].value or student_dir
    record = export_student(student, out, formats=formats, images=images, data_config=data_config, dataset=dataset,
                            info=info, num_images=flag_values["num_images"].value)
    for fmt, entry in record["formats"].items():
        print(f"{fmt:10s} {os.path.join(out, entry['file'])}  max |logit diff| {entry['max_abs_diff']:.2e} "
              f"(tolerance {record['tolerance']:g}) on {record['num_images']} images")


def _student_dir(path: str) -> str:
    return path if files.is_dir(path) else os.path.dirname(path) or "."


if __name__ == "__main__":
    from remem_jax import cli
    cli.run(main, _flags)
