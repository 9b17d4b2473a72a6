"""Installed, not cloned: a built wheel carries the configs, and the command runs one by name.

The wheel is built from a copy of the checkout's packaged files (so the build leaves nothing in
the checkout), installed with `pip install --no-deps` into a fresh virtual environment outside
the repository, whose site-packages reach the test environment's dependencies through a .pth
line (a full install of jax and TensorFlow would take minutes; the point here is remem_jax's own
files). Everything then runs from a folder outside the repository, with no PYTHONPATH, so the
checkout cannot stand in for a file the wheel lacks.
"""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGED = ("setup.py", "README.md", "remem_jax", "configs")


def _run(cmd, cwd, env=None, timeout=300):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in PACKAGED:
        copy = shutil.copytree if os.path.isdir(os.path.join(REPO, name)) else shutil.copy
        kwargs = dict(ignore=shutil.ignore_patterns("__pycache__")) if copy is shutil.copytree else {}
        copy(os.path.join(REPO, name), src / name, **kwargs)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", str(base / "dist")],
         cwd=src)
    (wheel,) = (base / "dist").glob("remem_jax-*.whl")
    env_dir = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=base)
    python = str(env_dir / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base).stdout.strip()
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", str(wheel)],
         cwd=base)
    # The dependencies: this environment's site-packages, after the venv's own (a plain path line:
    # the .pth files there, e.g. an editable install of remem_jax, are not read). Written after the
    # install: where this environment holds an installed remem_jax (CI installs `.[test]`, not
    # editable), pip would otherwise find it there and install nothing.
    with open(os.path.join(site, "test_dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    outside = base / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    return dict(python=python, site=site, cwd=outside, env=env)


def test_the_wheel_holds_the_configs_and_runs_one_by_name(venv):
    probe = _run([venv["python"], "-c", "import remem_jax, remem_jax.configs as c, configs\n"
                  "from remem_jax.configs import common, digits\n"
                  "print(remem_jax.__file__); print(c.__path__[0]); print(configs is c)\n"
                  "print(digits.get_config().dataset)"], cwd=venv["cwd"], env=venv["env"]).stdout.split()
    assert probe[0].startswith(venv["site"]) and probe[1] == os.path.join(venv["site"], "remem_jax", "configs")
    assert probe[2:] == ["True", "digits"]
    # The command, the digits config by name: its first stage, shrunk to seconds (16 px, one block, 2 steps).
    workdir = venv["cwd"] / "run"
    _run([venv["python"], "-m", "remem_jax.main", "--config=digits", f"--workdir={workdir}",
          "--config.stages=('pretrain_teacher',)", "--config.data.image_size=16", "--config.data.digits_source_size=16",
          "--config.data.validation_percent=5", "--config.pretrain.num_layers=1", "--config.pretrain.steps=2",
          "--config.pretrain.batch_size=8", "--config.pretrain.warmup_steps=1"], cwd=venv["cwd"], env=venv["env"])
    assert (workdir / "pretrain" / "teacher.npz").is_file()
    assert '"dataset": "digits"' in (workdir / "config.json").read_text()
    # A name that ships nowhere is one line.
    bad = subprocess.run([venv["python"], "-m", "remem_jax.main", "--config=cifar", f"--workdir={workdir}"],
                         cwd=venv["cwd"], env=venv["env"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "remem_jax: error: --config=cifar: no config named 'cifar' ships with remem_jax (named configs: "
        "analysis_digits, cifar100, digits, remem,"), bad.stderr[-2000:]
