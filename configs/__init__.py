"""Run configs: one file per experiment, every field and its default in common.py.

These are the files to copy and edit (`--config=path/to/file.py`). They also ship inside the
installed package as `remem_jax.configs`, which `--config=NAME[:ARG]` reads (e.g.
`--config=remem:cifar100`, `--config=digits`); installed there, this package is also importable
as `configs`, the name the files import each other by.
"""
import sys

if __name__ != "configs":
    sys.modules.setdefault("configs", sys.modules[__name__])
