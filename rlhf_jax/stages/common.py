"""What every stage shares: its `Schedule` (steps, batch, learning rate, intervals) and the
loaders of the offline task's preference and prompt batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import optax

from rlhf_jax import data as rdata
from rlhf_jax import distributed, paths, train
from rlhf_jax import lora as lora_lib
from rlhf_jax.lora import peft as peft_io
from rlhf_jax.run import handover

ADAPTER_DIR = "adapter"  # a LoRA run's adapters in PEFT's format


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How long and how fast a stage trains, and how often it logs, evaluates and checkpoints.

    Attributes:
      steps: updates (>= 1).
      batch_size: global rows per update, over all devices and hosts (>= 1).
      learning_rate: peak AdamW learning rate (> 0).
      warmup_steps: linear warmup (0 <= warmup_steps < steps when `decay`).
      decay: decay linearly to 0 at `steps` (False: constant after warmup).
      weight_decay: decoupled weight decay (>= 0).
      log_every, checkpoint_every: intervals in steps (>= 1).
      eval_every: evaluation interval (None: at the last step only, when there is an evaluation).
      microbatches: gradient accumulation inside the one compiled step (`train.make_step`): the
        batch is split into that many consecutive microbatches (it must divide `batch_size`).
      report_to: where metrics go besides metrics.jsonl (`run.reporting`: "tensorboard",
        "wandb"; () or ("none",) for none).
    """

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 0
    decay: bool = True
    weight_decay: float = 0.0
    log_every: int = 10
    checkpoint_every: int = 100
    eval_every: int | None = None
    microbatches: int = 1
    report_to: tuple[str, ...] = ("tensorboard",)

    def __post_init__(self):
        checks = [
            ("steps", self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("warmup_steps", 0 <= self.warmup_steps, ">= 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("eval_every", self.eval_every is None or self.eval_every >= 1, ">= 1 (or None)"),
            ("microbatches", self.microbatches >= 1, ">= 1"),
            ("microbatches", self.batch_size % max(self.microbatches, 1) == 0,
             f"a divisor of batch_size {self.batch_size}"),
        ]  # fmt: skip
        if self.decay:
            checks.append(("warmup_steps", self.warmup_steps < self.steps, "< steps"))
        for name, ok, accepted in checks:
            if not ok:
                raise ValueError(f"{name} must be {accepted}, got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> Schedule:
        """The schedule of a driver config: its fields of the same names (those it has), then
        `overrides`."""
        names = [f.name for f in dataclasses.fields(cls)]
        found = {n: getattr(config, n) for n in names if hasattr(config, n)}
        return cls(**{**found, **overrides})

    def optimizer(self) -> optax.GradientTransformation:
        """AdamW with clipping, warmup and (with `decay`) a linear decay to 0 at `steps`."""
        return train.make_optimizer(
            self.learning_rate,
            warmup_steps=self.warmup_steps,
            total_steps=self.steps if self.decay else None,
            weight_decay=self.weight_decay,
        )

    @property
    def local_batch_size(self) -> int:
        """Rows this host loads per step (the global batch split over the processes)."""
        return self.batch_size // jax.process_count()

    def fit_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `runner.fit` this schedule sets."""
        return {
            "steps": self.steps,
            "log_every": self.log_every,
            "checkpoint_every": self.checkpoint_every,
            "eval_every": self.eval_every,
            "report_to": tuple(self.report_to),
        }


def check_vocab(cfg: Any, tokenizer: Any, *, name: str = "tokenizer") -> None:
    """Raises a ValueError, naming the arguments, when the model of `cfg` has no embedding row for
    some id of `tokenizer` (out-of-range ids would give NaN logits, not an error)."""
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{name} has {tokenizer.vocab_size} ids but cfg.vocab_size is {cfg.vocab_size}: the "
            f"model's embedding has no row for ids >= {cfg.vocab_size}; pass the tokenizer the "
            "model was trained with (or a cfg whose vocab_size holds every id)"
        )


def preference_loader(
    records: Sequence[Any],
    tokenizer: rdata.Tokenizer,
    *,
    batch_size: int,
    max_length: int,
    max_prompt_length: int,
    seed: int,
) -> Any:
    """A resumable loader of fixed-shape preference batches over `records` (reshuffled every
    epoch with `seed`), `batch_size` rows on this host."""
    return rdata.task_loaders(
        None,
        "preference",
        records=records,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        seed=seed,
    )


def prompt_loader(task: Any, *, batch_size: int, max_prompt_length: int, seed: int) -> Any:
    """A resumable loader of the task's training prompts, LEFT-padded to `max_prompt_length`."""
    return rdata.task_loaders(
        task,
        "prompt",
        batch_size=batch_size,
        max_length=max_prompt_length + 1,
        max_prompt_length=max_prompt_length,
        seed=seed,
    )


def save_adapted(
    workdir: Any,
    cfg: Any,
    base: Any,
    adapters: Any,
    lora: Any,
    tokenizer: Any = None,
    base_model: str | None = None,
) -> Any:
    """A LoRA run's hand-over: the adapters in PEFT's format (`WORKDIR/adapter/`, naming
    `base_model` as their base) and the merged model (`WORKDIR/hf/`, a quantized base dequantized
    first); returns the merged params."""
    merged = lora_lib.merge(base, adapters, lora)
    adapters = distributed.to_host(adapters)  # every process: a collective when they span hosts
    if distributed.is_primary():
        peft_io.save_peft(
            str(paths.as_path(workdir) / ADAPTER_DIR), cfg, adapters, lora,
            base_model_name_or_path=base_model,
        )  # fmt: skip
    handover.save_lm(workdir, cfg, merged, tokenizer=tokenizer)
    return merged
