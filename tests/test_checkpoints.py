"""AugReg npz loading, adaptation and saving, on files fabricated in the real format."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf

from remem_jax import checkpoints, tree
from remem_jax.checkpoints import CheckpointError
from tests import augreg_format as fmt


def write_npz(path, flat):
    np.savez(path, **flat)
    return str(path)


@pytest.fixture
def ti_ckpt(tmp_path):
    """A Ti/16 i21k-style checkpoint at 64 px with a 21843-class head (3 blocks keep it fast)."""
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 64, 21843, num_layers=3))
    return write_npz(tmp_path / "Ti_16-i21k.npz", flat), flat


def images(n, size):
    return np.random.default_rng(5).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def test_load_infers_variant_and_keeps_every_value(ti_ckpt):
    path, flat = ti_ckpt
    model, params = checkpoints.load_augreg(path)
    assert (model.hidden_size, model.num_layers, model.num_heads, model.mlp_dim, model.patch_size,
            model.num_classes, model.representation_size) == (192, 3, 3, 768, 16, 21843, None)
    got = tree.flatten_params(params)
    assert sorted(got) == sorted(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(got[key], value)
    x = images(2, 64)
    np.testing.assert_allclose(model.apply({"params": params}, x),
                               fmt.reference_forward(flat, x, patch=16), rtol=1e-4, atol=1e-4)


def test_head_replacement_gives_a_zero_head(ti_ckpt):
    path, flat = ti_ckpt
    model, params = checkpoints.load_augreg(path, num_classes=10)
    assert model.num_classes == 10
    assert params["head"]["kernel"].shape == (192, 10) and not params["head"]["kernel"].any()
    assert params["head"]["bias"].shape == (10,) and not params["head"]["bias"].any()
    np.testing.assert_array_equal(params["embedding"]["kernel"], flat["embedding/kernel"])
    # Same class count: the head is kept.
    _, same = checkpoints.load_augreg(path, num_classes=21843)
    np.testing.assert_array_equal(same["head"]["kernel"], flat["head/kernel"])


def test_posemb_resize_is_identity_at_the_same_size():
    posemb = np.random.default_rng(0).standard_normal((1, 197, 8)).astype(np.float32)
    np.testing.assert_array_equal(checkpoints.resize_posemb(posemb, 197), posemb)


def test_posemb_resize_interpolates_linearly_and_keeps_the_class_token():
    # A grid that is linear in (row, col) is reproduced exactly by linear
    # interpolation with align-corners sampling: new row r maps to r * (old-1)/(new-1).
    old, new, d = 14, 24, 4
    rows, cols = np.meshgrid(np.arange(old), np.arange(old), indexing="ij")
    coef = np.arange(1, d + 1)
    grid = (2.0 * rows[..., None] - 0.5 * cols[..., None]) * coef
    cls = np.full((1, 1, d), 7.0)
    posemb = np.concatenate([cls, grid.reshape(1, old * old, d)], axis=1)
    out = checkpoints.resize_posemb(posemb, new * new + 1)
    assert out.shape == (1, 577, d)
    np.testing.assert_array_equal(out[:, 0], cls[:, 0])
    r, c = np.meshgrid(np.linspace(0, old - 1, new), np.linspace(0, old - 1, new), indexing="ij")
    want = (2.0 * r[..., None] - 0.5 * c[..., None]) * coef
    np.testing.assert_allclose(out[0, 1:].reshape(new, new, d), want, atol=1e-9)


def test_load_at_384_resizes_posemb(ti_ckpt, tmp_path):
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 224, 1000, num_layers=1))
    path = write_npz(tmp_path / "ti224.npz", flat)
    model, params = checkpoints.load_augreg(path, image_size=384)
    pos = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert pos.shape == (1, 577, 192)
    np.testing.assert_array_equal(pos[:, 0], flat["Transformer/posembed_input/pos_embedding"][:, 0])
    assert model.apply({"params": params}, images(1, 384)).shape == (1, 1000)


def test_round_trip_is_exact(ti_ckpt, tmp_path):
    path, _ = ti_ckpt
    model, params = checkpoints.load_augreg(path, num_classes=5)
    out = str(tmp_path / "again.npz")
    checkpoints.save_augreg(out, params)
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []
    model2, params2 = checkpoints.load_augreg(out)
    assert model2 == model
    jax.tree.map(np.testing.assert_array_equal, params, params2)
    with np.load(out, allow_pickle=False) as npz:  # a flat AugReg layout on disk
        assert set(npz.files) == set(fmt.documented_layout("Ti", 16, 64, 5, num_layers=3))


def test_gfile_paths_load_and_save_through_tensorflow():
    # ram:// is TensorFlow's in-memory filesystem: the same tf.io.gfile code path as gs://.
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 32, 3, num_layers=1))
    params = tree.unflatten_params(flat)
    checkpoints.save_augreg("ram://remem/ckpt.npz", params)
    _, loaded = checkpoints.load_augreg("ram://remem/ckpt.npz")
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


class _WriteHalfThenFail:
    """A writable file whose first write stores half of its bytes, then fails (a full disk)."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(28, "No space left on device (simulated)")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._f.close()
        return False


