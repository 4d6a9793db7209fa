"""Metrics to `WORKDIR/metrics.jsonl` (and the reporters of `run.reporting`: TensorBoard, W&B),
completion samples to `WORKDIR/samples.jsonl`, resumable.

One JSON object per logged step (always with `step`), appended and flushed at each write so a
killed run loses nothing it reported. On resume from a checkpoint at step S, the rows after S are
dropped (they belong to the lost part of the run and will be written again), so a resumed run's file
is identical to an uninterrupted one.

The workdir may be local or a cloud URL (gs://..., `rlhf_jax.paths`). There an object cannot be
appended: each row rewrites metrics.jsonl whole from the rows kept in memory (one atomic upload).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from rlhf_jax import paths
from rlhf_jax.run import reporting

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


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


def read_metrics(workdir: str | os.PathLike, file: str = METRICS_FILE) -> list[dict[str, Any]]:
    """Reads every row of `WORKDIR/metrics.jsonl` (or `file`, e.g. `SAMPLES_FILE`; an empty list
    when there is none)."""
    path = paths.as_path(workdir) / file
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
    """Appends scalar metrics to `metrics.jsonl` and the reporters; only the primary process writes.

    Args:
      workdir: the run directory.
      resume_step: the step of the checkpoint the run resumed from; rows with a larger step are
        removed from metrics.jsonl and samples.jsonl (None keeps every row, 0 or a fresh run
        starts empty).
      enabled: False on non-primary processes of a multi-host run.
      report_to: reporter names of `run.reporting` ("tensorboard", "wandb"; () for none), checked
        (`reporting.check_report_to`).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        resume_step: int | None = 0,
        enabled: bool = True,
        report_to: Sequence[str] = ("tensorboard",),
    ):
        self.workdir = paths.as_path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.samples_path = self.workdir / SAMPLES_FILE
        self.enabled = enabled
        self._reporters: list[Any] = []
        self._file = self._samples = None
        self._resume_step = resume_step
        if not enabled:
            return
        report_to = reporting.check_report_to(report_to, flag="report_to")
        self.workdir.mkdir(parents=True, exist_ok=True)
        kept = _rows_up_to(self.path, resume_step)
        self._file = paths.JsonlAppender(self.path, kept)  # atomic: the old or the new file
        if self.samples_path.exists():  # a resumed run: drop the samples of the lost steps
            self._open_samples()
        self._reporters = reporting.make_reporters(workdir, report_to, resume_step=resume_step)

    def _open_samples(self) -> None:
        kept = _rows_up_to(self.samples_path, self._resume_step)
        self._samples = paths.JsonlAppender(self.samples_path, kept)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Writes one row `{"step": step, **metrics}` and returns it (as python numbers)."""
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in metrics.items()})
        if not self.enabled:
            return row
        self._file.append(row)
        for reporter in self._reporters:
            reporter.log(int(step), row)
        return row

    def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        """Appends completion samples (`{"prompt", "completion", ...}` each) to samples.jsonl as
        `{"step": step, ...}` rows and shows them in the reporters."""
        if not self.enabled:
            return
        if self._samples is None:  # opened on first use: runs without samples write no file
            self._open_samples()
        rows = [{"step": int(step), **s} for s in samples]
        for row in rows:
            self._samples.append(row)
        for reporter in self._reporters:
            reporter.log_samples(int(step), rows)

    def close(self) -> None:
        for reporter in self._reporters:
            reporter.close()
        self._reporters = []

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
