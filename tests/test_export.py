"""Serving exports (remem_jax/export.py) and `remem_jax.predict`.

Every student architecture is exported at a small size: 16 px, 3 classes, every block type of
the architecture, narrow channels (ResNets width 8, MobileNetV2 x0.25, EfficientNetV2 channels
/ 8). ResNets and MobileNetV2 keep their full depth; the EfficientNetV2 stage tables keep every
stage but at most 2 repeats (S has up to 15), because at full depth they alone would take most
of this file's time; export time grows with the number of layers (XLA compiles, TFLite
conversion), not with their width. Parameters and BatchNorm statistics are randomised, so an
export that dropped or mixed up any leaf would be caught.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from remem_jax import checkpoints, errors, export, files, predict
from remem_jax.models import efficientnet_v2, students

pytestmark = pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, CLASSES = 16, ("cat", "dog", "bird")


def _narrow_stages(stages, divisor=8, max_repeats=2):
    """Every stage (block type, expansion, kernel, stride, squeeze-excitation) with channels / 8
    and at most 2 repeats (the first block of a stage and one stride-1 residual repeat)."""
    return [[s.fused, s.expand_ratio, s.kernel_size, s.strides, max(4, s.in_features // divisor),
             max(4, s.features // divisor), min(s.repeats, max_repeats)] for s in stages]


NARROW = {
    "resnet18": {"width": 8},
    "resnet34": {"width": 8},
    "resnet50": {"width": 8},
    "mobilenet_v2": {"width_multiplier": 0.25},
    "efficientnet_v2_b0": {"stages": _narrow_stages(efficientnet_v2.EFFICIENTNET_V2_B0), "last_features": 32},
    "efficientnet_v2_s": {"stages": _narrow_stages(efficientnet_v2.EFFICIENTNET_V2_S), "last_features": 32},
}


def _random_variables(model, seed=0):
    """Random weights and BatchNorm statistics for `model`, drawn with NumPy (no XLA compile of `init`).

    Kernels ~ N(0, 1 / fan_in), biases and running means ~ 0.1 N(0, 1), BatchNorm scales
    ~ 1 + 0.1 N(0, 1), running variances in [0.8, 1.25]: an export that dropped or mixed up
    any leaf (BatchNorm statistics included) would change the logits.
    """
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), np.float32))

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        if "var" in name:
            value = rng.uniform(0.8, 1.25, x.shape)
        elif "scale" in name:
            value = 1 + 0.1 * rng.standard_normal(x.shape)
        elif "kernel" in name:
            value = rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(x.shape)
        return value.astype(np.float32)
    variables = jax.tree_util.tree_map_with_path(leaf, shapes)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def _images(n, seed=1):
    return np.random.RandomState(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _write_student(directory, name):
    """A randomised narrow student as student.npz + model.json, as the distill stage writes them."""
    info = export.ModelInfo(architecture=name, num_classes=len(CLASSES), image_size=SIZE,
                            class_names=list(CLASSES), kwargs=NARROW[name])
    model = export.build_student(info)
    variables = _random_variables(model)
    os.makedirs(directory, exist_ok=True)
    checkpoints.save_augreg(os.path.join(directory, export.STUDENT_NPZ), variables)
    export.write_model_info(directory, info)
    return model, variables


ROUND_TRIP_IMAGES = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (export dir, Flax model, variables), each student exported once in all formats.

    The export verifies every format on `_images(3)` at batch sizes 1 and 3, loading it back
    from the written bytes; the tests check those numbers and re-run the files independently.
    """
    cache = {}

    def get(name):
        if name not in cache:
            directory = str(tmp_path_factory.mktemp(name))
            model, variables = _write_student(directory, name)
            export.export_student(directory, images=_images(ROUND_TRIP_IMAGES))
            cache[name] = directory, model, variables
        return cache[name]
    return get


def _flax(model, variables, images):
    """This test's own Flax logits (compiled at XLA optimisation level 0, as in test_students.py)."""
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return np.asarray(fn.lower(variables, images).compile({"xla_backend_optimization_level": 0})(variables, images))


