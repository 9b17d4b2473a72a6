"""Every notebook in colabs/ runs top to bottom (smoke settings), is paired with its jupytext .py, and has no outputs.

Notebooks are executed with nbclient in a python3 (ipykernel) kernel, with the repository root as
working directory and REMEM_SMOKE=1, which switches each notebook to tiny offline settings.
"""
import glob
import os

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "colabs", "*.ipynb")))
TIMEOUT_S = 600  # per cell; the whole smoke run takes about a minute on two idle cores


def _ids(paths):
    return [os.path.basename(p) for p in paths]


def test_there_are_notebooks():
    assert NOTEBOOKS, "colabs/ has no notebooks"


def _cells(notebook):
    return [(c.cell_type, c.source.strip()) for c in notebook.cells]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_in_sync_with_its_py_file(path):
    paired = path[: -len(".ipynb")] + ".py"
    assert os.path.exists(paired), f"{path} has no paired jupytext file {paired}"
    ipynb, py = jupytext.read(path), jupytext.read(paired)
    assert _cells(ipynb) == _cells(py), (
        f"{os.path.basename(path)} and {os.path.basename(paired)} differ; run "
        f"`jupytext --sync {os.path.relpath(paired, REPO)}`")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_outputs_are_stripped(path):
    notebook = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(notebook.cells)
             if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"cells {dirty} of {os.path.basename(path)} have outputs; strip them "
                       "(`jupyter nbconvert --clear-output --inplace`, or `jupytext --sync` from the .py)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    monkeypatch.setenv("REMEM_SMOKE", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    # The kernel is a fresh process with its own (single) CPU device, not the tests' eight fake ones.
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": REPO}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
