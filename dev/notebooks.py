"""Executes every notebook in notebooks/ in place at its tiny setting, so the committed notebooks
carry their outputs (figures included) for a reader on the web: `make notebooks`.

    .venv/bin/python dev/notebooks.py                      # all of them (~4 min on 2 CPU cores)
    .venv/bin/python dev/notebooks.py bandit_optimum       # one

Each kernel runs with `RLHF_JAX_NOTEBOOK_TINY=1` (read by every notebook's first code cell: the
tiny sizes; dpo_frontier runs the tiny frontier experiment in a temporary folder), on the CPU, and
imports this checkout. Cell timestamps are not stored, so a rerun changes only what was computed.
The test suite executes the same notebooks (tests/test_notebooks.py, tests/test_frontier.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def execute(path: Path) -> None:
    """Runs `path` top to bottom in a fresh kernel and writes it back with its outputs."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=1200,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
        record_timing=False,
    )
    client.execute()
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    if errors:
        raise RuntimeError(f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}")
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.names:
        known = {p.stem: p for p in paths}
        unknown = [n for n in args.names if n not in known]
        if unknown:
            parser.error(f"no notebook {', '.join(unknown)}; choose from {', '.join(known)}")
        paths = [known[n] for n in args.names]
    os.environ["RLHF_JAX_NOTEBOOK_TINY"] = "1"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # tqdm.auto in a kernel without ipywidgets warns once; the bars are off in these runs anyway.
    os.environ["PYTHONWARNINGS"] = "ignore:IProgress not found"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    for path in paths:
        start = time.perf_counter()
        execute(path)
        print(f"{path.relative_to(ROOT)}: executed in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