@pytest.fixture
def failing_writes(monkeypatch, tmp_path):
    """Every file write under `tmp_path` (builtin `open`) or through `tf.io.gfile.GFile` stores
    half of its first chunk, then raises: the lowest-level writes, whichever module calls them."""
    import builtins
    import io

    import tensorflow as tf

    real_open, real_write = builtins.open, tf.io.gfile.GFile.write
    root = os.path.realpath(tmp_path)

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        writing = isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+")
        if writing and os.path.realpath(os.fsdecode(file)).startswith(root):
            return _WriteHalfThenFail(f)
        return f

    def gfile_write(self, data):
        real_write(self, data[: len(data) // 2])
        self.flush()
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # zipfile (np.savez to a path) opens through io.open
    monkeypatch.setattr(tf.io.gfile.GFile, "write", gfile_write)


def _small_params(value):
    return {"head": {"kernel": np.full((8, 4), value, np.float32), "bias": np.full(4, value, np.float32)}}


def test_failed_save_leaves_the_existing_file_and_no_temporary(tmp_path, request):
    folder = tmp_path / "ckpts"
    path = str(folder / "ckpt.npz")
    checkpoints.save_augreg(path, _small_params(1.0))
    with open(path, "rb") as f:
        before = f.read()
    request.getfixturevalue("failing_writes")
    with pytest.raises(OSError, match="simulated"):
        checkpoints.save_augreg(path, _small_params(2.0))
    with open(path, "rb") as f:
        assert f.read() == before, "a failed save must not touch the previous checkpoint"
    assert os.listdir(folder) == ["ckpt.npz"], "no partial or temporary file may remain"


def test_failed_save_through_gfile_leaves_the_existing_file_and_no_temporary(request):
    # ram:// goes through tf.io.gfile, as gs:// does.
    import uuid

    import tensorflow as tf
    folder = f"ram://remem-atomic-{uuid.uuid4().hex}"
    path = f"{folder}/ckpt.npz"
    checkpoints.save_augreg(path, _small_params(1.0))
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            before = f.read()
        request.getfixturevalue("failing_writes")
        with pytest.raises(OSError, match="simulated"):
            checkpoints.save_augreg(path, _small_params(2.0))
        with tf.io.gfile.GFile(path, "rb") as f:
            assert f.read() == before, "a failed save must not touch the previous checkpoint"
        assert tf.io.gfile.listdir(folder) == ["ckpt.npz"], "no partial or temporary file may remain"
    finally:
        for name in tf.io.gfile.listdir(folder):
            tf.io.gfile.remove(f"{folder}/{name}")


def test_linen_numbered_tree_is_accepted_with_natural_block_order(tmp_path):
    # 12 blocks: encoderblock_10 and _11 must stay blocks 10 and 11 (a lexicographic
    # sort would put them after block 1).
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 32, 4))
    raw_model, raw = checkpoints.load_augreg(write_npz(tmp_path / "raw.npz", flat))
    linen_model, linen = checkpoints.load_augreg(write_npz(tmp_path / "linen.npz", fmt.to_linen_names(flat)))
    assert linen_model == raw_model
    jax.tree.map(np.testing.assert_array_equal, raw, linen)
    np.testing.assert_array_equal(
        linen["Transformer"]["encoderblock_10"]["MlpBlock_3"]["Dense_0"]["kernel"],
        flat["Transformer/encoderblock_10/MlpBlock_3/Dense_0/kernel"])


