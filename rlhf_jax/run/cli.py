"""The command line of every training driver: presets and flags, the start-up it shares, the run
configuration.

    config = parse_config(Config, PRESETS, argv)         # --preset NAME + tyro flags
    start = prepare_init(config, task=..., max_length=...)  # every check, nothing written yet
    ...                                                   # the driver's own checks (read --pairs)
    write_run_config(config.workdir, config)             # only now: resume only with the same run
    params = start.load_params()                          # --init-from's weights, or a random init

A driver's Config derives from the flag mixins it takes (`DistributedFlags`, `MemoryFlags`,
`LoraFlags`); `prepare_init` reads them. Errors a user can fix from the command line are
`ConfigError`s (one line that names the flag or file and what to change; the range table is
`run.checks`); `run_cli` prints them, and bad records / missing files / too little data, as one
line on stderr and exits with status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax

from rlhf_jax import data, distributed, lora, models, paths
from rlhf_jax.errors import ConfigError
from rlhf_jax.run import checks, handover, reporting
from rlhf_jax.run.checks import (
    DEFAULT_HEARTBEAT_TIMEOUT_S,
    check_batch,
    init_distributed,
    resolve_mesh,
)
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


@dataclasses.dataclass(frozen=True)
class DistributedFlags:
    """The multi-host flags every training driver takes (its Config derives from this).

    With none given, `--distributed auto` reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID and otherwise runs as one process. `--distributed detect` lets jax find the
    cluster (TPU VM pods, SLURM, Open MPI: `jax.distributed.initialize()` with no arguments);
    `--distributed off` is one process whatever the environment says. See docs/pods.md.
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
    try:
        main(None)
    except ConfigError as e:
        _fail(str(e))
    except data.BadRecordError as e:
        _fail(
            f"{e.path}:{e.line}: {e.reason} (fix or remove this line, or pass --on-bad-record "
            "skip to skip bad lines with a report)"
        )
    except FileNotFoundError as e:
        _fail(f"{e.filename}: no such file or folder" if e.filename else str(e))


def _fail(message: str) -> None:
    print("error: " + " ".join(message.split()), file=sys.stderr)
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


@dataclasses.dataclass(frozen=True)
class LoraFlags:
    """The LoRA / QLoRA flags every training driver takes (`lora_config` builds the adapters'
    config from them; see docs/lora.md). With --lora-rank R only adapters of rank R train on the
    frozen starting model, which is also the reference (adapters off): one copy of the base."""

    lora_rank: int = 0  # LoRA adapters of this rank on the frozen model (0: full fine-tuning)
    lora_alpha: float = 16.0  # the adapters' scale is alpha / rank
    lora_targets: str = lora.DEFAULT_TARGETS  # regex over projection paths (layers_0/attn/q)
    lora_dropout: float = 0.0  # dropout on the adapters' input while training
    quantize: Literal["none", "int8", "nf4"] = "none"  # QLoRA: the frozen base stored quantized


# The on-policy methods (PPO, critic-free) sample from the policy they train: LoRA dropout would
# make the sampled and the trained policy differ (the library refuses it: `lora.check_no_dropout`).
ON_POLICY_RULES: dict[str, checks.Rule] = {
    "lora_dropout": (
        lambda v: v == 0,
        "0 for the on-policy methods (they sample the policy they train)",
    ),
}


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


def lora_config(config: Any, model_config: Any) -> Any:
    """The `lora.LoraConfig` of a driver's `LoraFlags` (None for `--lora-rank 0`: full fine-tuning),
    checked with `--quantize` against the model's projections before anything is written.

    Raises:
      ConfigError: a bad value, a target pattern that matches no projection, or `--quantize`
        without adapters or for kernels it cannot store, naming the flag.
    """
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


@dataclasses.dataclass(frozen=True)
class Start:
    """What a training driver starts from, resolved and checked at the door by `prepare_init`.

    Attributes:
      mesh: the device mesh of `--mesh`.
      model_config: the model's config (of `--init-from`, or the random init's), the memory flags
        applied.
      lora: the adapters' config of the `LoraFlags` (None: full fine-tuning).
      init_from: the `--init-from` path (None: a random init), `init_folder` the HF folder it
        resolved to.
      task: the offline task the driver trains on (None without one).
      tokenizer: the model's tokenizer: `--init-from`'s own, else the task's (None: neither).
      seed: the random init's seed.
    """

    mesh: jax.sharding.Mesh
    model_config: models.TransformerConfig
    lora: lora.LoraConfig | None = None
    init_from: str | None = None
    init_folder: Any = None
    task: Any = None
    tokenizer: Any = None
    seed: int = 0

    @property
    def base_model(self) -> str | None:
        """The HF folder `--init-from` resolved to, absolute (a LoRA adapter's base, loadable from
        any working directory); None: a random init."""
        if self.init_folder is None:
            return None
        folder = str(self.init_folder)
        return folder if "://" in folder else os.path.abspath(folder)

    def load_params(self) -> Any:
        """The initial parameters: `--init-from`'s (float32 NumPy), else a random init of
        `model_config` from `seed`. Call it after `write_run_config`: it reads the weights."""
        if self.init_from is None:
            return models.init_params(self.model_config, jax.random.key(self.seed))
        _, params = handover.load_init_params(self.init_from)
        return params


