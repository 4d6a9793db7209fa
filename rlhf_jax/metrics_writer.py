"""Metrics to `WORKDIR/metrics.jsonl` and TensorBoard event files, resumable.

One JSON object per logged step (always with `step`), appended and flushed at each write so a
killed run loses nothing it reported. On resume from a checkpoint at step S, the rows after S are
dropped (they belong to the lost part of the run and will be written again), so a resumed run's file
is identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"


def _to_python(value: Any) -> Any:
    """Turns scalars (numpy, jax, python) into JSON-able python numbers; NaN/Inf stay floats."""
    if isinstance(value, str | bool | int) or value is None:
        return value
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"metrics must be scalars, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        return int(arr)
    if np.issubdtype(arr.dtype, np.bool_):
        return bool(arr)
    return float(arr)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads every row of `WORKDIR/metrics.jsonl` (an empty list when there is none)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    with path.open() as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


class MetricsWriter:
    """Appends scalar metrics to `metrics.jsonl` and TensorBoard; only the primary process writes.

    Args:
      workdir: the run directory.
      resume_step: the step of the checkpoint the run resumed from; rows with a larger step are
        removed from metrics.jsonl (None keeps every row, 0 or a fresh run starts empty).
      enabled: False on non-primary processes of a multi-host run.
      tensorboard: also write TensorBoard event files under `WORKDIR/tensorboard`.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        resume_step: int | None = 0,
        enabled: bool = True,
        tensorboard: bool = True,
    ):
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            kept = [row for row in read_metrics(workdir) if row["step"] <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            with tmp.open("w") as f:
                for row in kept:
                    f.write(json.dumps(row) + "\n")
            os.replace(tmp, self.path)  # atomic: a crash leaves the old or the new file
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Writes one row `{"step": step, **metrics}` and returns it (as python numbers)."""
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        line = json.dumps(row, allow_nan=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    if math.isfinite(value):
                        self._tb.add_scalar(key, value, global_step=int(step))
            self._tb.flush()
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
