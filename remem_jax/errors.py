"""The error type for mistakes a user can fix (config, paths, data, checkpoints).

`remem_jax.main` turns these into a one-line message and a non-zero exit
instead of a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message says what is wrong and what to do."""


class NonFiniteLossError(UserError):
    """Training produced a NaN or infinite loss; the run stops without saving that state."""


class StorageFullError(UserError, OSError):
    """A write found no space left on its device; the file written is unchanged and a rerun resumes."""


def storage_full(path: str, error: BaseException) -> "StorageFullError":
    """The one-line error for a write to `path` that ran out of space (free bytes measured now)."""
    import os
    import shutil
    free = "free space unknown"
    if "://" not in path:
        folder = os.path.dirname(path) or "."
        while folder and not os.path.exists(folder):
            folder = os.path.dirname(folder)
        try:
            free = f"{shutil.disk_usage(folder or '.').free / 2**20:.1f} MiB free on its device"
        except OSError:
            pass
    cause = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    return StorageFullError(
        f"No space left to write {path} ({free}; {cause}). Nothing was half-written: free some space and run the "
        "same command again, it resumes from the last complete checkpoint.")
