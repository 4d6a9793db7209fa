"""Metrics to `WORKDIR/metrics.jsonl` and TensorBoard event files, resumable.

One JSON object per logged step (always with `step`), appended and flushed at each write so a
killed run loses nothing it reported. On resume from a checkpoint at step S, the rows after S are
dropped (they belong to the lost part of the run and will be written again), so a resumed run's file
is identical to an uninterrupted one.

The workdir may be local or a cloud URL (gs://..., `rlhf_jax.paths`). There an object cannot be
appended: each row rewrites metrics.jsonl whole from the rows kept in memory (one atomic upload),
and the TensorBoard event file is buffered and uploaded whole at each flush, through the same
paths (tensorboardX's writer for that URL scheme is replaced by one on `etils.epath`).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from rlhf_jax import paths

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
    path = paths.as_path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rows_up_to(path: epath.Path, step: int | None) -> list[dict[str, Any]]:
    """The rows of `path` with "step" <= `step` (all when None), up to a line cut by a kill."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if step is None or row["step"] <= step:
            rows.append(row)
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
        self.workdir = paths.as_path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.enabled = enabled
        self._tb = None
        self._file = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        kept = _rows_up_to(self.path, resume_step)
        self._file = paths.JsonlAppender(self.path, kept)  # atomic: the old or the new file
        if tensorboard:
            from tensorboardX import SummaryWriter

            logdir = self.workdir / "tensorboard"
            if paths.is_cloud(logdir):
                _register_cloud_events(os.fspath(logdir))
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(paths.as_str(logdir), purge_step=purge)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Writes one row `{"step": step, **metrics}` and returns it (as python numbers)."""
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        self._file.append(row)
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


class _CloudEventFile:
    """A TensorBoard event file at a cloud path: buffered, and the whole object uploaded at each
    flush (objects cannot be appended; as tensorboardX's own gs:// writer does)."""

    def __init__(self, path: str):
        self.path = paths.as_path(path)
        self._buffer = io.BytesIO()
        self._dirty = False

    def write(self, data: bytes) -> None:
        self._buffer.write(data)
        self._dirty = True

    def flush(self) -> None:
        if self._dirty:
            self.path.write_bytes(self._buffer.getvalue())
            self._dirty = False

    def close(self) -> None:
        self.flush()


class _CloudEventFiles:
    """tensorboardX's writer factory for one URL scheme, on `rlhf_jax.paths`."""

    def open(self, path: str) -> _CloudEventFile:
        return _CloudEventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no folders to create


def _register_cloud_events(logdir: str) -> None:
    from tensorboardX import record_writer

    record_writer.register_writer_factory(logdir.split("://", 1)[0], _CloudEventFiles())
