"""File access for local and remote (gs://) paths, and the one atomic write every writer uses.

Remote paths (any `scheme://`: gs://, and TensorFlow's `ram://` in tests) go
through `tf.io.gfile`; local paths use the OS, so reading a local checkpoint
needs no TensorFlow start-up.
"""
from __future__ import annotations

import errno
import json
import os
import re
import uuid
from typing import Any, Iterable, Optional, Union

from remem_jax import errors

CHUNK_BYTES = 16 << 20  # streaming copies move 16 MiB at a time
TEMPORARY_MARK = ".tmp-"  # atomic_write's temporary files: <path>.tmp-<32 hex digits>
_TEMPORARY = re.compile(re.escape(TEMPORARY_MARK) + r"[0-9a-f]{32}$")


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


def size(path: str) -> int:
    """The length in bytes of the file at `path` (a metadata call for remote paths)."""
    return gfile().stat(path).length if is_remote(path) else os.path.getsize(path)


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


def atomic_write(path: str, data: Union[bytes, Iterable[bytes]]) -> None:
    """Writes `data` to `path` so that `path` is either the old file or the complete new one.

    `data` is the bytes, or an iterable of byte chunks (a streaming copy; an
    exception raised while iterating aborts the write). The bytes go to a
    uniquely named temporary file beside `path` (flushed and fsync-ed locally),
    which is then renamed over `path`. On any failure the temporary file is
    removed and an existing `path` is left untouched.
    """
    chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    parent = os.path.dirname(path)
    tmp = f"{path}{TEMPORARY_MARK}{uuid.uuid4().hex}"
    try:
        if parent:
            makedirs(parent)
        _write_then_rename(path, tmp, chunks)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise errors.storage_full(path, e) from e
        raise


def _write_then_rename(path: str, tmp: str, chunks) -> None:
    try:
        if is_remote(path):
            with gfile().GFile(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            gfile().rename(tmp, path, overwrite=True)
        else:
            with open(tmp, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if exists(tmp):
            (gfile().remove if is_remote(tmp) else os.remove)(tmp)


def remove_stale_temporaries(root: str) -> list[str]:
    """Removes the temporary files of interrupted `atomic_write`s under `root`; returns their paths.

    Call it only while no writer is running there (at the start of a run, by the process that
    holds the workdir).
    """
    if not exists(root):
        return []
    walk = gfile().walk(root) if is_remote(root) else os.walk(root)
    stale = [os.path.join(folder, name) for folder, _, names in walk for name in names if _TEMPORARY.search(name)]
    for path in stale:
        (gfile().remove if is_remote(path) else os.remove)(path)
    return stale


class IncompleteCopyError(OSError):
    """A copy ended with a different number of bytes than the source has."""


def copy_file(src: str, dst: str, expected_size: Optional[int] = None) -> int:
    """Streams `src` to `dst` through `atomic_write`, in `CHUNK_BYTES` pieces; returns the bytes copied.

    Raises:
      IncompleteCopyError: `expected_size` is given and the copy has another
        length (a cut-short download); `dst` is then left as it was.
    """
    copied = 0

    def chunks():
        nonlocal copied
        with (gfile().GFile(src, "rb") if is_remote(src) else open(src, "rb")) as f:
            while True:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
                copied += len(chunk)
                yield chunk
        if expected_size is not None and copied != expected_size:
            raise IncompleteCopyError(f"copying {src} gave {copied} bytes, but it has {expected_size}")

    atomic_write(dst, chunks())
    return copied


def remote_failure(path: str, err: BaseException) -> Optional[str]:
    """Why the remote `path` could not be used, when `err` says the storage itself failed.

    Returns a short cause (unreachable, needs credentials, a scheme TensorFlow
    cannot read) for the `tf.errors.OpError`s `tf.io.gfile` raises in those
    cases, or None for anything else (a missing file is not a storage failure).
    """
    if not is_remote(path):
        return None
    import tensorflow as tf
    if not isinstance(err, tf.errors.OpError) or isinstance(err, tf.errors.NotFoundError):
        return None
    detail = " ".join(str(getattr(err, "message", "") or err).split())
    if len(detail) > 200:
        detail = detail[:197] + "..."
    scheme = path.split("://", 1)[0]
    if isinstance(err, tf.errors.UnimplementedError):
        cause = f"TensorFlow has no file system for {scheme}:// paths"
    elif (isinstance(err, (tf.errors.PermissionDeniedError, tf.errors.UnauthenticatedError))
          or re.search(r"credential|permission|unauthori[sz]ed|\b40[13]\b", detail, re.IGNORECASE)):
        cause = "access was denied: the storage needs credentials this machine does not have"
    else:
        cause = "the storage could not be reached (no network, or the host is blocked)"
    return f"{cause} ({type(err).__name__}: {detail})"


def write_text(path: str, text: str) -> None:
    """Writes a text file atomically."""
    atomic_write(path, text.encode("utf-8"))


def write_json(path: str, value: Any) -> None:
    """Writes JSON (indented, sorted keys) atomically."""
    write_text(path, json.dumps(value, indent=2, sort_keys=True))
