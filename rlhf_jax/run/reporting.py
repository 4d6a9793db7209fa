"""Where a run's metrics and completion samples go besides `metrics.jsonl`: TensorBoard and
Weights & Biases (`--report-to tensorboard wandb`, or `none`).

    reporters = make_reporters(workdir, ("tensorboard", "wandb"), resume_step=0)
    for r in reporters:
        r.log(step, {"loss": 0.5})
        r.log_samples(step, [{"prompt": "...", "completion": "..."}])

`metrics.jsonl` (`run.metrics_writer`) is always written: it is the record a resumed run rewinds and
the tests and notebooks read; the reporters are views of it. Only the primary process reports.

- TensorBoard: event files under `WORKDIR/tensorboard` (a resumed run purges the steps after its
  checkpoint, so the curves hold no lost steps); samples as a markdown table in the TEXT tab. A
  cloud workdir (gs://) gets its event file uploaded whole at each flush.
- W&B (`pip install 'rlhf_jax[wandb]'`): one W&B run per workdir. Its id is kept in
  `WORKDIR/wandb_run_id`, so a resumed run continues the same W&B run (`resume="allow"`); W&B
  keeps the values it already has for steps logged before a kill (a resumed run logs the same
  values again: the runs are deterministic). The project is `$WANDB_PROJECT` (default "rlhf_jax"),
  the run's name the workdir's name, its config the driver's run_config.json. Files go under
  `WORKDIR/wandb/` (WANDB_DIR overrides); `WANDB_MODE=offline` logs locally for `wandb sync`.
  Samples are a `wandb.Table` ("samples").
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import netrc
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_jax import paths
from rlhf_jax.errors import ConfigError

REPORTERS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id"
SAMPLE_COLUMNS = ("step", "prompt", "completion")


@dataclasses.dataclass(frozen=True)
class ReportFlags:
    """The flag of every training driver that says where its metrics go besides metrics.jsonl."""

    report_to: tuple[str, ...] = ("tensorboard",)  # tensorboard and/or wandb, or none


def check_report_to(report_to: Sequence[str], *, flag: str = "--report-to") -> tuple[str, ...]:
    """The reporters of `report_to` (a sequence of names; ("none",) or () for none), checked at
    the door: known names, "none" alone, and for wandb its package and a login (or an offline
    mode).

    Raises:
      ConfigError: one line naming `flag` and what to change.
    """
    names = tuple(report_to)
    unknown = [n for n in names if n not in (*REPORTERS, "none")]
    if unknown:
        raise ConfigError(f"{flag} {unknown[0]}: choose tensorboard and/or wandb, or none")
    if "none" in names:
        if len(names) > 1:
            raise ConfigError(f"{flag} {' '.join(names)}: none stands alone")
        return ()
    if len(set(names)) != len(names):
        raise ConfigError(f"{flag} {' '.join(names)}: a reporter is named twice")
    if "wandb" in names:
        _check_wandb(flag)
    return names


def _check_wandb(flag: str) -> None:
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"{flag} wandb: the wandb package is not installed; pip install 'rlhf_jax[wandb]' "
            "(or pip install wandb)"
        ) from None
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host.split(":")[0]):
            return
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    raise ConfigError(
        f"{flag} wandb: no W&B login found (WANDB_API_KEY, or ~/.netrc from `wandb login`); log "
        "in, or set WANDB_MODE=offline to log locally and `wandb sync` later"
    )


def _scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row except its step (bools and strings are not curves)."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = value
    return out


def samples_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Sample rows as a markdown table (prompt | completion), for TensorBoard's text tab."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| prompt | completion |", "|---|---|"]
    lines += [f"| {cell(r['prompt'])} | {cell(r['completion'])} |" for r in rows]
    return "\n".join(lines)


class TensorBoardReporter:
    """Scalars and sample tables as TensorBoard event files under `WORKDIR/tensorboard`."""

    def __init__(self, workdir: Any, *, resume_step: int | None = 0):
        from tensorboardX import SummaryWriter

        logdir = paths.as_path(workdir) / "tensorboard"
        if paths.is_cloud(logdir):
            _register_cloud_events(os.fspath(logdir))
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(paths.as_str(logdir), purge_step=purge)

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        for key, value in _scalars(row).items():
            self._tb.add_scalar(key, value, global_step=int(step))
        self._tb.flush()

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        self._tb.add_text("samples", samples_markdown(rows), global_step=int(step))
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


class WandbReporter:
    """Scalars and sample tables to one W&B run per workdir (resumed with the workdir)."""

    def __init__(self, workdir: Any, *, resume_step: int | None = 0):
        import wandb

        root = paths.as_path(workdir)
        id_file = root / WANDB_ID_FILE
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            paths.write_text_atomic(id_file, run_id + "\n")
        config_file = root / "run_config.json"  # handover.RUN_CONFIG, written at the door
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        local = None if paths.is_cloud(root) else os.fspath(root)
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "rlhf_jax"),
            name=os.path.basename(os.path.normpath(os.fspath(root))) or None,
            id=run_id,
            resume="allow",
            config=config,
            dir=os.environ.get("WANDB_DIR", local),
            reinit="create_new",
        )
        self._wandb = wandb

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        self._run.log(_scalars(row), step=int(step))

    def log_samples(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        data = [[int(step), r["prompt"], r["completion"]] for r in rows]
        table = self._wandb.Table(columns=list(SAMPLE_COLUMNS), data=data)
        self._run.log({"samples": table}, step=int(step))

    def close(self) -> None:
        self._run.finish()


def make_reporters(
    workdir: Any, report_to: Sequence[str], *, resume_step: int | None = 0
) -> list[Any]:
    """The reporters named in `report_to` (checked names; "none" or () for none)."""
    classes = {"tensorboard": TensorBoardReporter, "wandb": WandbReporter}
    return [classes[n](workdir, resume_step=resume_step) for n in report_to if n != "none"]


# ----------------------------------------------------------------------------------------------
# TensorBoard event files in a bucket.


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
