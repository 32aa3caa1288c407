"""Every notebook in notebooks/ runs top to bottom without a cell error.

Each notebook is executed in memory (the committed file and its saved outputs are left alone) by a fresh
kernel started from notebooks/, as a reader opening it in Jupyter would. The kernel runs the interpreter
running the tests, so the notebooks exercise the library under test: a "python3" kernel spec pointing at
``sys.executable`` is written to a temporary folder that ``JUPYTER_PATH`` puts ahead of any other
"python3" kernel installed for the user or the system. Needs the ``dev`` extra (nbclient, ipykernel): a
missing one fails these tests instead of skipping them, so an incomplete environment cannot pass unseen.
"""
from __future__ import annotations

from pathlib import Path

import pytest

try:
    import ipykernel  # noqa: F401  (the kernel the notebooks run in)
    import nbclient
    import nbformat
except ImportError as error:  # reported by every test below, not at collection (other modules still run)
    nbclient = nbformat = None
    MISSING = f"{error}; install the dev extra: pip install -e '.[dev]' (make test does)"
else:
    MISSING = None

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600


@pytest.fixture
def venv_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Name of a kernel spec that starts ``sys.executable``, ahead of any other spec of that name."""
    from ipykernel.kernelspec import KERNEL_NAME, write_kernel_spec

    write_kernel_spec(tmp_path / "kernels" / KERNEL_NAME)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return KERNEL_NAME


def test_notebook_runner_is_installed():
    assert MISSING is None, MISSING


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs_without_errors(notebook: Path, venv_kernel: str):
    if MISSING is not None:
        pytest.fail(MISSING)
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name=venv_kernel, resources={"metadata": {"path": str(NOTEBOOK_DIR)}}
    )
    client.execute()  # raises CellExecutionError naming the failing cell and its traceback
