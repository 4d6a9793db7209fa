"""Checks at the door: every range, choice and file of a driver's config, before anything is
written or sampled.

    validate(config, {"digits": (lambda d: 1 <= d <= 6, "in [1, 6]")}, files=("pairs",))

A field's rule is the driver's own (`rules`), else its exact name in `RANGES`, else a name suffix
in `SUFFIX_RANGES`; the hyperparameters a step reads from its state (beta, label smoothing, the KL
coefficient, unlikelihood's alpha) take their ranges from `train.state.HPARAM_RANGES`, the one
table the library checks them by. Errors are `ConfigError`s naming the flag and what it accepts.
`init_distributed`, `resolve_mesh` and `check_batch` check the processes, the mesh and the batch
split before anything connects or is placed; `read_pairs` reads a driver's preference file at the
door (bad lines: an error naming file and
line, or skipped with a report; too few pairs: an error naming the flag).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from rlhf_jax import data, distributed, paths
from rlhf_jax import sharding as sh
from rlhf_jax.errors import ConfigError
from rlhf_jax.train.state import HPARAM_RANGES

Rule = tuple[Callable[[Any], bool], str]

# How long a silent peer may stay silent before every other process aborts. jax's default is 100 s;
# a shorter one turns a dead host (preempted VM, OOM-killed process) into a clear error on every
# other host quickly, and a longer one tolerates long pauses (a checkpoint to a slow bucket).
DEFAULT_HEARTBEAT_TIMEOUT_S = 60


def _positive(v: Any) -> bool:
    return v > 0


def _at_least(n: int) -> Callable[[Any], bool]:
    return lambda v: v >= n


# Exact field names, then name suffixes: the ranges every driver shares.
RANGES: dict[str, Rule] = {
    "warmup_steps": (_at_least(0), ">= 0"),
    "weight_decay": (_at_least(0), ">= 0"),
    "max_length": (_at_least(2), ">= 2"),
    "max_prompt_length": (_at_least(1), ">= 1"),
    "max_new_tokens": (_at_least(1), ">= 1"),
    "temperature": (_at_least(0), ">= 0"),
    "completions_per_prompt": (_at_least(2), ">= 2"),
    # The hyperparameters a step reads from its state: the ranges `train.state` checks them by.
    **{name: HPARAM_RANGES[name] for name in ("beta", "label_smoothing", "kl_coef")},
    "target_kl": (_positive, "> 0"),
    "kl_horizon": (_positive, "> 0"),
    "ppo_epochs": (_at_least(1), ">= 1"),
    "num_minibatches": (_at_least(1), ">= 1"),
    "ppo_minibatches": (_at_least(1), ">= 1"),
    "eval_batches": (_at_least(0), ">= 0"),
    "n_layers": (_at_least(1), ">= 1"),
    "seed": (_at_least(0), ">= 0"),
    "lora_rank": (_at_least(0), ">= 0 (0: full fine-tuning)"),
    "lora_alpha": (_positive, "> 0"),
    "cpo_alpha": (_at_least(0), ">= 0"),
    "desirable_weight": (_at_least(0), ">= 0"),
    "undesirable_weight": (_at_least(0), ">= 0"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "logits_chunk": (_at_least(1), ">= 1 (leave it out: the whole [B, T, V] at once)"),
    "microbatches": (_at_least(1), ">= 1"),
}
SUFFIX_RANGES: dict[str, Rule] = {
    "steps": (_at_least(1), ">= 1"),
    "batch_size": (_at_least(1), ">= 1"),
    "learning_rate": (_positive, "> 0"),
    "_lr": (_positive, "> 0"),
    "_every": (_at_least(1), ">= 1"),
    "_prompts": (_at_least(1), ">= 1"),
    "_betas": HPARAM_RANGES["beta"],  # a sweep's values, each checked like the one value
    "_kl_coefs": HPARAM_RANGES["kl_coef"],
    "_alphas": HPARAM_RANGES["alpha"],
    "_ns": (_at_least(1), ">= 1"),
    "_thresholds": (_positive, "> 0"),
    "d_model": (_at_least(1), ">= 1"),
    "n_heads": (_at_least(1), ">= 1"),
}


def flag(name: str) -> str:
    """The command-line flag of a config field: `warmup_steps` -> `--warmup-steps`."""
    return "--" + name.replace("_", "-")


def _rule(name: str, rules: Mapping[str, Rule]) -> Rule | None:
    if name in rules:
        return rules[name]
    if name in RANGES:
        return RANGES[name]
    for suffix, rule in SUFFIX_RANGES.items():
        if name == suffix.lstrip("_") or name.endswith(suffix):
            return rule
    return None


def validate(
    config: Any,
    rules: Mapping[str, Rule] | None = None,
    *,
    files: Sequence[str] = (),
) -> None:
    """Checks a driver's config before it writes or samples anything.

    Every field with a rule (`rules`, then `RANGES`, then `SUFFIX_RANGES`; for a tuple field each
    entry) must satisfy it, `Literal` fields must hold one of their values, `warmup_steps` must be
    below `steps`, and each field named in `files` (when set) must be an existing path.

    Raises:
      ConfigError: the first violation, e.g. "--beta -1.0: must be > 0".
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        name, value = field.name, getattr(config, field.name)
        if value is None:
            continue
        choices = _literal_choices(hints.get(name))
        if choices and value not in choices:
            raise ConfigError(
                f"{flag(name)} {value!r}: choose one of {', '.join(map(str, choices))}"
            )
        rule = _rule(name, rules or {})
        numeric = isinstance(value, int | float | tuple | list) and not isinstance(value, bool)
        if rule is None or not (numeric or name in (rules or {})):
            continue  # the shared ranges are about numbers; a driver's own rules apply to any
        ok, accepted = rule
        for v in value if isinstance(value, tuple | list) else (value,):
            if not ok(v):
                shown = value if isinstance(value, tuple | list) else v
                raise ConfigError(f"{flag(name)} {shown}: must be {accepted}")
        if isinstance(value, tuple | list) and not value:
            raise ConfigError(f"{flag(name)}: give at least one value")
    steps, warmup = getattr(config, "steps", None), getattr(config, "warmup_steps", None)
    if steps is not None and warmup is not None and warmup >= steps:
        raise ConfigError(f"--warmup-steps {warmup}: must be < --steps ({steps})")
    for name in files:  # local or cloud (gs://) paths alike
        path = getattr(config, name)
        try:
            found = not path or paths.as_path(path).exists()
        except (ValueError, ImportError) as e:  # an unknown URL scheme, no gcsfs for gs://
            raise ConfigError(f"{flag(name)} {path}: {e}") from None
        if not found:
            raise ConfigError(f"{flag(name)} {path}: no such file or folder")