def prepare_init(
    config: Any,
    *,
    required: str | None = None,
    random_init: Callable[[Any], models.TransformerConfig] | None = None,
    task: Callable[[], Any] | None = None,
    tokenizer_of: Callable[[Any], Any] | None = data.task_tokenizer,
    max_length: int | None = None,
    rules: Mapping[str, checks.Rule] | None = None,
    files: Sequence[str] = (),
    batch_fields: Sequence[str] = ("batch_size",),
    check: Callable[[models.TransformerConfig], None] | None = None,
    task_data: bool = True,
) -> Start:
    """The start-up every training driver shares, in this order and before anything is written:

    1. every range, choice and file of `config` (`checks.validate` with `rules`, `files`);
    2. `--init-from` resolved to an HF folder or a finished stage's workdir (required unless
       `random_init` is given; `required` is the error without it);
    3. the processes joined (`DistributedFlags`), the mesh built and each of `batch_fields` split
       over it (and over `--microbatches`);
    4. the offline `task()` loaded (a zero-argument callable, so that a bad flag is reported
       before the task is prepared) and its tokenizer, `tokenizer_of(task)` (the offline
       sentiment task's by default; None: the model is not checked against a tokenizer);
    5. the tokenizer: `--init-from`'s own when its folder has one (`tokenizer.json` and its
       `tokenizer_config.json`: special tokens, chat template), else the task's; with
       `task_data` (the run trains on the task's token ids) a model whose tokenizer is not the
       task's is refused;
    6. the model's config, from `--init-from`'s config.json (a supported `model_type`) or
       `random_init(tokenizer)`, checked against the tokenizer and `max_length`
       (`handover.check_model`) and by `check`;
    7. the memory flags applied once (`MemoryFlags`), the LoRA config built and checked
       (`LoraFlags`).

    `max_length` is the tokens per row the model must hold (default: the larger of the config's
    `max_length` and `max_prompt_length + max_new_tokens`, of those it has).

    Returns:
      The `Start`; `Start.load_params()` reads the weights once the workdir is written.
    Raises:
      ConfigError: the first problem, naming the flag or file and what to change.
    """
    checks.validate(config, rules, files=files)
    if hasattr(config, "report_to"):
        reporting.check_report_to(config.report_to)
    init_from = getattr(config, "init_from", None) or None
    if init_from is None and random_init is None:
        raise ConfigError(required or "pass --init-from (an HF model folder or a stage's workdir)")
    folder = None if init_from is None else handover.resolve_init_folder(init_from)
    init_distributed(config)
    mesh = resolve_mesh(getattr(config, "mesh", "data=-1"))
    for name in batch_fields:
        check_batch(
            getattr(config, name), mesh, name=name, microbatches=getattr(config, "microbatches", 1)
        )
    loaded = None if task is None else task()
    tokenizer = None if loaded is None or tokenizer_of is None else tokenizer_of(loaded)
    own = None if folder is None else _folder_tokenizer(init_from, folder)
    if own is not None and task_data and loaded is not None:
        if tokenizer is None or not own.same_as(tokenizer):
            raise ConfigError(
                f"--init-from {init_from}: its tokenizer (vocabulary {own.vocab_size}) is not the "
                "offline task's, and this run trains on the task's token ids; start from a model "
                "trained on this task"
                + (", or give the data as text" if "pairs" in _fields(config) else "")
            )
    tokenizer = own or tokenizer
    if init_from is None:
        model_config = random_init(tokenizer)
    else:
        try:
            model_config = handover.init_config(init_from)
        except ValueError as e:  # an unsupported model_type, a config.json it cannot read
            raise ConfigError(f"--init-from {init_from}: {e}") from None
    if tokenizer is not None:
        handover.check_model(
            model_config, tokenizer, max_length=max_length or _row_length(config),
            tokenizer_name="the task tokenizer" if own is None else f"{init_from}'s tokenizer",
        )  # fmt: skip
    if check is not None:
        check(model_config)
    model_config = memory_config(config, model_config)
    return Start(
        mesh=mesh,
        model_config=model_config,
        lora=lora_config(config, model_config),
        init_from=None if init_from is None else str(init_from),
        init_folder=folder,
        task=loaded,
        tokenizer=tokenizer,
        seed=getattr(config, "seed", 0),
    )


def _fields(config: Any) -> set[str]:
    return (
        {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    )


def _folder_tokenizer(init_from: Any, folder: Any) -> Any:
    """The tokenizer an `--init-from` folder brings (None: it has no tokenizer files)."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return None
    try:
        return data.load_tokenizer(folder)
    except ValueError as e:  # no end-of-sequence token, a special token not in the vocabulary
        raise ConfigError(f"--init-from {init_from}: its tokenizer: {e}") from None


def _row_length(config: Any) -> int:
    """The longest row a driver's config asks the model to read."""
    prompt, new = getattr(config, "max_prompt_length", 0), getattr(config, "max_new_tokens", 0)
    return max(getattr(config, "max_length", 0), prompt + new)