def test_pre_logits_checkpoint_keeps_or_drops_the_layer(tmp_path):
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 32, 6, representation_size=192, num_layers=1))
    path = write_npz(tmp_path / "orig.npz", flat)
    model, params = checkpoints.load_augreg(path)
    assert model.representation_size == 192 and "pre_logits" in params
    dropped_model, dropped = checkpoints.load_augreg(path, num_classes=3, representation_size=None)
    assert dropped_model.representation_size is None and "pre_logits" not in dropped
    assert dropped["head"]["kernel"].shape == (192, 3)


def test_known_names_resolve_to_recommended_gs_files():
    assert checkpoints.resolve_checkpoint("B_16") == (
        "gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz")
    assert checkpoints.resolve_checkpoint("B_16-i1k").endswith(
        "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz")
    assert checkpoints.resolve_checkpoint("/some/file.npz") == "/some/file.npz"


# ----------------------------------------------------------------------------- errors

def test_unknown_name_lists_known_names():
    with pytest.raises(CheckpointError, match=r"Unknown checkpoint name 'B_17'.*B_16, B_16-i1k"):
        checkpoints.load_augreg("B_17")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoints.load_augreg(str(tmp_path / "nope.npz"))


def test_truncated_file(ti_ckpt, tmp_path):
    path, _ = ti_ckpt
    data = open(path, "rb").read()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.npz.*truncated or corrupt"):
        checkpoints.load_augreg(str(bad))


def test_not_an_npz(tmp_path):
    bad = tmp_path / "notes.npz"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes.npz' \(5 bytes\) is not an npz file: it does not start with "
                       r"the zip header every npz archive has \(its first bytes are b'hello'\)"):
        checkpoints.load_augreg(str(bad))
    random = tmp_path / "random.npz"
    random.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(CheckpointError, match=r"random.npz' \(300 bytes\) is not an npz file"):
        checkpoints.load_augreg(str(random))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(CheckpointError, match="single array"):
        checkpoints.load_augreg(str(single))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 32, 4, num_layers=2))
    del flat["Transformer/encoderblock_1/LayerNorm_2/bias"]
    del flat["Transformer/encoder_norm/scale"]
    flat["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_augreg(write_npz(tmp_path / "bad.npz", flat))
    msg = str(info.value)
    assert "bad.npz" in msg
    assert "missing keys (2): Transformer/encoder_norm/scale, Transformer/encoderblock_1/LayerNorm_2/bias" in msg
    assert "unexpected keys (1): Transformer/encoderblock_0/extra/kernel" in msg


def test_shape_mismatch_lists_expected_and_actual(tmp_path):
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 32, 4, num_layers=2))
    flat["Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias"] = np.zeros(100, np.float32)
    with pytest.raises(CheckpointError, match=r"Dense_1/bias: expected \(192,\), got \(100,\)"):
        checkpoints.load_augreg(write_npz(tmp_path / "bad.npz", flat))


def test_not_a_vit_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no 'embedding/kernel'"):
        checkpoints.load_augreg(write_npz(tmp_path / "cnn.npz", {"conv/kernel": np.zeros((3, 3))}))


def test_block_index_gap(tmp_path):
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 32, 4, num_layers=3))
    flat = {k.replace("encoderblock_2", "encoderblock_5"): v for k, v in flat.items()}
    with pytest.raises(CheckpointError, match=r"must be 0..2, got \[0, 1, 5\]"):
        checkpoints.load_augreg(write_npz(tmp_path / "gap.npz", flat))


def test_bad_override_is_reported(ti_ckpt):
    path, _ = ti_ckpt
    with pytest.raises(CheckpointError, match="Bad model override"):
        checkpoints.load_augreg(path, not_a_field=1)


