"""The command-line pattern of remem_jax tools, as in `remem_jax.main`.

A mistake in the input (a bad flag, a missing or damaged file, a `UserError`) ends the
program with one line `remem_jax: error: ...` on stderr and exit status 2, never a
traceback. Flags are defined only when a tool runs as a program (`define_flags` is
called then), so importing the tool's module from the library defines no absl flags.
"""
from __future__ import annotations

import os
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
        for arg in argv:  # config files import `configs.common`: the folder holding configs/ goes on sys.path
            if arg.startswith("--config="):
                path = os.path.abspath(arg.split("=", 1)[1].split(":", 1)[0])
                sys.path.insert(0, os.path.dirname(os.path.dirname(path)))
        try:
            return flags.FLAGS(argv)
        except Exception as e:  # absl and config_flags raise several types for a bad flag or file
            detail = str(e).splitlines()[0] if str(e) else type(e).__name__
            fail(detail)

    def wrapped(argv):
        if len(argv) > 1:
            fail(f"unexpected arguments: {' '.join(argv[1:])}")
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