def _literal_choices(hint: Any) -> tuple[Any, ...]:
    """The values of a `Literal[...]` hint (also inside `X | None`), else ()."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    for arg in typing.get_args(hint):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return ()


def init_distributed(config: Any) -> bool:
    """Joins the run's processes from a driver's `DistributedFlags` (fields absent: environment
    only); call it after `validate` and before anything touches a device or writes.

    Returns:
      True when `jax.distributed` is initialized (several processes or detection).
    Raises:
      ConfigError: a bad flag or combination, naming it (checked before any connection).
    """
    mode = getattr(config, "distributed", "auto")
    address = getattr(config, "coordinator_address", "") or None
    count = getattr(config, "num_processes", 0) or None
    index = getattr(config, "process_id", -1)
    index = None if index is None or index < 0 else index
    given = [
        flag(n) for n, v in
        (("coordinator_address", address), ("num_processes", count), ("process_id", index))
        if v is not None
    ]  # fmt: skip
    if mode == "off":
        if given:
            raise ConfigError(f"{', '.join(given)} given with --distributed off: drop one of them")
        return False
    if address is not None:
        host, sep, port = address.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                f"--coordinator-address {address!r}: must be HOST:PORT (e.g. 10.0.0.2:8476)"
            )
    if count is not None and count < 1:
        raise ConfigError(f"--num-processes {count}: must be >= 1")
    if count is not None and index is not None and index >= count:
        raise ConfigError(f"--process-id {index}: must be < --num-processes ({count})")
    for name in ("heartbeat_timeout_s", "initialization_timeout_s"):
        if getattr(config, name, 1) < 1:
            raise ConfigError(f"{flag(name)} {getattr(config, name)}: must be >= 1")
    try:
        return distributed.init_distributed(
            address,
            count,
            index,
            heartbeat_timeout_s=getattr(config, "heartbeat_timeout_s", DEFAULT_HEARTBEAT_TIMEOUT_S),
            initialization_timeout_s=getattr(config, "initialization_timeout_s", 300),
            cluster_detection=mode == "detect",
        )
    except ValueError as e:
        raise ConfigError(f"{e} (--coordinator-address / --num-processes / --process-id)") from None


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


def check_batch(
    batch_size: int, mesh: jax.sharding.Mesh, *, name: str = "batch_size", microbatches: int = 1
) -> int:
    """Checks that the global `batch_size` splits over the mesh's batch axes and the hosts (and,
    with `microbatches` K > 1, that each of the K microbatches still splits over the mesh).

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
    rows = sh.process_batch_rows(batch_size, mesh)
    mine = batch_size // jax.process_count()
    start = jax.process_index() * mine
    if not np.array_equal(rows, np.arange(start, start + mine)):
        # The loaders give host i the i-th block of each global batch (`data.make_dataset`).
        raise ConfigError(
            f"--mesh: this host's devices hold rows other than block {jax.process_index()} of "
            "the batch (the mesh does not list the hosts' devices in order); build the mesh "
            "over jax.devices() in their order"
        )
    if microbatches > 1:
        try:
            if batch_size % microbatches:
                raise ValueError(f"batch size {batch_size} is not divisible by {microbatches}")
            sh.check_batch_divisible(batch_size // microbatches, mesh)
        except ValueError as e:
            raise ConfigError(
                f"--microbatches {microbatches}: each microbatch must split over the mesh "
                f"({e}); choose a divisor of --{name.replace('_', '-')} {batch_size} that leaves "
                "whole rows per device"
            ) from None
    return batch_size // jax.process_count()


def read_pairs(
    path: str | os.PathLike,
    on_bad_record: str = "error",
    *,
    at_least: int = 1,
    flag_name: str = "--pairs",
) -> list[Any]:
    """Reads a preference JSONL for a driver: bad lines raise `data.BadRecordError` (file:line)
    or, with on_bad_record="skip", are skipped with one printed line (how many, first line
    numbers); fewer than `at_least` records is a ConfigError naming the flag and the numbers."""
    records, report = data.read_jsonl_records(path, "preference", on_bad_record=on_bad_record)
    if report.num_skipped:
        first = ", ".join(map(str, report.skipped_lines[:5]))
        more = ", ..." if report.num_skipped > 5 else ""
        print(f"{flag_name} {path}: skipped {report.num_skipped} bad lines (lines {first}{more})")
    if len(records) < at_least:
        raise ConfigError(
            f"{flag_name} {path}: {len(records)} valid pairs, fewer than the {at_least} needed "
            "(one batch of --batch-size; give more pairs or a smaller --batch-size)"
        )
    return records
