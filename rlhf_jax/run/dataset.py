"""A researcher's dataset for a driver: the `--dataset` / `--columns` / `--truncation` flags, read,
checked and tokenized with the model's own tokenizer at the door, before anything is written.

    @dataclasses.dataclass(frozen=True)
    class Config(cli.DistributedFlags, cli.MemoryFlags, cli.LoraFlags, dataset.DataFlags): ...

    start = cli.prepare_init(config, ..., task_data=not config.dataset)
    rows = dataset.load(config, start.tokenizer, kinds=("preference",), max_length=...)

The formats are TRL's (`data.formats`); what a row becomes and how truncation is counted is
`data.encode`. The report (rows, type, what was truncated and where) is printed, and nothing is
cut silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal

from rlhf_jax.data import encode, formats
from rlhf_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class DataFlags:
    """The flags of the drivers that train on a researcher's own dataset (docs/your_data.md)."""

    dataset: str | None = None  # .jsonl / .parquet / tfds:NAME[:SPLIT] in TRL's formats
    columns: str = ""  # rename to TRL's names, TRL=YOURS: prompt=question,completion=answer
    truncation: Literal["left", "right", "error"] = "left"  # over-long prompts lose start / end


def load(
    config: Any,
    tokenizer: Any,
    *,
    kinds: Sequence[str],
    max_length: int,
    max_prompt_length: int | None = None,
    assistant_only: bool = False,
    flag: str = "--dataset",
    path: str | None = None,
) -> list[dict[str, Any]]:
    """The token rows of `config.dataset` (or `path`) for a driver, with a printed report.

    Raises:
      ConfigError: one line naming `flag` and the file, line and field: a dataset of another type
        than `kinds`, a missing column, a conversational dataset and no chat template (or one
        that fails), a row over its length with --truncation error, a tokenizer missing.
    """
    path = path or config.dataset
    if tokenizer is None:
        raise ConfigError(
            f"{flag} {path}: no tokenizer to read it with; --init-from a model folder with its "
            "tokenizer (tokenizer.json)"
        )
    try:
        ds = formats.load_dataset(path, columns=config.columns, kinds=kinds)
        rows, cut = encode.encode_dataset(
            ds,
            tokenizer,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation=config.truncation,
            assistant_only=assistant_only,
        )
    except ValueError as e:  # formats' and encode's errors name the file, line and field
        message = str(e)
        if not message.startswith(str(path)):
            message = f"{path}: {message}"
        raise ConfigError(f"{flag} {message}") from None
    form = "conversational" if ds.conversational else "text"
    print(f"{flag} {path}: {len(rows)} {ds.kind.replace('_', '-')} rows ({form}); {cut.report()}")
    return rows
