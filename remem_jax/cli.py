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
        for path in _config_files(argv):
            if not os.path.isfile(path):
                fail(f"--config: the config file {path!r} does not exist"
                     + (" (paths are relative to the current folder)" if not os.path.isabs(path) else "") + ".")
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
            if isinstance(e, user_error_types()):
                fail(_message(e))
            raise

    app.run(wrapped, flags_parser=parse)
