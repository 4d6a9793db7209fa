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
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

from rlhf_jax import distributed
from rlhf_jax import sharding as sh
from rlhf_jax.errors import ConfigError
from rlhf_jax.run.handover import RUN_CONFIG

# Config fields that may change when a run is resumed (everything else must match).
RESUMABLE_FIELDS = (
    "steps",
    "log_every",
    "checkpoint_every",
    "eval_every",
    "keep",
    "workdir",
    "data_dir",
    # where the processes meet changes between launches (a preempted pod comes back elsewhere)
    "coordinator_address",
    "process_id",
    "distributed",
    "heartbeat_timeout_s",
    "initialization_timeout_s",
)


# How long a silent peer may stay silent before every other process aborts. jax's default is 100 s;
# a shorter one turns a dead host (preempted VM, OOM-killed process) into a clear error on every
# other host quickly, and a longer one tolerates long pauses (a checkpoint to a slow bucket).
DEFAULT_HEARTBEAT_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
    """The multi-host flags every training driver takes (its Config derives from this).

    With none given, `--distributed auto` reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID and otherwise runs as one process. `--distributed detect` lets jax find the
    cluster (TPU VM pods, SLURM, Open MPI: `jax.distributed.initialize()` with no arguments);
    `--distributed off` is one process whatever the environment says. See the README's "Running
    on several hosts".
    """

    distributed: Literal["auto", "detect", "off"] = "auto"  # how the processes find each other
    coordinator_address: str = ""  # host:port of process 0 (every process passes the same)
    num_processes: int = 0  # processes in the run (0: from the environment or detection)
    process_id: int = -1  # this process's index in [0, num_processes) (-1: environment)
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S  # a silent peer aborts the run after
    initialization_timeout_s: int = 300  # how long process 0 waits for all to connect


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
    """Runs `main(sys.argv[1:])`; an input error prints one line "error: ..." on stderr and exits
    with status 2 (no traceback): a `ConfigError`, a bad record (`data.BadRecordError`: its file
    and line), a missing file."""
    from rlhf_jax.data import BadRecordError

    try:
        main(None)
    except ConfigError as e:
        _fail(str(e))
    except BadRecordError as e:
        _fail(
            f"{e.path}:{e.line}: {e.reason} (fix or remove this line, or pass --on-bad-record "
            "skip to skip bad lines with a report)"
        )
    except FileNotFoundError as e:
        _fail(f"{e.filename}: no such file or folder" if e.filename else str(e))


def _fail(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Checks at the door: every range, choice and file of a driver's config, before anything is
# written or sampled.

Rule = tuple[Callable[[Any], bool], str]


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
    "beta": (_positive, "> 0"),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "kl_coef": (_at_least(0), ">= 0"),
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
    "_betas": (_positive, "> 0"),
    "_kl_coefs": (_at_least(0), ">= 0"),
    "_alphas": (_at_least(0), ">= 0"),
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
    from rlhf_jax import paths  # local or cloud (gs://) paths alike

    for name in files:
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
    from rlhf_jax import paths  # local or cloud (gs://) workdirs alike

    new = _json_ready(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config)
    path = paths.as_path(workdir) / RUN_CONFIG
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
    # Atomic: a temporary file renamed into place, or one object upload.
    if distributed.is_primary():
        paths.write_text_atomic(path, json.dumps(new, indent=2, sort_keys=True) + "\n")
    return new


@dataclasses.dataclass(frozen=True)
class MemoryFlags:
    """The model-memory flags every training driver takes (what `experiments/plan.py` tries out
    before a run): remat of the decoder blocks, log-probs over the vocabulary in chunks and the
    blocks as one scan over the layers. They change how the step computes, not what: the
    metrics agree to float32 round-off."""

    remat: Literal["keep", "none", "full", "dots"] = "keep"  # block remat ("keep": the model's)
    logits_chunk: int | None = None  # positions per log-prob chunk (None: whole [B, T, V] logits)
    scan_layers: Literal["keep", "on", "off"] = "keep"  # blocks as one lax.scan over the layers


def memory_config(config: Any, model_config: Any) -> Any:
    """`model_config` with a driver's `MemoryFlags` applied (absent, "keep" or None: as is)."""
    changes = {}
    if getattr(config, "remat", "keep") != "keep":
        changes["remat"] = config.remat
    if getattr(config, "logits_chunk", None) is not None:
        changes["logits_chunk"] = config.logits_chunk
    if getattr(config, "scan_layers", "keep") != "keep":
        changes["scan_layers"] = config.scan_layers == "on"
    return dataclasses.replace(model_config, **changes) if changes else model_config


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


def lora_config(config: Any, model_config: Any) -> Any:
    """The `lora.LoraConfig` of a driver's `--lora-rank` / `--lora-alpha` / `--lora-targets`
    (and `--lora-dropout` where the driver has it; None for `--lora-rank 0`: full fine-tuning),
    checked with `--quantize` against the model's projections before anything is written.

    Raises:
      ConfigError: a bad value, a target pattern that matches no projection, or `--quantize`
        without adapters or for kernels it cannot store, naming the flag.
    """
    from rlhf_jax import lora, models

    quantize = getattr(config, "quantize", "none")
    if not getattr(config, "lora_rank", 0):
        if quantize != "none":
            raise ConfigError(
                f"--quantize {quantize} needs --lora-rank > 0: QLoRA trains adapters on a "
                "quantized, frozen base"
            )
        return None
    try:
        cfg = lora.LoraConfig(
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            targets=config.lora_targets,
            dropout=getattr(config, "lora_dropout", 0.0),
        )
    except ValueError as e:
        raise ConfigError(f"--lora-*: {e}") from None
    abstract = jax.eval_shape(lambda: models.init_params(model_config, jax.random.key(0)))
    try:
        lora.target_modules(abstract, cfg)
    except ValueError as e:
        raise ConfigError(f"--lora-targets: {e}") from None
    if quantize != "none":
        try:
            jax.eval_shape(lambda p: lora.quantize_base(p, quantize), abstract)
        except ValueError as e:
            raise ConfigError(f"--quantize {quantize}: {e}") from None
    return cfg


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
    from rlhf_jax import data

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
