"""The run configs as a package: `remem_jax.configs.digits`, and `--config=digits` on the command line.

An installed remem_jax holds here the files of the repository's top-level configs/ folder
(setup.py maps that folder to this package); in a checkout this file stands in for them and
points the package at configs/. Either way the configs' own `from configs import ...` finds
this package (`configs` is its other name).
"""
import os
import sys

__path__ = [os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")]
sys.modules.setdefault("configs", sys.modules[__name__])
