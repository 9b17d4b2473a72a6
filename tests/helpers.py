"""Helpers shared by the tests."""
import ml_collections

from configs import common


def data_config(**changes) -> ml_collections.ConfigDict:
    """`config.data` at the defaults of configs/common.py with `changes` applied.

    The section is locked first, so a misspelt field name fails instead of adding a field.
    """
    cfg = common.get_config().data
    cfg.lock()
    for name, value in changes.items():
        cfg[name] = value
    return cfg


def run_in_fresh_process(config_factory: str, workdir, *, devices: int = 2, analysis: bool = False,
                         timeout_s: float = 1200) -> dict:
    """`main.run(config, workdir)` in a new Python process with `devices` fake CPU devices.

    The suite's own process has eight fake devices (conftest.py), and on two cores every pmapped
    step of a tiny end-to-end run then executes eight replicas: three times slower than on two
    devices, which still exercise every cross-device reduction. The child inherits the session's
    XLA compilation cache.

    Args:
      config_factory: `'module:function'` returning the run's ConfigDict, e.g.
        `'tests.test_pipeline_digits:reduced_config'`.
      workdir: the run's workdir.
      devices: fake CPU devices of the child process.
      analysis: wrap the config in `analyze.analysis_config` (what `python -m remem_jax.analyze` runs).
      timeout_s: the child's time limit.

    Returns:
      `main.run`'s results as JSON round-trips them (NumPy scalars become numbers).
    """
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    module, function = config_factory.split(":")
    results_path = os.path.join(str(workdir) + ".results.json")
    code = (
        "import importlib, json, sys\n"
        "import numpy as np\n"
        "from remem_jax import analyze, main\n"
        f"config = getattr(importlib.import_module({module!r}), {function!r})()\n"
        f"config = analyze.analysis_config(config) if {analysis!r} else config\n"
        "results = main.run(config, sys.argv[1])\n"
        "as_json = lambda x: x.tolist() if isinstance(x, (np.ndarray, np.generic)) else str(x)\n"
        "json.dump(results, open(sys.argv[2], 'w'), default=as_json)\n")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
    result = subprocess.run([sys.executable, "-c", code, str(workdir), results_path], cwd=repo, env=env,
                            capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, f"{config_factory} failed in its own process:\n{result.stderr[-4000:]}"
    with open(results_path) as f:
        return json.load(f)


def random_vit_npz(path, num_layers: int = 2, image_size: int = 16) -> str:
    """A random ViT-Ti/8 with `num_layers` blocks and a 10-class head, saved at `path` as an AugReg npz."""
    import jax
    import numpy as np
    from remem_jax import checkpoints
    from remem_jax.models import vit
    model = vit.create_vit("Ti_8", 10, num_layers=num_layers)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), np.zeros((1, image_size, image_size, 3)))["params"]
    checkpoints.save_augreg(str(path), params)
    return str(path)
