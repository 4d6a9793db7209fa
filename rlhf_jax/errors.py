"""Errors and argument checks every floor shares (a base module: it imports nothing of the package).

ConfigError          a bad configuration: one line that names the flag, file or field and what
                     to change (`run.cli.run_cli` prints it and exits with status 2)
check_positive       ValueError for a host-side number <= 0 (traced values pass)
check_choice         ValueError naming the accepted values
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ConfigError(ValueError):
    """A bad configuration, with a message that says what to change."""


def concrete(x: Any) -> float | None:
    """The value of a host-side number (Python/NumPy), or None for jax arrays (maybe traced)."""
    if isinstance(x, (int, float, np.number)) or (isinstance(x, np.ndarray) and x.ndim == 0):
        return float(x)
    return None


def check_positive(name: str, x: Any) -> None:
    """Raise ValueError if `x` is a host-side number <= 0; traced values are not checked."""
    v = concrete(x)
    if v is not None and not v > 0:
        raise ValueError(f"{name} must be > 0 (accepted values: {name} > 0), got {x!r}")


def check_choice(name: str, value: str, accepted: tuple[str, ...]) -> None:
    """Raise ValueError naming the accepted values if `value` is not one of them."""
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted values: {', '.join(accepted)}")
