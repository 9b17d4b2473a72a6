"""File access for local and remote (gs://) paths, and the one atomic write every writer uses.

Remote paths (any `scheme://`: gs://, and TensorFlow's `ram://` in tests) go
through `tf.io.gfile`; local paths use the OS, so reading a local checkpoint
needs no TensorFlow start-up.
"""
from __future__ import annotations

import json
import os
import uuid
from typing import Any


def gfile():
    """`tf.io.gfile`, imported lazily."""
    import tensorflow as tf
    return tf.io.gfile


def is_remote(path: str) -> bool:
    """gs://, and any other scheme TensorFlow's filesystems know (ram:// in tests)."""
    return "://" in path


def exists(path: str) -> bool:
    return gfile().exists(path) if is_remote(path) else os.path.exists(path)


def is_dir(path: str) -> bool:
    return gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def remove_tree(path: str) -> None:
    gfile().rmtree(path)


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        with gfile().GFile(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def read_json(path: str, default: Any = None) -> Any:
    """The parsed JSON file at `path`, or `default` when there is none."""
    if not exists(path):
        return default
    return json.loads(read_bytes(path).decode("utf-8"))


def atomic_write(path: str, data: bytes) -> None:
    """Writes `data` to `path` so that `path` is either the old file or the complete new one.

    The bytes go to a uniquely named temporary file beside `path` (flushed and
    fsync-ed locally), which is then renamed over `path`. On any failure the
    temporary file is removed and an existing `path` is left untouched.
    """
    parent = os.path.dirname(path)
    if parent:
        makedirs(parent)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        if is_remote(path):
            with gfile().GFile(tmp, "wb") as f:
                f.write(data)
            gfile().rename(tmp, path, overwrite=True)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if exists(tmp):
            (gfile().remove if is_remote(tmp) else os.remove)(tmp)


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically."""
    atomic_write(path, text.encode("utf-8"))


def write_json(path: str, value: Any) -> None:
    """Writes JSON (indented, sorted keys) atomically."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True))
