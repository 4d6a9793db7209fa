"""Checks at the door: every range, choice and file of a driver's config, before anything is
written or sampled.

    validate(config, {"digits": (lambda d: 1 <= d <= 6, "in [1, 6]")}, files=("pairs",))

A field's rule is the driver's own (`rules`), else its exact name in `RANGES`, else a name suffix
in `SUFFIX_RANGES`; the hyperparameters a step reads from its state (beta, label smoothing, the KL
coefficient, unlikelihood's alpha) take their ranges from `train.state.HPARAM_RANGES`, the one
table the library checks them by. Errors are `ConfigError`s naming the flag and what it accepts.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rlhf_jax import paths
from rlhf_jax.errors import ConfigError
from rlhf_jax.train.state import HPARAM_RANGES

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