def _check_stablehlo_file(directory):
    with open(os.path.join(directory, "student.stablehlo.bin"), "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    assert set(exported.platforms) == {"cpu", "cuda", "tpu"}
    (spec,) = exported.in_avals
    assert not isinstance(spec.shape[0], int) and spec.shape[1:] == (SIZE, SIZE, 3), "batch must be symbolic"
    return exported


def _run_stablehlo(directory, images):
    return np.asarray(_check_stablehlo_file(directory).call(images))


def _check_savedmodel_signatures(directory):
    loaded = tf.saved_model.load(os.path.join(directory, "saved_model"))
    for key, dtype, shape in (("serving_default", tf.float32, [None, SIZE, SIZE, 3]),
                              ("serving_uint8", tf.uint8, [None, None, None, 3])):
        spec = loaded.signatures[key].structured_input_signature[1]["images"]
        assert spec.shape.as_list() == shape and spec.dtype == dtype, (key, spec)
        assert set(loaded.signatures[key].structured_outputs) == {"logits", "probabilities"}
    return loaded


def _run_savedmodel(directory, images):
    loaded = _check_savedmodel_signatures(directory)
    return loaded.signatures["serving_default"](images=tf.constant(images))["logits"].numpy()


def _run_tflite(directory, images):
    interpreter = tf.lite.Interpreter(model_path=os.path.join(directory, "student.tflite"))
    assert interpreter.get_signature_list()["serving_default"]["inputs"] == ["images"]
    runner = interpreter.get_signature_runner("serving_default")
    assert list(runner.get_input_details()["images"]["shape_signature"]) == [-1, SIZE, SIZE, 3]
    return runner(images=images)["logits"]


@pytest.mark.parametrize("name", sorted(students.STUDENTS))
def test_every_format_equals_flax_at_batch_1_and_3(exported, name):
    """Each format, loaded back from the written files, equals the Flax model at batch 1 and 3.

    The StableHLO and SavedModel numbers are the export's own check (`verification.json`: it
    loads each file and runs it at batch 1 and 3 on these images); this test re-runs the TFLite
    file at batch 1 and 3 with the raw interpreter against its own Flax logits, and checks the
    files' signatures (platforms, symbolic / dynamic batch) with raw JAX and TF APIs.
    `test_raw_apis_match_flax_at_another_batch_size` re-runs the other two formats
    independently too, for one architecture: doing it for all six would double the XLA
    compiles that are this file's running time.
    """
    directory, model, variables = exported(name)
    record = json.load(open(os.path.join(directory, export.VERIFICATION_JSON)))
    assert record["num_images"] == ROUND_TRIP_IMAGES
    for fmt in export.FORMATS:
        entry = record["formats"][fmt]
        assert entry["passed"] and entry["max_abs_diff"] <= export.TOLERANCE, (fmt, entry)
        by_batch = entry["max_abs_diff_by_batch_size"]
        assert set(by_batch) == {"1", "3"} and max(by_batch.values()) <= export.TOLERANCE, entry
    assert record["formats"]["savedmodel"]["serving_uint8"]["max_abs_diff"] <= export.TOLERANCE
    info = export.read_model_info(directory)
    assert info.formats == {f: export.FILES[f] for f in export.FORMATS} and info.class_names == list(CLASSES) and info.kwargs == NARROW[name]

    images = _images(ROUND_TRIP_IMAGES)
    reference = _flax(model, variables, images)
    assert np.isfinite(reference).all() and np.abs(reference).max() > 1e-2
    for n in (1, 3):
        diff = np.abs(_run_tflite(directory, images[:n]) - reference[:n]).max()
        assert diff <= export.TOLERANCE, (name, "tflite", n, diff)
    _check_stablehlo_file(directory)
    _check_savedmodel_signatures(directory)


def test_raw_apis_match_flax_at_another_batch_size(exported):
    """StableHLO and SavedModel through raw JAX / TF APIs, at batch 2 (the export checked 1 and 3)."""
    directory, model, variables = exported("resnet18")
    images = _images(2, seed=11)
    reference = _flax(model, variables, images)
    for fmt, run in RUNNERS.items():
        diff = np.abs(run(directory, images) - reference).max()
        assert diff <= export.TOLERANCE, (fmt, diff)


RUNNERS = {"stablehlo": _run_stablehlo, "savedmodel": _run_savedmodel, "tflite": _run_tflite}


def _write_pngs(directory, sizes=((16, 16), (24, 20), (9, 13), (40, 32))):
    rng = np.random.RandomState(3)
    paths = []
    for i, (h, w) in enumerate(sizes):
        paths.append(os.path.join(directory, f"image_{i}.png"))
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_predict_returns_the_flax_models_classes(exported, tmp_path):
    directory, model, variables = exported("resnet18")
    paths = _write_pngs(str(tmp_path))
    # The eval pipeline's decode + resize, done independently of predict.
    from remem_jax.data import augment
    images = np.stack([augment.eval_preprocess(tf.io.read_file(p), SIZE).numpy() for p in paths])
    probs = jax.nn.softmax(_flax(model, variables, images))
    expected = np.argsort(-np.asarray(probs), axis=-1, kind="stable")
    for fmt in export.FORMATS:
        predictions = predict.classify(directory, paths, fmt)
        assert [p.path for p in predictions] == paths
        for p, want, prob in zip(predictions, expected, probs):
            assert p.labels == list(want[:3]) and p.names == [CLASSES[i] for i in want[:3]], fmt
            np.testing.assert_allclose(p.probabilities, np.asarray(prob)[want[:3]], atol=1e-5)
    # The SavedModel's uint8 entry does the same preprocessing inside the graph.
    loaded = tf.saved_model.load(os.path.join(directory, "saved_model"))
    for path, want in zip(paths, expected):
        pixels = tf.io.decode_png(tf.io.read_file(path), channels=3)[None]
        logits = loaded.signatures["serving_uint8"](images=pixels)["logits"].numpy()
        assert int(np.argmax(logits)) == int(want[0])


def _make_damaged(directory, dest):
    """A copy of an export whose TFLite file is truncated and whose SavedModel lost saved_model.pb,
    plus an 8x8 PNG and a file that claims to be a PNG but is not one."""
    import shutil
    copy = os.path.join(dest, "damaged")
    shutil.copytree(directory, copy)
    tflite = os.path.join(copy, "student.tflite")
    data = open(tflite, "rb").read()
    open(tflite, "wb").write(data[: len(data) // 3])
    os.remove(os.path.join(copy, "saved_model", "saved_model.pb"))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(dest, "good.png"))
    open(os.path.join(dest, "broken.png"), "wb").write(b"\x89PNG\r\n\x1a\n this is no image")
    return copy


@pytest.fixture
def damaged(exported, tmp_path):
    return _make_damaged(exported("resnet18")[0], str(tmp_path))


# case -> (module, arguments, fragments of the one error line); {model}, {images}: see `cli_results`.
CLI_ERRORS = {
    "unknown_format": ("remem_jax.predict", ["--model={model}", "--images={images}/good.png", "--format=onnx"],
                       ["unknown export format 'onnx'", "savedmodel"]),
    "truncated_tflite": ("remem_jax.predict", ["--model={model}", "--images={images}/good.png", "--format=tflite"],
                         ["student.tflite", "not a valid TFLite model"]),
    "no_saved_model_pb": ("remem_jax.predict", ["--model={model}", "--images={images}/good.png",
                                                "--format=savedmodel"],
                          ["is not a SavedModel: it has no saved_model.pb"]),
    "undecodable_image": ("remem_jax.predict", ["--model={model}", "--images={images}/broken.png",
                                                "--format=stablehlo"], ["cannot decode image", "broken.png"]),
    "no_images": ("remem_jax.predict", ["--model={model}", "--images={images}/*.jpg"], ["no images at"]),
    "export_unknown_format": ("remem_jax.export", ["--student={model}", "--formats=stablehlo,onnx"],
                              ["unknown export format 'onnx'"]),
}


@pytest.fixture(scope="module")
def cli_results(exported, tmp_path_factory):
    """Every command line of this file, run at once in subprocesses (each waits ~10 s for TensorFlow's import).

    Returns case -> (returncode, stdout, stderr, extra); the 'predict' case classifies two PNGs
    of the exported resnet18 with --format=tflite (extra: the PNG paths), the others are
    `CLI_ERRORS` on a damaged copy of that export.
    """
    directory = exported("resnet18")[0]
    root = str(tmp_path_factory.mktemp("cli"))
    model = _make_damaged(directory, root)
    pngs = os.path.join(root, "pngs")
    os.makedirs(pngs)
    paths = _write_pngs(pngs, sizes=((16, 16), (20, 20)))
    commands = {"predict": ("remem_jax.predict", [f"--model={directory}", f"--images={pngs}/*.png",
                                                  "--format=tflite"])}
    for case, (module, args, _) in CLI_ERRORS.items():
        commands[case] = (module, [a.format(model=model, images=root) for a in args])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    running = {case: subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for case, (module, args) in commands.items()}
    results = {}
    for case, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        results[case] = (process.returncode, stdout, stderr, paths if case == "predict" else None)
    return results


def test_predict_cli_prints_top_classes_with_names(exported, cli_results):
    directory = exported("resnet18")[0]
    returncode, stdout, stderr, paths = cli_results["predict"]
    assert returncode == 0, stderr
    expected = [p.names for p in predict.classify(directory, paths, "tflite")]
    lines = stdout.splitlines()
    assert lines[0] == paths[0] and lines[4] == paths[1]
    assert [line.split()[1] for line in lines[1:4]] == expected[0]  # 3 classes: top-5 is top-3
    assert [line.split()[1] for line in lines[5:8]] == expected[1]


@pytest.mark.parametrize("case", sorted(CLI_ERRORS))
def test_cli_errors_are_one_line_and_exit_2(cli_results, case):
    returncode, stdout, stderr, _ = cli_results[case]
    assert returncode == 2, (returncode, stdout, stderr)
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("remem_jax: error: "), stderr
    assert [line for line in lines if line.startswith("remem_jax: error:")] == lines[-1:]
    for fragment in CLI_ERRORS[case][2]:
        assert fragment in lines[-1], (fragment, lines[-1])


def test_loaders_reject_damaged_files(damaged, tmp_path):
    model = damaged
    with pytest.raises(export.ExportError, match="not a valid TFLite model"):
        export.load_runner("tflite", model)
    with pytest.raises(export.ExportError, match="no saved_model.pb"):
        export.load_runner("savedmodel", model)
    blob = os.path.join(model, "student.stablehlo.bin")
    open(blob, "wb").write(open(blob, "rb").read()[:100])
    with pytest.raises(export.ExportError, match="not a jax.export StableHLO blob"):
        export.load_runner("stablehlo", model)
    with pytest.raises(errors.UserError, match="unknown export format"):
        export.load_runner("onnx", model)
    with pytest.raises(export.ExportError, match="cannot decode image"):
        export.load_images([str(tmp_path / "broken.png")], SIZE)


def test_failed_verification_names_the_format_and_writes_the_numbers(tmp_path, monkeypatch):
    model, variables = _write_student(str(tmp_path / "student"), "resnet18")
    real = export.load_runner
    # An exporter bug, simulated: the TFLite model answers with shifted logits.
    monkeypatch.setattr(export, "load_runner", lambda fmt, d: (
        (lambda x: real(fmt, d)(x) + 0.01) if fmt == "tflite" else real(fmt, d)))
    out = str(tmp_path / "out")
    with pytest.raises(export.VerificationError, match=r"tflite logits differ from the Flax model's by 0\.01"):
        export.export_student(str(tmp_path / "student"), out, formats=("stablehlo", "tflite"), images=_images(2))
    record = json.load(open(os.path.join(out, export.VERIFICATION_JSON)))
    assert record["formats"]["tflite"]["passed"] is False
    assert record["formats"]["tflite"]["max_abs_diff"] == pytest.approx(0.01, rel=1e-3)
    assert record["formats"]["stablehlo"]["passed"] is True
    assert not os.path.exists(os.path.join(out, "student.tflite"))  # what failed is not shipped
    assert export.read_model_info(out).formats == {"stablehlo": "student.stablehlo.bin"}


def test_distill_stage_export_uses_the_eval_pipeline_and_is_reused(tmp_path):
    """`export_for_serving` as the distill_student stage calls it: digits eval images, re-runs skip."""
    from configs import common
    config = common.get_config()
    config.dataset = "digits"
    config.data.image_size = SIZE
    config.distill.student, config.distill.width_multiplier = "mobilenet_v2", 0.25
    config.distill.export_formats = ("stablehlo",)
    best_dir = str(tmp_path / "best_student")
    info = export.model_info_from_config(config, 10)
    assert info.class_names == [str(i) for i in range(10)] and info.kwargs == {"width_multiplier": 0.25}
    checkpoints.save_augreg(os.path.join(best_dir, "student.npz"), _random_variables(export.build_student(info)))

    record = export.export_for_serving(config, best_dir, 10)
    assert record["image_source"] == "the first 8 images of the 'digits' eval pipeline"
    assert record["formats"]["stablehlo"]["passed"] and record["num_images"] == 8
    written = json.load(open(os.path.join(best_dir, export.MODEL_JSON)))
    assert written["architecture"] == "mobilenet_v2" and written["image_size"] == SIZE
    assert written["formats"] == {"stablehlo": "student.stablehlo.bin"} and written["dataset"] == "digits"
    mtime = os.path.getmtime(os.path.join(best_dir, "student.stablehlo.bin"))
    assert export.export_for_serving(config, best_dir, 10) == record  # the same student: nothing redone
    assert os.path.getmtime(os.path.join(best_dir, "student.stablehlo.bin")) == mtime

    config.distill.export_formats = ()
    assert export.export_for_serving(config, best_dir, 10) is None
    assert export.read_model_info(best_dir).formats == {"stablehlo": "student.stablehlo.bin"}

    # Re-exported elsewhere without a config: the run's WORKDIR/config.json says where eval images are.
    with pytest.raises(export.ExportError, match="verification needs images"):
        export.export_student(best_dir, str(tmp_path / "again"), formats=("stablehlo",))
    files.write_json(str(tmp_path / "config.json"), {"config": config.to_dict()})  # as main.run stores it
    again = export.export_student(best_dir, str(tmp_path / "again"), formats=("stablehlo",))
    assert again["image_source"] == record["image_source"] and again["formats"]["stablehlo"]["passed"]


def test_unknown_export_format_in_config_is_rejected_at_start_up():
    from configs import common
    from remem_jax import config_validation
    from remem_jax.train import stages as stages_lib
    config = common.get_config()
    config.distill.export_formats = ("tflite", "onnx")
    with pytest.raises(errors.UserError, match="config.distill.export_formats must be a tuple of stablehlo"):
        config_validation.validate(config, stages_lib.table())