# ----------------------------------------------------------------------------- remote storage and the cache

GS_PATH = "gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz"
NO_HOST = tf.errors.FailedPreconditionError(
    None, None, "Error executing an HTTP request: libcurl code 6 meaning 'Could not resolve hostname', "
    f"error details: Could not resolve host: www.googleapis.com\n\t when reading metadata of {GS_PATH}")


def failing_gfile(monkeypatch, error):
    """Makes every tf.io.gfile access of a gs:// path raise `error`, as tf does offline or without credentials."""
    for name in ("exists", "stat", "GFile"):
        real = getattr(tf.io.gfile, name)

        def fake(path, *args, _real=real, **kwargs):
            if str(path).startswith("gs://"):
                raise error
            return _real(path, *args, **kwargs)
        monkeypatch.setattr(tf.io.gfile, name, fake)


@pytest.mark.parametrize("cache", [False, True])
def test_unreachable_storage_names_path_cause_and_fix(monkeypatch, tmp_path, cache):
    failing_gfile(monkeypatch, NO_HOST)
    with pytest.raises(checkpoints.RemoteUnavailableError) as info:
        checkpoints.load_augreg("B_16", cache_dir=str(tmp_path) if cache else None)
    msg = str(info.value)
    assert msg.startswith(f"Cannot read checkpoint {GS_PATH}: the storage could not be reached")
    assert "FailedPreconditionError: Error executing an HTTP request" in msg and "\n" not in msg
    assert f"Download it, e.g. `gsutil cp {GS_PATH} .`, and pass the local path as config.teacher.checkpoint." in msg
    assert os.listdir(tmp_path) == []  # nothing half-written in the cache


def test_storage_that_needs_credentials(monkeypatch):
    failing_gfile(monkeypatch, tf.errors.PermissionDeniedError(
        None, None, "Error executing an HTTP request: HTTP response code 403 with body 'Anonymous caller "
        "does not have storage.objects.get access'"))
    with pytest.raises(CheckpointError, match=r"Cannot read checkpoint gs://bucket/t\.npz: access was denied: "
                                              r"the storage needs credentials.*gsutil cp gs://bucket/t\.npz \."):
        checkpoints.load_npz("gs://bucket/t.npz")


def test_unknown_scheme_is_reported_by_tensorflow_itself(tmp_path):
    with pytest.raises(CheckpointError, match=r"Cannot read checkpoint nofs://b/t\.npz: TensorFlow has no file "
                                              r"system for nofs:// paths \(UnimplementedError: .*with your storage"):
        checkpoints.load_npz("nofs://b/t.npz", cache_dir=str(tmp_path))


@pytest.fixture
def remote_ckpt(request):
    """A Ti checkpoint on TensorFlow's in-memory file system (the gs:// code path), and a read counter."""
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 32, 3, num_layers=1))
    path = f"ram://remote/{request.node.name}/ckpt.npz"
    checkpoints.save_augreg(path, tree.unflatten_params(flat))
    return path, flat


def count_remote_reads(monkeypatch):
    reads = []
    real = tf.io.gfile.GFile

    def counting(path, mode="r"):
        if str(path).startswith("ram://remote/") and "r" in mode:
            reads.append(path)
        return real(path, mode)
    monkeypatch.setattr(tf.io.gfile, "GFile", counting)
    return reads


def test_remote_checkpoint_is_fetched_once_into_the_cache(remote_ckpt, tmp_path, monkeypatch):
    path, flat = remote_ckpt
    reads = count_remote_reads(monkeypatch)
    cache = str(tmp_path / "cache")
    _, first = checkpoints.load_augreg(path, cache_dir=cache)
    _, second = checkpoints.load_augreg(path, num_classes=3, cache_dir=cache)
    assert reads == [path]  # the second load read no remote bytes
    jax.tree.map(np.testing.assert_array_equal, first, second)
    local = checkpoints.cached_path(path, cache)
    assert local.startswith(cache + "/ram/remote/") and os.path.getsize(local) == tf.io.gfile.stat(path).length
    assert sorted(os.listdir(os.path.dirname(local))) == ["ckpt.npz", "ckpt.npz.json"]  # no temporary files


