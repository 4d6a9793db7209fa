"""Load an experiments/ driver script as a module (they are scripts, not a package)."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(name: str, alias: str | None = None):
    """experiments/<name>.py as a module registered as `alias` (default `driver_<name>`): its
    dataclasses resolve their string annotations through sys.modules."""
    spec = importlib.util.spec_from_file_location(
        alias or f"driver_{name}", ROOT / "experiments" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
