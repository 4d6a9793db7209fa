"""Every notebook in notebooks/ executes top to bottom (nbclient) at its tiny setting.

The kernel is ipykernel's "python3" spec, whose command is `python -m ipykernel_launcher`;
jupyter_client replaces that `python` with the interpreter running the tests (`sys.executable`,
the project's .venv), and the kernel inherits this process's environment: the CPU settings of
conftest.py, `RLHF_JAX_NOTEBOOK_TINY=1` (read by each notebook's first code cell) and a PYTHONPATH
that starts with the repository root, so `import rlhf_jax` finds this checkout.
"""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
# dpo_frontier runs in tests/test_frontier.py on the tiny experiment's own output (one run of
# the experiment for both); the others run here.
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb") if p.stem != "dpo_frontier")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_JAX_NOTEBOOK_TINY", "1")
    python_path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), python_path) if p))
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # Committed with the outputs of `make notebooks` (a figure among them); cleared here, so that
    # every output checked below comes from this run.
    assert any("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    for cell in code:
        cell.outputs = []
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors
    images = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert images, f"{path.name} drew no figure"