def test_truncated_cache_is_fetched_again(remote_ckpt, tmp_path, monkeypatch):
    path, flat = remote_ckpt
    cache = str(tmp_path)
    checkpoints.load_npz(path, cache_dir=cache)
    local = checkpoints.cached_path(path, cache)
    data = open(local, "rb").read()
    open(local, "wb").write(data[:1000])  # what a killed copy by hand leaves
    reads = count_remote_reads(monkeypatch)
    got = checkpoints.load_npz(path, cache_dir=cache)
    assert reads == [path]
    assert open(local, "rb").read() == data
    for key in flat:
        np.testing.assert_array_equal(got[key], flat[key])


def test_short_fetch_leaves_nothing_in_the_cache(remote_ckpt, tmp_path, monkeypatch):
    path, _ = remote_ckpt
    real_stat = tf.io.gfile.stat

    class Bigger:  # the remote reports more bytes than the read delivers: a cut-short download
        def __init__(self, st):
            self.length, self.mtime_nsec = st.length + 10, st.mtime_nsec
    monkeypatch.setattr(tf.io.gfile, "stat", lambda p: Bigger(real_stat(p)))
    with pytest.raises(CheckpointError, match=r"Fetching checkpoint 'ram://remote/.*ckpt.npz' stopped early "
                                              r"\(copying .* gave \d+ bytes, but it has \d+\); nothing was cached"):
        checkpoints.load_npz(path, cache_dir=str(tmp_path))
    assert [f for _, _, fs in os.walk(tmp_path) for f in fs] == []


def test_complete_cache_is_used_when_the_storage_is_unreachable(tmp_path, monkeypatch):
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 32, 3, num_layers=1))
    # Cache it as if fetched earlier from gs:// (gs:// is unreachable here).
    local = checkpoints.cached_path(GS_PATH, str(tmp_path))
    os.makedirs(os.path.dirname(local))
    np.savez(local, **flat)
    record = {"source": GS_PATH, "size": os.path.getsize(local), "mtime_nsec": 1}
    open(local + ".json", "w").write(json.dumps(record))
    failing_gfile(monkeypatch, NO_HOST)
    _, params = checkpoints.load_augreg("B_16", cache_dir=str(tmp_path))
    np.testing.assert_array_equal(params["cls"], flat["cls"])
    open(local, "r+b").truncate(100)  # a truncated copy is not used
    with pytest.raises(checkpoints.RemoteUnavailableError, match="could not be reached"):
        checkpoints.load_augreg("B_16", cache_dir=str(tmp_path))


# ----------------------------------------------------------------------------- files that are not checkpoints

def test_git_lfs_pointer_is_named(tmp_path):
    bad = tmp_path / "B_16.npz"
    bad.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a2148\nsize 346327470\n")
    with pytest.raises(CheckpointError, match=r"B_16.npz' is a Git LFS pointer \(\d+ bytes\), not the "
                                              r"checkpoint: fetch the real file with `git lfs pull`"):
        checkpoints.load_augreg(str(bad))


@pytest.mark.parametrize("page", ["<!DOCTYPE html>\n<html><head><title>Google Cloud</title>",
                                  "\n  <html lang='en'><body>vit_models/augreg</body></html>"])
def test_html_page_is_named(tmp_path, page):
    bad = tmp_path / "B_16.npz"
    bad.write_text(page)
    with pytest.raises(CheckpointError, match=r"B_16.npz' is an HTML page \(\d+ bytes\), not an npz: "
                                              "download the file itself"):
        checkpoints.load_npz(str(bad))


def test_nan_and_inf_are_named_at_load_time(tmp_path):
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 32, 4, num_layers=2))
    flat["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"][0, :3] = np.nan
    flat["head/bias"][1] = np.inf
    path = write_npz(tmp_path / "diverged.npz", flat)
    with pytest.raises(CheckpointError) as info:
        checkpoints.load_augreg(path)
    assert str(info.value) == (
        f"Checkpoint {path!r} has NaN or inf values in 2 of {len(flat)} arrays: "
        "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel (3 NaN, 0 inf of 147456); head/bias (0 NaN, 1 inf of 4). "
        "It was saved from a diverged run or is corrupt; use another checkpoint.")


