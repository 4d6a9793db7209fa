"""The command line of every driver: presets and flags, the run configuration, input checks.

    config = parse_config(Config, PRESETS, argv)     # --preset NAME + tyro flags
    validate(config, RULES)                          # every range, file and choice, first
    mesh = resolve_mesh(config.mesh)                 # "impossible mesh for N devices"
    local_batch = check_batch(config.batch_size, mesh)
    write_run_config(config.workdir, config)         # only now: resume only with the same run

Errors a user can fix from the command line are `ConfigError`s (one line that names the flag or
file and what to change); `run_cli` prints them, and bad records / missing files / too little
data, as one line on stderr and exits with status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from rlhf_jax import sharding as sh

RUN_CONFIG = "run_config.json"
# Config fields that may change when a run is resumed (everything else must match).
RESUMABLE_FIELDS = (
    "steps",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "keep",
    "workdir",
    "data_dir",
)


class ConfigError(ValueError):
    """A bad configuration, with a message that says what to change."""


def parse_config(
    config_cls: type,
    presets: Mapping[str, Any],
    argv: Sequence[str] | None = None,
    *,
    default_preset: str = "default",
    description: str | None = None,
) -> Any:
    """`--preset NAME` picks the defaults from `presets`; every other flag overrides a field (tyro).

    Args:
      config_cls: the driver's frozen config dataclass.
      presets: name -> config instance.
      argv: the arguments (default `sys.argv[1:]`).
      default_preset: the preset used when `--preset` is absent.
      description: the `--help` text (the driver's docstring).
    Returns:
      The config.
    Raises:
      ConfigError: an unknown preset, naming the known ones.
    """
    import tyro

    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset", default=default_preset)
    known, rest = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if known.preset not in presets:
        raise ConfigError(
            f"unknown preset {known.preset!r}; choose one of: {', '.join(presets)} (--preset NAME)"
        )
    text = (description or "") + f"\n\nPresets (--preset NAME): {', '.join(presets)}."
    return tyro.cli(config_cls, default=presets[known.preset], args=rest, description=text)


def run_cli(main: Callable[[Sequence[str] | None], Any]) -> None:
    """Runs `main(sys.argv[1:])`; a `ConfigError` prints "error: ..." and exits with status 2."""
    try:
        main(None)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def write_run_config(
    workdir: str | os.PathLike,
    config: Any,
    *,
    resumable: Sequence[str] = RESUMABLE_FIELDS,
) -> dict[str, Any]:
    """Writes `WORKDIR/run_config.json`; refuses to resume a run that was configured differently.

    Args:
      workdir: the run directory.
      config: a dataclass instance (or a dict).
      resumable: fields that may differ from the stored config (steps-like ones).
    Returns:
      The config as written (JSON values).
    Raises:
      ConfigError: the workdir holds a run whose config differs in other fields (named).
    """
    new = _json_ready(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config)
    path = Path(workdir) / RUN_CONFIG
    if path.exists():
        old = json.loads(path.read_text())
        diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        fixed = [k for k in diff if k not in resumable]
        if fixed:
            changes = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fixed)
            raise ConfigError(
                f"{workdir} holds a run with a different configuration ({changes}); use another "
                f"--workdir, or the stored settings (only {', '.join(resumable)} may change when "
                "a run is resumed)"
            )
    if sh.is_primary():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    return new


def resolve_mesh(spec: str) -> jax.sharding.Mesh:
    """The ("data", "fsdp", "tensor") mesh of a `--mesh` spec such as "data=2,fsdp=4,tensor=1".

    Axes left out default to data=-1 (all remaining devices), fsdp=1, tensor=1; the mesh always
    spans all devices.
    Raises:
      ConfigError: "impossible mesh for N devices: ..." with what would work.
    """
    n = jax.device_count()
    try:
        return sh.make_mesh(**sh.parse_mesh_spec(spec))
    except ValueError as e:
        raise ConfigError(f"impossible mesh for {n} devices: {e} (--mesh)") from None


def check_batch(batch_size: int, mesh: jax.sharding.Mesh, *, name: str = "batch_size") -> int:
    """Checks that the global `batch_size` splits over the mesh's batch axes and the hosts.

    Returns:
      The number of rows each host loads (`batch_size // jax.process_count()`).
    Raises:
      ConfigError: saying which multiple to choose.
    """
    try:
        sh.check_batch_divisible(batch_size, mesh)
    except ValueError as e:
        raise ConfigError(f"--{name.replace('_', '-')}: {e}") from None
    if batch_size % jax.process_count():
        raise ConfigError(
            f"--{name.replace('_', '-')} {batch_size} is not divisible by the "
            f"{jax.process_count()} processes"
        )
    return batch_size // jax.process_count()


def default_data_dir(anchor: str | os.PathLike) -> str:
    """`$RLHF_JAX_DATA`, else `data/` in the repository holding `anchor` (a driver's __file__)."""
    return os.environ.get("RLHF_JAX_DATA") or str(Path(anchor).resolve().parents[1] / "data")
