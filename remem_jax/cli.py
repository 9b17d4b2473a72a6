"""The command-line pattern of remem_jax tools, as in `remem_jax.main`.

A mistake in the input (a bad flag, a missing or damaged file, a `UserError`) ends the
program with one line `remem_jax: error: ...` on stderr and exit status 2, never a
traceback. Flags are defined only when a tool runs as a program (`define_flags` is
called then), so importing the tool's module from the library defines no absl flags.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable


def user_error_types() -> tuple[type, ...]:
    """UserError and the data layer's own error types (only if the data layer was imported:
    importing it imports TensorFlow, which an early error should not wait for)."""
    from remem_jax import errors
    types = [errors.UserError]
    for module, name in (("remem_jax.data.registry", "UnknownDatasetError"),
                         ("remem_jax.data.sources", "DataNotFoundError")):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def shipped_configs() -> dict[str, str]:
    """Name -> file of the configs shipped with the package (`remem_jax.configs`; common.py is not a run)."""
    import remem_jax.configs  # noqa: F401 - also makes the configs' `from configs import ...` find the package
    folder = sys.modules["remem_jax.configs"].__path__[0]
    return {name[:-3]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.endswith(".py") and name not in ("__init__.py", "common.py")}


def _is_config_name(value: str) -> bool:
    """Whether a --config value names a shipped config (`remem:cifar100`, `digits`) instead of a file."""
    path = value.split(":", 1)[0]
    return bool(path) and not path.endswith(".py") and "/" not in path and os.sep not in path


def resolve_config_names(argv: list[str]) -> list[str]:
    """`argv` with each `--config=NAME[:ARG]` of a shipped config (e.g. `--config=remem:cifar100`) as
    `--config=<its file in the package>[:ARG]`; a file path is left as it is.

    Raises:
      UserError: NAME is no shipped config (the message lists them).
    """
    from remem_jax import errors

    def resolve(value):
        if not _is_config_name(value):
            return value
        name, _, arg = value.partition(":")
        known = shipped_configs()
        if name not in known:
            raise errors.UserError(f"--config={value}: no config named {name!r} ships with remem_jax (named configs: "
                                   f"{', '.join(known)}); a config file is given by its path, e.g. configs/{name}.py.")
        return known[name] + (f":{arg}" if arg else "")

    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out


def _config_files(argv) -> list[str]:
    """The file paths of `--config=PATH[:ARG]` / `--config PATH[:ARG]` arguments."""
    paths = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
        elif arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
    return [p.split(":", 1)[0] for p in paths]


def _override_named(argv, key: str) -> str:
    """The `config.a.b` of the `--config.a.b=...` argument whose last part is `key` (else `key`)."""
    for arg in argv:
        name = arg.split("=", 1)[0][2:]
        if arg.startswith("--config.") and name.split(".")[-1] == key:
            return name
    return key


def fail(message: str) -> None:
    print(f"remem_jax: error: {message}", file=sys.stderr)
    sys.exit(2)


def _message(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__  # one line


def _multiprocess() -> bool:
    """Whether this is one process of a multi-process run (never starts JAX for an early error)."""
    if "jax" not in sys.modules:
        return False
    from remem_jax import distributed
    return distributed.is_multiprocess()


def _stop_process(e: BaseException) -> None:
    """Ends one process of a multi-process run on `e` with one line, at once.

    A user error exits 2; a lost peer (`distributed.peer_loss_message`) exits 3 with no
    traceback; anything else prints its traceback (a bug) and exits 1. `os._exit` skips the
    runtime's shutdown barrier, which would otherwise wait minutes for processes that may be gone
    (this one's exit then tells the others, within their heartbeat timeout).
    """
    import traceback

    from absl import logging

    from remem_jax import distributed
    if isinstance(e, user_error_types()):
        message, code = _message(e), 2
    else:
        message, code = distributed.peer_loss_message(e), distributed.PEER_LOST_EXIT
        if message is None:
            traceback.print_exc()
            message, code = f"stopped on an unexpected error: {_message(e)[:500]}", 1
    print(f"remem_jax: error: {message}", file=sys.stderr)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class QuietLibraries:
    """A logging filter that drops INFO records of orbax, jax and TFDS internals, so that a long
    run's progress lines stay readable."""

    def filter(self, record) -> bool:
        noisy = any(f"{os.sep}{lib}{os.sep}" in record.pathname for lib in ("orbax", "jax", "tensorflow_datasets"))
        return record.levelno > 20 or not noisy  # 20 = INFO


def run(main: Callable, define_flags: Callable[[], dict], *, progress: bool = False) -> None:
    """Defines the flags, parses argv (errors -> one line, exit 2) and runs `main(argv, flags)`.

    Args:
      main: `main(argv, flags)`, `flags` being what `define_flags` returned.
      define_flags: defines the tool's absl flags; returns name -> flag holder.
      progress: log INFO records (a long run's progress lines, libraries' own INFO dropped);
        otherwise only warnings and errors.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up notes are not errors
    from absl import app, flags, logging

    holders = define_flags()

    def parse(argv):
        try:
            named = resolve_config_names(argv)
        except user_error_types() as e:
            fail(_message(e))
        shipped = [p for p, q in zip(_config_files(named), _config_files(argv)) if p != q]
        argv = named
        for path in _config_files(argv):
            if not os.path.isfile(path):
                fail(f"--config: the config file {path!r} does not exist"
                     + (" (paths are relative to the current folder)" if not os.path.isabs(path) else "") + ".")
            if path not in shipped:  # (a shipped config finds `configs` as remem_jax.configs)
                # Config files import `configs.common`: the folder holding configs/ goes on sys.path.
                sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # absl and config_flags raise several types for a bad flag or file
            if isinstance(e, user_error_types()):  # raised by the config file, e.g. configs/remem.py:<unknown>
                fail(_message(e))
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            unknown = re.fullmatch(r"Unknown command line flag '(config\.[\w.]+)'", detail)
            if unknown or isinstance(e, (AttributeError, KeyError)):
                field = unknown.group(1) if unknown else _override_named(argv, _message(e).strip("'\""))
                detail = f"unknown config field {field} (every field is listed in configs/common.py)"
            fail(detail)

    def wrapped(argv):
        if len(argv) > 1:
            fail(f"unexpected argument{'s' if len(argv) > 2 else ''} {' '.join(argv[1:])!r}: every option is a "
                 "--flag (e.g. --config=FILE --workdir=DIR)")
        if progress:
            logging.get_absl_handler().addFilter(QuietLibraries())
        else:
            logging.set_verbosity(logging.WARNING)
        try:
            main(argv, holders)
        except Exception as e:  # noqa: BLE001 - user errors become one line; anything else is a bug
            if _multiprocess():
                _stop_process(e)
            if isinstance(e, user_error_types()):
                fail(_message(e))
            raise

    app.run(wrapped, flags_parser=parse)