# ----------------------------------------------------------------------------- the head rule

def test_head_is_reset_when_pre_logits_is_dropped_even_for_the_same_classes(tmp_path):
    flat = fmt.random_checkpoint(fmt.documented_layout("Ti", 16, 32, 6, representation_size=192, num_layers=1))
    path = write_npz(tmp_path / "orig2020.npz", flat)
    _, kept = checkpoints.load_augreg(path, num_classes=6)  # pre_logits kept: the head still fits
    np.testing.assert_array_equal(kept["head"]["kernel"], flat["head/kernel"])
    np.testing.assert_array_equal(kept["pre_logits"]["kernel"], flat["pre_logits/kernel"])
    model, dropped = checkpoints.load_augreg(path, num_classes=6, representation_size=None)
    assert model.num_classes == 6 and "pre_logits" not in dropped
    assert dropped["head"]["kernel"].shape == (192, 6) and not dropped["head"]["kernel"].any()
    assert not dropped["head"]["bias"].any()


def test_a_model_built_from_the_config_is_loaded_with_the_file(ti_ckpt):
    """big_vision's order: read the file, build the model from the run's options, load the file into it."""
    from remem_jax.models import vit
    path, flat = ti_ckpt
    ckpt = checkpoints.read_vit(path)
    assert (ckpt.image_size, ckpt.num_classes, ckpt.architecture["num_layers"]) == (64, 21843, 3)
    model = checkpoints.build_vit(ckpt, num_classes=7, dropout_rate=0.1, remat_blocks=True, mlp_alpha=0.8,
                                  drop_path_rate=(0.0, 0.05, 0.1))
    assert (model.num_classes, model.dropout_rate, model.remat_blocks, model.mlp_alpha) == (7, 0.1, True, 0.8)
    params = checkpoints.load_into(model, ckpt, image_size=32)
    want_model, want = checkpoints.load_augreg(path, num_classes=7, image_size=32, dropout_rate=0.1,
                                               remat_blocks=True, mlp_alpha=0.8, drop_path_rate=(0.0, 0.05, 0.1))
    assert want_model == model
    for key, value in tree.flatten_params(want).items():
        np.testing.assert_array_equal(tree.flatten_params(params)[key], value, err_msg=key)
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 5, 192)  # 2x2 grid + class

    # A model with adapters loads a file without them (surgery adds them); a headless one drops the head.
    with_adapters = checkpoints.build_vit(ckpt, num_classes=7, adapter_dim=12)
    loaded = tree.flatten_params(checkpoints.load_into(with_adapters, ckpt))
    assert not any("Adapter_" in k for k in loaded) and "head/kernel" in loaded
    headless = checkpoints.load_into(checkpoints.build_vit(ckpt, num_classes=None), ckpt)
    assert "head" not in headless
    # A model the file does not fit: every mismatch named, with the file.
    with pytest.raises(CheckpointError, match=r"(?s)Ti_16-i21k.npz.*missing keys.*encoderblock_3"):
        checkpoints.load_into(vit.VisionTransformer(**{**ckpt.architecture, "num_layers": 4, "num_classes": 7}), ckpt)


def test_a_remote_file_that_disappears_between_its_size_check_and_the_copy(remote_ckpt, tmp_path, monkeypatch):
    path, _ = remote_ckpt
    real_stat = checkpoints._remote_stat

    def stat_then_delete(p):
        stat = real_stat(p)
        tf.io.gfile.remove(p)  # gone after the size check, before the copy
        return stat
    monkeypatch.setattr(checkpoints, "_remote_stat", stat_then_delete)
    cache = str(tmp_path / "cache")
    with pytest.raises(CheckpointError, match=r"ckpt.npz' disappeared while it was being fetched \(it existed, "
                                              r"\d+ bytes, a moment before\); nothing was cached"):
        checkpoints.load_augreg(path, cache_dir=cache)
    assert [f for _, _, names in os.walk(cache) for f in names] == []
